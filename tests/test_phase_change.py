"""The phase-change rule, the PCA and the trajectory's turn, on curves and paths whose
answer is known by construction."""
import numpy as np

from icl_jax import analysis


def _sigmoid_curve(steps, center, width, hi=-0.3, lo=-2.0):
    return hi + (lo - hi) / (1 + np.exp(-(steps - center) / width))


def test_phase_change_rule_on_synthetic_curves():
    steps = np.array(sorted({0, 1, 2, 4, 8, 16, 32, 64, 125} | set(range(250, 12001, 250))))
    rng = np.random.default_rng(0)
    noise = rng.normal(0, 0.02, len(steps))
    pc = analysis.detect_phase_change(steps, _sigmoid_curve(steps, 7500, 150) + noise,
                                      steps * 2048)
    assert pc["detected"], pc
    assert 6500 < pc["start_step"] < 7500 < pc["end_step"] < 8500
    assert pc["start_tokens"] == pc["start_step"] * 2048
    assert pc["icl_before"] > -0.6 and pc["icl_after"] < -1.7
    # a hard step function too
    step_fn = np.where(steps < 4000, -0.3, -1.5) + noise
    pc = analysis.detect_phase_change(steps, step_fn)
    assert pc["detected"] and 3000 < pc["start_step"] <= 4000 <= pc["end_step"] < 5000, pc
    # smooth curves: linear, exponential decay in steps, flat with noise
    for curve in (-0.3 - 1.5 * steps / steps[-1],
                  -0.3 - 1.5 * (1 - np.exp(-steps / 2000)),
                  -0.3 - 1.5 * (1 - np.exp(-steps / 200)),
                  -0.5 + noise):
        pc = analysis.detect_phase_change(steps, curve + noise)
        assert not pc["detected"], pc


def test_pca_and_turn():
    rng = np.random.default_rng(0)
    t = np.linspace(0, 1, 30)[:, None]
    a, b = rng.normal(size=(2, 50))
    bent = np.where(t < 0.5, t * a, 0.5 * a + (t - 0.5) * b) + rng.normal(0, 0.003, (30, 50))
    straight = t * a + rng.normal(0, 0.003, (30, 50))
    fit = analysis.fit_pca(np.concatenate([bent, straight]))
    assert fit["explained"].sum() > 0.95
    steps = np.arange(1, 31) * 100
    window = {"detected": True, "start_step": 1500, "end_step": 2500}  # the bend starts it
    turn_bent = analysis.trajectory_turn(fit["project"][:30], steps, window)
    assert turn_bent["turn_deg"] > 45
    assert analysis.trajectory_turn(fit["project"][30:], steps, window)["turn_deg"] < 15
    assert analysis.trajectory_turn(fit["project"][:30], steps, {"detected": False})["turn_deg"] is None
