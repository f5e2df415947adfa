"""Every head's refined LLC (head_llc.py): known answers, the compiled program against the
one-head estimate, the data subsets, devinterp's head restriction, and analyze --llc heads."""
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from conftest import SMALL, tiny_config
from icl_jax import data as data_lib, head_llc, llc
from icl_jax.model import init_params, make_model


def llc_cfg(**kw):
    d = dict(sampler="sgld", eps=2e-3, gamma=1.0, n_beta=0.0, chains=8, burn_in=100,
             draws=1000, batch_size=200, examples=2000, rms_alpha=0.99, rms_eps=0.1)
    d.update(kw)
    return ml_collections.ConfigDict(d)


def tiny_model(**overrides):
    config = tiny_config("layers=2", **overrides)
    model = make_model(config.model)
    return config, model, init_params(model, jax.random.key(0))


def flat_head(params, layer, head):
    return jnp.concatenate([jnp.ravel(v) for v in
                            jax.tree.leaves(head_llc.head_weights(params, layer, head))])


@pytest.mark.parametrize("stacking", ["map", "vmap"])
def test_wrllc_of_a_head_at_a_quadratic_minimum_is_half_its_parameters(stacking):
    """Known answers through the program analyze runs (every head of a snapshot, its layers
    looped, its heads mapped or vmapped). A hand-built loss over a 2-layer model's parameter
    tree: 1/2 |w - x|^2 averaged over n = 2000 points x of spread 0.01, w the d = 140
    weights of head L1H1 (d_model 8, d_head 4: 4 * 8 * 4 + 3 * 4), the snapshot's L1H1 at
    their mean. L1H1's loss is then a regular quadratic minimum of d parameters: its wrLLC
    is d/2 = 70, times nbeta / (nbeta + gamma) = 0.974 for the localisation (as
    tests/test_llc.py derives), held within three standard errors of the chains' mean plus
    3% (SGLD's discretisation bias, a few percent). No other head's weights enter the loss:
    their chains move, the loss does not, and their wrLLC is 0 (to float32 rounding times
    nbeta: every 10 steps the batches cover the pool once, and the 1,000 draws are 100
    whole passes, so their mean loss is the pool's)."""
    config, model, params = tiny_model(**{"model.d_model": 8, "model.n_heads": 2})
    d = 4 * 8 * 4 + 3 * 4
    assert head_llc.n_head_params(model.cfg) == d == flat_head(params, 1, 1).size
    rng = np.random.default_rng(0)
    x = (np.asarray(flat_head(params, 1, 1))[None] + rng.normal(size=(2000, d)) * 0.01)
    x += np.asarray(flat_head(params, 1, 1)) - x.mean(0)  # centred exactly on the snapshot
    loss = lambda p, b: 0.5 * jnp.mean(jnp.sum((flat_head(p, 1, 1) - b["x"]) ** 2, -1))  # noqa: E731
    cfg = llc_cfg()
    r = head_llc.heads_over_snapshots(model, [params], {"all": {"x": jnp.asarray(x, jnp.float32)}},
                                      cfg, stacking=stacking, loss_fn=loss)
    nbeta = llc.default_nbeta(200)
    want = d / 2 * nbeta / (nbeta + cfg.gamma)
    got, se = r["llc"][0, 0, 1, 1], r["llc_se"][0, 0, 1, 1]
    assert r["n_params"] == d and not r["diverged"]
    assert abs(got - want) < 3 * se + 0.03 * want, (got, want, se)
    others = np.delete(r["llc"][0, 0].ravel(), 3)
    assert np.abs(others).max() < 1e-3, others
    assert np.abs(np.delete(r["llc_chains"][0, 0].reshape(4, -1), 3, 0)).max() < 1e-3


