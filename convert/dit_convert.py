"""PyTorch Wan / Self-Forcing DiT state dict -> our params tree: the key table and the config inference.

The table reads top to bottom against the state dict of Wan's `WanModel` (Self-Forcing's `CausalWanModel`
has the same names); `{i}` keys are stacked over
layers into our scanned block params. The engine (checks, applier, transforms) is `rules.py`.
"""

from __future__ import annotations

import json
import pathlib
from collections.abc import Mapping

import numpy as np

from causal_dit_jax.convert.rules import Rule, apply_rules, check_dtype, dense, fused_dense, tensor, torch_shapes, with_dtype
from causal_dit_jax.convert.torch_files import CheckpointError, read_state_dict
from causal_dit_jax.model.config import ModelConfig
from causal_dit_jax.model.dit import CausalWanDiT, Params

HEAD_DIM = 128  # Wan's head width; num_heads = dim / 128 when a checkpoint does not say


def drop_leading_one(x: np.ndarray) -> np.ndarray:
    """modulation [1, k, C] -> [k, C]."""
    return x[0]


def patch_conv(w: np.ndarray) -> np.ndarray:
    """Conv3d weight [C_out, C_in, pt, ph, pw] -> Dense kernel [(pt ph pw C_in), C_out], C_in fastest."""
    return np.ascontiguousarray(w.transpose(2, 3, 4, 1, 0).reshape(-1, w.shape[0]))


def dit_key_map(config: ModelConfig) -> tuple[Rule, ...]:
    """Every parameter of `CausalWanDiT(config)`: our path <- the PyTorch (Causal)WanModel key(s)."""
    c, f = config.dim, config.ffn_dim
    b = "blocks.{i}"
    return tuple(
        [
            tensor("stem/patch_embedding/kernel", "patch_embedding.weight", (c, config.in_dim, *config.patch_size), patch_conv),
            tensor("stem/patch_embedding/bias", "patch_embedding.bias", (c,)),
        ]
        + dense("stem/text_embedding/fc1", "text_embedding.0", config.text_dim, c)
        + dense("stem/text_embedding/fc2", "text_embedding.2", c, c)
        + dense("stem/time_embedding/fc1", "time_embedding.0", config.freq_dim, c)
        + dense("stem/time_embedding/fc2", "time_embedding.2", c, c)
        + dense("stem/time_projection", "time_projection.1", c, 6 * c)
        + [tensor("blocks/modulation", f"{b}.modulation", (1, 6, c), drop_leading_one)]
        + fused_dense("blocks/self_attn/qkv", [f"{b}.self_attn.{n}" for n in "qkv"], c, c)
        + dense("blocks/self_attn/o", f"{b}.self_attn.o", c, c)
        + [
            tensor("blocks/self_attn/norm_q/scale", f"{b}.self_attn.norm_q.weight", (c,)),
            tensor("blocks/self_attn/norm_k/scale", f"{b}.self_attn.norm_k.weight", (c,)),
            tensor("blocks/norm3/scale", f"{b}.norm3.weight", (c,)),
            tensor("blocks/norm3/bias", f"{b}.norm3.bias", (c,)),
        ]
        + dense("blocks/cross_attn/q", f"{b}.cross_attn.q", c, c)
        + fused_dense("blocks/cross_attn/kv", [f"{b}.cross_attn.{n}" for n in "kv"], c, c)
        + dense("blocks/cross_attn/o", f"{b}.cross_attn.o", c, c)
        + [
            tensor("blocks/cross_attn/norm_q/scale", f"{b}.cross_attn.norm_q.weight", (c,)),
            tensor("blocks/cross_attn/norm_k/scale", f"{b}.cross_attn.norm_k.weight", (c,)),
        ]
        + dense("blocks/ffn/fc1", f"{b}.ffn.0", c, f)
        + dense("blocks/ffn/fc2", f"{b}.ffn.2", f, c)
        + [tensor("head/modulation", "head.modulation", (1, 2, c), drop_leading_one)]
        + dense("head/head", "head.head", c, config.out_features)
    )


