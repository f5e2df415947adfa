"""The report page: what was run, the paper's claims at a glance, and the paper's figures.

write_report(result) draws figures.py's figures of an analysis (analysis.analyze's result),
saves each as a PNG beside the scores, and writes one self-contained, offline report.html:
what was run and on what (from the runs' config.json and the sweep's sweep.json), a link to
the paper, the claims table (from claims.json, when the family's claims were checked: one
row a claim, the paper's sentence, the verdict and the one or two checks that decide it, the
other checks one click away), a table of contents, and the figures in the paper's order
(co-occurrence, co-perturbation, ablation, mechanism), each captioned with what to look for
and where the paper shows the same.
"""
from __future__ import annotations

import base64
import datetime
import hashlib
import html
import io
import json
import os
import re
import sys

import numpy as np

from icl_jax import analysis, attention_view, workdir as workdir_lib
from icl_jax.configs.sweeps.paper_small import FAMILY
from icl_jax.figures import (plot_ablation, plot_attention, plot_composition,  # noqa: F401
                             plot_copying_vs_prefix, plot_coperturbation, plot_family,
                             plot_head_scores, plot_icl, plot_llc, plot_loss,
                             plot_loss_heatmap, plot_pca, pivot_label, pyplot,
                             strongest_prefix_matching_head)

PAPER = ("Olsson et al. (2022), “In-context Learning and Induction Heads”",
         "https://arxiv.org/abs/2209.11895")

# The sentence each claim rests on, where claims.json carries none (claims.json written
# before it held "quote"): the paper's own words, as docs/paper-notes quote them.
CLAIM_QUOTES = {
    "1": "Transformer language models undergo a “phase change” early in training, during "
         "which induction heads form and simultaneously in-context learning improves "
         "dramatically.",
    "2": "(1) a one-layer smeared-key model experiences the phase change ... (2) the "
         "two-layer smeared-key model experiences a phase change earlier than a baseline "
         "model.",
    "3": "almost all the in-context learning in small attention-only models appears to come "
         "from these induction heads! This begins at the start of the phase change, and "
         "remains true through the end of training.",
    "4": "For small models, we can explain mechanistically how induction heads work, and can "
         "show they contribute to in-context learning.",
}

# The paper's four arguments as this report's sections, in the paper's order.
SECTIONS = (
    ("co-occurrence", "1. Co-occurrence", "Argument 1",
     "In one window of training the in-context learning score falls abruptly, induction "
     "heads form, the loss curve bumps and the per-token-loss trajectory pivots; a "
     "one-layer model shows none of it."),
    ("co-perturbation", "2. Co-perturbation", "Argument 2",
     "Smeared keys let a single layer form induction heads: a one-layer smeared-key model "
     "should have the phase change, and a two-layer one should have it earlier than the "
     "vanilla model."),
    ("ablation", "3. Ablation", "Argument 3",
     "Knocking out one head at a time (attention patterns frozen): the induction heads "
     "should carry almost all of the in-context learning from the start of the phase "
     "change to the end of training."),
    ("mechanism", "4. Mechanism", "Argument 5",
     "In the weights: an induction head in a later layer reads, through K-composition, a "
     "previous-token head in an earlier layer, and copies what it attends to (a positive "
     "OV eigenvalue score)."),
)


# ----------------------------------------------------------------------------- inputs

def _read_json(path):
    try:
        return json.loads(workdir_lib.path(path).read_text())
    except (OSError, ValueError):
        return None


def load_claims(out, run_names) -> dict | None:
    """claims.json in `out` (claims.write_results's), if its members are these runs."""
    saved = _read_json(os.path.join(str(out), "claims.json"))
    if not saved or "claims" not in saved:
        return None
    members = {r.get("model") for r in saved.get("rows", []) if isinstance(r, dict)}
    members.discard(None)
    return saved if not members or members == set(run_names) else None


def load_sweep(out, workdirs) -> dict | None:
    """The sweep.json that trained these runs: in `out` or its parent (sweep --analyze)."""
    for folder in (str(out), os.path.dirname(os.path.normpath(str(out)))):
        saved = _read_json(os.path.join(folder, "sweep.json"))
        # sweep.json keeps each member's workdir as given (relative to where it ran),
        # scores.json the absolute one
        if saved and any(os.path.normpath(workdir_lib.absolute(m["workdir"])) in workdirs
                         for m in saved.get("members", {}).values() if m.get("workdir")):
            return saved
    return None


def _per_run(result, read, missing) -> dict:
    """read(workdir) for each run, missing() where its folder is gone or unreadable (a
    report drawn from scores.json alone)."""
    out = {}
    for name, run in result["runs"].items():
        try:
            out[name] = read(run["workdir"])
        except (OSError, ValueError, KeyError):
            out[name] = missing()
    return out


def _configs(result) -> dict:
    return _per_run(result, workdir_lib.read_config_dict, lambda: None)


def _metrics(result) -> dict:
    return _per_run(result, workdir_lib.read_metrics, list)


# ----------------------------------------------------------------------------- html pieces

def _e(text) -> str:
    return html.escape(str(text))


def fmt(v) -> str:
    """A check's value or threshold as the table shows it."""
    if v is None:
        return "–"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(fmt(x) for x in v) + "]"
    if isinstance(v, float):
        if not np.isfinite(v):
            return "–"
        return f"{v:,.0f}" if abs(v) >= 1000 and float(v).is_integer() else f"{v:.3g}"
    return str(v)


def _inline(t):
    t = html.escape(t)
    while t.count("**") >= 2:
        t = t.replace("**", "<b>", 1).replace("**", "</b>", 1)
    return t.replace("`", "")


