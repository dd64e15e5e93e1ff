"""The umT5 key map: our parameter path <- PyTorch state-dict key, with one transform per entry.

A declarative table (read against `../shared/reference` sections 2 and 9). `{i}` marks a per-layer
key; those are stacked over layers into our scanned block params. Every Linear has no bias.
"""

from __future__ import annotations

from causal_dit_jax.text.umt5 import T5Config
from causal_dit_jax.convert.dit_keys import KeyRule, identity, linear

B = "blocks.{i}"


def t5_key_map(config: T5Config) -> tuple[KeyRule, ...]:
    """The rules for `config` (only shared_pos changes the table: one top-level bias table)."""
    pos = (KeyRule("pos_embedding/embedding", ("pos_embedding.embedding.weight",), identity)
           if config.shared_pos else
           KeyRule("blocks/pos_embedding/embedding", (f"{B}.pos_embedding.embedding.weight",), identity))
    return (
        KeyRule("token_embedding/embedding", ("token_embedding.weight",), identity),
        KeyRule("blocks/norm1/scale", (f"{B}.norm1.weight",), identity),
        KeyRule("blocks/attn/q/kernel", (f"{B}.attn.q.weight",), linear),
        KeyRule("blocks/attn/k/kernel", (f"{B}.attn.k.weight",), linear),
        KeyRule("blocks/attn/v/kernel", (f"{B}.attn.v.weight",), linear),
        KeyRule("blocks/attn/o/kernel", (f"{B}.attn.o.weight",), linear),
        KeyRule("blocks/norm2/scale", (f"{B}.norm2.weight",), identity),
        KeyRule("blocks/ffn/gate/kernel", (f"{B}.ffn.gate.0.weight",), linear),
        KeyRule("blocks/ffn/fc1/kernel", (f"{B}.ffn.fc1.weight",), linear),
        KeyRule("blocks/ffn/fc2/kernel", (f"{B}.ffn.fc2.weight",), linear),
        pos,
        KeyRule("norm/scale", ("norm.weight",), identity),
    )


def torch_t5_shapes(config: T5Config) -> dict[str, tuple[int, ...]]:
    """Every key of Wan's PyTorch `T5Encoder` state dict for `config`, with its shape."""
    c, a, f = config.dim, config.dim_attn, config.dim_ffn
    pos = (config.num_buckets, config.num_heads)
    shapes: dict[str, tuple[int, ...]] = {"token_embedding.weight": (config.vocab_size, c), "norm.weight": (c,)}
    if config.shared_pos:
        shapes["pos_embedding.embedding.weight"] = pos
    for i in range(config.num_layers):
        p = f"blocks.{i}"
        shapes[f"{p}.norm1.weight"] = (c,)
        shapes[f"{p}.norm2.weight"] = (c,)
        for name in "qkv":
            shapes[f"{p}.attn.{name}.weight"] = (a, c)
        shapes[f"{p}.attn.o.weight"] = (c, a)
        shapes[f"{p}.ffn.gate.0.weight"] = (f, c)
        shapes[f"{p}.ffn.fc1.weight"] = (f, c)
        shapes[f"{p}.ffn.fc2.weight"] = (c, f)
        if not config.shared_pos:
            shapes[f"{p}.pos_embedding.embedding.weight"] = pos
    return shapes
