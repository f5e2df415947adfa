"""The notebook runs top to bottom, and the attention view holds what it shows."""
import json
import os
import re

import numpy as np
import pytest

from conftest import ROOT
from icl_jax import attention_view

NOTEBOOK = os.path.join(ROOT, "notebooks", "induction_heads.ipynb")


def test_notebook_is_stored_without_outputs():
    nb = json.load(open(NOTEBOOK))
    code = [c for c in nb["cells"] if c["cell_type"] == "code"]
    assert code and all(not c["outputs"] and c["execution_count"] is None for c in code)


def _cells():
    return json.load(open(NOTEBOOK))["cells"]


def test_notebook_text_quotes_no_step_numbers():
    """Numbers of one run go stale: the prose names none (the cells compute them)."""
    prose = "\n".join("".join(c["source"]) for c in _cells() if c["cell_type"] == "markdown")
    assert not re.search(r"\b\d{1,3},\d{3}\b|steps? \d{3,}", prose), re.findall(
        r"\b\d{1,3},\d{3}\b|steps? \d{3,}", prose)


def test_notebook_keeps_its_paths_in_one_cell():
    code = ["".join(c["source"]) for c in _cells() if c["cell_type"] == "code"]
    with_paths = [i for i, c in enumerate(code) if re.search(r"ROOT\s*/|configs", c)]
    assert with_paths == [0], with_paths


