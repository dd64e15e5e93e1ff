"""`taew2_1.pth` (TAEHV for Wan2.1; a plain PyTorch state dict, or safetensors) -> TAEHV decoder params:
the key table and the config inference.

The key table follows the PyTorch `decoder` nn.Sequential (see `causal_dit_jax/autoencoders/taehv.py`):
conv_in is `decoder.1`, stage s occupies indices 3 + 6 s .. 8 + 6 s (three memory blocks with
`.conv.{0,2,4}.{weight,bias}`, an upsample without weights, the time-grow `.conv.weight`, the
projection `.weight`), and conv_out is `decoder.22`. The decoder loader recognises and ignores the
`encoder.*` half; the encoder loader (`load_taehv_encoder_params`, the `encoder` Sequential: conv_in
`encoder.0`, stage s at 2 + 5 s .. 6 + 5 s = time-pool `.conv.weight`, stride-2 conv `.weight`, three
memory blocks; conv_out `encoder.17`) reads it and ignores `decoder.*`.
A time-grow weight with more output channels than the config needs (a checkpoint trained with time
upscaling in that stage) keeps its last channels, as TAEHV's own loader does. Every other mismatch is
reported by name in one `CheckpointError` (by `rules.py`, the engine).
"""

from __future__ import annotations

import pathlib
from collections.abc import Mapping

from causal_dit_jax.autoencoders.taehv import MEM_BLOCKS, Params, TAEHVConfig, TAEHVDecoder, get_taehv_preset
from causal_dit_jax.autoencoders.taehv_encoder import ENCODER_STAGES, TAEHVEncoder
from causal_dit_jax.convert.rules import Rule, apply_rules, check_dtype, conv, with_dtype
from causal_dit_jax.convert.torch_files import read_state_dict

IGNORED_PREFIXES = ("encoder.",)
ENCODER_IGNORED_PREFIXES = ("decoder.",)


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
    what = f"channels={config.channels}, time_upscale={config.time_upscale}"
    state = _trim_time_grow(state, config)
    return _half_params(state, config, taehv_key_map, TAEHVDecoder, IGNORED_PREFIXES, what, as_numpy, consume)


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


# ------------------------------------------------------------------------------------------ encoder
def encoder_stage_base(stage: int) -> int:
    """Index of a stage's time-pool layer in the `encoder` Sequential."""
    return 2 + 5 * stage


def encoder_conv_out_index() -> int:
    return encoder_stage_base(ENCODER_STAGES)


def taehv_encoder_key_map(config: TAEHVConfig) -> tuple[Rule, ...]:
    """Every encoder parameter: our path <- the PyTorch key, with its expected torch shape."""
    e = config.encoder_width
    rules = conv("conv_in", "encoder.0", 3 * config.patch_size**2, e, (3, 3))
    for s in range(ENCODER_STAGES):
        base = encoder_stage_base(s)
        stride = 2 if config.encoder_time_downscale[s] else 1
        rules += conv(f"stage{s}/tpool", f"encoder.{base}.conv", e * stride, e, (1, 1), bias=False)
        rules += conv(f"stage{s}/down", f"encoder.{base + 1}", e, e, (3, 3), bias=False)
        for j in range(MEM_BLOCKS):
            block = f"encoder.{base + 2 + j}.conv"
            rules += conv(f"stage{s}/mem{j}/conv0", f"{block}.0", 2 * e, e, (3, 3))
            rules += conv(f"stage{s}/mem{j}/conv1", f"{block}.2", e, e, (3, 3))
            rules += conv(f"stage{s}/mem{j}/conv2", f"{block}.4", e, e, (3, 3))
    rules += conv("conv_out", f"encoder.{encoder_conv_out_index()}", e, config.latent_channels, (3, 3))
    return tuple(rules)