def markdown_html(markdown: str) -> str:
    """The little markdown results.md uses (headings, tables, bullets, **bold**) as HTML."""
    out, rows = [], []
    for line in markdown.splitlines() + [""]:
        if line.startswith("|"):
            if not set(line) <= set("|- "):
                rows.append([c.strip() for c in line.strip("|").split("|")])
            continue
        if rows:
            cell = lambda tag, c: f"<{tag}>{_inline(c)}</{tag}>"  # noqa: E731
            out.append("<table>" + "".join(
                "<tr>" + "".join(cell("th" if i == 0 else "td", c) for c in r) + "</tr>"
                for i, r in enumerate(rows)) + "</table>")
            rows = []
        if line.startswith("#"):
            level = len(line) - len(line.lstrip("#"))
            out.append(f"<h{level + 2}>{_inline(line.lstrip('#').strip())}</h{level + 2}>")
        elif line.startswith("- "):
            out.append(f"<li>{_inline(line[2:])}</li>")
        elif line.strip():
            out.append(f"<p>{_inline(line)}</p>")
    return "".join(out)


def table(rows: list[dict], cls: str = "") -> str:
    """Rows of {column: value} as an HTML table (columns: the first row's keys, in order)."""
    if not rows:
        return ""
    cols = list(rows[0])
    head = "".join(f"<th>{_e(c)}</th>" for c in cols)
    body = "".join("<tr>" + "".join(f"<td>{_e(fmt(r.get(c)))}</td>" for c in cols) + "</tr>"
                   for r in rows)
    return f"<table class='{cls}'><tr>{head}</tr>{body}</table>"


def _generic_table(obj) -> str:
    """A list of dicts or a dict of dicts (claims.json's robustness, whatever its shape) as a
    table; anything else as preformatted JSON."""
    if isinstance(obj, dict) and obj and all(isinstance(v, dict) for v in obj.values()):
        obj = [{"": k, **v} for k, v in obj.items()]
    if isinstance(obj, list) and obj and all(isinstance(r, dict) for r in obj):
        cols = list(dict.fromkeys(k for r in obj for k in r))
        return table([{c: _flat(r.get(c)) for c in cols} for r in obj], "wide")
    return f"<pre>{_e(json.dumps(obj, indent=1))}</pre>"


def _flat(v):
    if isinstance(v, dict):
        return "; ".join(f"{k}: {fmt(x) if not isinstance(x, dict) else _flat(x)}"
                         for k, x in v.items())
    if isinstance(v, list) and v and isinstance(v[0], (dict, list)):
        return "; ".join(str(_flat(x)) for x in v)
    return v


VERDICT_CLASS = {"supported": "ok", "not supported": "no", "inconclusive": "maybe"}


def _verdict(v) -> str:
    return f"<span class='verdict {VERDICT_CLASS.get(v, 'maybe')}'>{_e(v)}</span>"


def _status(s) -> str:
    return f"<span class='status {_e(s)}'>{_e(s)}</span>"


# ----------------------------------------------------------------------------- claims

def claim_number(claim: dict) -> str:
    return str(claim.get("claim", "")).split(".")[0].strip()


def deciding_checks(claim: dict) -> list[int]:
    """Indices of the one or two checks that decide a claim: claims.json's "decisive" where
    it gives them, else the failing checks, else the unmeasurable ones, else the first two
    that count (checks "shown" beside a verdict never decide it)."""
    checks = claim.get("checks", [])
    given = [i for i in claim.get("decisive") or [] if isinstance(i, int)
             and 0 <= i < len(checks)]
    if given:
        return given[:2]
    counted = [i for i, c in enumerate(checks) if c.get("status") != "shown"]
    for status in ("fail", "unmeasurable"):
        hit = [i for i in counted if checks[i].get("status") == status]
        if hit:
            return hit[:2]
    return counted[:2]


def _check_line(c: dict) -> str:
    return (f"<div class='check'><b>{_e(c.get('member', ''))}</b>: {_e(c.get('check', ''))} "
            f"<span class='num'>{_e(fmt(c.get('value')))}</span> vs "
            f"<span class='num'>{_e(fmt(c.get('threshold')))}</span> "
            f"{_status(c.get('status', ''))}"
            + (f"<div class='note'>{_e(c['note'])}</div>" if c.get("note") else "") + "</div>")


