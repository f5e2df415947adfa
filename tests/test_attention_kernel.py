"""model.causal_attention, the blocked attention kernel: one block against several, and its
values and gradients against PyTorch's fused scaled_dot_product_attention."""
import jax
import numpy as np
import pytest

from icl_jax.model import causal_attention


def test_blocked_causal_attention_equals_one_block_at_a_ragged_length():
    q, k, v = (jax.random.normal(jax.random.key(i), (2, 3, 150, 8)) for i in range(3))
    z, pattern = causal_attention(q, k, v, block=64)
    z_ref, pattern_ref = causal_attention(q, k, v, block=150)
    np.testing.assert_allclose(z, z_ref, atol=1e-5)
    np.testing.assert_allclose(pattern, pattern_ref, atol=1e-6)
    assert np.all(np.triu(np.asarray(pattern), k=1) == 0)
    np.testing.assert_allclose(np.asarray(pattern).sum(-1), 1.0, atol=1e-5)


def test_causal_attention_gradients_equal_torch_sdpa():
    # the attention the bench times against PyTorch's fused kernel computes the same
    # values and gradients (two query blocks and a ragged last one)
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(0)
    q, k, v, g = (rng.normal(size=(2, 3, 150, 8)).astype(np.float32) for _ in range(4))
    z, _ = causal_attention(q, k, v)
    grads = jax.grad(lambda q, k, v: (causal_attention(q, k, v)[0] * g).sum(), (0, 1, 2))(q, k, v)
    tq, tk, tv = (torch.from_numpy(x).requires_grad_() for x in (q, k, v))
    tz = torch.nn.functional.scaled_dot_product_attention(tq, tk, tv, is_causal=True, scale=1.0)
    (tz * torch.from_numpy(g)).sum().backward()
    np.testing.assert_allclose(z, tz.detach().numpy(), atol=2e-5)
    for ours, theirs in zip(grads, (tq.grad, tk.grad, tv.grad)):
        np.testing.assert_allclose(ours, theirs.numpy(), atol=1e-4, rtol=1e-4)
