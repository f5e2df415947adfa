import jax
import jax.numpy as jnp
import numpy as np
import pytest

from icl_jax.model import add_positions, init_params, loss_by_position, make_model, smear
from conftest import tiny_config


def _model(arg="layers=2", **kw):
    cfg = tiny_config(arg, **kw)
    model = make_model(cfg.model)
    return cfg, model, init_params(model, jax.random.key(1))


@pytest.mark.parametrize("arg", ["layers=2", "layers=1,smear=true", "layers=3,mlp=true,layer_norm=true",
                                 "layers=2,positions=residual"])
def test_causal_later_tokens_never_change_earlier_logits(arg):
    cfg, model, params = _model(arg)
    rng = np.random.default_rng(0)
    a = rng.integers(0, 32, (2, 32))
    b = a.copy()
    b[:, 20:] = rng.integers(0, 32, (2, 12))
    la, ca = model.apply({"params": params}, a)
    lb, cb = model.apply({"params": params}, b)
    np.testing.assert_allclose(la[:, :20], lb[:, :20], atol=1e-5)
    assert not np.allclose(la[:, 20:], lb[:, 20:])
    np.testing.assert_allclose(ca["attention"][:, :, :, :20], cb["attention"][:, :, :, :20], atol=1e-6)


def test_attention_shape_is_batch_layer_head_query_key_and_rows_sum_to_one():
    cfg, model, params = _model("layers=3")
    _, cache = model.apply({"params": params}, jnp.zeros((2, 17), jnp.int32))
    att = np.asarray(cache["attention"])
    assert att.shape == (2, 3, 2, 17, 17)
    np.testing.assert_allclose(att.sum(-1), 1.0, atol=1e-5)
    assert np.all(np.triu(att, k=1) == 0)  # no attention to the future


def test_each_head_weights_are_found_by_paper_name():
    cfg, model, params = _model("layers=2,smear=true")
    attn = params["block_1"]["attn"]
    assert attn["W_Q"].shape == (2, 32, 16) and attn["W_O"].shape == (2, 16, 32)
    assert attn["smear"].shape == (2,)
    assert params["W_E"].shape == (32, 32) and params["W_U"].shape == (32, 32)


def test_smeared_keys_equal_a_hand_computation():
    rng = np.random.default_rng(0)
    k = rng.normal(size=(2, 6, 3, 4)).astype(np.float32)
    alpha = np.array([-1.0, 0.0, 2.0], np.float32)
    expected = k.copy()
    s = 1 / (1 + np.exp(-alpha))
    for j in range(1, 6):
        for h in range(3):
            expected[:, j, h] = s[h] * k[:, j, h] + (1 - s[h]) * k[:, j - 1, h]
    np.testing.assert_allclose(smear(jnp.asarray(k), jnp.asarray(alpha)), expected, rtol=1e-5)


def test_smeared_keys_inside_the_model_follow_the_formula():
    """A 1-layer model whose smear parameter is pushed to +inf equals the vanilla model."""
    cfg, vanilla, params = _model("layers=1")
    _, smeared, sparams = _model("layers=1,smear=true")
    sparams = jax.tree.map(lambda x: x, sparams)
    for key in params:
        if key != "block_0":
            sparams[key] = params[key]
    sparams["block_0"]["attn"] = dict(params["block_0"]["attn"], smear=jnp.full((2,), 50.0))
    tokens = jnp.arange(32)[None] % 7
    np.testing.assert_allclose(vanilla.apply({"params": params}, tokens)[0],
                               smeared.apply({"params": sparams}, tokens)[0], atol=1e-5)
    sparams["block_0"]["attn"]["smear"] = jnp.zeros((2,))
    assert not np.allclose(vanilla.apply({"params": params}, tokens)[0],
                           smeared.apply({"params": sparams}, tokens)[0], atol=1e-3)


@pytest.mark.parametrize("arg", ["layers=2", "layers=2,mlp=true,layer_norm=true"])
def test_shortformer_positions_reach_only_queries_and_keys(arg):
    """With W_Q = W_K = 0 no logit may depend on the position table."""
    cfg, model, params = _model(arg)
    for layer in range(2):
        attn = params[f"block_{layer}"]["attn"]
        attn["W_Q"] = jnp.zeros_like(attn["W_Q"])
        attn["W_K"] = jnp.zeros_like(attn["W_K"])
    tokens = jax.random.randint(jax.random.key(2), (2, 32), 0, 32)
    a = model.apply({"params": params}, tokens)[0]
    params["W_pos"] = jax.random.normal(jax.random.key(3), params["W_pos"].shape) * 5
    b = model.apply({"params": params}, tokens)[0]
    np.testing.assert_allclose(a, b, atol=1e-5)


