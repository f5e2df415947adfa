"""Every program lowers for TPU and GPU from this CPU (jax.export), so that a pod or a GPU
node never sees a program for the first time.

Lowered for ("tpu",) and ("cuda",): the training step (one model, and an ensemble of
members) data-parallel over an abstract 8-device mesh, the scores of stacked snapshots
(vmapped), and the forward pass; in float32 and in bfloat16 mixed precision; for the quick
profile's model (the small config) and the paper profile's (the paper config: d_model 768,
12 heads, context 2048, vocabulary 8192; only the batch is smaller). Each module must hold
no host callback and no float64, and must use the attention kernel model.attention=auto
picks for its platform: cuDNN's fused attention on CUDA in bfloat16 (its custom calls,
__cudnn$fmhaSoftmax and, in the training step, its backward), jax.nn.dot_product_attention's
XLA path otherwise.

cuDNN's kernel asks the cuDNN library for its version while tracing, and this CPU has no
cuDNN (test_cudnn_attention_cannot_be_lowered_without_cudnn): the `cudnn_version` fixture
stands in for that one query, in these tests only. jax.export also refuses custom calls
it does not guarantee stable unless told (CUDNN_CALLS); jit on a GPU needs neither.
"""
import logging
import re

import jax
import jax.numpy as jnp
import pytest
from jax.sharding import AbstractMesh, NamedSharding, PartitionSpec as P

from icl_jax import config as config_lib, data, device_data, scores, train
from icl_jax.model import init_params, loss_by_position, make_model

N_DEVICES = 8  # the abstract mesh: more devices than this machine has
MEMBERS = 2  # ensemble members
SNAPSHOTS = 3  # stacked snapshots scored in one call
PAPER_CONTEXT = 2048

# jax.nn.dot_product_attention's own einsum, named in the lowered module's locations;
# our blocked kernel's is "bhtk,bhsk->bhts"
DOT_PRODUCT_ATTENTION = "BTNH,BSNH->BNTS"
CUDNN_CALLS = ("__cudnn$fmhaSoftmax", "__cudnn$fmhaSoftmaxBackward")  # forward, backward


@pytest.fixture
def cudnn_version(monkeypatch):
    """cuDNN 9.10 as far as jax's tracing asks (the library itself is absent here)."""
    from jax._src.cudnn import fused_attention_stablehlo
    monkeypatch.setattr(fused_attention_stablehlo, "check_cudnn_version", lambda: 91000)


def _mesh(platform: str, dtype: str):
    """An abstract 8-device mesh; for cuDNN's attention (CUDA, bfloat16) this machine's 4
    CPU devices: its primitive is custom-partitioned, and jax lowers those only with
    devices present (their kind does not matter to the lowered module)."""
    if platform == "cuda" and dtype == "bfloat16":
        return jax.make_mesh((jax.device_count(),), ("data",))
    return AbstractMesh((N_DEVICES,), ("data",))


def _export(fn, platform: str):
    return jax.export.export(fn, platforms=(platform,), disabled_checks=[
        jax.export.DisabledSafetyCheck.custom_call(c) for c in CUDNN_CALLS])


def _check_attention(text: str, platform: str, dtype: str, backward: bool = False):
    """The kernel model.attention=auto picks: cuDNN's on CUDA in bfloat16 (the heads of
    both profiles fit: d_head 16 and 64), XLA's dot_product_attention elsewhere."""
    if platform == "cuda" and dtype == "bfloat16":
        calls = set(re.findall(r"@(__cudnn\$fmha\w*)", text))
        assert calls == set(CUDNN_CALLS if backward else CUDNN_CALLS[:1]), calls
        assert DOT_PRODUCT_ATTENTION not in text
    else:
        assert DOT_PRODUCT_ATTENTION in text and "__cudnn" not in text


def _config(profile: str, dtype: str):
    config = config_lib.load(f"{profile}:layers=2")
    overrides = {"model.dtype": dtype, "train.batch_size": str(2 * N_DEVICES)}
    if profile == "paper":
        overrides.update({"model.context": str(PAPER_CONTEXT), "eval.n_examples": "8"})
    else:
        overrides["eval.n_examples"] = "16"
    config_lib.override(config, overrides)
    return config_lib.validate(config)


def _abstract(tree, sharding):
    return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sharding),
                        tree)


