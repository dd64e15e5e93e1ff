"""The tiny TAEHV decoder and encoder against the PyTorch reference (tests/torch_reference/taehv.py),
through the real converters, at small widths (decoder channels 16/12/8/8, encoder width 8) on 4x6
latents (decoder) and 16x24 frames (encoder).

Tolerances: float32 agrees to relative error ||a-b||/||b|| <= 1e-5 (measured ~1e-7: summation order
only; the reference runs frame by frame, ours a chunk at a time). bf16 compute against float32: <= 3e-2
(bf16 activations through 13 convs; measured ~1e-2). The encoder, float32: <= 1e-5 (the reference runs
frame by frame, ours all frames at once).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from dit_fixtures import rel_err
from safetensors.torch import save_file
from torch_reference.taehv import TAEHVReference

from causal_dit_jax.autoencoders.taehv import TAEHVDecoder, get_taehv_preset, taehv_flops
from causal_dit_jax.autoencoders.taehv_encoder import TAEHVEncoder
from causal_dit_jax.convert.rules import torch_shapes
from causal_dit_jax.convert.taehv_convert import (
    load_taehv_encoder_params,
    load_taehv_params,
    taehv_encoder_key_map,
    taehv_encoder_params_from_state_dict,
    taehv_key_map,
    taehv_params_from_state_dict,
)
from causal_dit_jax.convert.torch_files import CheckpointError

CFG = get_taehv_preset("tiny")
LATENT_H, LATENT_W = 4, 6
NUM_LATENTS = 5
F32_TOL = 1e-5
BF16_TOL = 3e-2
ENCODER_F32_TOL = 1e-5


def _reference(seed: int = 0) -> TAEHVReference:
    torch.manual_seed(seed)
    model = TAEHVReference(CFG.latent_channels, CFG.channels, CFG.time_upscale, CFG.space_upscale, encoder_width=8)
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 1:
                p.uniform_(-0.2, 0.2)  # non-zero biases, so a swapped bias would show
        model.decoder[-1].bias.add_(0.5)  # outputs centred in [0, 1], so the final clamp rarely bites
    return model.eval()


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    model = _reference()
    path = tmp_path_factory.mktemp("taehv") / "taew2_1.pth"
    torch.save(model.state_dict(), path)  # encoder keys included, as in the released file
    config, params = load_taehv_params(path)
    return model, path, config, params


@pytest.fixture(scope="module")
def latents():
    g = torch.Generator().manual_seed(1)
    return torch.randn(1, NUM_LATENTS, CFG.latent_channels, LATENT_H, LATENT_W, generator=g)  # n t c h w


@pytest.fixture(scope="module")
def decoder():
    return TAEHVDecoder(CFG)


def _channels_last(z: torch.Tensor) -> jax.Array:
    return jnp.asarray(z.permute(0, 1, 3, 4, 2).numpy())  # n t c h w -> n t h w c


@pytest.fixture(scope="module")
def whole(decoder, converted, latents):
    *_, params = converted
    return np.asarray(decoder.decode(params, _channels_last(latents), frames_per_chunk=None))


def test_config_read_off_the_file(converted):
    _, _, config, _ = converted
    assert config.channels == CFG.channels and config.latent_channels == CFG.latent_channels


def test_matches_the_torch_reference(converted, latents, whole):
    model, *_ = converted
    expected = model.decode_video(latents).permute(0, 1, 3, 4, 2).numpy()  # n t c h w -> n t h w c
    expected = expected * 2.0 - 1.0  # ours returns [-1, 1] like the Wan VAE
    assert whole.shape == expected.shape == (1, 1 + 4 * (NUM_LATENTS - 1), 8 * LATENT_H, 8 * LATENT_W, 3)
    assert np.mean(np.abs(expected) == 1.0) < 0.1  # the clamp leaves most values informative
    assert rel_err(whole, expected) <= F32_TOL


@pytest.mark.parametrize("per_call", [1, 3])
def test_streaming_equals_one_pass(decoder, converted, latents, whole, per_call):
    """Memory blocks carried between calls: any split of the latents gives the one-pass frames."""
    *_, params = converted
    cache = decoder.init_decode_cache(1, LATENT_H, LATENT_W)
    z = _channels_last(latents)
    chunks = []
    for start in range(0, NUM_LATENTS, per_call):
        frames, cache = decoder.jit_decode_chunk(params, z[:, start : start + per_call], cache)
        chunks.append(np.asarray(frames))
    counts = [c.shape[1] for c in chunks]
    assert counts[0] == 4 * per_call - 3 and all(c == 4 * per_call for c in counts[1:-1])
    assert rel_err(np.concatenate(chunks, axis=1), whole) <= 1e-6


def test_all_frames_without_the_wan_alignment(decoder, converted, latents, whole):
    *_, params = converted
    cache = decoder.init_decode_cache(1, LATENT_H, LATENT_W, wan_first_frame=False)
    frames, _ = decoder.decode_chunk(params, _channels_last(latents), cache)
    assert frames.shape[1] == 4 * NUM_LATENTS
    np.testing.assert_allclose(np.asarray(frames)[:, 3:], whole, atol=1e-6)


def test_bf16_decode_is_close_to_float32(converted, latents, whole):
    *_, params = converted
    bf16 = TAEHVDecoder(CFG.replace(dtype="bfloat16", param_dtype="bfloat16"))
    params16 = jax.tree.map(lambda a: a.astype(jnp.bfloat16), params)
    err = rel_err(np.asarray(bf16.decode(params16, _channels_last(latents), frames_per_chunk=None)), whole)
    assert err <= BF16_TOL, err


def test_safetensors_file_converts_the_same(converted, tmp_path):
    model, _, _, params = converted
    path = tmp_path / "taew2_1.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    _, again = load_taehv_params(path, CFG)
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(again)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_key_table_matches_the_released_layout():
    """taew2_1 at full size: the decoder's keys and shapes of the reference module (meta device)."""
    config = get_taehv_preset("taew2.1")
    with torch.device("meta"):
        sd = TAEHVReference().state_dict()
    decoder_sd = {k: tuple(v.shape) for k, v in sd.items() if k.startswith("decoder.")}
    rules = taehv_key_map(config)
    assert torch_shapes(rules) == decoder_sd
    facts = {
        "decoder.1.weight": (256, 16, 3, 3),
        "decoder.3.conv.0.weight": (256, 512, 3, 3),
        "decoder.7.conv.weight": (256, 256, 1, 1),
        "decoder.8.weight": (128, 256, 3, 3),
        "decoder.13.conv.weight": (256, 128, 1, 1),
        "decoder.19.conv.weight": (128, 64, 1, 1),
        "decoder.22.weight": (3, 64, 3, 3),
        "decoder.22.bias": (3,),
    }
    for key, shape in facts.items():
        assert decoder_sd[key] == shape, key
    n = sum(int(np.prod(s)) for s in decoder_sd.values())
    assert n == sum(a.size for a in jax.tree.leaves(TAEHVDecoder(config).abstract_params()))
    # about 0.5% of the Wan VAE decode's FLOPs per latent at 480x832
    assert 1e11 < taehv_flops(config, 1, 60, 104) < 1e12


