"""The claims' measurements on curves whose answer is known by construction."""
import numpy as np
import pytest

from icl_jax import claims


def _metrics(losses):
    return [{"step": s, "eval_loss": l} for s, l in enumerate(losses)]


def test_loss_bump_is_a_faster_fall_inside_the_window():
    window = {"detected": True, "start_step": 400, "end_step": 600}
    steps = np.arange(1000)
    straight = 3 - steps * 1e-3
    bumped = straight - 0.5 * np.clip((steps - 400) / 200, 0, 1)
    assert claims.loss_bump(_metrics(straight), window) == pytest.approx(1.0, abs=0.05)
    assert claims.loss_bump(_metrics(bumped), window) > 1.5
    assert claims.loss_bump(_metrics(bumped), {"detected": False}) is None