def claims_html(claims: dict) -> str:
    """The claims table (claim, the paper's sentence, verdict, deciding checks), then each
    claim's every check in a collapsed <details>, then the robustness table if any."""
    rows, details = [], []
    for claim in claims["claims"]:
        n = claim_number(claim)
        checks = claim.get("checks", [])
        quote = claim.get("quote") or CLAIM_QUOTES.get(n, "")
        decide = deciding_checks(claim)
        section = next((a for a, h, _, _ in SECTIONS if h.split(".")[0] == n), None)
        where = claim.get("argument") or next(
            (arg for a, _, arg, _ in SECTIONS if a == section), "")
        rows.append(
            f"<tr id='claim-{_e(n)}'><td class='claim'>{_e(claim.get('claim', ''))}"
            + (f"<div class='small'><a href='#{section}'>the paper's {_e(where)}: "
               "figures</a></div>" if section else "") + "</td>"
            f"<td class='quote'>“{_e(quote)}”</td><td>{_verdict(claim.get('verdict'))}</td>"
            f"<td>{''.join(_check_line(checks[i]) for i in decide)}"
            f"<a class='more' href='#checks-{_e(n)}'>all {len(checks)} checks</a></td></tr>")
        has_basis = any(c.get("basis") or c.get("ours") for c in checks)
        body = "".join(
            f"<tr class='{'decides' if i in decide else ''}'><td>{_e(c.get('member', ''))}</td>"
            f"<td>{_e(c.get('check', ''))}</td><td class='num'>{_e(fmt(c.get('value')))}</td>"
            f"<td class='num'>{_e(fmt(c.get('threshold')))}</td><td>{_status(c.get('status'))}</td>"
            f"<td>{_e(c.get('note') or '')}</td>"
            + (f"<td>{_e(c.get('basis') or '')}</td><td>{_e(c.get('ours') or '')}</td>"
               if has_basis else "") + "</tr>"
            for i, c in enumerate(checks))
        head = ("<tr><th>member</th><th>check</th><th>value</th><th>threshold</th>"
                "<th>status</th><th>note</th>"
                + ("<th>the paper's sentence it operationalizes</th><th>why our threshold</th>"
                   if has_basis else "") + "</tr>")
        details.append(
            f"<details id='checks-{_e(n)}'><summary>{_e(claim.get('claim', ''))}: "
            f"{_e(claim.get('verdict', ''))}: all {len(checks)} checks "
            f"({sum(c.get('status') == 'fail' for c in checks)} failing; highlighted: the "
            f"ones that decide it)</summary><table class='wide'>{head}{body}</table></details>")
    out = ("<table id='claims-table' class='claims'><tr><th>claim</th><th>the paper's sentence"
           "</th><th>verdict</th><th>what decides it (value vs threshold)</th></tr>"
           + "".join(rows) + "</table>"
           "<p class='small'>A claim is not supported when a check fails, inconclusive when "
           "one cannot be measured, supported when every check passes; checks marked "
           "<i>shown</i> are reported beside the verdict without counting. Every check, with "
           "the sentence of the paper it rests on where claims.json gives it:</p>"
           + "".join(details))
    if isinstance(claims.get("thresholds"), dict) and claims["thresholds"]:
        ours = claims.get("ours") or {}
        out += ("<details id='thresholds'><summary>The thresholds, and why ours where the "
                "paper gives no number</summary>" + table(
                    [{"threshold": k, "value": v, "why": ours.get(k, "")}
                     for k, v in claims["thresholds"].items()], "wide") + "</details>")
    if claims.get("robustness"):
        out += "<h3 id='robustness'>Across seeds</h3>" + robustness_html(claims["robustness"])
    return out


VERDICTS = ("supported", "not supported", "inconclusive", "not run")


def robustness_html(rob) -> str:
    """claims.robustness's {"claims": {claim: {verdict: [seeds]}}, "seeds": {seed: {claim:
    {"verdict", "why"}} or {"error"}}} as two tables: per claim the seeds of each verdict,
    per seed each claim's verdict and what decided it short of supported. Any other shape
    as a plain table."""
    if not (isinstance(rob, dict) and isinstance(rob.get("claims"), dict)
            and isinstance(rob.get("seeds"), dict)):
        return _generic_table(rob)
    titles = list(rob["claims"])
    rows = "".join(
        f"<tr><td class='claim'>{_e(t)}</td>" + "".join(
            f"<td>{len(by.get(v) or [])}" + (f" <span class='small'>(seeds "
                                              f"{_e(', '.join(map(str, by[v])))})</span>"
                                              if by.get(v) else "") + "</td>"
            for v in VERDICTS) + "</tr>"
        for t, by in rob["claims"].items())
    per_claim = ("<table class='robust'><tr><th>claim</th>"
                 + "".join(f"<th>{_e(v)}</th>" for v in VERDICTS) + f"</tr>{rows}</table>")
    seeds = []
    for seed, entry in rob["seeds"].items():
        if "error" in entry:
            seeds.append(f"<tr><td>{_e(seed)}</td>" + "<td>–</td>" * len(titles)
                         + f"<td>not run: {_e(entry['error'])}</td></tr>")
            continue
        why = "; ".join(f"{t.split('.')[0]}: {w}" for t in titles
                        for w in (entry.get(t) or {}).get("why") or [])
        seeds.append(f"<tr><td>{_e(seed)}</td>" + "".join(
            f"<td>{_verdict((entry.get(t) or {}).get('verdict', '–'))}</td>" for t in titles)
            + f"<td class='small'>{_e(why or '–')}</td></tr>")
    per_seed = ("<table class='robust'><tr><th>seed</th>"
                + "".join(f"<th>{_e(t)}</th>" for t in titles)
                + "<th>what decided a verdict short of supported</th></tr>"
                + "".join(seeds) + "</table>")
    return per_claim + per_seed


# ----------------------------------------------------------------------------- what was run

def _profile(sweep: dict | None) -> str | None:
    if not sweep or not sweep.get("sweep"):
        return None
    return os.path.splitext(os.path.basename(sweep["sweep"]))[0]


def _data_text(c: dict) -> str:
    d, m = c.get("data", {}), c.get("model", {})
    if d.get("name") == "synthetic":
        return (f"synthetic ({d.get('background')} background; {d.get('segments_min')}-"
                f"{d.get('segments_max')} segments of {d.get('segment_len_min')}-"
                f"{d.get('segment_len_max')} tokens repeated later in the context), "
                f"vocabulary {m.get('vocab_size')}")
    return f"{d.get('name')} ({d.get('tokenizer', '')} tokens), vocabulary {m.get('vocab_size')}"