def test_residual_positions_do_reach_the_logits():
    cfg, model, params = _model("layers=1,positions=residual")
    tokens = jnp.zeros((1, 32), jnp.int32)
    a = model.apply({"params": params}, tokens)[0]
    params["W_pos"] = params["W_pos"] * 2
    assert not np.allclose(a, model.apply({"params": params}, tokens)[0])


def test_loss_by_position_is_cross_entropy_of_the_next_token():
    cfg, model, params = _model("layers=1")
    tokens = jax.random.randint(jax.random.key(0), (2, 33), 0, 32)
    logits, _ = model.apply({"params": params}, tokens[:, :-1])
    p = jax.nn.softmax(np.asarray(logits, np.float64), -1)
    expected = -np.log(np.take_along_axis(np.asarray(p), np.asarray(tokens[:, 1:, None]), -1)[..., 0])
    np.testing.assert_allclose(loss_by_position(model, params, tokens), expected, rtol=1e-4)


def test_add_positions_equals_broadcasting_in_value_and_gradient():
    # add_positions writes the broadcast as a product with ones so that the gradient is
    # a matrix-vector product; the numbers must be those of plain broadcasting.
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(3, 5, 4)), jnp.float32)
    pos = jnp.asarray(rng.normal(size=(5, 4)), jnp.float32)
    w = jnp.asarray(rng.normal(size=(3, 5, 4)), jnp.float32)
    np.testing.assert_allclose(add_positions(x, pos), x + pos, rtol=1e-6)
    ours = jax.grad(lambda x, p: (jnp.sin(add_positions(x, p)) * w).sum(), (0, 1))(x, pos)
    plain = jax.grad(lambda x, p: (jnp.sin(x + p) * w).sum(), (0, 1))(x, pos)
    for a, b in zip(ours, plain):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    # by hand: d/dpos sums the per-example gradient over the batch
    np.testing.assert_allclose(ours[1], (jnp.cos(x + pos) * w).sum(0), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("arg", ["layers=2", "layers=1,smear=true",
                                 "layers=2,mlp=true,layer_norm=true,positions=residual"])
def test_dot_product_attention_kernel_equals_the_blocked_one(arg):
    # model.attention="dot_product_attention" (what "auto" picks on accelerators) must be
    # the same model: logits, gradients and the cache's patterns. Context 80 spans two of
    # the blocked kernel's query blocks.
    from icl_jax.model import attention_kernel
    assert attention_kernel("auto") == "blocked"  # on CPU
    cfg = tiny_config(arg, **{"model.context": 80})
    blocked = make_model(cfg.model)
    cfg.model.attention = "dot_product_attention"
    fused = make_model(cfg.model)
    params = jax.tree.map(lambda p: p + 0.05, init_params(blocked, jax.random.key(3)))
    tokens = np.random.default_rng(0).integers(0, 32, (3, 81))
    loss = lambda model: jax.grad(lambda p: loss_by_position(model, p, tokens).mean())(params)
    (lb, cb), (lf, cf) = (jax.jit(m.apply)({"params": params}, tokens[:, :-1])
                          for m in (blocked, fused))
    np.testing.assert_allclose(lf, lb, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(cf["attention"], cb["attention"], atol=1e-5)
    np.testing.assert_allclose(cf["z"], cb["z"], rtol=1e-5, atol=1e-5)
    for a, b in zip(jax.tree.leaves(loss(fused)), jax.tree.leaves(loss(blocked))):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


def test_an_unknown_attention_kernel_is_refused_by_name():
    from icl_jax.config import ConfigError
    with pytest.raises(ConfigError, match="model.attention"):
        tiny_config("layers=1", **{"model.attention": "flash"})


@pytest.mark.parametrize("platform, kernel", [("cpu", "blocked"), ("cuda", "dot_product_attention"),
                                              ("tpu", "dot_product_attention"),
                                              (None, "blocked")])  # None: this CPU backend
def test_auto_attention_follows_the_platform_the_model_is_built_for(platform, kernel):
    cfg = tiny_config("layers=1")
    model = make_model(cfg.model, platform=platform)
    assert model.kernel == kernel
    # the kernel is fixed at build time: tracing on this CPU does not change it. The
    # einsum of jax.nn.dot_product_attention's logits names itself in the lowered
    # module's locations; our blocked kernel's is "bhtk,bhsk->bhts".
    params = init_params(model, jax.random.key(0))
    text = jax.jit(lambda t: model.apply({"params": params}, t)[0]).lower(
        jnp.zeros((1, 8), jnp.int32)).as_text(debug_info=True)
    assert ("BTNH,BSNH->BNTS" in text) == (kernel == "dot_product_attention")


@pytest.mark.parametrize("dtype, d_head, kernel", [
    ("bfloat16", 64, "cudnn"), ("bfloat16", 32, "cudnn"), ("bfloat16", 128, "cudnn"),
    ("float32", 64, "dot_product_attention"),    # cuDNN's flash kernel wants 16-bit inputs
    ("bfloat16", 12, "dot_product_attention"),   # not a multiple of 8
    ("bfloat16", 256, "dot_product_attention")])  # over 128 (Hopper alone takes 256)
def test_auto_attention_on_cuda_is_cudnns_where_its_kernel_fits(dtype, d_head, kernel):
    from icl_jax.model import attention_kernel
    assert attention_kernel("auto", "cuda", dtype, d_head) == kernel
    assert attention_kernel("auto", "tpu", dtype, d_head) == "dot_product_attention"
    cfg = tiny_config("layers=1", **{"model.dtype": dtype, "model.d_head": d_head})
    assert make_model(cfg.model, platform="cuda").kernel == kernel


@pytest.mark.parametrize("version, kernel", [("cuda 12030", "cudnn"),
                                             ("rocm 60342", "dot_product_attention")])
def test_auto_attention_on_this_gpu_asks_the_backend_whose_gpu_it_is(version, kernel,
                                                                     monkeypatch):
    # jax's default backend is "gpu" on CUDA and ROCm alike; cuDNN exists only on the first
    from icl_jax.model import attention_kernel

    class Device:
        client = type("Client", (), {"platform_version": version})()

    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    monkeypatch.setattr(jax, "devices", lambda *a: [Device()])
    assert attention_kernel("auto", None, "bfloat16", 64) == kernel


@pytest.mark.parametrize("dtype, d_head", [("float32", 16), ("bfloat16", 12)])
def test_cudnn_attention_named_where_it_cannot_run_is_refused(dtype, d_head):
    from icl_jax.config import ConfigError
    with pytest.raises(ConfigError, match="model.attention.*'cudnn' needs"):
        tiny_config("layers=1", **{"model.attention": "cudnn", "model.dtype": dtype,
                                   "model.d_head": d_head})
    tiny_config("layers=1", **{"model.attention": "cudnn", "model.dtype": "bfloat16",
                               "model.d_head": 16})


@pytest.mark.parametrize("scale", [1.0, 0.1])
def test_mlp_out_init_sets_the_std_of_w_out(scale):
    cfg = tiny_config("layers=2,mlp=true", **{"model.d_mlp": 256, "model.mlp_out_init": scale})
    params = init_params(make_model(cfg.model), jax.random.key(0))
    w = np.concatenate([np.ravel(params[f"block_{l}"]["mlp"]["W_out"]["kernel"])
                        for l in range(2)])
    assert np.std(w) == pytest.approx(scale / np.sqrt(256), rel=0.05)


def test_the_typed_model_config_is_the_config_sections_fields():
    """ModelConfig holds exactly the fields config.py validates in the `model` section, is
    made from a validated section (ConfigDict or dict) unchanged, and names a field it does
    not know or one that is missing."""
    import dataclasses
    from icl_jax import config as config_lib
    from icl_jax.model import ModelConfig
    fields = {f.name for f in dataclasses.fields(ModelConfig)}
    assert fields == set(config_lib.SCHEMA["model"])
    section = tiny_config("layers=3,mlp=true").model
    typed = ModelConfig.of(section)
    assert typed.to_dict() == section.to_dict() and ModelConfig.of(typed) is typed
    assert make_model(section.to_dict()).cfg == typed
    with pytest.raises(ValueError, match="unknown model field.*n_layer\\b"):
        ModelConfig.of({**section.to_dict(), "n_layer": 2})
    with pytest.raises(ValueError, match="d_model.*missing"):
        ModelConfig.of({k: v for k, v in section.to_dict().items() if k != "d_model"})
