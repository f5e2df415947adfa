"""Training progress: plain lines off a terminal, tqdm's bar on one; the ETA; member k of N
through a sweep (in this process and in a member's own); an MFU that cannot pass 100%."""
import io
import json
import os

import pytest

from icl_jax import flops, progress, sweep
from conftest import ROOT, tiny_config

RECORD = {"train_loss": 2.5, "tokens_per_s": 12345.0, "mfu": 0.031}


class _Clock:
    def __init__(self):
        self.t = 100.0

    def __call__(self):
        return self.t


def test_off_a_terminal_the_bar_is_plain_lines_with_eta_and_member(monkeypatch):
    clock = _Clock()
    monkeypatch.setattr(progress.time, "perf_counter", clock)
    out = io.StringIO()
    peak = progress.BoundedPeak(flops.Peak(1e11, "100 GFLOP/s measured matmul"))
    bar = progress.Bar(1000, True, peak, start=200, stream=out, every_s=30,
                       member="member 2 of 6 (2l)")
    bar.update(210, RECORD)  # the first update starts the clock: no rate yet
    clock.t += 10
    bar.update(260, RECORD)  # 10 s later, inside every_s: not printed
    clock.t += 30
    bar.update(410, {**RECORD, "icl_score": -0.4, "prefix_matching_max": 0.61})
    bar.close()
    lines = out.getvalue().splitlines()
    assert "\r" not in out.getvalue() and len(lines) == 2
    assert lines[0].startswith("member 2 of 6 (2l)  step 210/1,000 (21%)  ETA -")
    # 200 steps in 40 s since the first update: 590 left take 118 s
    assert "ETA 01:58" in lines[1] and "step 410/1,000 (41%)" in lines[1]
    assert "12,345 tok/s" in lines[1] and "MFU 3.1% of 100 GFLOP/s measured matmul" in lines[1]
    assert "icl -0.400" in lines[1] and "prefix-match 0.61" in lines[1]
    assert bar.eta_s(410) == pytest.approx(118.0)


def test_on_a_terminal_the_bar_is_tqdms_redrawn_in_place():
    class Terminal(io.StringIO):
        def isatty(self):
            return True

    out = Terminal()
    bar = progress.Bar(100, True, None, stream=out, member="member 1 of 2 (a)")
    for step in (10, 20, 30):
        bar.update(step, RECORD)
    bar.close()
    text = out.getvalue()
    assert "\r" in text and "member 1 of 2 (a)" in text
    assert "30/100" in text and "12,345 tok/s" in text and "<" in text  # elapsed<remaining
    silent = Terminal()
    progress.Bar(100, False, None, stream=silent).update(10, RECORD)
    assert silent.getvalue() == ""


def test_mfu_never_passes_100_percent_and_says_when_the_peak_was_raised():
    peak = progress.BoundedPeak(flops.Peak(107e9, "107 GFLOP/s measured matmul"))
    assert peak.mfu(1e6, 53.5e3) == pytest.approx(0.5) and "raised" not in peak.label
    assert peak.label == "107 GFLOP/s measured matmul"
    # the rate that printed "MFU 115.7%" against a peak timed on a busy machine
    assert peak.mfu(1e6, 123.8e3) == pytest.approx(1.0)
    assert peak.flops_per_s == pytest.approx(123.8e9)
    assert "best rate seen" in peak.label and "107 GFLOP/s measured matmul" in peak.label
    assert peak.mfu(1e6, 61.9e3) == pytest.approx(0.5)  # later rates against the raised peak


def test_member_context_and_environment(monkeypatch):
    monkeypatch.delenv(progress.MEMBER_ENV, raising=False)
    assert progress.current_member() is None
    with progress.member(["2l", "3l"], [2, 3], 6):
        assert progress.current_member() == "members 2, 3 of 6 (2l, 3l: one ensemble)"
        with progress.member("1l", 1, 6):
            assert progress.current_member() == "member 1 of 6 (1l)"
        assert progress.current_member().startswith("members 2, 3")
    assert progress.current_member() is None
    monkeypatch.setenv(progress.MEMBER_ENV, progress.member_env("2l-mlp", 6, 6)[
        progress.MEMBER_ENV])
    assert progress.current_member() == "member 6 of 6 (2l-mlp)"
    monkeypatch.setenv(progress.MEMBER_ENV, "garbage")
    assert progress.current_member() is None


def _write_sweep(tmp_path, members):
    tiny = {"train.steps": "4", "model.d_model": "16", "eval.n_examples": "4",
            "checkpoint.every": "2", "checkpoint.log_spaced": "0", "train.batch_size": "8",
            "train.eval_every": "2"}
    path = tmp_path / "my_sweep.py"
    path.write_text(f"def get_sweep(arg=None):\n    return {{'base': "
                    f"{os.path.join(ROOT, 'configs', 'small.py:layers=1')!r}, 'overrides': "
                    f"{tiny!r}, 'members': {members!r}}}\n")
    return str(path)


def test_a_sweep_trained_in_process_says_which_member_is_training(tmp_path, capsys):
    spec = _write_sweep(tmp_path, {"a": {}, "b": {"overrides": {"seed": 1}}})
    sweep.run_sweep(spec, str(tmp_path / "runs"), in_process=True)
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if " step " in line and "ETA" in line]
    assert any(line.startswith("member 1 of 2 (a)  step 4/4") for line in lines), err
    assert any(line.startswith("member 2 of 2 (b)  step 4/4") for line in lines), err
    for line in lines:
        if "MFU" in line:
            assert float(line.split("MFU ")[1].split("%")[0]) <= 100.0


def test_a_members_own_process_says_which_member_it_is(tmp_path):
    spec = _write_sweep(tmp_path, {"a": {}, "b": {"overrides": {"seed": 1}}})
    wd = tmp_path / "runs"
    index = sweep.run_sweep(spec, str(wd), jobs=1, progress=False)
    assert {m["status"] for m in index["members"].values()} == {"done"}
    log = (wd / "b" / "train.log").read_text()
    assert "member 2 of 2 (b)  step 4/4 (100%)" in log, log
    assert "\r" not in log
    assert json.loads((wd / "sweep.json").read_text())["members"]["b"]["status"] == "done"


def test_training_against_a_peak_timed_too_low_logs_mfu_of_at_most_100_percent(
        tmp_path, monkeypatch, capsys):
    """The trainer end to end, stderr not a terminal (pytest captures it): plain lines, and a
    start-up peak far below what training reaches (a busy machine's) raised to the best rate
    seen, in the log and in metrics.jsonl alike."""
    from icl_jax import train, workdir
    monkeypatch.setattr(train.flops_lib, "peak",
                        lambda dtype: flops.Peak(1e3, "1 kFLOP/s measured matmul"))
    # timed every 10 steps or more (MIN_TIMED_STEPS); a plain line at each evaluation
    cfg = tiny_config(**{"train.steps": "20", "train.eval_every": "10"})
    train.train_and_evaluate(cfg, str(tmp_path), progress=True)
    err = capsys.readouterr().err
    assert "\r" not in err
    lines = [line for line in err.splitlines() if "MFU" in line]
    assert lines and all(0 < float(line.split("MFU ")[1].split("%")[0]) <= 100.0
                         for line in lines), lines
    assert "the best rate seen (the start-up measurement, 1 kFLOP/s measured matmul, ran low)" \
        in lines[-1]
    mfus = [r["mfu"] for r in workdir.read_metrics(str(tmp_path)) if r.get("mfu")]
    assert mfus and max(mfus) <= 1.0 + 1e-9
