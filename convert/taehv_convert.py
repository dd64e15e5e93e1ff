"""`taew2_1.pth` (TAEHV for Wan2.1; a plain PyTorch state dict, or safetensors) -> TAEHV decoder params:
the key table and the config inference.

The key table follows the PyTorch `decoder` nn.Sequential (see `causal_dit_jax/autoencoders/taehv.py`):
conv_in is `decoder.1`, stage s occupies indices 3 + 6 s .. 8 + 6 s (three memory blocks with
`.conv.{0,2,4}.{weight,bias}`, an upsample without weights, the time-grow `.conv.weight`, the
projection `.weight`), and conv_out is `decoder.22`. The `encoder.*` half is recognised and ignored.
A time-grow weight with more output channels than the config needs (a checkpoint trained with time
upscaling in that stage) keeps its last channels, as TAEHV's own loader does. Every other mismatch is
reported by name in one `CheckpointError` (by `rules.py`, the engine).
"""

from __future__ import annotations

import pathlib
from collections.abc import Mapping

from causal_dit_jax.autoencoders.taehv import MEM_BLOCKS, Params, TAEHVConfig, TAEHVDecoder, get_taehv_preset
from causal_dit_jax.convert.rules import Rule, apply_rules, check_dtype, conv, with_dtype
from causal_dit_jax.convert.torch_files import read_state_dict

IGNORED_PREFIXES = ("encoder.",)


def stage_base(stage: int) -> int:
    """Index of a stage's first memory block in the `decoder` Sequential."""
    return 3 + 6 * stage


def taehv_key_map(config: TAEHVConfig) -> tuple[Rule, ...]:
    """Every decoder parameter: our path <- the PyTorch key, with its expected torch shape."""
    c = config.channels
    rules = conv("conv_in", "decoder.1", config.latent_channels, c[0], (3, 3))
    for s in range(3):
        base = stage_base(s)
        for j in range(MEM_BLOCKS):
            block = f"decoder.{base + j}.conv"
            rules += conv(f"stage{s}/mem{j}/conv0", f"{block}.0", 2 * c[s], c[s], (3, 3))
            rules += conv(f"stage{s}/mem{j}/conv1", f"{block}.2", c[s], c[s], (3, 3))
            rules += conv(f"stage{s}/mem{j}/conv2", f"{block}.4", c[s], c[s], (3, 3))
        stride = 2 if config.time_upscale[s] else 1
        rules += conv(f"stage{s}/tgrow", f"decoder.{base + 4}.conv", c[s], c[s] * stride, (1, 1), bias=False)
        rules += conv(f"stage{s}/proj", f"decoder.{base + 5}", c[s], c[s + 1], (3, 3), bias=False)
    rules += conv("conv_out", f"decoder.{stage_base(3) + 1}", c[3], 3 * config.patch_size**2, (3, 3))
    return tuple(rules)


def _trim_time_grow(state: Mapping[str, object], config: TAEHVConfig) -> dict:
    """Keep the last c*stride output channels of a wider time-grow weight (TAEHV's `patch_tgrow_layers`)."""
    state = dict(state)
    for s in range(3):
        key = f"decoder.{stage_base(s) + 4}.conv.weight"
        want = config.channels[s] * (2 if config.time_upscale[s] else 1)
        w = state.get(key)
        if w is not None and len(w.shape) == 4 and w.shape[0] > want and w.shape[0] % config.channels[s] == 0:
            state[key] = w[-want:]
    return state


def infer_taehv_config(state: Mapping[str, object], base: TAEHVConfig | None = None) -> TAEHVConfig:
    """The 'taew2.1' preset (or `base`) with the latent channels and stage widths read off the file:
    conv_in `decoder.1.weight` [c0, latent_channels, 3, 3] and each stage's projection [c_{s+1}, c_s, 3, 3]."""
    config = base or get_taehv_preset("taew2.1")
    conv_in = state.get("decoder.1.weight")
    if conv_in is not None and len(conv_in.shape) == 4:
        widths = [int(conv_in.shape[0])]
        for s in range(1, 4):
            proj = state.get(f"decoder.{stage_base(s - 1) + 5}.weight")
            widths.append(int(proj.shape[0]) if proj is not None else config.channels[s])
        config = config.replace(latent_channels=int(conv_in.shape[1]), channels=tuple(widths))
    return config


def taehv_params_from_state_dict(
    state: Mapping[str, object], config: TAEHVConfig, as_numpy: bool = False, consume: bool = False
) -> Params:
    """Map a TAEHV state dict (torch tensors or numpy arrays) onto our decoder params tree, in
    config.param_dtype. The state dict is copied (the time-grow trim), so consume only frees the copy."""
    return apply_rules(
        _trim_time_grow(state, config),
        taehv_key_map(config),
        dtype=config.param_dtype,
        abstract_params=TAEHVDecoder(config).abstract_params(),
        what=f"the TAEHV decoder config (latent_channels={config.latent_channels}, "
        f"channels={config.channels}, time_upscale={config.time_upscale})",
        ignore_prefixes=IGNORED_PREFIXES,
        consume=consume,
        as_numpy=as_numpy,
    )


def load_taehv_params(
    path: str | pathlib.Path, config: TAEHVConfig | None = None, dtype: str | None = None
) -> tuple[TAEHVConfig, Params]:
    """Read `taew2_1.pth` (torch.load weights_only=True) or a `.safetensors` file; return (config, params).

    config: default the 'taew2.1' preset with the widths and latent channels read off the file.
    dtype: 'bfloat16' or 'float32' weights and compute, and a config saying so; None: the config's own
    (float32 for the preset).
    """
    check_dtype(dtype)
    state = read_state_dict(path)
    config = with_dtype(config or infer_taehv_config(state), dtype)
    return config, taehv_params_from_state_dict(state, config, consume=True)


__all__ = ["taehv_key_map", "infer_taehv_config", "taehv_params_from_state_dict", "load_taehv_params"]