def infer_taehv_encoder_config(state: Mapping[str, object], base: TAEHVConfig | None = None) -> TAEHVConfig:
    """`infer_taehv_config`, plus the encoder's width (conv_in `encoder.0.weight` [e, 3 patch^2, 3, 3]),
    latent channels (conv_out [latent_channels, e, 3, 3]) and time-pool strides ([e, e * stride, 1, 1])."""
    config = infer_taehv_config(state, base)
    conv_in = state.get("encoder.0.weight")
    if conv_in is None or len(conv_in.shape) != 4:
        return config
    e = int(conv_in.shape[0])
    fields: dict = {"encoder_width": e}
    conv_out = state.get(f"encoder.{encoder_conv_out_index()}.weight")
    if conv_out is not None and len(conv_out.shape) == 4:
        fields["latent_channels"] = int(conv_out.shape[0])
    strides = []
    for s in range(ENCODER_STAGES):
        pool = state.get(f"encoder.{encoder_stage_base(s)}.conv.weight")
        strides.append(
            pool.shape[1] == 2 * e if pool is not None and len(pool.shape) == 4 else config.encoder_time_downscale[s]
        )
    fields["encoder_time_downscale"] = tuple(strides)
    return config.replace(**fields)


def taehv_encoder_params_from_state_dict(
    state: Mapping[str, object], config: TAEHVConfig, as_numpy: bool = False, consume: bool = False
) -> Params:
    """Map a TAEHV state dict onto our encoder params tree (`TAEHVEncoder`), in config.param_dtype;
    the `decoder.*` half is ignored."""
    what = f"encoder_width={config.encoder_width}, encoder_time_downscale={config.encoder_time_downscale}"
    return _half_params(state, config, taehv_encoder_key_map, TAEHVEncoder, ENCODER_IGNORED_PREFIXES, what, as_numpy, consume)


def _half_params(state, config: TAEHVConfig, key_map, model, ignored, what: str, as_numpy: bool, consume: bool) -> Params:
    """One half of a TAEHV file through the engine: its key table, its model's tree; the other half ignored."""
    name = "encoder" if model is TAEHVEncoder else "decoder"
    what = f"the TAEHV {name} config (latent_channels={config.latent_channels}, {what})"
    return apply_rules(state, key_map(config), model(config), what, ignore_prefixes=ignored, consume=consume, as_numpy=as_numpy)


def load_taehv_encoder_params(
    path: str | pathlib.Path, config: TAEHVConfig | None = None, dtype: str | None = None
) -> tuple[TAEHVConfig, Params]:
    """Read the encoder half of `taew2_1.pth` (or a `.safetensors` file); return (config, params) for
    `TAEHVEncoder`. config: default the 'taew2.1' preset with the widths read off the file; dtype as
    `load_taehv_params`."""
    check_dtype(dtype)
    state = read_state_dict(path)
    config = with_dtype(config or infer_taehv_encoder_config(state), dtype)
    return config, taehv_encoder_params_from_state_dict(state, config, consume=True)


def load_taehv_components(
    path: str | pathlib.Path, config: TAEHVConfig | None = None, dtype: str | None = None
) -> tuple[TAEHVConfig, dict[str, Params]]:
    """Both halves of `taew2_1.pth` from one read: (config, {'taehv': decoder params, 'taehv_encoder':
    encoder params}), one config for both (the encoder's fields read off the file too); a file without
    any `encoder.*` key gives {'taehv': ...} alone. The checkpoint components of `causal-dit convert
    --taehv`."""
    check_dtype(dtype)
    state = read_state_dict(path)
    with_encoder = any(k.startswith("encoder.") for k in state)
    config = with_dtype(config or (infer_taehv_encoder_config(state) if with_encoder else infer_taehv_config(state)), dtype)
    components = {"taehv": taehv_params_from_state_dict(state, config)}
    if with_encoder:
        components["taehv_encoder"] = taehv_encoder_params_from_state_dict(state, config, consume=True)
    return config, components


__all__ = [
    "load_taehv_components",
    "taehv_key_map",
    "infer_taehv_config",
    "taehv_params_from_state_dict",
    "load_taehv_params",
    "taehv_encoder_key_map",
    "infer_taehv_encoder_config",
    "taehv_encoder_params_from_state_dict",
    "load_taehv_encoder_params",
]
