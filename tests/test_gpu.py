"""GPU-only checks (run on the device machine: `pytest -m gpu tests/test_gpu.py`): each fast path
against the plain JAX path on random inputs. Skipped where no GPU is present (CPU CI)."""

import jax
import jax.numpy as jnp
import pytest

from causal_dit_jax import CausalWanDiT, InferenceConfig
from causal_dit_jax.attention import dot_product_attention
from causal_dit_jax.config import get_preset

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(jax.default_backend() != "gpu", reason="needs a GPU")]

# bf16 flash attention vs XLA's bf16 attention: both round to bf16 (8-bit mantissa); 1e-2 relative.
BF16_TOL = 1e-2


def rel(a, b):
    a, b = a.astype(jnp.float32), b.astype(jnp.float32)
    return float(jnp.linalg.norm(a - b) / jnp.linalg.norm(b))


@pytest.mark.parametrize("filled", [4680, 14040, 32760])
def test_cudnn_attention_with_cache_length_matches_xla(filled):
    ks = jax.random.split(jax.random.key(filled), 3)
    q = jax.random.normal(ks[0], (1, 4680, 12, 128), jnp.bfloat16)
    k = jax.random.normal(ks[1], (1, 32760, 12, 128), jnp.bfloat16)
    v = jax.random.normal(ks[2], (1, 32760, 12, 128), jnp.bfloat16)
    fast = dot_product_attention(q, k, v, kv_length=filled, implementation="cudnn")
    plain = dot_product_attention(q, k, v, kv_length=filled, implementation="xla")
    assert rel(fast, plain) <= BF16_TOL


def test_chunk_rollout_fast_path_matches_xla():
    cfg = get_preset("demo")
    inference = InferenceConfig()
    outs = []
    for impl in ("cudnn", "xla"):
        dit = CausalWanDiT(cfg, attention_impl=impl)
        params = dit.init(jax.random.key(0))
        text = dit.encode_text(params, jax.random.normal(jax.random.key(1), (1, cfg.text_len, cfg.text_dim)))
        cache = dit.init_cache(inference, 1, 6, 60, 104)
        rope = dit.rope_tables(6, 60, 104)
        x = jax.random.normal(jax.random.key(2), (1, 3, 60, 104, 16))
        t = jnp.full((1, 3), 937.5)
        fwd = jax.jit(dit.forward)
        _, cache = fwd(params, x, jnp.zeros_like(t), text, cache, 0, rope)
        out, _ = fwd(params, x * 0.5, t, text, cache, 3, rope)
        outs.append(out)
    assert rel(outs[0], outs[1]) <= BF16_TOL