def test_wider_time_grow_weight_keeps_its_last_channels(converted):
    """A stage-0 time-grow trained with x2 time (2C outputs) loads into the x1 decoder, last C kept."""
    model, *_, params = converted
    sd = dict(model.state_dict())
    c = CFG.channels[0]
    extra = torch.randn(c, c, 1, 1)
    sd["decoder.7.conv.weight"] = torch.cat([extra, sd["decoder.7.conv.weight"]], 0)
    trimmed = taehv_params_from_state_dict(sd, CFG)
    np.testing.assert_array_equal(
        np.asarray(trimmed["stage0"]["tgrow"]["kernel"]), np.asarray(params["stage0"]["tgrow"]["kernel"])
    )


def test_converter_names_bad_keys(converted):
    model, *_ = converted
    sd = dict(model.state_dict())
    del sd["decoder.10.conv.2.bias"]
    sd["decoder.30.weight"] = torch.zeros(1)
    sd["decoder.22.weight"] = torch.zeros(3, CFG.channels[3], 1, 1)
    with pytest.raises(CheckpointError) as err:
        taehv_params_from_state_dict(sd, CFG)
    msg = str(err.value)
    assert "missing keys (1): decoder.10.conv.2.bias" in msg
    assert "unexpected keys (1): decoder.30.weight" in msg
    assert "decoder.22.weight: (3, 8, 1, 1) (expected (3, 8, 3, 3))" in msg
    assert "encoder" not in msg


def test_bad_latents_and_cache(decoder, converted):
    *_, params = converted
    cache = decoder.init_decode_cache(1, LATENT_H, LATENT_W)
    with pytest.raises(ValueError, match="latents must be"):
        decoder.decode_chunk(params, jnp.zeros((1, 1, LATENT_H, LATENT_W, 3)), cache)
    with pytest.raises(ValueError, match="decode cache was made for batch 1 at 4x6"):
        decoder.decode_chunk(params, jnp.zeros((1, 1, 8, 8, CFG.latent_channels)), cache)


def test_unknown_preset_names_the_choices():
    with pytest.raises(ValueError, match=r"unknown TAEHV preset 'big'; available: \['taew2.1', 'tiny'\]"):
        get_taehv_preset("big")


# ------------------------------------------------------------------------------------------ encoder
@pytest.fixture(scope="module")
def converted_encoder(converted):
    model, path, *_ = converted
    config, params = load_taehv_encoder_params(path)
    return model, config, params


def test_encoder_config_read_off_the_file(converted_encoder):
    _, config, _ = converted_encoder
    assert config.encoder_width == CFG.encoder_width == 8
    assert config.latent_channels == CFG.latent_channels
    assert config.encoder_time_downscale == (True, True, False)


