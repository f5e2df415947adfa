"""The developmental-view notebook runs top to bottom on a short run of a small model."""
import json
import os

import pytest

from conftest import ROOT

NOTEBOOK = os.path.join(ROOT, "notebooks", "developmental_view.ipynb")
# a small model (as conftest.tiny_config's) and few draws: every cell runs, in CI's minutes
SMALL = {"model.d_model": 32, "model.n_heads": 2, "model.context": 32, "model.vocab_size": 32,
         "train.batch_size": 8, "eval.n_examples": 8, "eval.icl_early_index": 2,
         "eval.icl_late_index": 20, "eval.probe_tokens": 7, "eval.probe_sequences": 2,
         "data.segment_len_min": 3, "data.segment_len_max": 8, "checkpoint.log_spaced": 2}
FEW_DRAWS = {"llc.chains": 2, "llc.draws": 4, "llc.examples": 64, "llc.batch_size": 8}


def test_notebook_is_stored_without_outputs():
    nb = json.load(open(NOTEBOOK))
    code = [c for c in nb["cells"] if c["cell_type"] == "code"]
    assert code and all(not c["outputs"] and c["execution_count"] is None for c in code)


@pytest.mark.slow
def test_notebook_runs_top_to_bottom(tmp_path, monkeypatch):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    pytest.importorskip("ipykernel")
    monkeypatch.setenv("ICL_JAX_NOTEBOOK_STEPS", "40")
    monkeypatch.setenv("ICL_JAX_NOTEBOOK_WORKDIR", str(tmp_path / "run"))
    monkeypatch.setenv("ICL_JAX_NOTEBOOK_OVERRIDES", json.dumps(SMALL))
    monkeypatch.setenv("ICL_JAX_NOTEBOOK_LLC", json.dumps(FEW_DRAWS))
    monkeypatch.setenv("PYTHONPATH", ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    nb = nbformat.read(NOTEBOOK, as_version=4)
    client = nbclient.NotebookClient(nb, timeout=600, kernel_name="python3",
                                     resources={"metadata": {"path": os.path.dirname(NOTEBOOK)}})
    client.execute()  # raises CellExecutionError naming the cell that failed
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    images = [o for o in outputs if "image/png" in o.get("data", {})]
    assert len(images) >= 4, "every figure cell draws"
    text = "".join(o.get("text", "") for o in outputs)
    assert "wrLLC" in text and "drLLC on pasted" in text
    assert "in the sweep" in text and "other settings" not in text  # the hand computation checked
    saved = json.loads((tmp_path / "run" / "analysis" / "scores.json").read_text())
    assert saved["llc_heads"]["chains"] == 2 and len(saved["llc"]) == len(saved["steps"])
