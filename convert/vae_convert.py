"""`Wan2.1_VAE.pth` (a plain PyTorch state dict) -> our VAE decoder params: the key table and the config
inference.

The table is generated from the `VAEConfig` (the numbers of stages and residual blocks decide the
`decoder.upsamples.{k}` indices) and reads against the keys of Wan2.1's `WanVAE_` module. Only the
decoder half is mapped: `conv2.*` and `decoder.*`. The encoder half of the file (`encoder.*`,
`conv1.*`) is expected and ignored; any other key, a missing decoder key or a tensor of the wrong
shape is reported by name in one `CheckpointError` (by `rules.py`, the engine).
"""

from __future__ import annotations

import pathlib
from collections.abc import Mapping

import numpy as np

from causal_dit_jax.autoencoders.wan_vae import Params, VAEConfig, WanVAE, get_vae_preset
from causal_dit_jax.convert.rules import Rule, apply_rules, check_dtype, conv, tensor, with_dtype
from causal_dit_jax.convert.torch_files import load_torch_pickle, select_state_dict

IGNORED_PREFIXES = ("encoder.", "conv1.")  # the encoder half; not read by the decoder


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


def infer_vae_config(state: Mapping[str, object], base: VAEConfig | None = None) -> VAEConfig:
    """The 'wan2.1' preset (or `base`) at the width read off `decoder.conv1.weight` [dim * dim_mult[-1], z, 3, 3, 3]."""
    config = base or get_vae_preset("wan2.1")
    conv1 = state.get("decoder.conv1.weight")
    if conv1 is not None and conv1.shape[0] % config.dim_mult[-1] == 0:
        config = config.replace(dim=int(conv1.shape[0]) // config.dim_mult[-1])
    return config


def vae_params_from_state_dict(
    state: Mapping[str, object], config: VAEConfig, as_numpy: bool = False, consume: bool = False
) -> Params:
    """Map a Wan VAE state dict (torch tensors or numpy arrays) onto our decoder params tree, in
    config.param_dtype."""
    return apply_rules(
        state,
        vae_decoder_key_map(config),
        dtype=config.param_dtype,
        abstract_params=WanVAE(config).abstract_params(),
        what=f"the VAE decoder config (dim={config.dim}, dim_mult={config.dim_mult}, "
        f"num_res_blocks={config.num_res_blocks})",
        ignore_prefixes=IGNORED_PREFIXES,
        consume=consume,
        as_numpy=as_numpy,
    )


def load_vae_params(
    path: str | pathlib.Path, config: VAEConfig | None = None, dtype: str | None = None
) -> tuple[VAEConfig, Params]:
    """Read `Wan2.1_VAE.pth` (torch.load weights_only=True) and return (config, decoder params).

    config: default the 'wan2.1' preset at the width read off the file. dtype: 'bfloat16' or 'float32'
    weights and compute, and a config saying so; None: the config's own (float32 for the preset).
    """
    check_dtype(dtype)
    state = select_state_dict(load_torch_pickle(path))
    config = with_dtype(config or infer_vae_config(state), dtype)
    return config, vae_params_from_state_dict(state, config, consume=True)
