"""The fused q/k RMSNorm + RoPE kernel (Pallas; interpreted on CPU) against the plain JAX path:
values, gradients, and the whole model with either."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from dit_fixtures import two_chunk_forwards

from causal_dit_jax import CausalWanDiT, KernelConfig
from causal_dit_jax.model.config import get_preset
from causal_dit_jax.model.qk_norm_rope import qk_norm_rope, qk_norm_rope_pallas, qk_norm_rope_xla


def _inputs(key, b, l, n, d, dtype):
    ks = jax.random.split(key, 4)
    c = n * d
    qkv = (3 * jax.random.normal(ks[0], (b, l, 3 * c))).astype(dtype)
    scale_q = (1 + 0.2 * jax.random.normal(ks[1], (c,))).astype(dtype)
    scale_k = (1 + 0.2 * jax.random.normal(ks[2], (c,))).astype(dtype)
    angle = 6 * jax.random.uniform(ks[3], (l, d // 2))
    return qkv, scale_q, scale_k, jnp.cos(angle), jnp.sin(angle)


@pytest.mark.parametrize(
    "b,l,n,d,dtype", [(2, 12, 4, 16, jnp.bfloat16), (1, 7, 12, 128, jnp.bfloat16), (1, 5, 3, 8, jnp.float32)]
)
def test_pallas_equals_xla(b, l, n, d, dtype):
    """The same float32 operations, in the same order but for the sum of squares: on CPU (interpreted)
    the results are identical; widths that are not a power of 2 (12 x 128) are masked."""
    args = _inputs(jax.random.key(l), b, l, n, d, dtype)
    ref = qk_norm_rope_xla(*args, 1e-6, n)
    out = jax.jit(qk_norm_rope_pallas, static_argnums=(5, 6))(*args, 1e-6, n)
    for a, r in zip(out, ref):
        assert a.shape == (b, l, n, d) and a.dtype == dtype
        np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(r, np.float32), rtol=1e-6, atol=1e-6)


def test_pallas_gradient_is_the_xla_gradient():
    args = _inputs(jax.random.key(3), 2, 6, 4, 16, jnp.float32)
    g = jax.random.normal(jax.random.key(4), (2, 2, 6, 4, 16))

    def loss(fn, qkv, sq, sk):
        q, k = fn(qkv, sq, sk, args[3], args[4], 1e-6, 4)
        return jnp.sum(q * g[0]) + jnp.sum(k * g[1])

    grads = [
        jax.grad(lambda *a, f=f: loss(f, *a), argnums=(0, 1, 2))(*args[:3]) for f in (qk_norm_rope_pallas, qk_norm_rope_xla)
    ]
    for a, r in zip(*grads):
        np.testing.assert_allclose(a, r, rtol=1e-6, atol=1e-6)


def test_bad_inputs():
    args = _inputs(jax.random.key(0), 1, 4, 4, 16, jnp.float32)
    with pytest.raises(ValueError, match="unknown q/k norm"):
        qk_norm_rope(*args, 1e-6, 4, implementation="triton")
    with pytest.raises(ValueError, match="does not match RoPE tables"):
        qk_norm_rope(*args, 1e-6, 8, implementation="pallas")  # 8 heads of 8: 4 pairs, tables have 8
    with pytest.raises(ValueError, match="norm_rope_impl"):
        KernelConfig(norm_rope_impl="cuda")


def test_model_with_the_pallas_kernel_equals_the_xla_model():
    """A chunk forward with the cache, with either implementation: the same flow and the same cache."""
    cfg = get_preset("tiny")
    outs = []
    for impl in ("xla", "pallas"):
        out, cache = two_chunk_forwards(CausalWanDiT(cfg, KernelConfig(norm_rope_impl=impl)), 4, 6)
        outs.append((out, cache.k))
    # The float32 preset: the kernel sums the squares in another order (f32 rounding, ~1e-7), which two
    # forwards carry to at most ~1e-5 absolute (measured 1.1e-5 in 1 of 1152 elements). 1e-4 relative L2.
    for a, r in zip(outs[0], outs[1]):
        a, r = np.asarray(a, np.float32), np.asarray(r, np.float32)
        assert np.linalg.norm(a - r) / np.linalg.norm(r) <= 1e-4


@pytest.mark.skipif(jax.default_backend() == "gpu", reason="the GPU runs the kernel sharded (tests/test_gpu.py)")
def test_sequence_parallel_refuses_the_interpreted_pallas_kernel():
    """Off GPUs the Pallas kernel runs in JAX's interpreter, which cannot run inside shard_map: the
    sequence-parallel model says so at construction instead of silently running the XLA path."""
    from causal_dit_jax.sharding import SequenceParallelDiT, make_mesh

    dit = CausalWanDiT(get_preset("tiny"), KernelConfig(norm_rope_impl="pallas"))
    with pytest.raises(ValueError, match="norm_rope_impl='pallas' under sequence parallelism"):
        SequenceParallelDiT(dit, make_mesh(2, strategy="ulysses", num_heads=12))
