"""KV cache slots: append in global mode, sink + ring in local-window mode, bad settings refused."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from torch_reference.causal_wan import rolling_kv_cache_update

from causal_dit_jax import InferenceConfig, KernelConfig, init_kv_cache
from causal_dit_jax.model.config import CacheLayout, ModelConfig, get_preset
from causal_dit_jax.model.kv_cache import cache_write_index, write_chunk

CFG = get_preset("tiny")


def slots(inference, frames, origin=0):
    cache = init_kv_cache(CFG, inference, 1, frames, 4, origin_frame=origin)
    return cache, [tuple(int(v) for v in cache_write_index(cache, origin + 3 * j)[:2]) for j in range(frames // 3)]


def test_global_cache_appends_and_is_sized_from_frames():
    cache, idx = slots(InferenceConfig(cache_dtype="float32"), 12, origin=5)
    assert cache.k.shape == (CFG.num_layers, 1, 4 * 4, CFG.num_heads, CFG.head_dim)
    assert cache.k.dtype == jnp.float32
    assert idx == [(0, 1), (1, 2), (2, 3), (3, 4)]


def test_cache_dtype_follows_the_model_unless_set():
    assert init_kv_cache(CFG, InferenceConfig(), 1, 3, 4).k.dtype == jnp.float32  # the float32 'tiny'
    wan = ModelConfig(num_layers=1)  # the published model's dtypes: bf16
    assert init_kv_cache(wan, InferenceConfig(), 1, 3, 4).k.dtype == jnp.bfloat16
    assert init_kv_cache(CFG, InferenceConfig(cache_dtype="bfloat16"), 1, 3, 4).k.dtype == jnp.bfloat16
    assert init_kv_cache(wan, InferenceConfig(cache_dtype="float32"), 1, 3, 4).k.dtype == jnp.float32
    assert init_kv_cache(CFG, InferenceConfig(), 1, 3, 4, dtype=jnp.float16).k.dtype == jnp.float16


def test_sequence_parallel_cache_dtype_follows_the_model():
    from causal_dit_jax import CausalWanDiT
    from causal_dit_jax.sharding import SequenceParallelDiT, make_mesh

    cpus = jax.devices("cpu")[:2]  # the simulated CPU devices (conftest), also on a GPU machine
    for cfg, want in ((CFG, jnp.float32), (CFG.replace(param_dtype="bfloat16", dtype="bfloat16"), jnp.bfloat16)):
        for strategy in ("ring", "ulysses"):
            sp = SequenceParallelDiT(CausalWanDiT(cfg), make_mesh(strategy=strategy, num_heads=12, devices=cpus))
            assert sp.init_cache(InferenceConfig(), 1, 6, 4, 6).k.dtype == want, (cfg.dtype, strategy)
    sp = SequenceParallelDiT(CausalWanDiT(CFG), make_mesh(strategy="ring", num_heads=12, devices=cpus))
    assert sp.init_cache(InferenceConfig(cache_dtype="bfloat16"), 1, 6, 4, 6).k.dtype == jnp.bfloat16


def test_rolling_cache_keeps_sink_and_recent_chunks():
    # window 12 frames = 4 slots, sink 3 frames = slot 0; ring of 3 slots for the rest.
    _, idx = slots(InferenceConfig(local_attn_size=12, sink_size=3), 24)
    assert [s for s, _ in idx] == [0, 1, 2, 3, 1, 2, 3, 1]
    assert [v for _, v in idx] == [1, 2, 3, 4, 4, 4, 4, 4]


def test_write_chunk_overwrites_one_slot():
    ck = jnp.zeros((1, 12, 2, 4))
    k = jnp.ones((1, 4, 2, 4))
    from causal_dit_jax.model.kv_cache import CacheWrite, LayerCache

    out = write_chunk(LayerCache(ck[None], ck[None], jnp.int32(0)), k, 2 * k, CacheWrite(jnp.int32(1), jnp.int32(2)))
    nk, nv = out.read()
    assert float(nk[:, 4:8].min()) == 1 and float(nk[:, :4].max()) == 0 and float(nk[:, 8:].max()) == 0
    assert float(nv[:, 4:8].min()) == 2


@pytest.mark.parametrize(
    "kw,msg",
    [
        (dict(local_attn_size=0), r"local_attn_size=0 must be -1 \(the whole video\) or a positive"),
        (dict(local_attn_size=-2), "local_attn_size=-2 must be -1"),
        (dict(local_attn_size=6, sink_size=-1), "sink_size=-1 must be >= 0"),
        (dict(local_attn_size=6, sink_size=4), "local_attn_size=6 with sink_size=4 leaves no room for a chunk"),
        (dict(local_attn_size=6, sink_size=6), "leaves no room for a chunk"),
        (dict(local_attn_size=2), "local_attn_size=2 with sink_size=0 leaves no room"),
        (dict(sink_size=1), "sink_size=1 needs a local_attn_size"),
        (dict(cache_dtype="int8"), "unknown dtype"),
    ],
)
def test_bad_inference_settings(kw, msg):
    with pytest.raises(ValueError, match=msg):
        InferenceConfig(**kw)


@pytest.mark.parametrize(
    "kw",
    [
        dict(local_attn_size=6, sink_size=1),
        dict(local_attn_size=7),
        dict(local_attn_size=4, sink_size=1),
        dict(local_attn_size=3),
        dict(local_attn_size=5, sink_size=2),
        dict(cache_dtype=None),
    ],
)
def test_frame_granular_settings_are_accepted(kw):
    InferenceConfig(**kw)


@pytest.mark.parametrize(
    "kw,frames,want,masked",
    [
        (dict(), 15, CacheLayout(5, 0, 0, -1), False),
        (dict(local_attn_size=6, sink_size=1), 15, CacheLayout(3, 1, 1, 6), True),  # 1 sink slot + 2 ring slots
        (dict(local_attn_size=6, sink_size=3), 15, CacheLayout(2, 1, 3, 6), False),  # whole chunks: prefix
        (dict(local_attn_size=7), 15, CacheLayout(3, 0, 0, 7), True),  # 7 frames need 3 slots
        (dict(local_attn_size=7, sink_size=2), 9, CacheLayout(3, 1, 2, 7), True),  # 1 + 2 slots, all 3 chunks
        (dict(local_attn_size=12, sink_size=3), 24, CacheLayout(4, 1, 3, 12), False),
        (dict(local_attn_size=6, sink_size=1), 6, CacheLayout(2, 0, 0, -1), False),  # never outgrows the window
        (dict(local_attn_size=30, sink_size=1), 15, CacheLayout(5, 0, 0, -1), False),  # huge window = global
    ],
)
def test_cache_layout(kw, frames, want, masked):
    inference = InferenceConfig(**kw)
    assert inference.cache_layout(frames) == want and inference.cache_chunks(frames) == want.capacity
    cache = init_kv_cache(CFG, inference, 1, frames, 4)
    assert cache.frame_masked == masked
    assert (cache_write_index(cache, 0).frame_mask is None) == (not masked)


def _self_forcing_frames(local, sink, c, chunks, calls=2):
    """The frames each chunk attends to under the PyTorch reference's rolling cache (Self-Forcing's
    published index arithmetic) at one token per frame, keys holding their frame index."""
    size = local if local != -1 else c * chunks
    cache = {
        "k": torch.full((1, size, 1, 1), -1.0),
        "v": torch.zeros(1, size, 1, 1),
        "global_end_index": torch.tensor([0]),
        "local_end_index": torch.tensor([0]),
    }
    seen = []
    for j in range(chunks):
        k = torch.arange(j * c, (j + 1) * c, dtype=torch.float32).view(1, c, 1, 1)
        for _ in range(calls):  # denoising steps and the cache fill overwrite the same slots
            att, _ = rolling_kv_cache_update(cache, k, k, j * c, local, sink, 1)
        keys = [int(f) for f in att.flatten()]
        assert len(set(keys)) == len(keys), keys  # no frame is held twice
        seen.append(sorted(keys))
    return seen


def _our_frames(local, sink, c, chunks, origin=4):
    """The frames each chunk attends to with our slots (as written) and frame masks."""
    inference = InferenceConfig(frames_per_chunk=c, local_attn_size=local, sink_size=sink)
    cache = init_kv_cache(CFG, inference, 1, c * chunks, 1, origin_frame=origin)
    held = [None] * cache.capacity  # the chunk each slot holds, from the writes
    seen = []
    for j in range(chunks):
        write = cache_write_index(cache, origin + j * c)
        held[int(write.slot)] = j
        if write.frame_mask is None:
            valid = np.arange(cache.capacity)[:, None] < int(write.valid_slots)
            valid = np.broadcast_to(valid, (cache.capacity, c))
        else:
            valid = np.asarray(write.frame_mask)
        seen.append(sorted(held[s] * c + i for s in range(cache.capacity) for i in range(c) if valid[s, i]))
    return seen


@pytest.mark.parametrize("c", [3, 2, 4])
def test_slots_and_frame_masks_attend_to_self_forcings_frames(c):
    """Every (window, sink) with window - sink >= one chunk, over 7 chunks: the set of key frames of
    each chunk equals the reference's (exact integer sets), and the rule of the task statement."""
    chunks = 7
    for local in [-1, *range(c, 4 * c + 2)]:
        for sink in [0] if local == -1 else range(0, local - c + 1):
            ref = _self_forcing_frames(local, sink, c, chunks)
            for j, frames in enumerate(ref):
                e = (j + 1) * c
                rule = [f for f in range(e) if local == -1 or f < sink or f >= e - (local - sink)]
                assert frames == rule, (local, sink, j)
            assert _our_frames(local, sink, c, chunks) == ref, (c, local, sink)


def test_cache_write_index_refuses_a_misaligned_start_frame():
    cache = init_kv_cache(CFG, InferenceConfig(local_attn_size=6, sink_size=1), 1, 15, 4, origin_frame=5)
    assert int(cache_write_index(cache, 11).slot) == 2
    assert int(cache_write_index(cache, np.int64(8)).slot) == 1
    for bad in (6, np.int32(12), jnp.int32(7)):
        with pytest.raises(ValueError, match=f"start_frame={int(bad)} is not aligned with the cache's chunks"):
            cache_write_index(cache, bad)
    # a traced start_frame is the caller's guarantee: no check inside jit (nothing added to the program)
    assert int(jax.jit(lambda s: cache_write_index(cache, s).slot)(jnp.int32(11))) == 2
    jax.jit(lambda s: cache_write_index(cache, s).slot)(jnp.int32(6))


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