@pytest.mark.parametrize("stacking", ["map", "vmap"])
def test_heads_and_snapshots_share_one_traced_program(stacking):
    """Every head of a layer is one traced computation (mapped or vmapped over the head
    index), not a Python loop per head, and the snapshots reuse the program compiled for the
    first: the loss is traced as often for 4 heads a layer as for 2, and as often for three
    snapshots as for one (a Python loop over heads would trace it H times a layer)."""
    def traces(n_heads, n_snapshots):
        config, model, _ = tiny_model(**{"model.d_model": 8, "model.n_heads": n_heads})
        trees = [init_params(model, jax.random.key(i)) for i in range(n_snapshots)]
        calls = [0]

        def loss(p, b):
            calls[0] += 1  # runs only while jax traces
            return 0.5 * jnp.mean(jnp.sum((flat_head(p, 1, 0) - b["x"]) ** 2, -1))
        x = jnp.zeros((16, head_llc.n_head_params(model.cfg)))
        r = head_llc.heads_over_snapshots(model, trees, {"all": {"x": x}},
                                          llc_cfg(chains=2, burn_in=0, draws=3, batch_size=4),
                                          stacking=stacking, chunk=n_snapshots, loss_fn=loss)
        assert r["llc"].shape == (n_snapshots, 1, 2, n_heads)
        return calls[0]

    assert traces(2, 1) == traces(4, 1) == traces(2, 3) > 0


@pytest.mark.slow
def test_program_gives_each_heads_own_estimate():
    """The compiled program (every subset, layer, head and chain of two snapshots, mapped
    and vmapped) gives, head by head, what estimate_head_llc gives for that head alone:
    the same batches and the same noise, so the same chains. The drLLC on pasted tokens is
    the weighted loss's, and differs from the wrLLC; no two heads read alike."""
    config, model, params = tiny_model(**{"llc.examples": 64})
    second = init_params(model, jax.random.key(1))
    cfg = config.llc.copy_and_resolve_references()
    cfg.chains, cfg.draws, cfg.batch_size = 2, 6, 8
    pools = head_llc.subset_pools(data_lib.make_source(config), config, subsets=True)
    assert list(pools) == ["all", "pasted", "background"]
    outs = [head_llc.heads_over_snapshots(model, [params, second], pools, cfg, steps=[0, 9],
                                          stacking=s, chunk=2) for s in ("map", "vmap")]
    for r in outs:
        assert r["llc"].shape == (2, 3, 2, 2) and r["llc_chains"].shape == (2, 3, 2, 2, 2)
        assert r["subsets"] == ["all", "pasted", "background"] and not r["diverged"]
        assert r["n_params"] == head_llc.n_head_params(model.cfg)
    np.testing.assert_allclose(outs[0]["llc_chains"], outs[1]["llc_chains"], rtol=1e-3,
                               atol=1e-3)
    r = outs[0]
    for p, (layer, head) in ((0, (1, 0)), (1, (0, 1)), (2, (1, 1))):
        one = head_llc.estimate_head_llc(model, jax.device_get(second), layer, head,  # as restored
                                         pools[r["subsets"][p]], cfg)
        np.testing.assert_allclose(r["llc_chains"][1, p, layer, head], one["llc_chains"],
                                   rtol=1e-4, atol=1e-4)
        assert r["init_loss"][1, p] == pytest.approx(one["init_loss"], rel=1e-5)
    assert len(set(np.round(r["llc"][1, 0].ravel(), 4))) == 4
    assert not np.allclose(r["llc"][:, 1], r["llc"][:, 0], rtol=1e-2)
    assert r["init_loss"][1, 1] != pytest.approx(r["init_loss"][1, 2], rel=1e-3)


def test_synthetic_subsets_are_the_pasted_and_background_predictions():
    config = tiny_config("layers=2", **{"llc.examples": 64})
    source = data_lib.make_source(config)
    T1 = config.model.context + 1
    tokens, pasted = source.eval_set_pasted(64, T1)
    np.testing.assert_array_equal(tokens, source.eval_set(64, T1))
    pools = head_llc.subset_pools(source, config, subsets=True)
    np.testing.assert_array_equal(pools["all"], llc.held_out_pool(source, config))
    w_p, w_b = pools["pasted"]["weight"], pools["background"]["weight"]
    np.testing.assert_array_equal(w_p, pasted[:, 1:])  # the prediction of token t + 1
    assert w_p.shape == (64, T1 - 1) and (w_p + w_b == 1).all() and 0.05 < w_p.mean() < 0.95
    # half the pasted tokens are a segment's copy, whose trigram ending at the predicted token
    # occurred earlier in the sequence; background trigrams repeat too (copy2 repeats token
    # t - 2), but less often (0.21 against 0.14 here)
    def seen(i, t):
        g = tuple(tokens[i, t - 1:t + 2])
        return any(tuple(tokens[i, s - 1:s + 2]) == g for s in range(1, t))
    repeats = np.array([[t >= 1 and seen(i, t) for t in range(T1 - 1)] for i in range(64)])
    assert repeats[w_p == 1].mean() > 1.3 * repeats[w_b == 1].mean()
    assert list(head_llc.subset_pools(source, config)) == ["all"]


