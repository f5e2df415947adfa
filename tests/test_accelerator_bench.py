"""icl-jax bench --suite accelerator, shrunk (--tiny) so that it runs end to end on a CPU."""
import json

import pytest

from icl_jax import cli


@pytest.mark.slow
def test_the_tiny_accelerator_suite_writes_every_row_with_positive_numbers(tmp_path):
    assert cli.main(["bench", "--suite", "accelerator", "--tiny", "--repeats", "1",
                     "--out", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "accelerator.json").read_text())
    assert {"devices", "platform", "jax", "repeats", "tiny"} <= set(result["meta"])
    metrics = {r["metric"] for r in result["rows"]}
    assert {"matmul peak", "paper train", "paper MFU", "one member train", "K=4 summed",
            "K=4 summed / one", "score vmapped", "score loop", "vmapped / loop",
            "data", "step", "data / step"} <= metrics
    for r in result["rows"]:
        assert r["median"] > 0 and r["min"] > 0, r
        assert {"case", "metric", "median", "p25", "p75", "unit", "note"} <= set(r)
    targets = {r["metric"] for r in result["rows"] if "target" in r}
    assert {"paper MFU", "vmapped / loop", "data / step"} <= targets
    # on a CPU the H100/H200 targets are shown, not judged
    assert all(r["met"] is None for r in result["rows"] if "target" in r)
    table = (tmp_path / "accelerator.md").read_text()
    assert table.count("\n| ") == len(result["rows"]) + 2  # header, rule, then one line a row
    assert "| paper MFU |" in table
