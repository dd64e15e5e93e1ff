"""Wan's `models_t5_umt5-xxl-enc-bf16.pth` (a plain PyTorch state dict) -> our umT5 params, checked key by key."""

from __future__ import annotations

import pathlib
from typing import Mapping, Optional

import jax
import numpy as np

from causal_dit_jax.model.config import dtype_from_name
from causal_dit_jax.text.umt5 import Params, T5Config, UMT5Encoder
from causal_dit_jax.convert.dit_keys import source_keys
from causal_dit_jax.convert.t5_keys import t5_key_map, torch_t5_shapes
from causal_dit_jax.convert.state_dict_check import check_keys_and_shapes, set_path
from causal_dit_jax.convert.torch_files import CheckpointError, read_pt_state_dict


def infer_t5_config(state: Mapping[str, np.ndarray], base: Optional[T5Config] = None) -> T5Config:
    """vocab, widths, heads, buckets, layers and shared_pos read off the tensor shapes (the rest from
    `base`, umT5-XXL by default)."""
    base = base or T5Config()
    shared = "pos_embedding.embedding.weight" in state
    try:
        vocab, dim = state["token_embedding.weight"].shape
        dim_attn = state["blocks.0.attn.q.weight"].shape[0]
        dim_ffn = state["blocks.0.ffn.fc1.weight"].shape[0]
        pos_key = "pos_embedding.embedding.weight" if shared else "blocks.0.pos_embedding.embedding.weight"
        buckets, heads = state[pos_key].shape
        layers = 1 + max(int(k.split(".")[1]) for k in state if k.startswith("blocks."))
    except (KeyError, ValueError) as e:
        raise CheckpointError(f"cannot infer the text encoder config from this state dict (missing {e})") from e
    return base.replace(vocab_size=vocab, dim=dim, dim_attn=dim_attn, dim_ffn=dim_ffn, num_heads=heads,
                        num_buckets=buckets, num_layers=layers, shared_pos=shared)


def check_t5_state_dict(state: Mapping[str, np.ndarray], config: T5Config) -> None:
    """Raise one CheckpointError naming every missing, unexpected and mis-shaped key."""
    check_keys_and_shapes(state, torch_t5_shapes(config), "the text encoder config "
                          f"(vocab={config.vocab_size}, dim={config.dim}, heads={config.num_heads}, "
                          f"layers={config.num_layers}, ffn={config.dim_ffn})")


def t5_params_from_state_dict(state: Mapping[str, np.ndarray], config: T5Config,
                              as_numpy: bool = False) -> Params:
    """Map a PyTorch umT5 state dict onto our params tree, in config.param_dtype (`state` is not modified)."""
    check_t5_state_dict(state, config)
    return _consume_state_dict(dict(state), config, as_numpy)


def _consume_state_dict(state: dict, config: T5Config, as_numpy: bool) -> Params:
    """The mapping itself; pops each source array as it is used so the XXL file (11.4 GB) is released
    tensor by tensor instead of living beside the whole converted tree."""
    dtype = np.dtype(dtype_from_name(config.param_dtype))
    params: dict = {}
    for rule in t5_key_map(config):
        if rule.per_layer:
            value = np.stack([rule.transform(*(np.asarray(state.pop(t.format(i=i))) for t in rule.torch))
                              for i in range(config.num_layers)])
        else:
            value = rule.transform(*(np.asarray(state.pop(t)) for t in rule.torch))
        value = value.astype(dtype, copy=False)
        set_path(params, rule.ours, value if as_numpy else jax.numpy.asarray(value))
    _check_tree(params, config)
    return params


def _check_tree(params: Params, config: T5Config) -> None:
    """Our tree must be exactly the tree `UMT5Encoder.init` makes (a bug guard on the key table)."""
    want = jax.tree.map(lambda a: tuple(a.shape), UMT5Encoder(config).abstract_params())
    got = jax.tree.map(lambda a: tuple(a.shape), params)
    if got != want:
        raise AssertionError(f"key table produced a different tree: {got} vs {want}")
    read = [k for rule in t5_key_map(config) for k in source_keys(rule, config.num_layers)]
    assert len(read) == len(set(read)) == len(torch_t5_shapes(config))


def load_t5_params(path: str | pathlib.Path, config: Optional[T5Config] = None,
                   as_numpy: bool = False) -> tuple[T5Config, Params]:
    """Read Wan's `models_t5_umt5-xxl-enc-bf16.pth` and return (config, params) in memory.

    config: the expected encoder (checked key by key); when None it is inferred from the tensor
    shapes, with umT5-XXL defaults for the rest (bf16 weights, text_len 512).
    """
    state = read_pt_state_dict(path)  # torch.load(weights_only=True); bf16 stays bf16
    if config is None:
        config = infer_t5_config(state)
    check_t5_state_dict(state, config)
    return config, _consume_state_dict(state, config, as_numpy)