def test_text_subsets_are_held_out_test_and_library_files(tmp_path, monkeypatch):
    """On pycode, "tests" holds windows of held-out files that match TEST_FILES only, and
    "library" of the other held-out files only (each file's body one letter, so a window
    shows which files it came from); training files are in neither."""
    from icl_jax import corpus
    monkeypatch.setenv("ICL_JAX_CACHE", str(tmp_path / "cache"))
    root = tmp_path / "root"
    (root / "pkg" / "tests").mkdir(parents=True)
    letters = "abcdefghijklmnopqrstuvwx"
    for i, c in enumerate(letters):
        where = (root / "pkg" / "tests" / f"test_{c}.py" if i % 3 == 0
                 else root / "pkg" / f"{c}.py")
        where.write_text(f"{c} = {c}\n" * 200)
    config = tiny_config("layers=2", **{"data.name": "pycode", "data.roots": str(root),
                                        "data.holdout_fraction": 0.5, "model.vocab_size": 256,
                                        "llc.examples": 16, "llc.batch_size": 8})
    source = data_lib.make_source(config)
    _, held = corpus.split_by_hash(corpus.pycode_files([str(root)]), 0.5)
    letter = lambda path: os.path.basename(path).removeprefix("test_")[0]  # noqa: E731
    held_tests = {letter(p) for p, _, _ in held if "/tests/" in p}
    held_lib = {letter(p) for p, _, _ in held if "/tests/" not in p}
    assert held_tests and held_lib
    pools = head_llc.subset_pools(source, config, subsets=True)
    assert list(pools) == ["all", "tests", "library"]
    for name, allowed in (("tests", held_tests), ("library", held_lib)):
        pool = pools[name]
        assert pool.shape == (16, config.model.context + 1) and pool.dtype == np.int32
        seen = {chr(t) for t in np.unique(pool)} & set(letters)
        assert seen and seen <= allowed, (name, seen, allowed)
    with pytest.raises(data_lib.DataError, match="no held-out pycode file matches"):
        head_llc.text_subset_pool(source, config, "*/nothing_like_this_*.py", 4)


def test_subsets_of_other_data_are_refused_by_name(tmp_path, monkeypatch):
    text = tmp_path / "t.txt"
    text.write_text("hello world\n" * 2000)
    config = tiny_config("layers=2", **{"data.name": "files", "data.path": str(text),
                                        "model.vocab_size": 256})
    monkeypatch.setenv("ICL_JAX_CACHE", str(tmp_path / "cache"))
    source = data_lib.make_source(config)
    with pytest.raises(data_lib.DataError, match="data.name='files'"):
        head_llc.subset_pools(source, config, subsets=True)


def test_chosen_steps_spread_over_log_steps():
    steps = [0, 1, 3, 7, 15, 31, 62, 125] + list(range(250, 6001, 250))
    got = head_llc.chosen_steps(steps, 12)
    assert len(got) == 12 and got[0] == 0 and got[-1] == 6000 and set(got) <= set(steps)
    assert sum(s < 250 for s in got) >= 4  # the early decades are not crowded out
    assert head_llc.chosen_steps(steps, 0) == steps == head_llc.chosen_steps(steps, 100)


def test_llc_mode_parses_and_names_bad_values():
    assert head_llc.parse_mode("model") == (True, None)
    assert head_llc.parse_mode("heads") == (True, head_llc.HeadView())
    assert head_llc.parse_mode("heads,data") == (True, head_llc.HeadView(subsets=True))
    for bad in ("data", "head", "", "heads,extra"):
        with pytest.raises(ValueError, match="model, heads or heads,data"):
            head_llc.parse_mode(bad)


# ----------------------------------------------------------------------------- devinterp

