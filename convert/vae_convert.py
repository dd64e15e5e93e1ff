"""`Wan2.1_VAE.pth` (a plain PyTorch state dict) -> our VAE decoder and encoder params: the two key tables
and the config inference.

The tables are generated from the `VAEConfig` (the numbers of stages and residual blocks decide the
`decoder.upsamples.{k}` and `encoder.downsamples.{k}` indices) and read against the keys of Wan2.1's
`WanVAE_` module. Each half is mapped on its own, the other half of the file ignored:
  decoder (`load_vae_params`): `conv2.*` and `decoder.*` (108 tensors for Wan2.1);
  encoder (`load_vae_encoder_params`): `conv1.*` and `encoder.*` (86 tensors);
  both from one read (`load_vae_components`, what `causal-dit convert --wan-dir` uses).
Any other key, a missing key of the half being read or a tensor of the wrong shape is reported by name
in one `CheckpointError` (by `rules.py`, the engine).
"""

from __future__ import annotations

import pathlib
from collections.abc import Mapping

import numpy as np

from causal_dit_jax.autoencoders.wan_vae import Params, VAEConfig, WanVAE, get_vae_preset
from causal_dit_jax.autoencoders.wan_vae_encoder import WanVAEEncoder
from causal_dit_jax.convert.rules import Rule, apply_rules, check_dtype, check_state_dict, conv, tensor, with_dtype
from causal_dit_jax.convert.torch_files import load_torch_pickle, select_state_dict

ENCODER_PREFIXES = ("encoder.", "conv1.")  # the encoder half: ignored by the decoder's table
DECODER_PREFIXES = ("decoder.", "conv2.")  # the decoder half: ignored by the encoder's table
IGNORED_PREFIXES = ENCODER_PREFIXES  # (the decoder's, by its old name)


def gamma(g: np.ndarray) -> np.ndarray:
    """RMS_norm gamma [C, 1, 1, 1] (video) or [C, 1, 1] (images) -> [C]."""
    return np.ascontiguousarray(g.reshape(-1))


def _norm(ours: str, torch: str, c: int, images: bool = False) -> Rule:
    return tensor(f"{ours}/scale", f"{torch}.gamma", (c, 1, 1) if images else (c, 1, 1, 1), gamma)


def _residual(ours: str, torch: str, c_in: int, c_out: int) -> list[Rule]:
    """Wan's ResidualBlock.residual = [0 norm, 1 SiLU, 2 conv, 3 norm, 4 SiLU, 5 Dropout, 6 conv]."""
    rules = [_norm(f"{ours}/norm1", f"{torch}.residual.0", c_in)]
    rules += conv(f"{ours}/conv1", f"{torch}.residual.2", c_in, c_out, (3, 3, 3))
    rules += [_norm(f"{ours}/norm2", f"{torch}.residual.3", c_out)]
    rules += conv(f"{ours}/conv2", f"{torch}.residual.6", c_out, c_out, (3, 3, 3))
    if c_in != c_out:
        rules += conv(f"{ours}/shortcut", f"{torch}.shortcut", c_in, c_out, (1, 1, 1))
    return rules


