"""`taew2_1.pth` (TAEHV for Wan2.1; a plain PyTorch state dict, or safetensors) -> TAEHV decoder params.

The key table follows the PyTorch `decoder` nn.Sequential (see `causal_dit_jax/taehv.py`): conv_in is
`decoder.1`, stage s occupies indices 3 + 6 s .. 8 + 6 s (three memory blocks with
`.conv.{0,2,4}.{weight,bias}`, an upsample without weights, the time-grow `.conv.weight`, the
projection `.weight`), and conv_out is `decoder.22`. The `encoder.*` half is recognised and ignored.
A time-grow weight with more output channels than the config needs (a checkpoint trained with time
upscaling in that stage) keeps its last channels, as TAEHV's own loader does. Every other mismatch is
reported by name in one `CheckpointError`.
"""

from __future__ import annotations

import pathlib
from typing import Mapping, Optional

import numpy as np

from causal_dit_jax.model.config import dtype_from_name
from causal_dit_jax.decoders.taehv import MEM_BLOCKS, Params, TAEHVConfig, TAEHVDecoder, get_taehv_preset
from causal_dit_jax.convert.state_dict_check import check_keys_and_shapes, params_from_rules
from causal_dit_jax.convert.torch_files import read_state_dict
from causal_dit_jax.convert.vae_keys import VAEKeyRule, conv2d, identity

IGNORED_PREFIXES = ("encoder.",)


def _conv(ours: str, torch: str, c_in: int, c_out: int, k: int = 3, bias: bool = True) -> list[VAEKeyRule]:
    weight = f"{torch}.weight"
    rules = [VAEKeyRule(f"{ours}/kernel", weight, conv2d, (c_out, c_in, k, k))]
    if bias:
        rules.append(VAEKeyRule(f"{ours}/bias", f"{torch}.bias", identity, (c_out,)))
    return rules


def stage_base(stage: int) -> int:
    """Index of a stage's first memory block in the `decoder` Sequential."""
    return 3 + 6 * stage


def taehv_key_map(config: TAEHVConfig) -> tuple[VAEKeyRule, ...]:
    """Every decoder parameter: our path <- the PyTorch key, transform and expected torch shape."""
    c = config.channels
    rules = _conv("conv_in", "decoder.1", config.latent_channels, c[0])
    for s in range(3):
        base = stage_base(s)
        for j in range(MEM_BLOCKS):
            block = f"decoder.{base + j}.conv"
            rules += _conv(f"stage{s}/mem{j}/conv0", f"{block}.0", 2 * c[s], c[s])
            rules += _conv(f"stage{s}/mem{j}/conv1", f"{block}.2", c[s], c[s])
            rules += _conv(f"stage{s}/mem{j}/conv2", f"{block}.4", c[s], c[s])
        stride = 2 if config.time_upscale[s] else 1
        rules += _conv(f"stage{s}/tgrow", f"decoder.{base + 4}.conv", c[s], c[s] * stride, k=1, bias=False)
        rules += _conv(f"stage{s}/proj", f"decoder.{base + 5}", c[s], c[s + 1], bias=False)
    rules += _conv("conv_out", f"decoder.{stage_base(3) + 1}", c[3], 3 * config.patch_size ** 2)
    return tuple(rules)


def _trim_time_grow(state: dict, config: TAEHVConfig) -> dict:
    """Keep the last c*stride output channels of a wider time-grow weight (TAEHV's `patch_tgrow_layers`)."""
    state = dict(state)
    for s in range(3):
        key = f"decoder.{stage_base(s) + 4}.conv.weight"
        want = config.channels[s] * (2 if config.time_upscale[s] else 1)
        w = state.get(key)
        if w is not None and len(w.shape) == 4 and w.shape[0] > want and w.shape[0] % config.channels[s] == 0:
            state[key] = w[-want:]
    return state


def check_taehv_state_dict(state: Mapping[str, object], config: TAEHVConfig) -> None:
    """Raise one CheckpointError naming every missing, unexpected and mis-shaped decoder key."""
    expected = {rule.torch: rule.torch_shape for rule in taehv_key_map(config)}
    decoder_part = {k: v for k, v in state.items() if not k.startswith(IGNORED_PREFIXES)}
    check_keys_and_shapes(decoder_part, expected, f"the TAEHV decoder config (latent_channels="
                          f"{config.latent_channels}, channels={config.channels}, time_upscale={config.time_upscale})")


def taehv_params_from_state_dict(state: Mapping[str, object], config: TAEHVConfig) -> Params:
    """Map a TAEHV state dict (torch tensors or numpy arrays) onto our decoder params tree."""
    state = _trim_time_grow(dict(state), config)
    check_taehv_state_dict(state, config)
    return params_from_rules(state, taehv_key_map(config), np.dtype(dtype_from_name(config.param_dtype)),
                             TAEHVDecoder(config).abstract_params(), "TAEHV")


def load_taehv_params(path: str | pathlib.Path, config: Optional[TAEHVConfig] = None
                      ) -> tuple[TAEHVConfig, Params]:
    """Read `taew2_1.pth` (torch.load weights_only=True) or a `.safetensors` file; return (config,
    params). Default config: the 'taew2.1' preset with the widths and latent channels read off the file."""
    state = read_state_dict(path)
    if config is None:
        config = get_taehv_preset("taew2.1")
        conv_in = state.get("decoder.1.weight")
        if conv_in is not None and len(conv_in.shape) == 4:
            widths = [int(conv_in.shape[0])]
            for s in range(1, 4):
                proj = state.get(f"decoder.{stage_base(s - 1) + 5}.weight")
                widths.append(int(proj.shape[0]) if proj is not None else config.channels[s])
            config = config.replace(latent_channels=int(conv_in.shape[1]), channels=tuple(widths))
    return config, taehv_params_from_state_dict(state, config)


__all__ = ["taehv_key_map", "check_taehv_state_dict", "taehv_params_from_state_dict", "load_taehv_params"]