def torch_dit_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every key of a PyTorch (Causal)WanModel state dict for `config`, with its shape."""
    return torch_shapes(dit_key_map(config), config.num_layers)


# ---------------------------------------------------------------------------------------------------
# config inference


def read_wan_config_json(path: str | pathlib.Path) -> dict:
    """Wan's HF `config.json` beside a safetensors checkpoint (a folder or a file in it), or {}."""
    p = pathlib.Path(path)
    f = (p if p.is_dir() else p.parent) / "config.json"
    if not f.exists():
        return {}
    try:
        return json.loads(f.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{f} is not valid JSON: {e}") from e


def infer_dit_config(
    state: Mapping[str, np.ndarray], base: ModelConfig | None = None, wan_config: Mapping | None = None
) -> ModelConfig:
    """Read dim, ffn_dim, layers, text/freq dims and patch size off the tensors' shapes.

    The head count is not visible in the shapes: it comes from Wan's config.json when given, else
    dim / 128 (Wan's head width).
    """
    base = base or ModelConfig()
    wan_config = dict(wan_config or {})
    try:
        w = state["patch_embedding.weight"]
        dim, in_dim, pt, ph, pw = w.shape
        layers = 1 + max(int(k.split(".")[1]) for k in state if k.startswith("blocks."))
        ffn_dim = state["blocks.0.ffn.0.weight"].shape[0]
        text_dim = state["text_embedding.0.weight"].shape[1]
        freq_dim = state["time_embedding.0.weight"].shape[1]
        out_dim = state["head.head.weight"].shape[0] // (pt * ph * pw)
    except (KeyError, ValueError) as e:
        raise CheckpointError(f"cannot infer the model config from this state dict (missing {e})") from e
    if "num_heads" in wan_config:
        heads = int(wan_config["num_heads"])
    elif dim % HEAD_DIM == 0:
        heads = dim // HEAD_DIM
    else:
        raise CheckpointError(
            f"cannot tell the head count of a dim-{dim} model: pass a config "
            "(--preset) or put Wan's config.json beside the weights"
        )
    if "text_len" in wan_config:
        base = base.replace(text_len=int(wan_config["text_len"]))
    if "eps" in wan_config:
        base = base.replace(eps=float(wan_config["eps"]))
    base = base.replace(dim=dim, ffn_dim=ffn_dim, num_heads=heads, num_layers=layers, patch_size=(pt, ph, pw))
    return base.replace(in_dim=in_dim, out_dim=out_dim, text_dim=text_dim, freq_dim=freq_dim)


# ---------------------------------------------------------------------------------------------------
# conversion


def dit_params_from_state_dict(
    state: Mapping[str, np.ndarray], config: ModelConfig, as_numpy: bool = False, consume: bool = False
) -> Params:
    """Map a (prefix-stripped) PyTorch DiT state dict onto our params tree, in config.param_dtype.
    consume: pop the tensors from `state` as they are converted (see `rules.apply_rules`)."""
    what = f"the DiT config (dim={config.dim}, layers={config.num_layers}, ffn={config.ffn_dim})"
    return apply_rules(
        state, dit_key_map(config), CausalWanDiT(config), what, num_layers=config.num_layers, consume=consume, as_numpy=as_numpy
    )


def load_dit_params(
    path: str | pathlib.Path, config: ModelConfig | None = None, which: str = "generator_ema", dtype: str | None = None
) -> tuple[ModelConfig, Params]:
    """Read a Self-Forcing `.pt` or a Wan safetensors checkpoint and return (config, params) in memory.

    config: the expected model; when None it is inferred from the tensor shapes (Wan defaults for the
      rest: eps, heads = dim / 128 or Wan's config.json beside the weights, bf16 weights).
    which: the entry of a Self-Forcing `.pt` ('generator_ema' or 'generator').
    dtype: 'bfloat16' or 'float32': the weights are stored in it and the returned config says so
      (param_dtype = dtype = `dtype`; residual_dtype stays the config's, float32 by default). None: the
      config's own (bfloat16 for an inferred config).
    """
    check_dtype(dtype)
    state = read_state_dict(path, which)
    if config is None:
        config = infer_dit_config(state, wan_config=read_wan_config_json(path))
    config = with_dtype(config, dtype)
    return config, dit_params_from_state_dict(state, config, consume=True)