@pytest.mark.parametrize("sampler", ["sgld", "rmsprop_sgld"])
def test_agrees_with_devinterps_head_restriction(sampler, monkeypatch):
    """One head's wrLLC, ours against devinterp 2.x's own head restriction
    (weight_restrictions.create_param_masks(model, "l1h2"): per-element masks on that
    layer's W_Q, W_K, W_V, W_O, b_Q, b_K, b_V; the rest of the model fixed) chain by chain:
    the same weights (a freshly initialised quick 2L model, exported to TransformerLens), the
    same batches in the same order, and the same noise: devinterp draws a full-shaped tensor
    for every masked parameter and multiplies it by the mask, so it is handed one holding
    our head's draw at [head] (and zeros, masked away, elsewhere)."""
    torch = pytest.importorskip("torch")
    pytest.importorskip("transformer_lens")
    datasets = pytest.importorskip("datasets")
    devinterp_llc = pytest.importorskip("devinterp.slt.llc")
    sgmcmc = pytest.importorskip("devinterp.optim.sgmcmc")
    restrictions = pytest.importorskip("devinterp.slt.weight_restrictions")
    from icl_jax import config as config_lib, export

    layer, head = 1, 2
    config = config_lib.load_validated(f"{SMALL}:layers=2")
    model = make_model(config.model)
    params = init_params(model, jax.random.key(2))
    pool = np.asarray(data_lib.make_source(config).eval_set(256, config.model.context + 1))
    cfg = config.llc.copy_and_resolve_references()
    cfg.sampler, cfg.chains, cfg.draws, cfg.batch_size = sampler, 3, 40, 16
    if sampler == "rmsprop_sgld":
        cfg.eps = 3e-4  # as the whole model's comparison: RMSProp's steps are larger
    idx = llc.batch_indices(len(pool), cfg, seed=0)
    idx[:] = idx[0]  # devinterp's chains walk one loader
    ours = head_llc.estimate_head_llc(model, params, layer, head, pool, cfg, indices=idx)

    tl = export.hooked_transformer(params, model.cfg)
    masks = restrictions.create_param_masks(tl, f"l{layer}h{head}")
    prefix = f"blocks.{layer}.attn."
    assert sorted(masks) == sorted(prefix + n for n in head_llc.HEAD_WEIGHTS)
    shapes = dict(tl.named_parameters())
    keys_CS = llc.chain_keys(jax.random.key(0), cfg.chains, cfg.burn_in + cfg.draws)
    w_star = head_llc.head_weights(params, layer, head)
    draws = []
    for k in keys_CS.reshape(-1):
        z = llc.step_noise(k, w_star)
        for name in masks:  # devinterp's order: one parameter group per masked parameter
            full = np.zeros(tuple(shapes[name].shape), np.float32)
            full[head] = np.asarray(z[name.removeprefix(prefix)])
            draws.append(full)
    draws = iter(draws)

    def our_normal(mean, std, size, **_):
        z = next(draws)
        assert tuple(z.shape) == tuple(size) and mean == 0 and std == 1
        return torch.from_numpy(z)

    monkeypatch.setattr(sgmcmc.torch, "normal", our_normal)

    def per_token_loss(net, ids):
        logits = net(ids[:, :-1])
        return torch.nn.functional.cross_entropy(logits.transpose(1, 2), ids[:, 1:],
                                                 reduction="none")

    walk = datasets.Dataset.from_dict({"input_ids": pool[idx[0].ravel()].tolist()})
    walk.set_format("torch")
    extra = ({} if sampler == "sgld" else
             dict(sampling_method="rmsprop_sgld", rmsprop_eps=cfg.rms_eps,
                  rmsprop_alpha=cfg.rms_alpha))
    theirs = devinterp_llc.llc(
        tl, walk, {}, lr=cfg.eps, n_beta=ours["nbeta"], localization=cfg.gamma,
        param_masks=masks, num_chains=cfg.chains, num_draws=cfg.draws,
        batch_size=cfg.batch_size, num_burnin_steps=cfg.burn_in,
        num_init_loss_batches=len(pool) // cfg.batch_size, shuffle=False, device="cpu",
        loss_fn=per_token_loss, **extra)
    assert next(draws, None) is None  # devinterp drew exactly our noise, no more
    assert float(theirs["init_loss"]) == pytest.approx(ours["init_loss"], rel=1e-5)
    assert ours["chain_ok"].all()
    np.testing.assert_allclose(ours["loss_trace"], np.asarray(theirs["loss_trace"]), rtol=1e-5)
    np.testing.assert_allclose(ours["llc_chains"], np.asarray(theirs["llc_per_chain"]),
                               rtol=1e-4, atol=1e-4)
    print(f"\nL{layer}H{head} {sampler}: ours {ours['llc_chains']}, "
          f"devinterp {np.asarray(theirs['llc_per_chain'])}")


