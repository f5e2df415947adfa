"""icl-jax reproduce: train the paper's small-model family, analyse it, and check the claims.

A profile is a sweep file, configs/sweeps/<profile>.py: the family (1l, 2l, 3l, 1l-smear,
2l-smear, 2l-mlp) on one base config. The sweep runner trains each member in
<workdir>/<name> (finished members are skipped, unfinished ones resume; sweep.json keeps
each one's training time); then all are analysed together (one shared PCA), the claims
checked (claims.py), and <workdir>/results.md, claims.json, family.png and report.html
say, from the numbers, whether each of the paper's four claims holds in this run.
"""
from __future__ import annotations

import os
import sys
import time

import jax

from icl_jax import analysis, claims, config as config_lib, head_llc, report, sweep, train
from icl_jax.config import ConfigError

CONFIGS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")
PROFILES = ("quick", "text", "text-cpu", "paper")


def sweep_file(profile: str) -> str:
    """configs/sweeps/<profile>.py; ConfigError for an unknown profile."""
    if profile not in PROFILES:
        raise ConfigError(f"unknown profile {profile!r}; choose one of {', '.join(PROFILES)}")
    return os.path.join(CONFIGS, "sweeps", f"{profile}.py")


def _overrides(seed: int, overrides: dict | None) -> dict:
    return {**{k: str(v) for k, v in (overrides or {}).items()}, "seed": str(seed)}


def member_configs(profile: str, seed: int = 0, overrides: dict | None = None) -> dict:
    """{member name: validated config} of a profile; raises ConfigError on a bad override."""
    members = sweep.resolve(sweep_file(profile), "", _overrides(seed, overrides))
    return {m.name: m.config for m in members}


# ----------------------------------------------------------------------------- README

README_START, README_END = "<!-- results:start -->", "<!-- results:end -->"


def update_readme(workdir: str, readme: str, figures_dir: str):
    """Copies results.md and three figures of a reproduction into the README's Results section."""
    import shutil
    os.makedirs(figures_dir, exist_ok=True)
    picks = {"family.png": "family.png", "pca.png": "pca.png",
             os.path.join("2l", "head_scores.png"): "2l_head_scores.png"}
    for src, dst in picks.items():
        shutil.copyfile(os.path.join(workdir, src), os.path.join(figures_dir, dst))
    with open(os.path.join(workdir, "results.md")) as f:
        results = f.read().split("\n", 1)[1].strip()  # without its title
    rel = os.path.relpath(figures_dir, os.path.dirname(os.path.abspath(readme)))
    body = "\n".join([
        README_START, "", results.replace("## The paper's claims", "**The paper's claims**"), "",
        f"![ICL score and prefix matching of every model]({rel}/family.png)", "",
        f"![per-token loss PCA]({rel}/pca.png) ![2L heads]({rel}/2l_head_scores.png)", "",
        README_END])
    with open(readme) as f:
        text = f.read()
    if README_START in text:
        a, b = text.index(README_START), text.index(README_END) + len(README_END)
        text = text[:a] + body + text[b:]
    else:
        text = text.rstrip() + "\n\n" + body + "\n"
    with open(readme, "w") as f:
        f.write(text)


# ----------------------------------------------------------------------------- the command

CPU_TOKENS = 5e8  # above this many training tokens in all, a CPU takes days: say so first


def scale_warning(configs: dict, platform: str) -> str | None:
    """A warning when the members' configs ask a CPU for accelerator-sized training (the
    text and paper profiles: billions of tokens), with the tokens each member sees."""
    tokens = {n: c.train.steps * c.train.batch_size * c.model.context for n, c in configs.items()}
    if platform != "cpu" or sum(tokens.values()) < CPU_TOKENS:
        return None
    each = max(tokens.values())
    return (f"warning: this profile trains {len(tokens)} members of up to {each / 1e9:.2f}B "
            f"tokens each ({sum(tokens.values()) / 1e9:.1f}B in all), sized for an accelerator; "
            "on this CPU that is days (a 2-core machine trains ~30k tokens/s). Shorten it with "
            "--config.train.steps=N, or run it where jax sees a GPU or TPU")


def reproduce(profile: str = "quick", workdir: str = "runs/reproduce", seed: int = 0,
              overrides: dict | None = None, progress: bool = True, llc: bool = False) -> dict:
    """Trains the profile's family (finished members skipped, unfinished resumed), analyses
    it, checks the claims and writes results.md, claims.json and report.html in `workdir`.
    llc: also the local learning coefficient of every snapshot of the 1l and 2l members, and
    every head's wrLLC of the 2l and 3l members (head_llc.REPRODUCE_VIEW: 12 snapshots, 2
    chains a head)."""
    spec, texts = sweep_file(profile), _overrides(seed, overrides)
    members = sweep.resolve(spec, workdir, texts)  # config errors first
    names = [m.name for m in members]
    # measured as the profile says now: finished members keep the eval and llc values they
    # were trained with in their folders (config.MEASUREMENT), which may be older
    measure = [config_lib.flatten({k: m.config[k].to_dict() for k in config_lib.MEASUREMENT})
               for m in members]
    measure = measure[0] if all(x == measure[0] for x in measure) else None
    warning = scale_warning({m.name: m.config for m in members}, jax.devices()[0].platform)
    if warning:
        print(warning, file=sys.stderr, flush=True)
    # one member after another in this process, as fast as one `train` each (no process
    # and jax start per member): the quick profile must stay under 10 minutes on 2 cores
    index = sweep.run_sweep(spec, workdir, overrides=texts, progress=progress, in_process=True)
    members = index["members"]
    unfinished = {n: members[n] for n in names if members[n].get("status") != "done"}
    if unfinished:
        raise train.TrainingError("not every member finished training: " + "; ".join(
            f"{n} {m.get('status')}" + (f" ({m['error']})" if m.get("error") else "")
            for n, m in unfinished.items()) + "; run reproduce again to resume")
    train_seconds = sum(members[n].get("wall_s") or 0.0 for n in names)

    t_analysis = time.time()
    result = analysis.analyze([os.path.join(workdir, n) for n in names], out=workdir,
                              progress=progress,
                              llc={"1l", "2l"} if llc else False, measure=measure,
                              llc_heads={n: head_llc.REPRODUCE_VIEW for n in ("2l", "3l")}
                              if llc else None)
    rows, found = claims.check_claims(result)
    text = claims.results_markdown(rows, found, profile, train_seconds,
                                   time.time() - t_analysis)
    claims.write_results(workdir, rows, found, text)
    report.write_report(result, preamble=text, progress=progress, figures=[
        ("ICL score and prefix matching of every model", "family.png",
         report.plot_family(result))])
    if progress:
        print(text)
    return {"rows": rows, "claims": found, "analysis": result}
