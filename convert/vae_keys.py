"""The Wan VAE decoder key map: our parameter path <- PyTorch state-dict key, with one transform each.

A declarative table generated from the `VAEConfig` (the numbers of stages and residual blocks decide
the `decoder.upsamples.{k}` indices), read against facts section 2 ("VAE") and section 8. Only the
decoder half is mapped: `conv2.*` and `decoder.*`. The encoder half of `Wan2.1_VAE.pth`
(`encoder.*`, `conv1.*`) is recognised and ignored.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import numpy as np

from causal_dit_jax.decoders.wan_vae import VAEConfig

IGNORED_PREFIXES = ("encoder.", "conv1.")  # the encoder half; not read by the decoder


def conv3d(w: np.ndarray) -> np.ndarray:
    """torch Conv3d weight [O, I, t, h, w] -> [t, h, w, I, O]."""
    return np.ascontiguousarray(w.transpose(2, 3, 4, 1, 0))


def conv2d(w: np.ndarray) -> np.ndarray:
    """torch Conv2d weight [O, I, h, w] -> [h, w, I, O]."""
    return np.ascontiguousarray(w.transpose(2, 3, 1, 0))


def gamma(g: np.ndarray) -> np.ndarray:
    """RMS_norm gamma [C, 1, 1, 1] (video) or [C, 1, 1] (images) -> [C]."""
    return np.ascontiguousarray(g.reshape(-1))


def identity(x: np.ndarray) -> np.ndarray:
    return x


@dataclasses.dataclass(frozen=True)
class VAEKeyRule:
    ours: str  # '/'-joined path in our params
    torch: str  # the PyTorch key
    transform: Callable[[np.ndarray], np.ndarray]
    torch_shape: tuple[int, ...]  # what the PyTorch tensor must look like


def _conv3d_rules(ours: str, torch: str, c_in: int, c_out: int, k: tuple[int, int, int]) -> list[VAEKeyRule]:
    return [VAEKeyRule(f"{ours}/kernel", f"{torch}.weight", conv3d, (c_out, c_in, *k)),
            VAEKeyRule(f"{ours}/bias", f"{torch}.bias", identity, (c_out,))]


def _conv2d_rules(ours: str, torch: str, c_in: int, c_out: int, k: int) -> list[VAEKeyRule]:
    return [VAEKeyRule(f"{ours}/kernel", f"{torch}.weight", conv2d, (c_out, c_in, k, k)),
            VAEKeyRule(f"{ours}/bias", f"{torch}.bias", identity, (c_out,))]


def _norm_rule(ours: str, torch: str, c: int, images: bool = False) -> VAEKeyRule:
    return VAEKeyRule(f"{ours}/scale", f"{torch}.gamma", gamma, (c, 1, 1) if images else (c, 1, 1, 1))


def _residual_rules(ours: str, torch: str, c_in: int, c_out: int) -> list[VAEKeyRule]:
    """Wan's ResidualBlock.residual = [0 norm, 1 SiLU, 2 conv, 3 norm, 4 SiLU, 5 Dropout, 6 conv]."""
    rules = [_norm_rule(f"{ours}/norm1", f"{torch}.residual.0", c_in)]
    rules += _conv3d_rules(f"{ours}/conv1", f"{torch}.residual.2", c_in, c_out, (3, 3, 3))
    rules += [_norm_rule(f"{ours}/norm2", f"{torch}.residual.3", c_out)]
    rules += _conv3d_rules(f"{ours}/conv2", f"{torch}.residual.6", c_out, c_out, (3, 3, 3))
    if c_in != c_out:
        rules += _conv3d_rules(f"{ours}/shortcut", f"{torch}.shortcut", c_in, c_out, (1, 1, 1))
    return rules


def vae_decoder_key_map(config: VAEConfig) -> tuple[VAEKeyRule, ...]:
    """Every decoder-side key of a Wan VAE state dict for `config`, mapped onto our params tree."""
    z, dims = config.z_dim, config.decoder_dims
    c0 = dims[0]
    rules = _conv3d_rules("conv2", "conv2", z, z, (1, 1, 1))
    rules += _conv3d_rules("decoder/conv1", "decoder.conv1", z, c0, (3, 3, 3))
    rules += _residual_rules("decoder/middle/res0", "decoder.middle.0", c0, c0)
    rules += [_norm_rule("decoder/middle/attn/norm", "decoder.middle.1.norm", c0, images=True)]
    rules += _conv2d_rules("decoder/middle/attn/to_qkv", "decoder.middle.1.to_qkv", c0, 3 * c0, 1)
    rules += _conv2d_rules("decoder/middle/attn/proj", "decoder.middle.1.proj", c0, c0, 1)
    rules += _residual_rules("decoder/middle/res1", "decoder.middle.2", c0, c0)
    k = 0  # index into decoder.upsamples (a flat nn.Sequential in Wan)
    num_stages = len(config.dim_mult)
    for i in range(num_stages):
        c_in, c_out = (dims[i] if i == 0 else dims[i] // 2), dims[i + 1]
        for j in range(config.num_res_blocks + 1):
            rules += _residual_rules(f"decoder/stage{i}/res{j}", f"decoder.upsamples.{k}", c_in, c_out)
            c_in, k = c_out, k + 1
        if i != num_stages - 1:
            ours, torch = f"decoder/stage{i}/upsample", f"decoder.upsamples.{k}"
            rules += _conv2d_rules(f"{ours}/resample", f"{torch}.resample.1", c_out, c_out // 2, 3)
            if config.temporal_upsample[i]:
                rules += _conv3d_rules(f"{ours}/time_conv", f"{torch}.time_conv", c_out, 2 * c_out, (3, 1, 1))
            k += 1
    rules += [_norm_rule("decoder/head/norm", "decoder.head.0", dims[-1])]
    rules += _conv3d_rules("decoder/head/conv", "decoder.head.2", dims[-1], 3, (3, 3, 3))
    return tuple(rules)
