"""The Flax Wan VAE encoder against the PyTorch reference encoder (tests/torch_reference/wan_vae.py, Wan's
`Encoder3d` + `conv1` and `WanVAE_.encode`), through the real converter, at a small width (the 'tiny'
preset, dim 8: channels 8/8/16/32/32) on 1 + 4 * 2 frames of 32x48 (latents 3 x 4 x 6).

Tolerances (relative error ||a-b|| / ||b||):
  float32 against PyTorch: 1e-4 (measured ~6e-7: summation order only);
  chunked against the one-pass encode: 1e-5 (the same float32 convs, other splits: rounding only);
  bf16 weights and compute: within 1.5x of PyTorch's own bf16 error against its float32 encode (measured
  8.2e-3 for both: the bf16 rounding of weights and activations dominates).
"""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from dit_fixtures import rel_err
from torch_reference import wan_vae as ref

from causal_dit_jax.autoencoders.wan_vae import LATENT_MEAN, LATENT_STD, VAEConfig, WanVAE, get_vae_preset
from causal_dit_jax.autoencoders.wan_vae_encoder import VAEEncodeCache, WanVAEEncoder, load_vae_encoder
from causal_dit_jax.convert.rules import torch_shapes
from causal_dit_jax.convert.torch_files import CheckpointError
from causal_dit_jax.convert.vae_convert import (
    load_vae_components,
    load_vae_encoder_params,
    load_vae_params,
    vae_encoder_key_map,
    vae_encoder_params_from_state_dict,
)
from causal_dit_jax.model.random_params import random_params

