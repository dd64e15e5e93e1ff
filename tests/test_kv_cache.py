"""KV cache slots: append in global mode, sink + ring in local-window mode, bad settings refused."""

import jax.numpy as jnp
import pytest

from causal_dit_jax import KernelConfig, InferenceConfig, init_kv_cache
from causal_dit_jax.model.config import get_preset
from causal_dit_jax.model.kv_cache import cache_write_index, write_chunk

CFG = get_preset("tiny")


def slots(inference, frames, origin=0):
    cache = init_kv_cache(CFG, inference, 1, frames, 4, origin_frame=origin)
    return cache, [tuple(int(v) for v in cache_write_index(cache, origin + 3 * j))
                   for j in range(frames // 3)]


def test_global_cache_appends_and_is_sized_from_frames():
    cache, idx = slots(InferenceConfig(cache_dtype="float32"), 12, origin=5)
    assert cache.k.shape == (CFG.num_layers, 1, 4 * 4, CFG.num_heads, CFG.head_dim)
    assert cache.k.dtype == jnp.float32
    assert idx == [(0, 1), (1, 2), (2, 3), (3, 4)]


def test_default_cache_dtype_is_bf16():
    assert init_kv_cache(CFG, InferenceConfig(), 1, 3, 4).k.dtype == jnp.bfloat16


def test_rolling_cache_keeps_sink_and_recent_chunks():
    # window 12 frames = 4 slots, sink 3 frames = slot 0; ring of 3 slots for the rest.
    _, idx = slots(InferenceConfig(local_attn_size=12, sink_size=3), 24)
    assert [s for s, _ in idx] == [0, 1, 2, 3, 1, 2, 3, 1]
    assert [v for _, v in idx] == [1, 2, 3, 4, 4, 4, 4, 4]


def test_write_chunk_overwrites_one_slot():
    ck = jnp.zeros((1, 12, 2, 4))
    k = jnp.ones((1, 4, 2, 4))
    from causal_dit_jax.model.kv_cache import CacheWrite
    from causal_dit_jax.model.kv_cache import LayerCache
    out = write_chunk(LayerCache(ck[None], ck[None], jnp.int32(0)), k, 2 * k, CacheWrite(jnp.int32(1), jnp.int32(2)))
    nk, nv = out.read()
    assert float(nk[:, 4:8].min()) == 1 and float(nk[:, :4].max()) == 0 and float(nk[:, 8:].max()) == 0
    assert float(nv[:, 4:8].min()) == 2


@pytest.mark.parametrize("kw,msg", [
    (dict(local_attn_size=7), "multiple of frames_per_chunk"),
    (dict(local_attn_size=6, sink_size=1), "sink_size=1"),
    (dict(local_attn_size=6, sink_size=6), "leaves no room"),
    (dict(sink_size=3), "needs a local_attn_size"),
    (dict(cache_dtype="int8"), "unknown dtype"),
])
def test_bad_inference_settings(kw, msg):
    with pytest.raises(ValueError, match=msg):
        InferenceConfig(**kw)


def test_frames_must_fit_chunks():
    with pytest.raises(ValueError, match="do not fit chunks of 3"):
        InferenceConfig().num_chunks(20)


def test_aligned_cache_gives_the_same_rollout():
    """align rounds the key axis up (whole pages for paged attention); the unused tail never counts."""
    import jax

    from causal_dit_jax import CausalWanDiT, SelfForcingSampler

    assert init_kv_cache(CFG, InferenceConfig(), 1, 12, 10, align=16).k.shape[2] == 48  # 4 x 10 -> 48
    dit = CausalWanDiT(CFG, KernelConfig(attention_impl="xla"))
    params = dit.init(jax.random.key(0))
    text = dit.encode_text(params, jax.random.normal(jax.random.key(1), (1, CFG.text_len, CFG.text_dim)))
    noise = jax.random.normal(jax.random.key(2), (1, 6, 4, 6, 16))
    inference = InferenceConfig(cache_dtype="float32")
    plain = SelfForcingSampler(dit, inference).generate(params, text, noise, jax.random.key(3))

    class Aligned(CausalWanDiT):
        def init_cache(self, inference, batch, num_frames, h, w, origin_frame=0):
            tokens = self.config.tokens_per_frame(h, w) * inference.frames_per_chunk
            return init_kv_cache(self.config, inference, batch, num_frames, tokens, origin_frame, align=64)

    aligned_dit = Aligned(CFG, KernelConfig(attention_impl="xla"))
    assert aligned_dit.init_cache(inference, 1, 6, 4, 6).k.shape[2] % 64 == 0
    aligned = SelfForcingSampler(aligned_dit, inference).generate(params, text, noise, jax.random.key(3))
    assert jnp.allclose(plain, aligned, atol=1e-6)