@pytest.mark.slow
def test_notebook_runs_top_to_bottom(tmp_path, monkeypatch):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    pytest.importorskip("ipykernel")
    # a short run trained by the notebook itself into an empty workdir
    monkeypatch.setenv("ICL_JAX_NOTEBOOK_STEPS", "40")
    monkeypatch.setenv("ICL_JAX_NOTEBOOK_WORKDIR", str(tmp_path / "run"))
    monkeypatch.setenv("PYTHONPATH", ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    nb = nbformat.read(NOTEBOOK, as_version=4)
    client = nbclient.NotebookClient(nb, timeout=600, kernel_name="python3",
                                     resources={"metadata": {"path": os.path.dirname(NOTEBOOK)}})
    client.execute()  # raises CellExecutionError naming the cell that failed
    code = [c for c in nb.cells if c.cell_type == "code"]
    images = [i for i, c in enumerate(code) for o in c.outputs
              if "image/png" in o.get("data", {})]
    # something to see early: the training cell draws before anything is analysed
    trains = next(i for i, c in enumerate(code) if "train_and_evaluate" in c.source)
    analyses = next(i for i, c in enumerate(code) if "analysis.analyze" in c.source)
    assert images[0] == trains < analyses
    assert len(images) >= 8, "every figure cell draws"
    # measured in front of the reader, from Run and icl_jax.scores, before the analysis...
    by_hand = "\n".join(c.source for c in code[:analyses])
    for call in ("icl_jax.Run(", "scores.prefix_matching(", "scores.icl_score(",
                 "scores.head_ablation_icl(", "scores.icl_with_heads_removed("):
        assert call in by_hand, call
    # ...which then agrees with them (the cell asserts it) and draws the paper's figures
    text = "".join(o.get("text", "") for o in code[analyses].outputs)
    assert "the analysis agrees with the measurements by hand" in text
    html = [o["data"]["text/html"] for o in nb_outputs(nb) if "text/html" in o.get("data", {})]
    assert any("attention-view" in h for h in html)
    assert os.path.exists(tmp_path / "run" / "analysis" / "scores.json")


def nb_outputs(nb):
    return [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]


def _payload(page):
    m = re.search(r'<script type="application/json">(.*?)</script>', page, re.S)
    return json.loads(m.group(1).replace("<\\/", "</"))


def test_attention_view_holds_the_pattern_and_no_external_script():
    rng = np.random.default_rng(0)
    att = rng.random((2, 3, 5, 5))
    att = np.tril(att) / np.tril(att).sum(-1, keepdims=True)
    tokens = ["<bos>", "a", "</script>", "b", 7]
    page = attention_view.html(tokens, att, head=(1, 2))
    data = _payload(page)
    assert data["heads"] == [f"L{l}H{h}" for l in range(2) for h in range(3)]
    np.testing.assert_allclose(np.asarray(data["attention"]).reshape(att.shape), att, atol=1e-4)
    assert data["tokens"] == ["<bos>", "a", "</script>", "b", "7"]
    assert data["initial"] == 1 * 3 + 2
    # works offline: every script is inline, nothing is fetched
    assert not re.search(r"<script[^>]*\bsrc\s*=", page, re.I)
    assert "http://" not in page and "https://" not in page and "<link" not in page
    # a token that looks like markup is shown, not parsed
    assert "&lt;/script&gt;" in page and page.count("</script>") == 2


def test_attention_view_picks_the_head_that_looks_furthest_back():
    T = 6
    att = np.tile(np.eye(T), (2, 2, 1, 1))  # every head attends to itself
    att[1, 1] = np.eye(T, k=-1)
    att[1, 1, 0, 0] = 1.0
    assert _payload(attention_view.html(range(T), att))["initial"] == 1 * 2 + 1


def test_attention_view_rejects_a_pattern_of_the_wrong_shape():
    with pytest.raises(ValueError, match="query == key"):
        attention_view.html(range(4), np.zeros((1, 1, 4, 3)))
    with pytest.raises(ValueError, match="3 tokens"):
        attention_view.html(range(3), np.zeros((1, 1, 4, 4)))


def test_attention_view_page_is_written(tmp_path):
    path = attention_view.write(tmp_path / "view.html", [1, 2], np.ones((1, 1, 2, 2)) / 2)
    text = open(path).read()
    assert text.startswith("<!doctype html>") and "L0H0" in text


_FAKE_DOM = """
const listeners = new Map();
function el(props) {
  const e = Object.assign({style: {}, textContent: "", children: [], value: "",
    addEventListener(kind, f) { listeners.set(e, {...(listeners.get(e) || {}), [kind]: f}); },
    appendChild(c) { e.children.push(c); }}, props);
  return e;
}
const spans = DATA.tokens.map(() => el({}));
const select = el({}), info = el({}), tokens = el({});
const root = el({
  querySelector(q) {
    if (q.startsWith("script")) return {textContent: PAYLOAD};
    return {"select": select, ".av-info": info, ".av-tokens": tokens}[q];
  },
  querySelectorAll(q) { return spans; }});
globalThis.document = {getElementById: () => root, createElement: () => el({})};
const fire = (e, kind) => listeners.get(e)[kind]();
const shades = () => spans.map(s => s.style.background === "none" ? null :
  Number(s.style.background.match(/([0-9.]+)\\)$/)[1]));
const out = {};
SCRIPT
out.initial = shades();
fire(spans[QUERY], "mouseenter");
out.hover = shades(); out.info = info.textContent; out.options = select.children.length;
fire(spans[QUERY], "click");        // pin, then switch head: the pinned query is redrawn
select.value = OTHER; fire(select, "change");
out.other = shades();
console.log(JSON.stringify(out));
"""


def test_attention_view_hover_shades_keys_by_the_chosen_heads_attention(tmp_path):
    import shutil
    import subprocess
    node = shutil.which("node") or pytest.skip("node is not installed")
    rng = np.random.default_rng(1)
    att = np.tril(rng.random((2, 2, 6, 6)))
    att /= att.sum(-1, keepdims=True)
    page = attention_view.html(list("abcdef"), att, head=(1, 0))
    payload = re.search(r'<script type="application/json">(.*?)</script>', page, re.S).group(1)
    script = re.findall(r"<script>(.*?)</script>", page, re.S)[0]
    q = 4
    harness = (_FAKE_DOM.replace("PAYLOAD", json.dumps(payload))
               .replace("DATA", json.dumps(_payload(page))).replace("SCRIPT", script)
               .replace("QUERY", str(q)).replace("OTHER", '"1"'))
    (tmp_path / "h.js").write_text(harness)
    out = json.loads(subprocess.run([node, str(tmp_path / "h.js")], capture_output=True,
                                    text=True, check=True).stdout)
    assert out["initial"] == [None] * 6 and out["options"] == 4
    expected = np.where(np.arange(6) <= q, att[1, 0, q], 0)
    np.testing.assert_allclose(out["hover"], expected, atol=1e-3)
    assert f"L1H0: query {q} (e) attends most to key {np.argmax(att[1, 0, q])}" in out["info"]
    np.testing.assert_allclose(out["other"], np.where(np.arange(6) <= q, att[0, 1, q], 0),
                               atol=1e-3)
