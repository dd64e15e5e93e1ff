"""The DiT key map: our parameter path <- PyTorch state-dict key(s), with one transform per entry.

A declarative table (read top to bottom against `../shared/reference` section 2), not string
surgery. `{i}` marks a per-layer key; those are stacked over layers into our scanned block params.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import numpy as np

from causal_dit_jax.model.config import ModelConfig


def linear(w: np.ndarray) -> np.ndarray:
    """torch Linear weight [out, in] -> kernel [in, out]."""
    return np.ascontiguousarray(w.T)


def concat_linear(*ws: np.ndarray) -> np.ndarray:
    """Several torch Linear weights fused along the output axis: kernel [in, sum(out)]."""
    return np.concatenate([w.T for w in ws], axis=1)


def concat(*bs: np.ndarray) -> np.ndarray:
    return np.concatenate(bs, axis=0)


def identity(x: np.ndarray) -> np.ndarray:
    return x


def drop_leading_one(x: np.ndarray) -> np.ndarray:
    """modulation [1, k, C] -> [k, C]."""
    return x[0]


def patch_conv(w: np.ndarray) -> np.ndarray:
    """Conv3d weight [C_out, C_in, 1, ph, pw] -> Dense kernel [(ph pw C_in), C_out], C_in fastest."""
    return np.ascontiguousarray(w.transpose(2, 3, 4, 1, 0).reshape(-1, w.shape[0]))


@dataclasses.dataclass(frozen=True)
class KeyRule:
    ours: str  # '/'-joined path in our params
    torch: tuple[str, ...]  # source key(s); '{i}' = layer index
    transform: Callable[..., np.ndarray]

    @property
    def per_layer(self) -> bool:
        return "{i}" in self.torch[0]


def _linear_rules(ours: str, torch: str) -> list[KeyRule]:
    return [KeyRule(f"{ours}/kernel", (f"{torch}.weight",), linear),
            KeyRule(f"{ours}/bias", (f"{torch}.bias",), identity)]


def _fused_rules(ours: str, torches: tuple[str, ...]) -> list[KeyRule]:
    return [KeyRule(f"{ours}/kernel", tuple(f"{t}.weight" for t in torches), concat_linear),
            KeyRule(f"{ours}/bias", tuple(f"{t}.bias" for t in torches), concat)]


B = "blocks.{i}"
DIT_KEY_MAP: tuple[KeyRule, ...] = tuple(
    [KeyRule("stem/patch_embedding/kernel", ("patch_embedding.weight",), patch_conv),
     KeyRule("stem/patch_embedding/bias", ("patch_embedding.bias",), identity)]
    + _linear_rules("stem/text_embedding/fc1", "text_embedding.0")
    + _linear_rules("stem/text_embedding/fc2", "text_embedding.2")
    + _linear_rules("stem/time_embedding/fc1", "time_embedding.0")
    + _linear_rules("stem/time_embedding/fc2", "time_embedding.2")
    + _linear_rules("stem/time_projection", "time_projection.1")
    + [KeyRule("blocks/modulation", (f"{B}.modulation",), drop_leading_one)]
    + _fused_rules("blocks/self_attn/qkv", (f"{B}.self_attn.q", f"{B}.self_attn.k", f"{B}.self_attn.v"))
    + _linear_rules("blocks/self_attn/o", f"{B}.self_attn.o")
    + [KeyRule("blocks/self_attn/norm_q/scale", (f"{B}.self_attn.norm_q.weight",), identity),
       KeyRule("blocks/self_attn/norm_k/scale", (f"{B}.self_attn.norm_k.weight",), identity),
       KeyRule("blocks/norm3/scale", (f"{B}.norm3.weight",), identity),
       KeyRule("blocks/norm3/bias", (f"{B}.norm3.bias",), identity)]
    + _linear_rules("blocks/cross_attn/q", f"{B}.cross_attn.q")
    + _fused_rules("blocks/cross_attn/kv", (f"{B}.cross_attn.k", f"{B}.cross_attn.v"))
    + _linear_rules("blocks/cross_attn/o", f"{B}.cross_attn.o")
    + [KeyRule("blocks/cross_attn/norm_q/scale", (f"{B}.cross_attn.norm_q.weight",), identity),
       KeyRule("blocks/cross_attn/norm_k/scale", (f"{B}.cross_attn.norm_k.weight",), identity)]
    + _linear_rules("blocks/ffn/fc1", f"{B}.ffn.0")
    + _linear_rules("blocks/ffn/fc2", f"{B}.ffn.2")
    + [KeyRule("head/modulation", ("head.modulation",), drop_leading_one)]
    + _linear_rules("head/head", "head.head")
)


def torch_dit_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every key of a PyTorch (Causal)WanModel state dict for `config`, with its shape."""
    c, f = config.dim, config.ffn_dim
    pt, ph, pw = config.patch_size
    shapes: dict[str, tuple[int, ...]] = {
        "patch_embedding.weight": (c, config.in_dim, pt, ph, pw), "patch_embedding.bias": (c,),
        "text_embedding.0.weight": (c, config.text_dim), "text_embedding.0.bias": (c,),
        "text_embedding.2.weight": (c, c), "text_embedding.2.bias": (c,),
        "time_embedding.0.weight": (c, config.freq_dim), "time_embedding.0.bias": (c,),
        "time_embedding.2.weight": (c, c), "time_embedding.2.bias": (c,),
        "time_projection.1.weight": (6 * c, c), "time_projection.1.bias": (6 * c,),
        "head.modulation": (1, 2, c),
        "head.head.weight": (config.out_features, c), "head.head.bias": (config.out_features,),
    }
    for i in range(config.num_layers):
        p = f"blocks.{i}"
        shapes[f"{p}.modulation"] = (1, 6, c)
        for attn in ("self_attn", "cross_attn"):
            for name in "qkvo":
                shapes[f"{p}.{attn}.{name}.weight"] = (c, c)
                shapes[f"{p}.{attn}.{name}.bias"] = (c,)
            shapes[f"{p}.{attn}.norm_q.weight"] = (c,)
            shapes[f"{p}.{attn}.norm_k.weight"] = (c,)
        shapes[f"{p}.norm3.weight"] = (c,)
        shapes[f"{p}.norm3.bias"] = (c,)
        shapes[f"{p}.ffn.0.weight"] = (f, c)
        shapes[f"{p}.ffn.0.bias"] = (f,)
        shapes[f"{p}.ffn.2.weight"] = (c, f)
        shapes[f"{p}.ffn.2.bias"] = (c,)
    return shapes


def source_keys(rule: KeyRule, num_layers: int) -> list[str]:
    """All PyTorch keys one rule reads."""
    if not rule.per_layer:
        return list(rule.torch)
    return [t.format(i=i) for i in range(num_layers) for t in rule.torch]