# ----------------------------------------------------------------------------- analyze

@pytest.mark.slow
def test_analyze_llc_heads_records_every_head(tmp_path):
    """icl-jax analyze --llc heads,data: every head's wrLLC and drLLC at every snapshot in
    scores.json, equal to one call of heads_over_snapshots over the whole run; a second
    analyze reuses them, one with another HeadView does not."""
    import json
    from icl_jax import analysis, checkpoints, cli, report, train
    config = tiny_config("layers=2", **{"llc.chains": 2, "llc.draws": 3, "llc.examples": 32,
                                        "llc.batch_size": 8})
    workdir = tmp_path / "2l"
    train.train_and_evaluate(config, str(workdir), progress=False)
    view = head_llc.HeadView(subsets=True)
    out = tmp_path / "a"
    result = analysis.analyze([str(workdir)], out=str(out), chunk=4, progress=False,
                              llc_heads=view)
    report.write_report(result, progress=False)  # the report shows the head figure
    assert (out / "llc_heads.png").stat().st_size > 10_000
    assert "2l: every head&#x27;s weight-refined LLC" in (out / "report.html").read_text()
    saved = json.loads((out / "scores.json").read_text())
    rec = saved["llc_heads"]
    steps = saved["steps"]
    assert rec["steps"] == steps and len(steps) > 4 and "llc" not in saved
    assert np.asarray(rec["wrllc"]).shape == (len(steps), 2, 2)
    assert sorted(rec["drllc"]) == ["background", "pasted"]
    assert np.asarray(rec["drllc_se"]["pasted"]).shape == (len(steps), 2, 2)
    assert rec["chains"] == 2 and rec["draws"] == 3 and rec["n_params"] > 0
    run = checkpoints.Run(str(workdir))
    pools = head_llc.subset_pools(data_lib.make_source(run.config), run.config, True)
    whole = head_llc.heads_over_snapshots(run.model, [run.params(s) for s in steps], pools,
                                          run.config.llc, steps=steps, seed=run.config.seed)
    np.testing.assert_allclose(rec["wrllc"], whole["llc"][:, 0], rtol=1e-3, atol=1e-4)
    np.testing.assert_allclose(rec["drllc"]["pasted"], whole["llc"][:, 1], rtol=1e-3, atol=1e-4)
    assert result["runs"]["2l"]["llc_heads"]["wrllc"] == rec["wrllc"]

    again = analysis.analyze([str(workdir)], out=str(out), progress=False, llc_heads=view)
    assert again["runs"]["2l"]["scored_with"] == saved["scored_with"]
    # launch/llc_heads.py: 3 of the snapshots, into its own folder, with the figure
    import importlib.util
    from conftest import ROOT
    spec = importlib.util.spec_from_file_location(
        "llc_heads", os.path.join(ROOT, "launch", "llc_heads.py"))
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    assert script.main(["--workdir", str(workdir), "--snapshots", "3", "--data"]) == 0
    few_out = workdir / "analysis-heads"
    few = json.loads((few_out / "scores.json").read_text())
    assert few["scored_with"] != saved["scored_with"]
    few = few["llc_heads"]
    assert few["steps"] == head_llc.chosen_steps(steps, 3) and len(few["steps"]) == 3
    at = [steps.index(s) for s in few["steps"]]  # the same batches and noise at every step
    np.testing.assert_allclose(few["wrllc"], np.asarray(rec["wrllc"])[at], rtol=1e-5)
    assert (few_out / "head_llc.png").stat().st_size > 10_000
    args = cli.build_parser().parse_args(["analyze", "--workdir", "w", "--llc", "heads,data"])
    assert args.llc == (True, view)