def _check(exported, platform: str):
    """The lowered module's text, after the checks every program must pass."""
    text = exported.mlir_module()
    callbacks = re.findall(r"custom_call @[\w$.]*callback[\w$.]*", text)
    assert not callbacks, f"host callbacks in the {platform} module: {set(callbacks)}"
    assert not re.search(r"\bf64\b|xf64>", text), f"float64 in the {platform} module"
    assert exported.platforms == (platform,)
    return text


def _check_precision(text: str, dtype: str):
    """bfloat16: matrix products in bfloat16, every exponential (softmax, logsumexp of the
    loss) in float32; float32: no bfloat16 anywhere."""
    if dtype == "float32":
        assert "bf16" not in text
        return
    assert re.search(r"stablehlo\.dot_general .*bf16>", text), "no bfloat16 matrix product"
    exps = re.findall(r"stablehlo\.exponential .*", text)
    assert exps or "__cudnn$fmha" in text  # a forward pass's softmax may sit in cuDNN's call
    assert not [e for e in exps if "bf16" in e], "an exponential in bfloat16"


@pytest.fixture(scope="module", params=["small", "paper"])
def profile(request):
    return request.param


PLATFORMS = ("tpu", "cuda")
DTYPES = ("float32", "bfloat16")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("platform", PLATFORMS)
@pytest.mark.parametrize("ensemble", [False, True], ids=["one", "ensemble"])
def test_training_step_lowers_data_parallel_over_8_devices(profile, platform, dtype, ensemble,
                                                          cudnn_version):
    config = _config(profile, dtype)
    t = config.train
    mesh = _mesh(platform, dtype)
    model = make_model(config.model, platform=platform)
    tx = train.make_optimizer(t)
    step = train.make_train_step(model, tx, mesh, t, ensemble=ensemble, platform=platform)
    state = jax.eval_shape(lambda: train.init_state(model, tx, config.seed, t))
    batch_shape = (t.batch_size, config.model.context + 1)
    spec = P("data")
    if ensemble:
        state = jax.tree.map(lambda a: jax.ShapeDtypeStruct((MEMBERS, *a.shape), a.dtype), state)
        batch_shape, spec = (MEMBERS, *batch_shape), P(None, "data")
    # parameters and optimizer state stay float32 whatever model.dtype says
    floats = {a.dtype for a in jax.tree.leaves(state) if jnp.issubdtype(a.dtype, jnp.floating)}
    assert floats == {jnp.dtype("float32")}
    exported = _export(step, platform)(
        _abstract(state, NamedSharding(mesh, P())),
        jax.ShapeDtypeStruct(batch_shape, jnp.int32, sharding=NamedSharding(mesh, spec)))
    assert exported.nr_devices == mesh.size
    text = _check(exported, platform)
    _check_attention(text, platform, dtype, backward=True)
    _check_precision(text, dtype)


@pytest.mark.parametrize("platform", PLATFORMS)
@pytest.mark.parametrize("ensemble, background", [(False, "lag2"), (True, "lag2"),
                                                  (False, "copy2")],
                         ids=["one", "ensemble", "copy2"])
def test_training_step_that_makes_its_own_batches_lowers(platform, ensemble, background,
                                                         cudnn_version):
    # data.generate: each device draws its rows inside the step (device_data.py), with the
    # parallel background fill accelerators get (lag2), or the scan over positions (copy2,
    # the quick profile's, which reads two tokens back), and no host callback
    config = _config("small", "bfloat16")
    config.data.background = background
    t = config.train
    mesh = _mesh(platform, "bfloat16")
    source = data.make_source(config)
    gen = device_data.DeviceSynthetic(source, parallel_fill=True)
    assert source.table is not None and gen.parallel_fill == (background == "lag2")
    model = make_model(config.model, platform=platform)
    tx = train.make_optimizer(t)
    step = train.make_train_step(model, tx, mesh, t, ensemble=ensemble, platform=platform,
                                 generator=gen)
    state = jax.eval_shape(lambda: train.init_state(model, tx, config.seed, t))
    inputs = jax.eval_shape(lambda: jax.tree.map(jnp.asarray, gen.inputs()))
    if ensemble:
        state, inputs = (jax.tree.map(lambda a: jax.ShapeDtypeStruct((MEMBERS, *a.shape),
                                                                     a.dtype), tree)
                         for tree in (state, inputs))
    exported = _export(step, platform)(
        _abstract(state, NamedSharding(mesh, P())), _abstract(inputs, NamedSharding(mesh, P())))
    text = _check(exported, platform)
    assert "threefry" in text  # the batch is drawn inside the program
    _check_attention(text, platform, "bfloat16", backward=True)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("platform", PLATFORMS)