CFG = get_vae_preset("tiny")
FRAMES, HEIGHT, WIDTH = 1 + 4 * 2, 32, 48
LATENTS = (1, 3, HEIGHT // 8, WIDTH // 8, CFG.z_dim)
F32_TOL = 1e-4
CHUNK_TOL = 1e-5
BF16_VS_TORCH = 1.5  # our bf16 error may be at most this multiple of PyTorch's own bf16 error


def _channels_last(x: torch.Tensor) -> jax.Array:
    return jnp.asarray(x.permute(0, 2, 3, 4, 1).float().numpy())  # b c t h w -> b t h w c


def _assert_trees_equal(a, b) -> None:
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        assert x.dtype == y.dtype
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.fixture(scope="module")
def torch_vae():
    """The two halves of a Wan VAE (random weights), and the full state dict as Wan2.1_VAE.pth has it."""
    decoder = ref.randomize_vae_(ref.WanVAEDecoder(dim=CFG.dim), seed=0).eval()
    encoder = ref.randomize_vae_(ref.WanVAEEncoder(dim=CFG.dim), seed=1).eval()
    return decoder, encoder, {**decoder.state_dict(), **encoder.state_dict()}


@pytest.fixture(scope="module")
def vae_file(torch_vae, tmp_path_factory):
    path = tmp_path_factory.mktemp("vae") / "Wan2.1_VAE.pth"
    torch.save({k: v.clone() for k, v in torch_vae[2].items()}, path)
    return path


@pytest.fixture(scope="module")
def params(vae_file):
    config, params = load_vae_encoder_params(vae_file, CFG)
    assert config == CFG
    return params


@pytest.fixture(scope="module")
def enc():
    return WanVAEEncoder(CFG)  # shared, so its jitted encode_chunk compiles each chunk shape once


@pytest.fixture(scope="module")
def frames():
    g = torch.Generator().manual_seed(2)
    return torch.rand(1, 3, FRAMES, HEIGHT, WIDTH, generator=g) * 2 - 1  # b c t h w in [-1, 1]


@pytest.fixture(scope="module")
def torch_latents(torch_vae, frames):
    with torch.no_grad():
        return torch_vae[1].encode(frames).permute(0, 2, 3, 4, 1).numpy()  # b c t h w -> b t h w c


@pytest.fixture(scope="module")
def whole(enc, params, frames):
    return np.asarray(enc.encode(params, _channels_last(frames), latents_per_chunk=None))  # one pass


def test_encode_matches_the_torch_encode(enc, params, frames, torch_latents, whole):
    """Wan's order (frame 0 alone, then 4 frames per call; `encode`'s default) and one pass, against
    `WanVAE_.encode` (the same order, its feature cache carried)."""
    wan_order = np.asarray(enc.encode(params, _channels_last(frames)))
    assert wan_order.shape == whole.shape == torch_latents.shape == LATENTS
    assert wan_order.dtype == np.float32
    assert rel_err(wan_order, torch_latents) <= F32_TOL
    assert rel_err(whole, torch_latents) <= F32_TOL


@pytest.mark.parametrize("sizes", [(1, 4, 4), (5, 4), (1, 8), (9,)])
def test_chunks_equal_the_whole_encode(enc, params, frames, whole, sizes):
    """The streaming contract: 1 + 4k frames to start, then multiples of 4, caches carried: the latents
    of one pass (1 + k latents from a first chunk, k after it)."""
    cache = enc.init_encode_cache(1, HEIGHT, WIDTH)
    x = _channels_last(frames)
    outs, start = [], 0
    for size in sizes:
        first = cache.first_chunk
        latents, cache = enc.jit_encode_chunk(params, x[:, start : start + size], cache)
        assert latents.shape[1] == enc.num_latents(size, first) == (1 + (size - 1) // 4 if first else size // 4)
        assert cache.first_chunk is False
        outs.append(np.asarray(latents))
        start += size
    assert rel_err(np.concatenate(outs, axis=1), whole) <= CHUNK_TOL
    assert rel_err(np.asarray(enc.encode(params, x, latents_per_chunk=2)), whole) <= CHUNK_TOL  # 5 then 4 frames


def test_bf16_encode_is_as_close_as_pytorchs_own_bf16(vae_file, torch_vae, frames, torch_latents):
    """bf16 weights and compute (the converter's dtype='bfloat16') against the float32 PyTorch encode,
    next to PyTorch's own bf16 encode (the same weights rounded, every op in bf16)."""
    config, p16 = load_vae_encoder_params(vae_file, CFG, dtype="bfloat16")
    assert (config.param_dtype, config.dtype) == ("bfloat16", "bfloat16")
    ours = np.asarray(WanVAEEncoder(config).encode(p16, _channels_last(frames)))
    torch16 = ref.WanVAEEncoder(dim=CFG.dim)
    torch16.load_state_dict(torch_vae[1].state_dict())
    torch16 = torch16.to(torch.bfloat16).eval()
    with torch.no_grad():
        theirs = torch16.encode(frames.to(torch.bfloat16)).permute(0, 2, 3, 4, 1).numpy()
    err_ours, err_torch = rel_err(ours, torch_latents), rel_err(theirs, torch_latents)
    print(f"bf16 encode relative error: ours {err_ours:.2e}, PyTorch's own {err_torch:.2e}")
    assert ours.dtype == np.float32 and np.isfinite(ours).all()
    assert err_ours <= BF16_VS_TORCH * err_torch, (err_ours, err_torch)


def test_round_trip_shapes(vae_file, params, enc):
    """decode(encode(x)) on a smooth clip. With random weights the round trip reconstructs nothing (a
    meaningful PSNR needs trained weights), so only shapes and finiteness are asserted; the PSNR is
    printed for the record."""
    t, h, w = np.meshgrid(np.arange(FRAMES), np.arange(HEIGHT), np.arange(WIDTH), indexing="ij")
    rgb = [np.sin(2 * np.pi * (h / HEIGHT + w / WIDTH + t / FRAMES + k / 3)) for k in range(3)]
    clip = jnp.asarray(0.8 * np.stack(rgb, axis=-1)[None], jnp.float32)  # b t h w 3 in [-0.8, 0.8]
    latents = enc.encode(params, clip)
    assert latents.shape == LATENTS
    dec_config, dec_params = load_vae_params(vae_file, CFG)
    video = np.asarray(WanVAE(dec_config).decode(dec_params, latents))
    assert video.shape == clip.shape == (1, FRAMES, HEIGHT, WIDTH, 3)
    assert np.isfinite(np.asarray(latents)).all() and np.isfinite(video).all()
    psnr = 10 * np.log10(4.0 / np.mean((video - np.asarray(clip)) ** 2))  # peak-to-peak 2 ([-1, 1])
    print(f"round trip PSNR with random weights: {psnr:.1f} dB (meaningless without trained weights)")


def _shape(*dims):
    return jax.ShapeDtypeStruct(dims, jnp.float32)  # no data: the checks read shapes only


@pytest.mark.parametrize(
    "shape, first, msg",
    [
        ((1, 9, 32, 3), True, r"frames must be \[batch, frames, height, width, 3\].*got \(1, 9, 32, 3\)"),
        ((1, 9, 32, 48, 4), True, r"frames must be \[batch, frames, height, width, 3\]"),
        ((1, 4, 32, 48, 3), True, r"a video's first chunk must be 1 or 1 \+ 4k frames .*got 4"),
        ((1, 0, 32, 48, 3), True, r"first chunk must be 1 or 1 \+ 4k frames .*got 0"),
        ((1, 3, 32, 48, 3), False, r"after a video's first chunk, chunks must be a positive multiple of 4 .*got 3"),
        ((1, 5, 32, 48, 3), False, r"positive multiple of 4 frames .*got 5"),
        ((1, 0, 32, 48, 3), False, r"positive multiple of 4 frames .*got 0"),
        ((1, 1, 40, 48, 3), True, r"height and width must be positive multiples of 16 .*got 40x48"),
        ((1, 1, 32, 24, 3), True, r"multiples of 16 .*got 32x24"),
        ((1, 1, 32, 64, 3), True, r"the cache holds a video of batch 1 at 32x48 .*batch 1 at 32x64"),
        ((2, 1, 32, 48, 3), True, r"the cache holds a video of batch 1 at 32x48 .*batch 2 at 32x48"),
    ],
)
def test_bad_input_is_named_before_any_compute(enc, shape, first, msg):
    """params=None and data-less frames: the ValueError comes from the checks, before the model exists."""
    cache = enc.init_encode_cache(1, 32, 48)
    cache = cache if first else cache.replace(first_chunk=False)
    with pytest.raises(ValueError, match=msg):
        enc.encode_chunk(None, _shape(*shape), cache)


def test_bad_whole_clip_and_sizes_are_named(enc):
    with pytest.raises(ValueError, match=r"first chunk must be 1 or 1 \+ 4k frames .*got 8"):
        enc.encode(None, _shape(1, 8, 32, 48, 3))
    with pytest.raises(ValueError, match="latents_per_chunk must be >= 1 or None, got 0"):
        enc.encode(None, _shape(1, 9, 32, 48, 3), latents_per_chunk=0)
    with pytest.raises(ValueError, match="multiples of 16 .*got 24x48"):
        enc.init_encode_cache(1, 24, 48)


def test_latent_statistics_are_config_fields():
    """latent_mean / latent_std: Wan2.1's by default, saved in the config (JSON round trip; a config
    from before the fields loads with Wan's), used by the encoder ((mu - mean) / std) and the decoder
    (z * std + mean); z_dim entries each, std positive. The numerics on a 2-stage VAE (quick to compile)."""
    assert CFG.latent_mean == LATENT_MEAN == tuple(ref.LATENT_MEAN)
    assert CFG.latent_std == LATENT_STD == tuple(ref.LATENT_STD)
    saved = json.loads(json.dumps(CFG.to_dict()))
    assert VAEConfig.from_dict(saved) == CFG
    old = {k: v for k, v in saved.items() if k not in ("latent_mean", "latent_std")}
    assert VAEConfig.from_dict(old) == CFG

    rng = np.random.default_rng(0)
    mean, std = rng.normal(size=16), rng.uniform(0.5, 2.0, size=16)
    wan = VAEConfig(dim=4, dim_mult=(1, 1), temporal_upsample=(False,), num_res_blocks=1, per_frame_stages=0)
    own = wan.replace(latent_mean=tuple(mean), latent_std=tuple(std))
    assert VAEConfig.from_dict(json.loads(json.dumps(own.to_dict()))) == own
    x = jax.random.uniform(jax.random.key(1), (1, 1, 16, 16, 3), minval=-1.0, maxval=1.0)
    enc_params = random_params(WanVAEEncoder(wan).abstract_params(), 2)
    z_wan = np.asarray(WanVAEEncoder(wan).encode(enc_params, x))
    z_own = np.asarray(WanVAEEncoder(own).encode(enc_params, x))
    raw = z_wan * np.asarray(LATENT_STD) + np.asarray(LATENT_MEAN)  # the same mu, normalised both ways
    assert rel_err(z_own, (raw - mean) / std) <= 1e-5
    dec_params = random_params(WanVAE(wan).abstract_params(), 3)
    frames_wan = np.asarray(WanVAE(wan).decode(dec_params, jnp.asarray(z_wan)))
    frames_own = np.asarray(WanVAE(own).decode(dec_params, jnp.asarray(z_own, jnp.float32)))
    assert rel_err(frames_own, frames_wan) <= 1e-5  # the decoder un-normalises with the config's statistics

    with pytest.raises(ValueError, match=r"latent_mean and latent_std need z_dim=16 entries each .*got 8 and 16"):
        CFG.replace(latent_mean=(0.0,) * 8)
    with pytest.raises(ValueError, match=r"need z_dim=8 entries each .*got 16 and 16"):
        CFG.replace(z_dim=8)
    assert CFG.replace(z_dim=8, latent_mean=(0.0,) * 8, latent_std=(1.0,) * 8).z_dim == 8
    with pytest.raises(ValueError, match="latent_std must be positive"):
        CFG.replace(latent_std=(1.0,) * 15 + (0.0,))


def test_key_table_matches_the_wan_checkpoint_layout():
    """Facts §2: 84 `encoder.*` tensors + `conv1.*` [32,32,1,1,1]; with the decoder's 108, the 194 tensors
    and 126.9M parameters of Wan2.1_VAE.pth (torch on the meta device)."""
    with torch.device("meta"):
        enc_sd = ref.WanVAEEncoder(dim=96).state_dict()
        dec_sd = ref.WanVAEDecoder(dim=96).state_dict()
    rules = vae_encoder_key_map(get_vae_preset("wan2.1"))
    assert torch_shapes(rules) == {k: tuple(v.shape) for k, v in enc_sd.items()}
    assert len(rules) == 86 and sum(k.startswith("encoder.") for k in enc_sd) == 84
    full = {**dec_sd, **enc_sd}
    assert len(full) == 194 and sum(v.numel() for v in full.values()) == 126_892_531
    facts = {
        "conv1.weight": (32, 32, 1, 1, 1),
        "encoder.conv1.weight": (96, 3, 3, 3, 3),
        "encoder.downsamples.2.resample.1.weight": (96, 96, 3, 3),  # stage 0: downsample2d
        "encoder.downsamples.3.shortcut.weight": (192, 96, 1, 1, 1),
        "encoder.downsamples.5.time_conv.weight": (192, 192, 3, 1, 1),  # stage 1: downsample3d
        "encoder.downsamples.8.time_conv.weight": (384, 384, 3, 1, 1),
        "encoder.downsamples.10.residual.6.weight": (384, 384, 3, 3, 3),
        "encoder.middle.1.to_qkv.weight": (1152, 384, 1, 1),
        "encoder.middle.1.norm.gamma": (384, 1, 1),
        "encoder.head.0.gamma": (384, 1, 1, 1),
        "encoder.head.2.weight": (32, 384, 3, 3, 3),
    }
    for key, shape in facts.items():
        assert tuple(enc_sd[key].shape) == shape, key
    assert "encoder.downsamples.2.time_conv.weight" not in enc_sd


def test_shapes_at_wan_size():
    """Shapes only (jax.eval_shape, no compute): 81 frames at 480x832 -> 21 latents at 60x104, and the
    streaming chunks 1 -> 1, 4 -> 1, 12 -> 3."""
    enc = WanVAEEncoder(get_vae_preset("wan2.1"))
    abstract = enc.abstract_params()
    assert sum(p.size for p in jax.tree.leaves(abstract)) == 53_596_928  # = 126,892,531 - the decoder's 73,295,603
    cache = jax.eval_shape(lambda: enc.init_encode_cache(1, 480, 832))
    # 22 cached 3x3x3 convs + 2 downsample3d time convs (Wan's count_conv3d: 26, with the 2 uncached shortcuts)
    assert len(jax.tree.leaves(cache)) == 24
    assert cache.convs["conv1"].shape == (1, 2, 480, 832, 3)
    assert cache.convs["stage1"]["downsample"]["time_conv"].shape == (1, 1, 120, 208, 192)
    assert cache.convs["head"].shape == (1, 2, 60, 104, 384)
    for t, first, want in [(81, True, 21), (1, True, 1), (5, True, 2), (4, False, 1), (12, False, 3)]:
        c = VAEEncodeCache(convs=cache.convs, first_chunk=first)
        latents, new = jax.eval_shape(enc.encode_chunk, abstract, _shape(1, t, 480, 832, 3), c)
        assert latents.shape == (1, want, 60, 104, 16) and latents.dtype == jnp.float32
        assert jax.tree.map(lambda a: a.shape, new.convs) == jax.tree.map(lambda a: a.shape, cache.convs)


def test_converter_names_bad_encoder_keys(torch_vae):
    sd = dict(torch_vae[2])  # the decoder half is ignored by the encoder's table
    del sd["encoder.downsamples.5.time_conv.bias"]
    sd["encoder.downsamples.99.weight"] = torch.zeros(1)
    sd["encoder.head.2.weight"] = torch.zeros(32, 32, 1, 3, 3)
    with pytest.raises(CheckpointError) as err:
        vae_encoder_params_from_state_dict(sd, CFG)
    msg = str(err.value)
    assert "the VAE encoder config (dim=8" in msg
    assert "missing keys (1): encoder.downsamples.5.time_conv.bias" in msg
    assert "unexpected keys (1): encoder.downsamples.99.weight" in msg
    assert "encoder.head.2.weight: (32, 32, 1, 3, 3) (expected (32, 32, 3, 3, 3))" in msg
    assert "decoder." not in msg and "conv2" not in msg
    del sd["conv1.bias"]
    with pytest.raises(CheckpointError, match=r"missing keys \(2\): conv1.bias, encoder.downsamples.5.time_conv.bias"):
        vae_encoder_params_from_state_dict(sd, CFG)


def test_load_vae_components_reads_both_halves_once(torch_vae, vae_file, params, tmp_path):
    """`convert --wan-dir`'s loader: both halves (the single loaders' params); a decoder-only file gives
    the decoder alone; a partial encoder half is named, before anything is converted."""
    config, components = load_vae_components(vae_file, CFG)
    assert config == CFG and sorted(components) == ["vae", "vae_encoder"]
    _assert_trees_equal(components["vae_encoder"], params)
    _assert_trees_equal(components["vae"], load_vae_params(vae_file, CFG)[1])
    assert load_vae_components(vae_file)[0] == CFG  # the width inferred from the file

    decoder_only = tmp_path / "decoder_only.pth"
    torch.save(torch_vae[0].state_dict(), decoder_only)
    assert sorted(load_vae_components(decoder_only, CFG)[1]) == ["vae"]
    partial = tmp_path / "partial.pth"
    torch.save({**torch_vae[0].state_dict(), "encoder.conv1.weight": torch.zeros(CFG.dim, 3, 3, 3, 3)}, partial)
    with pytest.raises(CheckpointError, match=r"(?s)the VAE encoder config .*missing keys \(85\): conv1.bias, conv1.weight,"):
        load_vae_components(partial, CFG)


def _tokenizer_folder(folder) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(["a red fox"], trainers.WordLevelTrainer(special_tokens=["<pad>", "</s>", "<unk>"]))
    folder.mkdir(parents=True)
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({"eos_token": "</s>", "pad_token": "<pad>"}))


def test_convert_wan_dir_writes_the_encoder_and_it_loads_back(torch_vae, params, tmp_path, capsys):
    """`causal-dit convert --wan-dir` on a small Wan folder whose VAE file has both halves: the checkpoint
    gains 'vae_encoder' (its config the decoder's, latent statistics included), which loads back with
    the converter's params; the pipeline loads the same checkpoint without needing it."""
    from dit_fixtures import SMALL, save_self_forcing_pt, torch_model
    from torch_reference.umt5 import T5Encoder
    from torch_reference.umt5 import randomize_parameters_ as randomize_t5_

    from causal_dit_jax.app.cli import main
    from causal_dit_jax.app.pipeline import TextToVideoPipeline
    from causal_dit_jax.checkpoint import read_checkpoint_config, save_checkpoint

    wan = tmp_path / "Wan2.1-T2V-tiny"
    _tokenizer_folder(wan / "google" / "umt5-xxl")
    t5 = randomize_t5_(T5Encoder(vocab=64, dim=SMALL.text_dim, dim_attn=32, dim_ffn=64, num_heads=4, num_layers=2))
    torch.save(t5.state_dict(), wan / "models_t5_umt5-xxl-enc-bf16.pth")
    torch.save(torch_vae[2], wan / "Wan2.1_VAE.pth")
    pt = save_self_forcing_pt(torch_model(seed=3), tmp_path / "self_forcing_dmd.pt")
    ckpt = tmp_path / "ckpt"
    assert main(["convert", "--checkpoint", str(pt), "--wan-dir", str(wan), "--out", str(ckpt), "--preset", "tiny"]) == 0
    capsys.readouterr()

    meta = read_checkpoint_config(ckpt)
    assert meta["components"] == ["dit", "t5", "vae", "vae_encoder"]
    assert meta["vae_encoder"] == meta["vae"] == json.loads(json.dumps(CFG.to_dict()))
    assert meta["vae"]["latent_mean"] == list(LATENT_MEAN)
    encoder, restored = load_vae_encoder(ckpt)
    assert encoder.config == CFG
    _assert_trees_equal(restored, params)
    pipe = TextToVideoPipeline.from_checkpoint(ckpt)  # the pipeline ignores the encoder
    assert pipe.vae.config == CFG

    other = tmp_path / "no_encoder"
    save_checkpoint(other, {"vae": {"w": np.zeros(1)}}, {"vae": CFG.to_dict()})
    with pytest.raises(ValueError, match=r"has no VAE encoder \(it has \['vae'\]\)"):
        load_vae_encoder(other)