def vae_decoder_key_map(config: VAEConfig) -> tuple[Rule, ...]:
    """Every decoder-side key of a Wan VAE state dict for `config`, mapped onto our params tree."""
    z, dims = config.z_dim, config.decoder_dims
    c0 = dims[0]
    rules = conv("conv2", "conv2", z, z, (1, 1, 1))
    rules += conv("decoder/conv1", "decoder.conv1", z, c0, (3, 3, 3))
    rules += _residual("decoder/middle/res0", "decoder.middle.0", c0, c0)
    rules += [_norm("decoder/middle/attn/norm", "decoder.middle.1.norm", c0, images=True)]
    rules += conv("decoder/middle/attn/to_qkv", "decoder.middle.1.to_qkv", c0, 3 * c0, (1, 1))
    rules += conv("decoder/middle/attn/proj", "decoder.middle.1.proj", c0, c0, (1, 1))
    rules += _residual("decoder/middle/res1", "decoder.middle.2", c0, c0)
    k = 0  # index into decoder.upsamples (a flat nn.Sequential in Wan)
    num_stages = len(config.dim_mult)
    for i in range(num_stages):
        c_in, c_out = (dims[i] if i == 0 else dims[i] // 2), dims[i + 1]
        for j in range(config.num_res_blocks + 1):
            rules += _residual(f"decoder/stage{i}/res{j}", f"decoder.upsamples.{k}", c_in, c_out)
            c_in, k = c_out, k + 1
        if i != num_stages - 1:
            ours, torch = f"decoder/stage{i}/upsample", f"decoder.upsamples.{k}"
            rules += conv(f"{ours}/resample", f"{torch}.resample.1", c_out, c_out // 2, (3, 3))
            if config.temporal_upsample[i]:
                rules += conv(f"{ours}/time_conv", f"{torch}.time_conv", c_out, 2 * c_out, (3, 1, 1))
            k += 1
    rules += [_norm("decoder/head/norm", "decoder.head.0", dims[-1])]
    rules += conv("decoder/head/conv", "decoder.head.2", dims[-1], 3, (3, 3, 3))
    return tuple(rules)


def vae_encoder_key_map(config: VAEConfig) -> tuple[Rule, ...]:
    """Every encoder-side key of a Wan VAE state dict for `config`, mapped onto our encoder params tree."""
    z2, dims = 2 * config.z_dim, config.encoder_dims
    rules = conv("conv1", "conv1", z2, z2, (1, 1, 1))
    rules += conv("encoder/conv1", "encoder.conv1", 3, dims[0], (3, 3, 3))
    k = 0  # index into encoder.downsamples (a flat nn.Sequential in Wan)
    num_stages = len(config.dim_mult)
    for i in range(num_stages):
        c_in, c_out = dims[i], dims[i + 1]
        for j in range(config.num_res_blocks):
            rules += _residual(f"encoder/stage{i}/res{j}", f"encoder.downsamples.{k}", c_in, c_out)
            c_in, k = c_out, k + 1
        if i != num_stages - 1:
            ours, torch = f"encoder/stage{i}/downsample", f"encoder.downsamples.{k}"
            rules += conv(f"{ours}/resample", f"{torch}.resample.1", c_out, c_out, (3, 3))  # resample.0: ZeroPad2d
            if config.temporal_downsample[i]:
                rules += conv(f"{ours}/time_conv", f"{torch}.time_conv", c_out, c_out, (3, 1, 1))
            k += 1
    c = dims[-1]
    rules += _residual("encoder/middle/res0", "encoder.middle.0", c, c)
    rules += [_norm("encoder/middle/attn/norm", "encoder.middle.1.norm", c, images=True)]
    rules += conv("encoder/middle/attn/to_qkv", "encoder.middle.1.to_qkv", c, 3 * c, (1, 1))
    rules += conv("encoder/middle/attn/proj", "encoder.middle.1.proj", c, c, (1, 1))
    rules += _residual("encoder/middle/res1", "encoder.middle.2", c, c)
    rules += [_norm("encoder/head/norm", "encoder.head.0", c)]
    rules += conv("encoder/head/conv", "encoder.head.2", c, z2, (3, 3, 3))
    return tuple(rules)


def infer_vae_config(state: Mapping[str, object], base: VAEConfig | None = None) -> VAEConfig:
    """The 'wan2.1' preset (or `base`) at the width read off `decoder.conv1.weight` [dim * dim_mult[-1], z, 3, 3, 3]
    or, in a file without the decoder, `encoder.conv1.weight` [dim, 3, 3, 3, 3]."""
    config = base or get_vae_preset("wan2.1")
    conv1 = state.get("decoder.conv1.weight")
    if conv1 is not None and conv1.shape[0] % config.dim_mult[-1] == 0:
        config = config.replace(dim=int(conv1.shape[0]) // config.dim_mult[-1])
    elif conv1 is None and state.get("encoder.conv1.weight") is not None:
        config = config.replace(dim=int(state["encoder.conv1.weight"].shape[0]))
    return config


def has_encoder(state: Mapping[str, object]) -> bool:
    """Whether a VAE state dict has (any of) the encoder half: `encoder.*` keys."""
    return any(k.startswith(ENCODER_PREFIXES[0]) for k in state)


def vae_params_from_state_dict(
    state: Mapping[str, object], config: VAEConfig, as_numpy: bool = False, consume: bool = False
) -> Params:
    """Map a Wan VAE state dict (torch tensors or numpy arrays) onto our decoder params tree, in
    config.param_dtype (the encoder half of the file is ignored)."""
    return _half_params(state, config, "decoder", as_numpy, consume)


def vae_encoder_params_from_state_dict(
    state: Mapping[str, object], config: VAEConfig, as_numpy: bool = False, consume: bool = False
) -> Params:
    """Map a Wan VAE state dict (torch tensors or numpy arrays) onto our encoder params tree, in
    config.param_dtype (the decoder half of the file is ignored)."""
    return _half_params(state, config, "encoder", as_numpy, consume)


def _half_params(state: Mapping[str, object], config: VAEConfig, half: str, as_numpy: bool, consume: bool) -> Params:
    """One half of the file through the engine: its key table, its model's tree; the other half ignored."""
    key_map, model, ignored = {
        "decoder": (vae_decoder_key_map, WanVAE, ENCODER_PREFIXES),
        "encoder": (vae_encoder_key_map, WanVAEEncoder, DECODER_PREFIXES),
    }[half]
    return apply_rules(
        state, key_map(config), model(config), _what(config, half), ignore_prefixes=ignored, consume=consume, as_numpy=as_numpy
    )


def _what(config: VAEConfig, half: str) -> str:
    """The config in words, for a CheckpointError."""
    return f"the VAE {half} config (dim={config.dim}, dim_mult={config.dim_mult}, num_res_blocks={config.num_res_blocks})"


def _read_vae(path: str | pathlib.Path, config: VAEConfig | None, dtype: str | None) -> tuple[VAEConfig, dict]:
    """The dtype checked first, then the file read: (the config given or inferred, in `dtype`; the state)."""
    check_dtype(dtype)
    state = select_state_dict(load_torch_pickle(path))
    return with_dtype(config or infer_vae_config(state), dtype), state


def load_vae_params(
    path: str | pathlib.Path, config: VAEConfig | None = None, dtype: str | None = None
) -> tuple[VAEConfig, Params]:
    """Read `Wan2.1_VAE.pth` (torch.load weights_only=True) and return (config, decoder params).

    config: default the 'wan2.1' preset at the width read off the file. dtype: 'bfloat16' or 'float32'
    weights and compute, and a config saying so; None: the config's own (float32 for the preset).
    """
    config, state = _read_vae(path, config, dtype)
    return config, vae_params_from_state_dict(state, config, consume=True)


def load_vae_encoder_params(
    path: str | pathlib.Path, config: VAEConfig | None = None, dtype: str | None = None
) -> tuple[VAEConfig, Params]:
    """Read `Wan2.1_VAE.pth` and return (config, encoder params) for `WanVAEEncoder`; config and dtype
    as in `load_vae_params` (one config serves both halves)."""
    config, state = _read_vae(path, config, dtype)
    return config, vae_encoder_params_from_state_dict(state, config, consume=True)


def load_vae_components(
    path: str | pathlib.Path, config: VAEConfig | None = None, dtype: str | None = None
) -> tuple[VAEConfig, dict[str, Params]]:
    """Both halves from one read of the file: (config, {'vae': decoder params, 'vae_encoder': encoder
    params}), the checkpoint components of `causal-dit convert --wan-dir`. A decoder-only file (no
    `encoder.*` key at all) gives {'vae': ...} alone; a partial encoder half is a CheckpointError that
    names its missing keys. Both halves are checked before either is converted."""
    config, state = _read_vae(path, config, dtype)
    check_state_dict(state, vae_decoder_key_map(config), _what(config, "decoder"), ignore_prefixes=ENCODER_PREFIXES)
    with_encoder = has_encoder(state)
    if with_encoder:
        check_state_dict(state, vae_encoder_key_map(config), _what(config, "encoder"), ignore_prefixes=DECODER_PREFIXES)
    components = {"vae": vae_params_from_state_dict(state, config, consume=True)}
    if with_encoder:
        components["vae_encoder"] = vae_encoder_params_from_state_dict(state, config, consume=True)
    return config, components