@pytest.mark.parametrize("num_frames", [5, 8, 1])
def test_encoder_matches_the_torch_reference(converted_encoder, num_frames):
    """1 + 4k frames -> 1 + k latents (the end padded with the last frame); 8 -> 2; 1 -> 1."""
    model, config, params = converted_encoder
    g = torch.Generator().manual_seed(2)
    frames = torch.rand(1, num_frames, 3, 8 * LATENT_H, 8 * LATENT_W, generator=g)  # n t c h w in [0, 1]
    expected = model.encode_video(frames).permute(0, 1, 3, 4, 2).numpy()  # n t c h w -> n t h w c
    encoder = TAEHVEncoder(config)
    ours = np.asarray(encoder.jit_encode(params, _channels_last(frames) * 2.0 - 1.0))
    want_t = -(-num_frames // 4)
    assert encoder.num_latents(num_frames) == want_t
    assert ours.shape == expected.shape == (1, want_t, LATENT_H, LATENT_W, CFG.latent_channels)
    assert rel_err(ours, expected) <= ENCODER_F32_TOL


def test_encode_then_decode_keeps_wan_frame_counts(converted, converted_encoder):
    """Wan's 1 + 4k frames -> k + 1 latents -> 1 + 4k frames again, at the input's size."""
    _, _, config, dec_params = converted
    _, enc_config, enc_params = converted_encoder
    frames = jnp.zeros((1, 9, 8 * LATENT_H, 8 * LATENT_W, 3))
    z = TAEHVEncoder(enc_config).encode(enc_params, frames)
    assert z.shape == (1, 3, LATENT_H, LATENT_W, CFG.latent_channels)
    video = TAEHVDecoder(config).decode(dec_params, z, frames_per_chunk=None)
    assert video.shape == frames.shape


def test_encoder_init_matches_the_key_table():
    encoder = TAEHVEncoder(CFG)
    params = encoder.init(jax.random.key(0))
    assert jax.tree.map(lambda a: (a.shape, a.dtype), params) == jax.tree.map(
        lambda a: (a.shape, a.dtype), encoder.abstract_params()
    )
    z = encoder.encode(params, jnp.zeros((2, 4, 16, 16, 3)))
    assert z.shape == (2, 1, 2, 2, CFG.latent_channels) and z.dtype == jnp.float32


def test_encoder_names_bad_frames_before_compute():
    """Shape errors come from the shape check: empty params would fail if any layer ran first."""
    encoder = TAEHVEncoder(CFG)
    with pytest.raises(ValueError, match=r"frames must be \[batch, frames, height, width, 3\].*got \(1, 4, 16, 16, 4\)"):
        encoder.encode({}, jnp.zeros((1, 4, 16, 16, 4)))
    with pytest.raises(ValueError, match="frames must be"):
        encoder.encode({}, jnp.zeros((4, 16, 16, 3)))
    with pytest.raises(ValueError, match="at least 1 frame, got a frame count of 0"):
        encoder.encode({}, jnp.zeros((1, 0, 16, 16, 3)))
    with pytest.raises(ValueError, match="height and width must be multiples of 8, got 20x16"):
        encoder.encode({}, jnp.zeros((1, 4, 20, 16, 3)))


def test_encoder_converter_names_missing_key(converted):
    model, *_ = converted
    sd = dict(model.state_dict())
    del sd["encoder.9.conv.2.bias"]
    sd["decoder.22.weight"] = torch.zeros(1)  # the decoder half is not the encoder loader's business
    with pytest.raises(CheckpointError) as err:
        taehv_encoder_params_from_state_dict(sd, CFG)
    msg = str(err.value)
    assert "missing keys (1): encoder.9.conv.2.bias" in msg
    assert "decoder" not in msg


def test_encoder_key_table_matches_the_released_layout():
    """taew2_1 at full size: the encoder's keys and shapes of the reference module (meta device)."""
    config = get_taehv_preset("taew2.1")
    with torch.device("meta"):
        sd = TAEHVReference().state_dict()
    encoder_sd = {k: tuple(v.shape) for k, v in sd.items() if k.startswith("encoder.")}
    assert torch_shapes(taehv_encoder_key_map(config)) == encoder_sd
    facts = {
        "encoder.0.weight": (64, 3, 3, 3),
        "encoder.2.conv.weight": (64, 128, 1, 1),
        "encoder.3.weight": (64, 64, 3, 3),
        "encoder.4.conv.0.weight": (64, 128, 3, 3),
        "encoder.12.conv.weight": (64, 64, 1, 1),
        "encoder.17.weight": (16, 64, 3, 3),
        "encoder.17.bias": (16,),
    }
    for key, shape in facts.items():
        assert encoder_sd[key] == shape, key
    n = sum(int(np.prod(s)) for s in encoder_sd.values())
    assert n == sum(a.size for a in jax.tree.leaves(TAEHVEncoder(config).abstract_params()))
