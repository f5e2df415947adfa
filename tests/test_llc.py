"""The LLC estimator against known answers, its handling of bad chains, and devinterp."""
import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from icl_jax import llc, report


def llc_cfg(**kw):
    d = dict(sampler="sgld", eps=2e-3, gamma=1.0, n_beta=0.0, chains=32, burn_in=100,
             draws=1000, batch_size=200, examples=2000, rms_alpha=0.99, rms_eps=0.1)
    d.update(kw)
    return ml_collections.ConfigDict(d)


N, D_REG, D_QUART, S, C = 2000, 4, 2, 0.01, 10.0


@pytest.fixture(scope="module")
def toy():
    """n = 2000 samples: x in R^4 and y in R^2, both of spread S = 0.01; y centred exactly,
    so that the quartic directions below have no quadratic term at all."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(N, D_REG)) * S
    y = rng.normal(size=(N, D_QUART)) * S
    y -= y.mean(0)
    data = {"x": jnp.asarray(x, jnp.float32), "y": jnp.asarray(y, jnp.float32)}
    w_star = {"a": jnp.asarray(x.mean(0), jnp.float32), "q": jnp.zeros(D_QUART)}
    return data, w_star


def regular_loss(w, b):
    """Mean of 1/2 |a - x|^2: L_n(a) - L_n(a*) = 1/2 |a - a*|^2, a regular minimum."""
    return 0.5 * jnp.mean(jnp.sum((w["a"] - b["x"]) ** 2, -1))


def singular_loss(w, b):
    """regular_loss plus a product-style model q^2 fitted to y (mean 0): L_n(q) - L_n(0)
    = C/2 q^4 in each q direction, flat to fourth order."""
    return regular_loss(w, b) + 0.5 * C * jnp.mean(jnp.sum((b["y"] - w["q"] ** 2) ** 2, -1))


def quartic_share(nbeta, gamma):
    """E[nbeta C/2 q^4] under exp(-nbeta C/2 q^4 - gamma/2 q^2) by quadrature: 1/4 exactly
    without localisation (gamma 0), a hair less with it."""
    q = np.linspace(-2, 2, 400_001)
    k = nbeta * C / 2 * q ** 4
    p = np.exp(-k - gamma / 2 * q ** 2)
    return float((k * p).sum() / p.sum())


@pytest.mark.parametrize("sampler,eps", [("sgld", 2e-3), ("rmsprop_sgld", 5e-4)])
def test_llc_of_regular_and_singular_minima(toy, sampler, eps):
    """Known answers. At a regular minimum of a quadratic in d parameters the LLC is d/2:
    here d = 4, so 2. Adding two directions in which the loss rises only as q^4 (the
    model q^2 fitted to data of mean 0, a product parameterisation at its degenerate
    point) adds 1/4 each, not 1/2: the LLC of K(w) = sum a_i^2 + sum q_j^4 is
    sum 1/2 + sum 1/4 (for a monomial w^(2k), 1/(2k)), so 2 + 2/4 = 2.5, smaller by 1/2
    than the regular 3 of six parameters. The localisation gamma shifts the sampled
    answer by known amounts (the regular part by nbeta / (nbeta + gamma), 0.974 here; the
    quartic part by quadrature); SGLD's step adds a discretisation bias of a few percent.
    SGLD is held to the corrected answer within three standard errors of the chains'
    mean plus 3%. RMSProp-SGLD lacks the correction term of a position-dependent
    preconditioner (as devinterp's does), so it samples a slightly distorted posterior:
    here it reads 10-13% high, and is held within two chain spreads (2 llc_std)."""
    data, w_star = toy
    cfg = llc_cfg(sampler=sampler, eps=eps)
    nbeta = llc.default_nbeta(200)
    assert cfg.n_beta == 0 and math.isclose(nbeta, 200 / math.log(200))
    regular = D_REG / 2 * nbeta / (nbeta + cfg.gamma)
    singular = regular + D_QUART * quartic_share(nbeta, cfg.gamma)
    assert abs(singular - 2.5) < 0.08 and abs(regular - 2.0) < 0.06  # the corrections are small

    for loss, params, want in ((regular_loss, {"a": w_star["a"]}, regular),
                               (singular_loss, w_star, singular)):
        r = llc.estimate_llc(loss, params, data, cfg)
        assert r["chain_ok"].all() and not r["diverged"]
        assert r["loss_trace"].shape == (cfg.chains, cfg.draws)
        assert math.isclose(r["nbeta"], nbeta)
        if sampler == "sgld":
            tol = 3 * r["llc_std"] / math.sqrt(cfg.chains) + 0.03 * want
        else:
            tol = 2 * r["llc_std"]
        assert abs(r["llc"] - want) < tol, (loss.__name__, r["llc"], want, tol)


def test_bad_chains_are_named_and_left_out(toy):
    """Chain 1 sees only stiff batches (the loss scaled 10^4: eps * nbeta * 10^4 >> 4, so
    SGLD is unstable and its loss blows up); chain 2 meets a NaN at step 50. Both are
    named with a suggestion, and the estimate is the mean of the other chains alone."""
    data, w_star = toy
    scale = np.ones(N, np.float32)
    scale[-200:] = 1e4  # the last 200 examples are stiff
    poisoned = np.zeros(N, np.float32)
    poisoned[-201] = np.nan
    data = {**data, "scale": jnp.asarray(scale), "nan": jnp.asarray(poisoned)}

    def loss(w, b):
        per = 0.5 * jnp.sum((w["a"] - b["x"]) ** 2, -1) * b["scale"] + b["nan"]
        return per.mean()

    cfg = llc_cfg(chains=4, draws=200, burn_in=0)
    idx = llc.batch_indices(N - 201, cfg, seed=0)
    idx[1] = np.arange(N - 200, N)  # every batch of chain 1 stiff
    idx[2, 50, 0] = N - 201  # the NaN
    clean = jax.tree.map(lambda a: a[:N - 201], data)
    r = llc.estimate_llc(loss, {"a": w_star["a"]}, data, cfg, indices=idx,
                         init_loss=loss({"a": w_star["a"]}, clean))
    assert [d["chain"] for d in r["diverged"]] == [1, 2]
    assert "diverged" in r["diverged"][0]["reason"] or "non-finite" in r["diverged"][0]["reason"]
    assert "non-finite at step 50" in r["diverged"][1]["reason"]
    assert all("llc.eps" in m and "llc.gamma" in m for m in r["messages"])
    assert "chain 1" in r["messages"][0] and "chain 2" in r["messages"][1]
    assert list(r["chain_ok"]) == [True, False, False, True]
    good = r["llc_chains"][[0, 3]]
    assert np.isfinite(good).all()
    assert math.isclose(r["llc"], good.mean(), rel_tol=1e-6)
    assert math.isclose(r["llc_std"], good.std(ddof=1), rel_tol=1e-6)


def test_batches_are_deterministic_and_cover_the_pool():
    cfg = llc_cfg(chains=3, burn_in=5, draws=20, batch_size=7)
    a, b = llc.batch_indices(50, cfg, seed=3), llc.batch_indices(50, cfg, seed=3)
    assert a.shape == (3, 25, 7) and (a == b).all()
    assert not (a == llc.batch_indices(50, cfg, seed=4)).all()
    assert not (a[0] == a[1]).all()  # chains see different batches
    # a pass over the pool is a permutation: its 7 batches of 7 hold 49 distinct examples
    assert len(set(a[0, :7].ravel())) == 49
    with pytest.raises(ValueError, match="llc.batch_size"):
        llc.batch_indices(5, cfg)


def test_bad_config_is_named():
    with pytest.raises(ValueError, match="llc.sampler"):
        llc.check(llc_cfg(sampler="hmc"))
    with pytest.raises(ValueError, match="llc.eps"):
        llc.check(llc_cfg(eps=0.0))


@pytest.mark.parametrize("sampler", ["sgld", "rmsprop_sgld"])
def test_noise_drawn_in_blocks_is_each_steps_own(toy, sampler):
    """A chain that draws the noise of several steps at once (CPUs) walks the same path as
    one drawing it step by step, including a last block shorter than the others."""
    data, w_star = toy
    cfg = llc_cfg(sampler=sampler, eps=5e-4, chains=1, burn_in=0, draws=7)
    idx_SM = jnp.asarray(llc.batch_indices(N, cfg)[0])
    keys_S = llc.chain_keys(jax.random.key(0), 1, 7)[0]
    run = lambda block: np.asarray(llc.run_chain(singular_loss, llc.sampler_settings(cfg), block, w_star,
                                                 data, idx_SM, keys_S))
    by_step = run(1)
    assert by_step.shape == (7,) and len(set(by_step)) == 7
    for block in (3, 7, 16):  # 2 blocks and a step; one block; one short block
        np.testing.assert_allclose(run(block), by_step, rtol=1e-6)
    assert llc.noise_block("vmap", 10**4, 200) == 1
    assert llc.noise_block("map", 10**4, 5) == 5 and llc.noise_block("map", 10**4, 160) == 16
    # a block that divides the steps, if one is at least half the largest: one loop to compile
    assert llc.noise_block("map", 10**4, 100) == 10 and llc.noise_block("map", 10**4, 200) == 10
    assert llc.noise_block("map", 10**4, 101) == 16  # prime: whole blocks and a shorter one
    assert llc.noise_block("map", 10**9, 200) == 1  # a block must fit in NOISE_BLOCK_BYTES


# ----------------------------------------------------------------------------- transformers

def quick_model(layers):
    from icl_jax import config as config_lib, data as data_lib
    from icl_jax.model import init_params, make_model
    config = config_lib.load_validated(f"small:layers={layers}")
    model = make_model(config.model)
    params = init_params(model, jax.random.key(layers))
    pool = data_lib.make_source(config).eval_set(256, config.model.context + 1)
    return config, model, params, pool


def test_token_loss_is_the_models_cross_entropy():
    """token_loss takes the targets' logits by one-hot products, not loss_by_position's
    gather: the same loss and the same gradient."""
    from icl_jax.model import loss_by_position
    config, model, params, pool = quick_model(1)
    tokens = jnp.asarray(pool[:8])
    ours = jax.value_and_grad(llc.token_loss(model))
    ref = jax.value_and_grad(lambda p, t: loss_by_position(model, p, t).mean())
    (a, ga), (b, gb) = ours(params, tokens), ref(params, tokens)
    assert float(a) == pytest.approx(float(b), rel=1e-6)
    for x, y in zip(jax.tree.leaves(ga), jax.tree.leaves(gb)):
        np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-7)


def test_snapshots_named_when_their_chains_fail():
    """llc_over_snapshots names a bad chain by snapshot step; vmap and lax.map agree."""
    config, model, params, pool = quick_model(1)
    broken = jax.tree.map(lambda a: a, params)
    broken["W_U"] = jnp.full_like(params["W_U"], jnp.nan)
    cfg = config.llc.copy_and_resolve_references()
    cfg.chains, cfg.draws, cfg.batch_size = 2, 5, 8
    stacked = jax.tree.map(lambda *a: jnp.stack(a), params, broken, params)
    outs = [llc.llc_over_snapshots(model, stacked, pool, cfg, steps=[0, 100, 200],
                                   stacking=s, chunk=2) for s in ("vmap", "map")]
    for r in outs:
        assert r["loss_trace"].shape == (3, 2, 5) and r["llc"].shape == (3,)
        assert [(d["step"], d["chain"]) for d in r["diverged"]] == [(100, 0), (100, 1)]
        assert "snapshot step 100, chain 0" in r["messages"][0]
        assert np.isnan(r["llc"][1]) and np.isfinite(r["llc"][[0, 2]]).all()
        # the padded last chunk and the first see the same batches and noise: same answer
        assert r["llc"][0] == pytest.approx(r["llc"][2], rel=1e-5)
    np.testing.assert_allclose(outs[0]["llc"][[0, 2]], outs[1]["llc"][[0, 2]], rtol=1e-3)


def test_snapshots_compile_once_on_cpu():
    """On CPUs (stacking "map") any number of snapshots runs one compiled program: analyze's
    short last chunk (33 snapshots in chunks of 16) must not compile a second."""
    config, model, params, pool = quick_model(1)
    cfg = config.llc.copy_and_resolve_references()
    cfg.chains, cfg.draws, cfg.batch_size = 2, 3, 8
    llc._snapshots_program.cache_clear()
    a = llc.llc_over_snapshots(model, [params, params], pool, cfg, stacking="map", chunk=2)
    b = llc.llc_over_snapshots(model, [params], pool, cfg, stacking="map", chunk=2)
    program = llc._snapshots_program(model, llc.sampler_settings(cfg), "map")
    assert program._cache_size() == 1
    np.testing.assert_array_equal(a["llc"], np.repeat(b["llc"], 2))


@pytest.mark.parametrize("layers", [1, 2])
@pytest.mark.parametrize("sampler", ["sgld", "rmsprop_sgld"])
def test_agrees_with_devinterp(layers, sampler, monkeypatch):
    """Ours against devinterp 2.x chain by chain: the same weights (a freshly initialised
    quick-profile model, exported to a TransformerLens HookedTransformer: training one here
    would take longer than the test), the same held-out batches in the same order (every
    chain of both walks chain 0's batches, as devinterp's chains walk one loader), the same
    hyperparameters, and the same Gaussian noise: devinterp's optimizer is handed our
    draws (step_noise) in place of torch.normal's. Then the two are one computation, and
    every chain's estimate must agree to float32 rounding. With independent noise they
    could only be compared within the chains' spread: 4 chains once read 1.5-2.6% apart,
    and 16 chains of each agree within 0.5-1.6 standard errors (docs/measurements.md)."""
    torch = pytest.importorskip("torch")
    pytest.importorskip("transformer_lens")
    datasets = pytest.importorskip("datasets")
    devinterp_llc = pytest.importorskip("devinterp.slt.llc")
    sgmcmc = pytest.importorskip("devinterp.optim.sgmcmc")
    from icl_jax import export

    config, model, params, pool = quick_model(layers)
    cfg = config.llc.copy_and_resolve_references()
    cfg.sampler, cfg.chains, cfg.draws, cfg.batch_size = sampler, 3, 40, 16
    if sampler == "rmsprop_sgld":
        cfg.eps = 3e-4
    pool = np.asarray(pool)
    idx = llc.batch_indices(len(pool), cfg, seed=0)
    idx[:] = idx[0]
    ours = llc.estimate_llc(llc.token_loss(model), params, jnp.asarray(pool), cfg, indices=idx)

    # our noise, by TransformerLens parameter name: export a tree whose every leaf holds
    # its own noise, step by step, chain by chain, in devinterp's order of calls
    tl = export.hooked_transformer(params, model.cfg)
    names = [n for n, _ in tl.named_parameters()]
    keys_CS = llc.chain_keys(jax.random.key(0), cfg.chains, cfg.burn_in + cfg.draws)
    noise = [export.hooked_transformer_state_dict(
        export.params_to_arrays(llc.step_noise(k, params), model.cfg), model.cfg)
        for k in keys_CS.reshape(-1)]
    draws = iter([z[name] for z in noise for name in names])

    def our_normal(mean, std, size, **_):
        z = next(draws)
        assert tuple(z.shape) == tuple(size) and mean == 0 and std == 1
        return torch.from_numpy(np.array(z))

    monkeypatch.setattr(sgmcmc.torch, "normal", our_normal)

    def per_token_loss(net, ids):  # the model sees T tokens and predicts the next T
        logits = net(ids[:, :-1])
        return torch.nn.functional.cross_entropy(
            logits.transpose(1, 2), ids[:, 1:], reduction="none")

    # our batches in our order; devinterp's L(w*) from its first 16 batches, which are
    # one pass over the pool of 256, so the same L(w*) as ours
    walk = datasets.Dataset.from_dict({"input_ids": pool[idx[0].ravel()].tolist()})
    walk.set_format("torch")
    extra = ({} if sampler == "sgld" else
             dict(sampling_method="rmsprop_sgld", rmsprop_eps=cfg.rms_eps,
                  rmsprop_alpha=cfg.rms_alpha))
    theirs = devinterp_llc.llc(
        tl, walk, {}, lr=cfg.eps, n_beta=ours["nbeta"], localization=cfg.gamma,
        num_chains=cfg.chains, num_draws=cfg.draws, batch_size=cfg.batch_size,
        num_burnin_steps=cfg.burn_in, num_init_loss_batches=len(pool) // cfg.batch_size,
        shuffle=False, device="cpu", loss_fn=per_token_loss, **extra)
    assert next(draws, None) is None  # devinterp drew exactly our noise, no more
    assert float(theirs["init_loss"]) == pytest.approx(ours["init_loss"], rel=1e-5)
    assert ours["chain_ok"].all()
    np.testing.assert_allclose(ours["loss_trace"], np.asarray(theirs["loss_trace"]),
                               rtol=1e-5)
    np.testing.assert_allclose(ours["llc_chains"], np.asarray(theirs["llc_per_chain"]),
                               rtol=1e-4)
    print(f"\n{layers}L {sampler}: ours {ours['llc_chains']}, "
          f"devinterp {np.asarray(theirs['llc_per_chain'])}")


def test_plot_llc_shades_the_phase_change():
    steps = [0, 10, 100, 1000, 5000]
    pc = {"detected": True, "start_step": 3000, "end_step": 4800}
    fig = report.plot_llc(steps, [9, 8, 5, 10, 20], [0.1] * 5, [np.nan, -0.1, np.nan, -0.2, -0.9], pc)
    assert len(fig.axes) == 2
    for ax in fig.axes:  # one shaded span from start_step to end_step in each panel
        spans = [p for p in ax.patches if p.get_label() == "phase change"]
        assert len(spans) == 1
        x0, x1 = spans[0].get_window_extent().x0, spans[0].get_window_extent().x1
        to_data = ax.transData.inverted()
        lo, hi = to_data.transform((x0, 0))[0], to_data.transform((x1, 0))[0]
        assert lo == pytest.approx(3000, rel=1e-3) and hi == pytest.approx(4800, rel=1e-3)
    fig = report.plot_llc(steps, [1] * 5, [0] * 5, [0] * 5, {"detected": False})
    assert not [p for ax in fig.axes for p in ax.patches if p.get_label() == "phase change"]


def test_analyze_llc_adds_every_snapshots_estimate_and_a_figure(tmp_path):
    """icl-jax analyze --llc: the chunked estimates made inside the scoring pass equal one
    call of llc_over_snapshots over the whole run (same batches, same noise); they land in
    scores.json with every chain's loss trace, and the figure in the report."""
    import json
    from conftest import tiny_config
    from icl_jax import analysis, checkpoints, cli, data as data_lib, train
    config = tiny_config("layers=2", **{"llc.chains": 2, "llc.draws": 4, "llc.examples": 64,
                                        "llc.batch_size": 8})
    workdir = tmp_path / "2l"
    train.train_and_evaluate(config, str(workdir), progress=False)
    out = tmp_path / "a"
    result = analysis.analyze([str(workdir)], out=str(out), chunk=4, progress=False, llc=True)
    report.write_report(result, progress=False)
    saved = json.loads((out / "scores.json").read_text())
    steps = saved["steps"]
    assert len(steps) > 4  # more than one chunk
    assert len(saved["llc"]) == len(saved["llc_std"]) == len(steps)
    assert np.asarray(saved["llc_loss_trace"]).shape == (len(steps), 2, 4)
    run = checkpoints.Run(str(workdir))
    pool = data_lib.make_source(run.config).eval_set(64, run.config.model.context + 1)
    whole = llc.llc_over_snapshots(run.model, [run.params(s) for s in steps], pool,
                                   run.config.llc, steps=steps, seed=run.config.seed,
                                   chunk=len(steps))
    np.testing.assert_allclose(saved["llc"], whole["llc"], rtol=1e-3, atol=1e-4)
    assert (out / "llc.png").exists()
    assert result["runs"]["2l"]["llc"] == saved["llc"]
    assert cli.build_parser().parse_args(["analyze", "--workdir", "w", "--llc"]).llc
    no_llc = analysis.analyze([str(workdir)], out=str(tmp_path / "b"), progress=False)
    assert "llc" not in no_llc["runs"]["2l"]


def test_llc_of_chosen_snapshots_matches_analyze(tmp_path, capsys):
    """launch/llc_steps.py: the LLC of two chosen snapshots equals what analyze --llc finds
    at those steps (same batches and noise per snapshot), under the same --config.llc.*
    overrides; a step with no snapshot is refused by name, before any sampling."""
    import importlib.util
    import json
    import os
    from conftest import ROOT, tiny_config
    from icl_jax import analysis, train
    spec = importlib.util.spec_from_file_location(
        "llc_steps", os.path.join(ROOT, "launch", "llc_steps.py"))
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    config = tiny_config("layers=1", **{"llc.draws": 4, "llc.examples": 64,
                                        "llc.batch_size": 8})
    workdir = tmp_path / "1l"
    train.train_and_evaluate(config, str(workdir), progress=False)
    result = analysis.analyze([str(workdir)], out=str(tmp_path / "a"), progress=False,
                              llc=True, measure={"llc.chains": 2})
    run = result["runs"]["1l"]
    chosen = [run["steps"][1], run["steps"][-1]]
    out = tmp_path / "llc.json"
    assert script.main(["--workdir", str(workdir), "--steps", ",".join(map(str, chosen)),
                        "--out", str(out), "--config.llc.chains=2",
                        "--scores", str(tmp_path / "a" / "scores.json"),
                        "--plot", str(tmp_path / "llc.png")]) == 0
    got = json.loads(out.read_text())
    want = [run["llc"][run["steps"].index(s)] for s in chosen]
    np.testing.assert_allclose(got["llc"], want, rtol=1e-3, atol=1e-4)
    assert (tmp_path / "llc.png").stat().st_size > 1000
    with pytest.raises(SystemExit):
        script.main(["--workdir", str(workdir), "--steps", "7777", "--out", str(out)])
    assert "no snapshot at step(s) [7777]" in capsys.readouterr().err