def test_scores_of_stacked_snapshots_and_forward_pass_lower(profile, platform, dtype,
                                                           cudnn_version):
    config = _config(profile, dtype)
    e, T = config.eval, config.model.context
    model = make_model(config.model, platform=platform)
    params = jax.eval_shape(lambda: init_params(model, jax.random.key(0)))
    stacked = jax.tree.map(lambda a: jax.ShapeDtypeStruct((SNAPSHOTS, *a.shape), a.dtype),
                           params)
    inputs = {"eval_BT1": jax.ShapeDtypeStruct((e.n_examples, T + 1), jnp.int32),
              "probe_BT": jax.ShapeDtypeStruct(
                  (e.probe_sequences, 1 + e.probe_tokens * e.probe_repeats), jnp.int32),
              "pca_index_B": jax.ShapeDtypeStruct((e.n_examples,), jnp.int32)}

    def one(params, inputs):  # every score the analysis computes of a snapshot
        return scores.snapshot_scores(model, params, inputs, e.icl_early_index,
                                      e.icl_late_index, e.probe_tokens)

    score = jax.jit(jax.vmap(one, in_axes=(0, None)))
    text = _check(_export(score, platform)(stacked, inputs), platform)
    _check_precision(text, dtype)

    forward = jax.jit(lambda p, tokens_BT: model.apply({"params": p}, tokens_BT)[0])
    exported = _export(forward, platform)(params, jax.ShapeDtypeStruct((4, T), jnp.int32))
    assert exported.out_avals[0].dtype == jnp.float32  # logits in float32
    text = _check(exported, platform)
    _check_attention(text, platform, dtype)
    _check_precision(text, dtype)


def test_the_cpu_lowering_keeps_the_blocked_kernel(tiny):
    # the other half of the kernel choice: built for this CPU, the step has no
    # jax.nn.dot_product_attention (the check above is not vacuous)
    config = tiny("layers=1")
    model = make_model(config.model, platform="cpu")
    params = jax.eval_shape(lambda: init_params(model, jax.random.key(0)))
    text = jax.export.export(jax.jit(lambda p, x: model.apply({"params": p}, x)[0]),
                             platforms=("cpu",))(params, jax.ShapeDtypeStruct((2, 32), jnp.int32))
    assert DOT_PRODUCT_ATTENTION not in text.mlir_module()


def test_cudnn_attention_cannot_be_lowered_without_cudnn():
    # Why the lowerings above need the cudnn_version fixture: cuDNN's own kernel asks the
    # library for its version while tracing. When this starts to pass (jax lowering cuDNN
    # attention without the library), the fixture can go.
    q = jax.ShapeDtypeStruct((1, 128, 2, 64), jnp.bfloat16)
    fn = jax.jit(lambda q: jax.nn.dot_product_attention(q, q, q, is_causal=True,
                                                        implementation="cudnn"))
    with pytest.raises(RuntimeError, match="cuDNN"):
        jax.export.export(fn, platforms=("cuda",))(q)


def test_the_training_step_compiles_once_for_a_whole_run(tiny, tmp_path, monkeypatch, caplog):
    """On 4 devices, through evaluations, snapshots and a growing step counter, the step
    is traced once and compiled once; so is every other program of the loop."""
    assert jax.device_count() == 4  # conftest's fake CPU devices
    traces = []

    def counted(*args, **kwargs):
        traces.append(1)  # runs once per trace of the step, never per call
        return loss_by_position(*args, **kwargs)

    monkeypatch.setattr(train, "loss_by_position", counted)
    config = tiny("layers=2")  # 12 steps: evaluations every 4, snapshots at 0, 1, 2, 4, 8, 12
    with jax.log_compiles(True), caplog.at_level(logging.WARNING):
        train.train_and_evaluate(config, str(tmp_path / "run"), progress=False)
    # "Compiling <name> with global shapes and types ...": a message seen twice would be
    # one program with the same inputs compiled again
    compiled = [r.getMessage() for r in caplog.records if r.getMessage().startswith("Compiling ")]
    names = [m.split(" ")[1] for m in compiled]
    assert len(traces) == 1
    assert names.count("jit(per_device_step)") == 1, names
    assert names.count("jit(evaluate)") == 1, names
    repeated = {m[:120] for m in compiled if compiled.count(m) > 1}
    assert not repeated, f"compiled more than once: {repeated}"
