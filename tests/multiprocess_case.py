"""The computation shared by the 2-process test and its single-process reference."""

import jax
import jax.numpy as jnp

from causal_dit_jax import CausalWanDiT, InferenceConfig
from causal_dit_jax.model.config import get_preset

LH, LW = 6, 10


def build_case():
    cfg = get_preset("tiny")
    dit = CausalWanDiT(cfg)
    params = dit.init(jax.random.key(0))
    text = dit.encode_text(params, jax.random.normal(jax.random.key(1), (1, cfg.text_len, cfg.text_dim)))
    x = jax.random.normal(jax.random.key(2), (1, 6, LH, LW, cfg.in_dim))
    rope = dit.rope_tables(16, LH, LW)
    return dit, params, text, x, rope


def run_two_chunks(model, params, text, x, rope):
    """Two chunks at global frames 7 and 10 through one KV cache; returns both flow predictions."""
    cache = model.init_cache(InferenceConfig(cache_dtype="float32"), 1, 6, LH, LW, origin_frame=7)
    fwd = jax.jit(model.forward)
    t = jnp.full((1, 3), 800.0)
    out0, cache = fwd(params, x[:, :3], t, text, cache, 7, rope)
    out1, cache = fwd(params, x[:, 3:], t, text, cache, 10, rope)
    return out0, out1
