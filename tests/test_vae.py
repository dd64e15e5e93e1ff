"""The Flax Wan VAE decoder against the PyTorch reference (tests/torch_reference/wan_vae.py), through
the real converter, at a small width (dim 8: channels 32/32/32/16/8) on 4x6 latents.

Tolerances: float32 paths agree to relative error ||a-b||/||b|| <= 1e-4 (measured ~1e-6: summation
order only). bf16 compute is compared with float32 at a stated bound.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from dit_fixtures import rel_err
from torch_reference import wan_vae as ref

from causal_dit_jax.autoencoders.chunked_decode import to_uint8
from causal_dit_jax.autoencoders.wan_vae import VAEDecodeCache, WanVAE, get_vae_preset
from causal_dit_jax.convert.rules import torch_shapes
from causal_dit_jax.convert.torch_files import CheckpointError
from causal_dit_jax.convert.vae_convert import load_vae_params, vae_decoder_key_map, vae_params_from_state_dict

CFG = get_vae_preset("tiny")
LATENT_H, LATENT_W = 4, 6
NUM_LATENTS = 6  # two product-sized chunks of 3
F32_TOL = 1e-4
BF16_TOL = 5e-2  # bf16 activations through ~35 convs; measured ~1e-2


def _encoder_half() -> dict:
    """Stand-ins for the encoder keys of Wan2.1_VAE.pth, which the decoder converter must ignore."""
    return {
        "encoder.conv1.weight": torch.zeros(CFG.dim, 3, 3, 3, 3),
        "conv1.weight": torch.zeros(32, 32, 1, 1, 1),
        "conv1.bias": torch.zeros(32),
    }


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    model = ref.randomize_vae_(ref.WanVAEDecoder(dim=CFG.dim), seed=0).eval()
    path = tmp_path_factory.mktemp("vae") / "Wan2.1_VAE.pth"
    torch.save({**model.state_dict(), **_encoder_half()}, path)
    return model, load_vae_params(path, CFG)[1]


@pytest.fixture(scope="module")
def vae():
    return WanVAE(CFG)  # shared, so its jitted decode_chunk compiles each chunk shape once


@pytest.fixture(scope="module")
def latents():
    g = torch.Generator().manual_seed(1)
    return torch.randn(1, CFG.z_dim, NUM_LATENTS, LATENT_H, LATENT_W, generator=g)  # b c t h w


def _channels_last(x: torch.Tensor) -> jax.Array:
    return jnp.asarray(x.permute(0, 2, 3, 4, 1).numpy())  # b c t h w -> b t h w c


def _torch_decode(model, z, streaming=False, cache=None):
    with torch.no_grad():
        video, cache = model.decode(z, streaming=streaming, cache=cache)
    return video.permute(0, 2, 3, 4, 1).numpy(), cache  # b c t h w -> b t h w c


@pytest.fixture(scope="module")
def whole(vae, converted, latents):
    _, params = converted
    return np.asarray(vae.decode(params, _channels_last(latents), frames_per_chunk=None))  # one pass


def test_whole_video_matches_torch_decode(converted, latents, whole):
    model, _ = converted
    expected, _ = _torch_decode(model, latents)
    assert whole.shape == expected.shape == (1, 1 + 4 * (NUM_LATENTS - 1), 8 * LATENT_H, 8 * LATENT_W, 3)
    assert np.mean(np.abs(expected) == 1.0) < 0.1  # the clamp leaves most values informative
    assert rel_err(whole, expected) <= F32_TOL


@pytest.mark.parametrize(
    "sizes, frames, newest", [((3, 3), [9, 12], [0, 0]), ((1,) * 6, [1] + [4] * 5, [0] * 6), ((1, 5), [1, 20], [0, 1])]
)
def test_chunks_equal_the_whole_decode(vae, converted, latents, whole, sizes, frames, newest):
    """The product's contract: latents in chunks (3 in the pipeline, 1 in the bench), caches carried,
    the same frames as one pass. The per-frame stages' ring caches flip their newer slot after an odd
    frame count (the first chunk); a chunk of over 12 frames (scanned, not unrolled) reorders them."""
    _, params = converted
    step = vae.jit_decode_chunk
    cache = vae.init_decode_cache(1, LATENT_H, LATENT_W)
    z = _channels_last(latents)
    chunks, slots, start = [], [], 0
    for size in sizes:
        out, cache = step(params, z[:, start : start + size], cache)
        chunks.append(np.asarray(out))
        slots.append(cache.tail_newest)
        start += size
    assert [c.shape[1] for c in chunks] == frames
    assert slots == newest
    assert rel_err(np.concatenate(chunks, axis=1), whole) <= 1e-5


@pytest.mark.parametrize("per_call", [1, 2])
def test_latent_chunk_decoder_queues_the_whole_decode(vae, converted, latents, whole, per_call):
    """LatentChunkDecoder (the pipeline's loop): chunks of 3 latents, `per_call` latents per jitted call,
    uint8 frames on the device equal the uint8 of the one-pass decode; a count below 1 is refused."""
    from causal_dit_jax.autoencoders import LatentChunkDecoder

    _, params = converted
    decoder = LatentChunkDecoder(vae, per_call)
    cache = decoder.init_cache(1, LATENT_H, LATENT_W)
    z = _channels_last(latents)
    outs = []
    for start in range(0, NUM_LATENTS, 3):
        queued, cache = decoder(params, z[:, start : start + 3], cache)
        assert len(queued) == -(-3 // per_call) and all(q.dtype == jnp.uint8 for q in queued)
        outs += [np.asarray(q) for q in queued]
    got = np.concatenate(outs, axis=1).astype(int)
    assert np.abs(got - np.asarray(to_uint8(jnp.asarray(whole))).astype(int)).max() <= 1  # rounding at .5
    with pytest.raises(ValueError, match="latents_per_call must be >= 1, got 0"):
        LatentChunkDecoder(vae, 0)


def test_per_frame_tail_equals_all_frames_at_once(converted, latents, whole):
    """per_frame_stages (the default runs the last 2 stages and the head one frame at a time) changes
    the memory, not the frames: all stages over all frames at once give the same video (`whole` is one
    21-frame call: the frames are scanned; the 9- and 12-frame chunks above are unrolled), and
    per-frame over 3 stages is refused (stage 1's temporal upsample doubles the frames)."""
    _, params = converted
    at_once = WanVAE(CFG.replace(per_frame_stages=0))
    frames = np.asarray(at_once.decode(params, _channels_last(latents), frames_per_chunk=None))
    assert CFG.per_frame_stages == 2
    assert rel_err(frames, whole) <= 1e-6  # the same float32 convs, one frame per call: rounding only
    with pytest.raises(ValueError, match="stage 1, whose temporal upsample"):
        CFG.replace(per_frame_stages=3)
    with pytest.raises(ValueError, match=r"per_frame_stages must be in \[0, 4\]"):
        CFG.replace(per_frame_stages=-1)


def test_upsample_as_four_phase_convs_equals_repeat_then_conv(converted, latents, whole):
    """upsample_conv='phases' (the default: each output phase a 2x2 conv of the low-resolution frame,
    interleaved) against Wan's literal nearest x2 + 3x3 conv: the same function, so float32 agrees to
    summation order (1e-5), one conv on odd sizes and the whole decoder; the PyTorch parity above
    runs the default. A method that does not exist is named."""
    from flax import nnx

    from causal_dit_jax.autoencoders.wan_vae import Conv, upsample_conv_phases

    conv = Conv(5, 7, (3, 3), dtype=jnp.float32, param_dtype=jnp.float32, rngs=nnx.Rngs(0))
    conv.bias[...] = jax.random.normal(jax.random.key(3), (7,))
    x = jax.random.normal(jax.random.key(1), (2, 3, 5, 9, 5))  # odd rows and columns: the borders
    literal = conv(jnp.repeat(jnp.repeat(x, 2, axis=2), 2, axis=3))
    assert rel_err(upsample_conv_phases(conv, x), literal) <= 1e-5
    _, params = converted
    assert CFG.upsample_conv == "phases"
    repeat = WanVAE(CFG.replace(upsample_conv="repeat"))
    frames = np.asarray(repeat.decode(params, _channels_last(latents), frames_per_chunk=None))
    assert rel_err(whole, frames) <= 1e-5
    with pytest.raises(ValueError, match="upsample_conv must be one of"):
        CFG.replace(upsample_conv="pixel_shuffle")


def test_self_forcing_demo_decoder(vae, converted, latents):
    """wan_first_frame=False is demo_utils/vae_block3.py: zero caches, no 'Rep', 4 frames per latent,
    blocks of 3 latents with the cache handed from block to block."""
    model, params = converted
    cache = vae.init_decode_cache(1, LATENT_H, LATENT_W, wan_first_frame=False)
    z = _channels_last(latents)
    ref_cache, ours, theirs = None, [], []
    for start in range(0, NUM_LATENTS, 3):
        frames, cache = vae.jit_decode_chunk(params, z[:, start : start + 3], cache)
        expected, ref_cache = _torch_decode(model, latents[:, :, start : start + 3], streaming=True, cache=ref_cache)
        ours.append(np.asarray(frames))
        theirs.append(expected)
    assert [o.shape[1] for o in ours] == [12, 12]
    assert rel_err(np.concatenate(ours, 1), np.concatenate(theirs, 1)) <= F32_TOL


def test_frame_counts_and_cache_at_wan_size():
    """Shapes only (jax.eval_shape, no compute): 21 latents -> 81 frames; chunks give 9, 12, 12, ..."""
    vae = WanVAE(get_vae_preset("wan2.1"))
    params = vae.abstract_params()
    assert sum(p.size for p in jax.tree.leaves(params)) == 73_295_603
    cache = jax.eval_shape(lambda: vae.init_decode_cache(1, 60, 104))
    assert len(jax.tree.leaves(cache)) == 32  # Wan2.1's decoder caches 32 causal convs
    assert cache.convs["head"].shape == (1, 2, 480, 832, 96)
    for t, first, want in [(21, True, 81), (1, True, 1), (2, True, 5), (3, True, 9), (3, False, 12)]:
        c = VAEDecodeCache(convs=cache.convs, first_chunk=first)
        z = jax.ShapeDtypeStruct((1, t, 60, 104, 16), jnp.float32)
        frames, _ = jax.eval_shape(vae.decode_chunk, params, z, c)
        assert frames.shape == (1, want, 480, 832, 3) == (1, vae.config.num_frames(t, first), 480, 832, 3)


def test_key_table_matches_the_wan_checkpoint_layout():
    """Facts §2: 106 decoder tensors + conv2's 2, with Wan's names and shapes (torch on the meta device)."""
    with torch.device("meta"):
        sd = ref.WanVAEDecoder(dim=96).state_dict()
    rules = vae_decoder_key_map(get_vae_preset("wan2.1"))
    assert torch_shapes(rules) == {k: tuple(v.shape) for k, v in sd.items()}
    assert len(rules) == 108
    facts = {
        "decoder.conv1.weight": (384, 16, 3, 3, 3),
        "decoder.middle.1.to_qkv.weight": (1152, 384, 1, 1),
        "decoder.upsamples.3.time_conv.weight": (768, 384, 3, 1, 1),
        "decoder.upsamples.3.resample.1.weight": (192, 384, 3, 3),
        "decoder.upsamples.4.shortcut.weight": (384, 192, 1, 1, 1),
        "decoder.upsamples.11.resample.1.weight": (96, 192, 3, 3),
        "decoder.head.0.gamma": (96, 1, 1, 1),
        "decoder.head.2.weight": (3, 96, 3, 3, 3),
        "conv2.weight": (16, 16, 1, 1, 1),
    }
    for key, shape in facts.items():
        assert tuple(sd[key].shape) == shape, key


def test_converter_names_bad_keys(converted):
    model, _ = converted
    sd = {**model.state_dict(), **_encoder_half()}  # encoder keys are ignored
    del sd["decoder.upsamples.7.time_conv.bias"]
    sd["decoder.upsamples.99.weight"] = torch.zeros(1)
    sd["decoder.head.2.weight"] = torch.zeros(3, CFG.dim, 1, 3, 3)
    with pytest.raises(CheckpointError) as err:
        vae_params_from_state_dict(sd, CFG)
    msg = str(err.value)
    assert "missing keys (1): decoder.upsamples.7.time_conv.bias" in msg
    assert "unexpected keys (1): decoder.upsamples.99.weight" in msg
    assert "decoder.head.2.weight: (3, 8, 1, 3, 3) (expected (3, 8, 3, 3, 3))" in msg
    assert "encoder" not in msg and "conv1.bias" not in msg


def test_bf16_decode_is_close_to_float32(converted, latents, whole):
    _, params = converted
    bf16_vae = WanVAE(CFG.replace(dtype="bfloat16"))
    bf16 = np.asarray(bf16_vae.decode(params, _channels_last(latents), frames_per_chunk=None))
    err = rel_err(bf16, whole)
    assert err <= BF16_TOL, err


def test_to_uint8():
    v = jnp.asarray([-2.0, -1.0, 0.0, 0.5, 1.0, 3.0])
    np.testing.assert_array_equal(np.asarray(to_uint8(v)), [0, 0, 128, 191, 255, 255])
