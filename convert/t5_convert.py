"""Wan's `models_t5_umt5-xxl-enc-bf16.pth` (a plain PyTorch state dict) -> our umT5 params: the key
table and the config inference.

The table reads against the state dict of Wan2.1's `T5Encoder` (umT5-XXL); `{i}` keys are stacked over layers
into our scanned block params. Every Linear has no bias. The engine is `rules.py`.
"""

from __future__ import annotations

import pathlib
from collections.abc import Mapping

import numpy as np

from causal_dit_jax.convert.rules import Rule, apply_rules, check_dtype, dense, tensor, torch_shapes, with_dtype
from causal_dit_jax.convert.torch_files import CheckpointError, read_pt_state_dict
from causal_dit_jax.text.umt5 import Params, T5Config, UMT5Encoder


def t5_key_map(config: T5Config) -> tuple[Rule, ...]:
    """Every parameter of `UMT5Encoder(config)`: our path <- Wan's `T5Encoder` key. Only shared_pos
    changes the layout: one top-level relative-position bias table instead of one per layer."""
    c, a, f = config.dim, config.dim_attn, config.dim_ffn
    b = "blocks.{i}"
    pos = (config.num_buckets, config.num_heads)
    pos_rule = (
        tensor("pos_embedding/embedding", "pos_embedding.embedding.weight", pos)
        if config.shared_pos
        else tensor("blocks/pos_embedding/embedding", f"{b}.pos_embedding.embedding.weight", pos)
    )
    return tuple(
        [
            tensor("token_embedding/embedding", "token_embedding.weight", (config.vocab_size, c)),
            tensor("blocks/norm1/scale", f"{b}.norm1.weight", (c,)),
        ]
        + dense("blocks/attn/q", f"{b}.attn.q", c, a, bias=False)
        + dense("blocks/attn/k", f"{b}.attn.k", c, a, bias=False)
        + dense("blocks/attn/v", f"{b}.attn.v", c, a, bias=False)
        + dense("blocks/attn/o", f"{b}.attn.o", a, c, bias=False)
        + [tensor("blocks/norm2/scale", f"{b}.norm2.weight", (c,))]
        + dense("blocks/ffn/gate", f"{b}.ffn.gate.0", c, f, bias=False)
        + dense("blocks/ffn/fc1", f"{b}.ffn.fc1", c, f, bias=False)
        + dense("blocks/ffn/fc2", f"{b}.ffn.fc2", f, c, bias=False)
        + [pos_rule, tensor("norm/scale", "norm.weight", (c,))]
    )


def torch_t5_shapes(config: T5Config) -> dict[str, tuple[int, ...]]:
    """Every key of Wan's PyTorch `T5Encoder` state dict for `config`, with its shape."""
    return torch_shapes(t5_key_map(config), config.num_layers)


def infer_t5_config(state: Mapping[str, np.ndarray], base: T5Config | None = None) -> T5Config:
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
    base = base.replace(vocab_size=vocab, dim=dim, dim_attn=dim_attn, dim_ffn=dim_ffn, num_heads=heads)
    return base.replace(num_buckets=buckets, num_layers=layers, shared_pos=shared)


def t5_params_from_state_dict(
    state: Mapping[str, np.ndarray], config: T5Config, as_numpy: bool = False, consume: bool = False
) -> Params:
    """Map a PyTorch umT5 state dict onto our params tree, in config.param_dtype. `state` is not modified
    unless consume (pop each tensor as it is converted: the XXL file is 11.4 GB)."""
    what = (
        f"the text encoder config (vocab={config.vocab_size}, dim={config.dim}, heads={config.num_heads}, "
        f"layers={config.num_layers}, ffn={config.dim_ffn})"
    )
    return apply_rules(
        state, t5_key_map(config), UMT5Encoder(config), what, num_layers=config.num_layers, consume=consume, as_numpy=as_numpy
    )


def load_t5_params(
    path: str | pathlib.Path, config: T5Config | None = None, dtype: str | None = None
) -> tuple[T5Config, Params]:
    """Read Wan's `models_t5_umt5-xxl-enc-bf16.pth` and return (config, params) in memory.

    config: the expected encoder (checked key by key); when None it is inferred from the tensor
      shapes, with umT5-XXL defaults for the rest (bf16 weights, text_len 512).
    dtype: 'bfloat16' or 'float32' weights, and a config saying so (residual_dtype unchanged); None:
      the config's own.
    """
    check_dtype(dtype)
    state = read_pt_state_dict(path)  # torch.load(weights_only=True); bf16 stays bf16
    if config is None:
        config = infer_t5_config(state)
    config = with_dtype(config, dtype)
    return config, t5_params_from_state_dict(state, config, consume=True)
