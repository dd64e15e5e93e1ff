"""PyTorch Wan / Self-Forcing DiT state dict -> our params tree, checked key by key."""

from __future__ import annotations

import json
import pathlib
from typing import Mapping, Optional

import jax
import numpy as np

from causal_dit_jax.model.config import ModelConfig, dtype_from_name
from causal_dit_jax.model.dit import CausalWanDiT, Params
from causal_dit_jax.convert.dit_keys import DIT_KEY_MAP, source_keys, torch_dit_shapes
from causal_dit_jax.convert.state_dict_check import check_keys_and_shapes, set_path
from causal_dit_jax.convert.torch_files import CheckpointError, read_state_dict

HEAD_DIM = 128  # Wan's head width; num_heads = dim / 128 when a checkpoint does not say


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


def infer_dit_config(state: Mapping[str, np.ndarray], base: Optional[ModelConfig] = None,
                     wan_config: Optional[Mapping] = None) -> ModelConfig:
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
        raise CheckpointError(f"cannot tell the head count of a dim-{dim} model: pass a config "
                              "(--preset) or put Wan's config.json beside the weights")
    if "text_len" in wan_config:
        base = base.replace(text_len=int(wan_config["text_len"]))
    if "eps" in wan_config:
        base = base.replace(eps=float(wan_config["eps"]))
    return base.replace(dim=dim, ffn_dim=ffn_dim, num_heads=heads, num_layers=layers, in_dim=in_dim,
                        out_dim=out_dim, text_dim=text_dim, freq_dim=freq_dim, patch_size=(pt, ph, pw))


def check_dit_state_dict(state: Mapping[str, np.ndarray], config: ModelConfig) -> None:
    """Raise one CheckpointError naming every missing, unexpected and mis-shaped key."""
    check_keys_and_shapes(state, torch_dit_shapes(config), "the DiT config "
                          f"(dim={config.dim}, layers={config.num_layers}, ffn={config.ffn_dim})")


def dit_params_from_state_dict(state: Mapping[str, np.ndarray], config: ModelConfig,
                               as_numpy: bool = False) -> Params:
    """Map a (prefix-stripped) PyTorch DiT state dict onto our params tree, in config.param_dtype."""
    check_dit_state_dict(state, config)
    dtype = np.dtype(dtype_from_name(config.param_dtype))
    params: dict = {}
    for rule in DIT_KEY_MAP:
        if rule.per_layer:
            layers = [rule.transform(*(np.asarray(state[t.format(i=i)]) for t in rule.torch))
                      for i in range(config.num_layers)]
            value = np.stack(layers)
        else:
            value = rule.transform(*(np.asarray(state[t]) for t in rule.torch))
        value = value.astype(dtype)
        set_path(params, rule.ours, value if as_numpy else jax.numpy.asarray(value))
    _check_tree(params, config)
    return params


def _check_tree(params: Params, config: ModelConfig) -> None:
    """Our tree must be exactly the tree `CausalWanDiT.init` makes (a bug guard on the key table)."""
    want = CausalWanDiT(config).abstract_params()
    got_shapes = jax.tree.map(lambda a: tuple(a.shape), params)
    want_shapes = jax.tree.map(lambda a: tuple(a.shape), want)
    if got_shapes != want_shapes:
        raise AssertionError(f"key table produced a different tree: {got_shapes} vs {want_shapes}")
    # every torch key is read exactly once
    read = [k for rule in DIT_KEY_MAP for k in source_keys(rule, config.num_layers)]
    assert len(read) == len(set(read)) == len(torch_dit_shapes(config))


def load_dit_params(path: str | pathlib.Path, config: Optional[ModelConfig] = None,
                    which: str = "generator_ema") -> tuple[ModelConfig, Params]:
    """Read a Self-Forcing `.pt` or a Wan safetensors checkpoint and return (config, params) in memory.

    config: the expected model; when None it is inferred from the tensor shapes (Wan defaults for
    the rest: eps, heads = dim / 128, bf16 weights).
    """
    state = read_state_dict(path, which)
    if config is None:
        config = infer_dit_config(state, wan_config=read_wan_config_json(path))
    return config, dit_params_from_state_dict(state, config)