def setup_html(result, configs: dict, sweep: dict | None) -> str:
    """What was run and on what: profile, data, model sizes, steps, seeds, device, time."""
    import jax
    cs = {n: c for n, c in configs.items() if c}
    profile = _profile(sweep)
    items = []
    if profile:
        from icl_jax.configs.sweeps import PROFILES
        others = [p for p in PROFILES if p != profile]
        items.append(("profile", f"{profile} ({sweep['sweep']})"
                      + (f"; not run here: the {', '.join(others)} profiles"
                         if profile in PROFILES else "")))
    else:
        items.append(("runs", ", ".join(f"{n} ({r['workdir']})"
                                         for n, r in result["runs"].items())))
    datas = sorted({_data_text(c) for c in cs.values()})
    items.append(("data", "; ".join(datas) or "–"))
    seeds = sorted({c.get("seed") for c in cs.values()}, key=str)
    items.append(("seeds", ", ".join(map(str, seeds)) or "–"))
    trains = sorted({(c["train"]["steps"], c["train"]["batch_size"], c["model"]["context"],
                      c["train"].get("lr"), c["train"].get("schedule")) for c in cs.values()})
    items.append(("training", "; ".join(
        f"{s:,} steps of {b} sequences of {t} tokens ({s * b * t / 1e6:.1f}M tokens), "
        f"lr {lr}, {sch} schedule" for s, b, t, lr, sch in trains) or "; ".join(sorted({
            f"{int(r['steps'][-1]):,} steps ({float(r['tokens'][-1]) / 1e6:.1f}M tokens)"
            for r in result["runs"].values()}))))  # no config.json at hand: the scores' own
    devices = jax.devices()
    items.append(("device", f"{len(devices)} × {devices[0].device_kind} "
                  f"({devices[0].platform}), where this report was made; `icl-jax reproduce` "
                  "trains and analyses in the same process"))
    if sweep:
        walls = {n: m.get("wall_s") for n, m in sweep.get("members", {}).items()
                 if n in result["runs"] and m.get("wall_s")}
        if walls:
            items.append(("training time", f"{sum(walls.values()) / 60:.1f} minutes in all ("
                          + ", ".join(f"{n} {w / 60:.1f}" for n, w in walls.items()) + ")"))
    items.append(("report written", datetime.datetime.now().isoformat(timespec="minutes")))
    models = []
    for name, run in result["runs"].items():
        c = cs.get(name)
        pm = np.asarray(run["prefix_matching"])
        # the run's config.json, else what scores.json keeps of the model (a run folder
        # that is not at hand: an analysis copied from a bucket)
        m = (c or {}).get("model") or run.get("model") or {}
        models.append({"member": name, "layers": pm.shape[1], "heads": pm.shape[2],
                       "d_model": m.get("d_model"),
                       "d_head": m.get("d_head") or (m["d_model"] // m["n_heads"] if m else None),
                       "context": m.get("context"), "MLP": m.get("mlp"),
                       "smeared keys": m.get("smear_keys"), "positions": m.get("positions"),
                       "steps": int(run["steps"][-1]), "snapshots": len(run["steps"])})
    sizes = sorted({(r["layers"], r["heads"], r["d_model"], r["context"]) for r in models})
    kinds = [f"{r['member']}: " + " and ".join(
        k for k, on in (("MLPs", r["MLP"]), ("smeared keys", r["smeared keys"])) if on)
        for r in models if r["MLP"] or r["smeared keys"]]
    items.insert(1, ("models", "; ".join(
        f"{L} layer{'s' if L > 1 else ''} × {H} heads" for L in sorted({x[0] for x in sizes})
        for H in sorted({x[1] for x in sizes if x[0] == L}))
        + f", d_model {', '.join(sorted({str(x[2]) for x in sizes}))}, context "
          f"{', '.join(sorted({str(x[3]) for x in sizes}))}; attention only"
        + (f" except {'; '.join(kinds)}" if kinds else "")))
    dl = "".join(f"<dt>{_e(k)}</dt><dd>{_e(v)}</dd>" for k, v in items)
    return (f"<dl class='setup'>{dl}</dl><details><summary>Every member's model and run"
            f"</summary>{table(models, 'models')}</details>")


# ----------------------------------------------------------------------------- figures

MANIFEST = "figures.json"  # in the analysis folder: what its PNGs were drawn from


class Figures:
    """The figures of one page: each saved as a PNG in the analysis folder and kept (bytes)
    for embedding, numbered in the order they are shown.

    inputs: a digest of everything the page's figures follow from (inputs_digest). Where
    the folder's figures.json says its PNGs were drawn from the same inputs and a PNG's
    bytes still hash as recorded, that PNG is read back instead of drawn again (drawing is
    most of a report's time: a second `reproduce` of the quick family drew its 44 figures
    again in 25 of its 33 s). A figure made elsewhere (a Figure, not a function) is always
    saved."""

    def __init__(self, out, inputs: str | None = None):
        self.out, self.count, self.subs = out, 0, 0
        self.index = []  # (anchor, title) of the figures shown, for the table of contents
        self.inputs, self.files = inputs, {}  # rel -> sha256 of the PNG saved now
        self.before = {}
        if inputs is not None:
            try:
                saved = json.loads(workdir_lib.path(os.path.join(out, MANIFEST)).read_text())
                if saved.get("inputs") == inputs:
                    self.before = dict(saved["files"])
            except (OSError, ValueError, KeyError, TypeError, AttributeError):
                pass  # none, torn or foreign: every figure drawn

    def png(self, make, rel: str) -> bytes | None:
        """The PNG at out/rel: read back where drawn from the same inputs, else make()
        (a function returning a matplotlib Figure, or None where the figure does not
        apply) saved there; or a Figure, saved there."""
        path = os.path.join(self.out, rel)
        if callable(make) and rel in self.before:
            try:
                data = workdir_lib.path(path).read_bytes()
            except OSError:
                data = None
            if data is not None and hashlib.sha256(data).hexdigest() == self.before[rel]:
                self.files[rel] = self.before[rel]
                return data
        fig = make() if callable(make) else make
        if fig is None:
            return None
        data = save_figure(fig, path)
        if callable(make):
            self.files[rel] = hashlib.sha256(data).hexdigest()
        return data

    def add(self, make, rel: str, title: str, look: str, paper: str, extra: str = "",
            sub: bool = False) -> str:
        """Saves the figure (`make`, as for png) at out/rel and returns its <figure> with a
        caption: the title, what to look for, and where the paper has the same figure; ""
        where make() gives no figure. sub: numbered under the figure before it (3.1, 3.2:
        the same figure of other members, collapsed)."""
        data = self.png(make, rel)
        if data is None:
            return ""
        if sub:
            self.subs += 1
            number = f"{self.count}.{self.subs}"
        else:
            self.count, self.subs = self.count + 1, 0
            number = str(self.count)
        anchor = "fig-" + rel.replace("/", "-").replace(".png", "")
        if not sub:
            self.index.append((anchor, f"Figure {number}. {title}"))
        b64 = base64.b64encode(data).decode()
        return (f"<figure id='{_e(anchor)}'><img src='data:image/png;base64,{b64}' "
                f"alt='{_e(title)}'><figcaption><b>Figure {number}. {_e(title)}.</b> "
                f"<span class='look'>What to look for:</span> {_e(look)}{extra} "
                f"<span class='paper'>In the paper: {_e(paper)}</span> "
                f"<span class='file'>({_e(rel)})</span></figcaption></figure>")

    def save_manifest(self):
        """Records what the PNGs drawn from functions were drawn from (after they are all
        written: a report killed before this leaves the old record, whose hashes the PNGs
        written since no longer match)."""
        if self.inputs is not None:
            workdir_lib.write_text(os.path.join(self.out, MANIFEST), json.dumps(
                {"inputs": self.inputs, "files": self.files}, indent=1, sort_keys=True))


def inputs_digest(result, claims, configs, metrics) -> str:
    """A digest of what a report's figures are drawn from: every run's scores (each keyed on
    its snapshots, config and scoring code), the shared PCA, the claims, configs and
    metrics, and the drawing code (the package's source) and matplotlib's version."""
    import matplotlib
    what = json.dumps({"runs": result["runs"], "pca": result["pca"], "claims": claims,
                       "configs": configs, "metrics": metrics,
                       "last": {n: s.step for n, s in result.get("last", {}).items()},
                       "code": analysis.code_digest(), "matplotlib": matplotlib.__version__},
                      sort_keys=True, default=lambda o: np.asarray(o).tolist())
    return hashlib.sha256(what.encode()).hexdigest()


def save_figure(fig, path) -> bytes:
    """The figure as a PNG at `path` (a local path or a bucket's URL); returns its bytes."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90)
    pyplot().close(fig)
    workdir_lib.write_bytes(path, buf.getvalue())
    return buf.getvalue()


def _lead(runs) -> str:
    """The member a section shows first: 2l, else the first with 2+ layers, else the first."""
    if "2l" in runs:
        return "2l"
    multi = [n for n, r in runs.items() if np.asarray(r["prefix_matching"]).shape[1] > 1]
    return (multi or list(runs))[0]


def _per_member(runs, lead, make, title):
    """The lead member's figure shown, the others' one click away. make(name, sub) returns
    a member's <figure> ("" where the figure does not apply to it)."""
    shown = make(lead, False)
    rest = [(n, make(n, bool(shown))) for n in runs if n != lead]
    rest = [(n, h) for n, h in rest if h]
    if not rest:
        return shown
    return (shown + f"<details class='more-figs'><summary>{_e(title)} of "
            f"{', '.join(n for n, _ in rest)}</summary>{''.join(h for _, h in rest)}</details>")


def pca_measures(pca: dict) -> list[str]:
    """Per trajectory, what the analysis measured of it at its phase change: the pivot's
    verdict and note (stats.pca_pivot), or, from an analysis that predates it, its scalar
    measures but the turn angle (an angle the jitter of a plateau makes as well)."""
    out = []
    for name, traj in pca.get("trajectories", {}).items():
        p = traj.get("pivot")
        if isinstance(p, dict):
            out.append(f"{name}: {pivot_label(traj)}" + (f" ({p['note']})" if p.get("note")
                                                         else ""))
            continue
        kv = [f"{k.replace('_', ' ')} {fmt(v)}" for k, v in traj.items()
              if k not in ("steps", "points", "turn_deg", "pivot") and v is not None
              and not isinstance(v, (list, dict))]
        if kv:
            out.append(f"{name}: {', '.join(kv)}")
    return out


def untrained_sentence(result) -> str:
    """The untrained models' ICL scores, and the analysis's account of them where it gives
    one (a run's or the result's "untrained_icl_note")."""
    runs = result["runs"]
    firsts = [(n, r["icl_score"][0]) for n, r in runs.items()
              if int(r["steps"][0]) == 0 and r["icl_score"][0] is not None]
    notes = [r.get("untrained_icl_note") for r in runs.values()] + [
        result.get("untrained_icl_note")]
    # each run's note opens with its own score, which the sentence here gives for all of
    # them: the account after it, said once
    notes = [re.sub(r"^At step 0 \(untrained\) the ICL score is [-+]?[\d.]+:\s*", "", n)
             for n in notes if isinstance(n, str) and n.strip()]
    notes = list(dict.fromkeys(n[:1].upper() + n[1:] for n in notes))
    text = ""
    if firsts:
        text = (" At step 0 (untrained) the ICL score is "
                + ", ".join(f"{v:+.2f} ({n})" for n, v in firsts)
                + ": an untrained model's score is not the paper's “before”, which is the "
                  "trained model just before the window.")
    return text + "".join(" " + n for n in notes)


def write_report(result, preamble: str = "", figures=(), progress: bool = True,
                 claims: dict | None = None) -> str:
    """Every figure of an analysis (analysis.analyze's result) as a PNG, and report.html.

    claims: claims.json's content (claims.write_results); read from result["out"] when not
    given, and left out when that holds other members. preamble: markdown shown collapsed at
    the end (reproduce's results.md), or at the top when there are no claims. figures: extra
    (title, file name, matplotlib Figure), shown in the appendix; one whose file name the
    report draws itself (family.png) is replaced by the report's. One run: its figures go to
    out; several: to out/<run name>/. Returns the page's path.
    """
    out, runs = result["out"], result["runs"]
    single = len(runs) == 1
    claims = claims if claims is not None else load_claims(out, list(runs))
    sweep = load_sweep(out, {os.path.normpath(workdir_lib.absolute(r["workdir"]))
                             for r in runs.values()})
    configs, metrics = _configs(result), _metrics(result)
    lead = _lead(runs)
    F = Figures(out, inputs_digest(result, claims, configs, metrics))
    untrained = _e(untrained_sentence(result))

    def each(fname, plot, title, look, paper, extra=""):
        """A figure of every member: the lead's shown, the others' one click away."""
        def make(name, sub):
            return F.add(lambda: plot(runs[name]), ("" if single else name + "/") + fname
                         + ".png", f"{name}: {title}", look, paper, extra, sub)
        return _per_member(runs, lead, make, "The same figure")

    # --- 1. co-occurrence
    s = []
    if not single:
        s.append(F.add(lambda: plot_family(result), "family.png",
                       "ICL score and the induction heads' prefix matching of every model",
                       "in each model with two or more layers, the ICL score falls in a window "
                       "(shaded) in which its induction heads' prefix matching rises from near "
                       "0 to near 1; the one-layer model's does neither.",
                       "the paper's figure of in-context learning score and induction-head "
                       "formation against training tokens for its small models (Argument 1).",
                       untrained))
    s.append(F.add(lambda: plot_loss(result, metrics), "loss.png",
                   "Training and held-out loss, and the held-out loss's rate of fall",
                   "a bump: the held-out loss falls faster in the phase change (shaded) than "
                   "just before it, a peak of the lower curve; a one-layer model shows no such "
                   "peak over the two-layer window (dashed), and the two models' losses part "
                   "there.", "the paper's loss curves of its one- and two-layer models, where "
                   "the two-layer curve bumps and diverges from the one-layer one, and their "
                   "derivative (Argument 1)."))
    s.append(each("icl", plot_icl, "ICL score and every head's prefix matching",
                  "the ICL score's abrupt fall and the induction heads (bold) rising in the "
                  "same window (shaded).", "the paper's plots of the ICL score and the "
                  "prefix-matching heads across training (Argument 1).", untrained))
    s.append(each("loss_heatmap", plot_loss_heatmap, "loss by context index over training",
                  "after the phase change (dashed edges) the loss keeps falling at late "
                  "context indices (blue in the derivative, upper right); before it, late "
                  "tokens are predicted barely better than early ones.", "the paper's heatmap "
                  "of per-token loss, and its derivative with respect to the log of the token "
                  "index, over training (where it defines the in-context learning score)."))
    if result["pca"]["trajectories"]:
        measures = pca_measures(result["pca"])
        s.append(F.add(lambda: plot_pca(result["pca"], runs), "pca.png",
                       "Per-token loss PCA: every model's trajectory",
                       "the multi-layer models' trajectories change direction (pivot) in "
                       "their phase change (thick, from ○ to □); the one-layer model's does "
                       "not. The legend gives the analysis's verdict: two chords of equal "
                       "length in steps (dashed), before and after the fall's onset, must "
                       "both move more than the trajectory's own jitter and turn, or the "
                       "trajectory must set off from rest.",
                       "the paper's per-token-loss principal-component trajectories, which "
                       "it says “pivot” (Argument 1).",
                       _e(" From the analysis: " + "; ".join(measures) + ".") if measures
                       else ""))
    sections = {"co-occurrence": "".join(s)}

    # --- 2. co-perturbation
    sections["co-perturbation"] = (F.add(
        lambda: plot_coperturbation(result), "coperturbation.png",
        "Vanilla and smeared-key models' ICL score",
        "the one-layer smeared-key model has a phase change (the vanilla one has none), and "
        "the two-layer smeared-key model's comes before the vanilla two-layer model's.",
        "the paper's comparison of smeared-key and vanilla models (Argument 2).")
        or "<p>No vanilla and smeared-key pair among these runs.</p>")

    # --- 3. ablation
    sections["ablation"] = each(
        "ablation", plot_ablation, "each head's attribution to in-context learning",
        "from the start of the phase change on, the induction heads (bold, red bars) carry "
        "nearly all of it, the other heads little or less than nothing.",
        "the paper's per-head ablation attributions across training for its small "
        "attention-only models (Argument 3).")

    # --- 4. mechanism
    s = [each("composition", plot_composition, "Q-, K- and V-composition",
              "a dark cell in K-composition from a layer-0 previous-token head (row) into "
              "the induction heads (columns).", "the Framework paper's (Elhage et al. 2021) "
              "K-composition of a previous-token head into an induction head, on which "
              "Argument 5 of this paper rests."),
         each("head_scores", plot_head_scores,
              "previous-token attention and copying score of every head",
              "a layer-0 head that attends to the previous token (the induction heads' "
              "K-input), and induction heads (bold) with a positive copying score.",
              "the previous-token and copying properties of the paper's mechanistic account "
              "(Argument 5)."),
         each("copying_vs_prefix", plot_copying_vs_prefix,
              "every head's copying against its prefix matching",
              "the induction heads, top right: high prefix matching and a positive copying "
              "score (dashed: the thresholds).", "the paper defines induction heads by these "
              "two properties; it has no single figure of this scatter.")]
    last = result.get("last", {})

    def attention(run):
        if run["name"] not in last:
            return None
        snap = last[run["name"]]
        l, h = strongest_prefix_matching_head(run)
        return plot_attention(snap.probe_attention_LHTS[l, h],
                              f"{run['name']}: L{l}H{h} on a repeated random sequence, "
                              f"step {snap.step:,}")
    s.append(each("attention", attention, "the strongest prefix-matching head's attention",
                  "stripes one position past each earlier copy of the query's token: the head "
                  "attends to what followed that token last time.", "the paper's attention "
                  "patterns of induction heads on repeated random tokens."))
    if lead in last:
        snap = last[lead]
        tokens = np.asarray(snap.inputs["probe_BT"][0]).tolist()
        s.append("<div class='view'><p>The same sequence, every head of " + _e(lead)
                 + ": hover a token to see where the chosen head attends, click to pin it.</p>"
                 + attention_view.html(tokens, snap.probe_attention_LHTS,
                                       head=strongest_prefix_matching_head(runs[lead]),
                                       title=f"{lead}, step {snap.step:,}",
                                       view_id="attention-view") + "</div>")
    sections["mechanism"] = "".join(s)

    # --- appendix: the LLC, extra figures, per-member numbers, the phase-change rule
    appendix = []
    for name, run in runs.items():
        if run.get("llc") is not None:
            appendix.append(F.add(
                lambda run=run, name=name: plot_llc(
                    run["steps"], run["llc"], run["llc_std"], run["icl_score"],
                    run["phase_change"], f"{name}: local learning coefficient"),
                ("" if single else name + "/") + "llc.png",
                f"{name}: local learning coefficient",
                "a dip while the previous-token heads form and a rise while the induction "
                "heads do (Hoogland et al. 2024).", "not in Olsson et al.; Hoogland et al. "
                "2024, “The Developmental Landscape of In-Context Learning”."))
        if run.get("llc_heads") is not None:  # analyze --llc heads: every head's wrLLC
            from icl_jax import head_llc_plot
            appendix.append(F.add(
                lambda run=run, name=name: head_llc_plot.plot_head_llc(
                    run, f"{name}: every head's refined LLC"),
                ("" if single else name + "/") + "llc_heads.png",
                f"{name}: every head's weight-refined LLC",
                "the heads' curves grouped by K-means (colour), each head's role from its "
                "scores at the last snapshot beside it; the induction heads' curves change in "
                "the phase change (shaded).", "not in Olsson et al.; Wang et al. 2025, "
                "“Differentiation and Specialization of Attention Heads via the Refined Local "
                "Learning Coefficient”."))
    drawn = {"family.png", "loss.png", "pca.png", "coperturbation.png"}
    for title, fname, fig in figures:
        if fname in drawn:
            pyplot().close(fig)
            continue
        appendix.append(F.add(fig, fname, title, "see the title.", "–"))
    appendix.append("<details><summary>Per-member numbers</summary>"
                    + table(analysis.headline(result), "wide") + "</details>")
    appendix.append(
        "<details><summary>The phase-change rule</summary><p>icl_jax.analysis."
        "detect_phase_change: on a ln-step axis, the ICL score smoothed; the window is where "
        "-dICL/d ln step exceeds 30% of its peak; its drop must be at least max(0.1 nats, "
        "3 × the standard error of the change) and 40% of the score's fall around it, "
        "within a factor e of steps; not the early transient, a fall from the first rise's "
        "top back to the initial score.</p></details>")
    if preamble and claims:
        appendix.append("<details><summary>results.md, as written</summary>"
                        + markdown_html(preamble) + "</details>")

    page = _page(result, claims, sweep, configs, sections, appendix, F,
                 preamble if preamble and not claims else "")
    path = os.path.join(out, "report.html")
    workdir_lib.write_text(path, page)
    F.save_manifest()
    if progress:
        print(f"wrote {path}", file=sys.stderr, flush=True)
    return path


# a link to a collapsed <details> (a claim's checks) opens it
OPEN_TARGET = """
function openTarget() {
  var t = location.hash && document.getElementById(decodeURIComponent(location.hash.slice(1)));
  for (; t; t = t.parentElement) if (t.tagName === "DETAILS") t.open = true;
}
window.addEventListener("hashchange", openTarget);
openTarget();
"""

STYLE = """
body{font-family:system-ui,-apple-system,"Segoe UI",sans-serif;max-width:1180px;margin:1.5em auto;
 padding:0 1em;color:#1d1d1f;line-height:1.45}
h1{font-size:1.6em;margin-bottom:.2em} h2{border-bottom:1px solid #ddd;padding-bottom:.2em;
 margin-top:2em} .lede{color:#444;margin-top:0}
table{border-collapse:collapse;margin:.6em 0} td,th{border:1px solid #ccc;padding:4px 8px;
 font-size:90%;vertical-align:top;text-align:left} th{background:#f4f4f6}
table.claims td.quote{font-style:italic;max-width:26em} table.claims td.claim{font-weight:600;
 white-space:nowrap} .check{margin-bottom:.3em} .note{color:#555;font-size:90%}
.num{font-family:ui-monospace,monospace} .small{font-size:88%;color:#444}
.verdict{font-weight:700;padding:2px 8px;border-radius:10px;white-space:nowrap}
.verdict.ok{background:#d8f3dc;color:#1b5e20} .verdict.no{background:#fde2e1;color:#a4161a}
.verdict.maybe{background:#fff3c4;color:#7a5b00}
.status{font-size:85%;font-weight:600} .status.pass{color:#1b5e20} .status.fail{color:#a4161a}
.status.unmeasurable{color:#7a5b00} .status.shown{color:#555}
tr.decides td{background:#fffbe6}
details{margin:.4em 0} summary{cursor:pointer;color:#1f5fbf}
dl.setup{display:grid;grid-template-columns:max-content 1fr;gap:2px 14px}
dl.setup dt{font-weight:600} dl.setup dd{margin:0}
nav.toc{background:#f7f7f9;border:1px solid #e2e2e6;padding:.5em 1.2em;font-size:92%}
nav.toc ul{margin:.2em 0;padding-left:1.3em;list-style:none}
figure{margin:1.2em 0} figure img{max-width:100%;height:auto;display:block}
figcaption{font-size:90%;color:#333;max-width:60em} .look{font-weight:600}
.paper{color:#555;font-style:italic} .file{color:#888;font-size:85%}
.view{margin:1em 0}
"""


def _page(result, claims, sweep, configs, sections, appendix, F, preamble) -> str:
    title, url = PAPER
    runs = result["runs"]
    by_number = {claim_number(c): c for c in (claims or {}).get("claims", [])}
    if claims:
        claims_part = claims_html(claims)
    else:
        missing = [n for n in FAMILY if n not in runs]
        claims_part = ("<p>The paper's claims were not checked for these runs: the checks "
                       "need the family (" + ", ".join(FAMILY) + ")"
                       + (f"; missing here: {', '.join(missing)}" if missing else "")
                       + ". <code>icl-jax reproduce</code> trains it and checks them.</p>"
                       + markdown_html(preamble))
    toc = ["<li><a href='#setup'>What was run</a></li>",
           "<li><a href='#claims'>The paper's claims</a></li>"]
    body = []
    for anchor, heading, argument, text in SECTIONS:
        n = heading.split(".")[0]
        claim = by_number.get(n)
        verdict = (f" {_verdict(claim.get('verdict'))} <a href='#checks-{n}'>its checks</a>"
                   if claim else "")
        figs = [a for a in F.index if f"id='{a[0]}'" in sections[anchor]]
        toc.append(f"<li><a href='#{anchor}'>{_e(heading)}</a>"
                   + ("<ul>" + "".join(f"<li><a href='#{a}'>{_e(t)}</a></li>" for a, t in figs)
                      + "</ul>" if figs else "") + "</li>")
        body.append(f"<section id='{anchor}'><h2>{_e(heading)} <span class='small'>"
                    f"(the paper's {argument})</span></h2><p>{_e(text)}{verdict}</p>"
                    f"{sections[anchor]}</section>")
    toc.append("<li><a href='#appendix'>Appendix</a></li>")
    return (
        "<!doctype html><html lang='en'><head><meta charset='utf-8'>"
        "<meta name='viewport' content='width=device-width, initial-scale=1'>"
        "<link rel='icon' href='data:,'>"
        f"<title>icl_jax: in-context learning and induction heads</title><style>{STYLE}</style>"
        "</head><body>"
        "<h1>In-context learning and induction heads: a reproduction</h1>"
        f"<p class='lede'>What {_e(title)} (<a href='{url}'>arXiv:2209.11895</a>) claims "
        "about small transformers, checked on models trained with icl_jax. Every number on "
        "this page is computed from the runs named below; nothing here needs a network.</p>"
        f"<section id='setup'><h2>What was run</h2>{setup_html(result, configs, sweep)}</section>"
        f"<section id='claims'><h2>The paper's claims</h2>{claims_part}</section>"
        f"<nav class='toc' id='contents'><b>Contents</b><ul>{''.join(toc)}</ul></nav>"
        + "".join(body)
        + f"<section id='appendix'><h2>Appendix</h2>{''.join(appendix)}</section>"
        f"<script>{OPEN_TARGET}</script></body></html>")


def write_robustness(out, text: str, reports: dict) -> str:
    """<out>/report.html for several seeds (reproduce.reproduce_seeds): the robustness over
    them (`text`: the markdown of results.md, its tables claims.robustness_markdown's), its
    verdicts coloured as in a seed's page, and a link to each seed's own report (`reports`:
    {seed: path relative to out}). Self-contained and offline, like write_report's page."""
    title, url = PAPER
    body = markdown_html(text)
    for v in VERDICTS[:3]:  # a verdict alone in a cell, as on a seed's page
        body = body.replace(f"<td>{_e(v)}</td>", f"<td>{_verdict(v)}</td>")
    links = "".join(f"<li><a href='{_e(p)}'>seed {_e(s)}</a>: its claims, checks and "
                    "figures</li>" for s, p in reports.items())
    page = ("<!doctype html><html lang='en'><head><meta charset='utf-8'>"
            "<meta name='viewport' content='width=device-width, initial-scale=1'>"
            "<link rel='icon' href='data:,'>"
            f"<title>icl_jax: the paper's claims over seeds</title><style>{STYLE}</style>"
            "</head><body><h1>In-context learning and induction heads: the claims over seeds"
            f"</h1><p class='lede'>How often each claim of {_e(title)} (<a href='{url}'>"
            "arXiv:2209.11895</a>) holds when the same family is trained from different "
            "seeds. Each seed's own page has every check and figure.</p>"
            f"<section id='robustness'>{body}</section>"
            f"<section id='seeds'><h2>Each seed's report</h2><ul>{links or '<li>none</li>'}"
            "</ul></section></body></html>")
    path = os.path.join(str(out), "report.html")
    workdir_lib.write_text(path, page)
    return path
