"""An interactive attention view: one self-contained HTML page (inline JS, no external
scripts, works offline) showing a token sequence; hovering a query token shades every
key by the attention the selected head pays it, and a selector picks the head.

    html = attention_view.html(tokens, attention_LHTS)   # str; IPython.display.HTML(html)
    attention_view.write("view.html", tokens, attention_LHTS)

attention_LHTS is one sequence's pattern, [layer, head, query, key], as Run.forward
returns it (attention[0]).
"""
from __future__ import annotations

import html as html_lib
import itertools
import json

import numpy as np

_ids = itertools.count()

# The page's script: everything it needs is in the page; %(id)s keeps several views in
# one notebook apart.
_SCRIPT = """
(function () {
  const root = document.getElementById("%(id)s");
  const data = JSON.parse(root.querySelector("script[type='application/json']").textContent);
  const select = root.querySelector("select");
  const info = root.querySelector(".av-info");
  const spans = Array.from(root.querySelectorAll(".av-tok"));
  let pinned = null;
  data.heads.forEach(function (name, i) {
    const o = document.createElement("option");
    o.value = i; o.textContent = name; select.appendChild(o);
  });
  select.value = data.initial;
  function show(q) {
    const row = data.attention[select.value][q];
    spans.forEach(function (s, k) {
      const a = k <= q ? row[k] : 0;
      s.style.background = "rgba(220, 60, 30, " + Math.min(1, a).toFixed(3) + ")";
      s.style.outline = k === q ? "2px solid #1f5fbf" : "none";
      s.title = "attention " + a.toFixed(3);
    });
    let best = 0;
    for (let k = 1; k <= q; k++) if (row[k] > row[best]) best = k;
    info.textContent = data.heads[select.value] + ": query " + q + " (" + data.tokens[q] +
      ") attends most to key " + best + " (" + data.tokens[best] + "), " + row[best].toFixed(3);
  }
  function clear() {
    spans.forEach(function (s) { s.style.background = "none"; s.style.outline = "none"; });
    info.textContent = "hover a token (click to pin it)";
  }
  spans.forEach(function (s, q) {
    s.addEventListener("mouseenter", function () { if (pinned === null) show(q); });
    s.addEventListener("click", function () { pinned = pinned === q ? null : q; show(q); });
  });
  root.querySelector(".av-tokens").addEventListener("mouseleave", function () {
    if (pinned === null) clear(); else show(pinned);
  });
  select.addEventListener("change", function () { if (pinned !== null) show(pinned); });
  clear();
})();
"""

_STYLE = """
#%(id)s { font-family: sans-serif; font-size: 13px; }
#%(id)s .av-tokens { font-family: monospace; line-height: 2.1; max-width: 60em; }
#%(id)s .av-tok { padding: 2px 3px; margin: 1px; border-radius: 3px; cursor: pointer;
                  display: inline-block; border: 1px solid #ddd; }
#%(id)s .av-info { margin: 4px 0 8px; color: #444; min-height: 1.3em; }
"""


def html(tokens, attention_LHTS, head=None, title: str = "attention",
         view_id: str | None = None) -> str:
    """The view as an HTML fragment (also a valid page body).

    tokens: the T tokens as shown (ints or strings); attention_LHTS: [L, H, T, T] (or
    [H, T, T] for one layer). head: (layer, head) shown first (default: the last layer's
    head with the most attention off the diagonal). view_id: the element's id, unique in
    its page (default: a new one each call, for a notebook's many views; a page written
    again gives its one view a fixed id, so that the same page comes out byte for byte).
    """
    att = np.asarray(attention_LHTS, np.float64)
    if att.ndim == 3:
        att = att[None]
    if att.ndim != 4 or att.shape[2] != att.shape[3]:
        raise ValueError(f"attention_LHTS must be [layer, head, query, key] with query == key "
                         f"positions; got shape {att.shape}")
    L, H, T, _ = att.shape
    tokens = [str(t) for t in tokens]
    if len(tokens) != T:
        raise ValueError(f"{len(tokens)} tokens for an attention pattern over {T} positions")
    if head is None:
        off_diag = att[-1] * (1 - np.eye(T))
        head = (L - 1, int(np.argmax(off_diag.sum(axis=(1, 2)))))
    view_id = view_id or f"attention-view-{next(_ids)}"
    data = {"tokens": tokens, "heads": [f"L{l}H{h}" for l in range(L) for h in range(H)],
            "attention": np.round(att.reshape(L * H, T, T), 4).tolist(),
            "initial": int(head[0]) * H + int(head[1])}
    # "</" inside the JSON would end the script element early
    payload = json.dumps(data).replace("</", "<\\/")
    toks = "".join(f'<span class="av-tok">{html_lib.escape(t)}</span>' for t in tokens)
    return (f'<div id="{view_id}">'
            f"<style>{_STYLE % {'id': view_id}}</style>"
            f"<b>{html_lib.escape(title)}</b> head <select></select>"
            f'<div class="av-info"></div><div class="av-tokens">{toks}</div>'
            f'<script type="application/json">{payload}</script>'
            f"<script>{_SCRIPT % {'id': view_id}}</script></div>")


def write(path, tokens, attention_LHTS, head=None, title: str = "attention") -> str:
    """The view as a standalone page at `path` (local or gs://); returns the path."""
    from etils import epath
    page = ("<!doctype html><html><head><meta charset='utf-8'><title>"
            f"{html_lib.escape(title)}</title></head><body>"
            f"{html(tokens, attention_LHTS, head, title)}</body></html>")
    epath.Path(path).write_text(page)
    return str(path)
