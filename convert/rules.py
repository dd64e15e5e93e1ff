"""The conversion engine shared by every model: one `Rule` type, one checker, one applier.

A model's key table (`dit_convert`, `t5_convert`, `vae_convert`, `taehv_convert`) is a tuple of
`Rule`s, one per leaf of our params tree, in the style of MaxText's conversion tables:

    our path                  <- PyTorch key(s)                     PyTorch shape(s)   transform
    "blocks/ffn/fc1/kernel"   <- "blocks.{i}.ffn.0.weight"          (ffn, dim)         linear
    "blocks/self_attn/qkv/kernel" <- "blocks.{i}.self_attn.{q,k,v}.weight"  3 x (dim, dim)  fused_linear

`{i}` marks a per-layer key: the rule reads it for every layer and stacks the results on a new
leading axis (our scanned blocks). From the table alone this module
  - checks a state dict and names every missing, unexpected and mis-shaped key in one CheckpointError;
  - builds our params tree: leaf = transform(*sources) (stacked over layers), cast to the weight dtype;
  - guards the table itself: the tree must have the shapes of the model's `abstract_params()`.
Transforms only move elements (transposes, reshapes, concatenations), so they run in the source dtype
(a bf16 file stays bf16 until the final cast) and a conversion is exact up to that cast.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Any, TypeVar

import jax
import numpy as np

from causal_dit_jax.convert.torch_files import CheckpointError, to_numpy
from causal_dit_jax.model.config import dtype_from_name

Shape = tuple[int, ...]
Transform = Callable[..., np.ndarray]
LAYER = "{i}"  # the layer-index placeholder in a per-layer PyTorch key

DTYPES = ("bfloat16", "float32")  # the weight dtypes a conversion can store


# ---------------------------------------------------------------------------------------------------
# transforms: PyTorch layout -> ours, for one layer's tensor(s)


def identity(x: np.ndarray) -> np.ndarray:
    return x


def linear(w: np.ndarray) -> np.ndarray:
    """torch Linear weight [out, in] -> kernel [in, out]."""
    return np.ascontiguousarray(w.T)


def fused_linear(*ws: np.ndarray) -> np.ndarray:
    """Several torch Linear weights [out_k, in] fused along the output axis: kernel [in, sum(out_k)]."""
    return np.concatenate([w.T for w in ws], axis=1)


def concat(*bs: np.ndarray) -> np.ndarray:
    """Biases [out_k] of fused Linears -> [sum(out_k)]."""
    return np.concatenate(bs, axis=0)


def conv_kernel(w: np.ndarray) -> np.ndarray:
    """torch ConvNd weight [O, I, *k] -> [*k, I, O]: Conv2d [O, I, h, w] -> [h, w, I, O],
    Conv3d [O, I, t, h, w] -> [t, h, w, I, O]."""
    return np.ascontiguousarray(w.transpose(*range(2, w.ndim), 1, 0))


# ---------------------------------------------------------------------------------------------------
# the rule


@dataclasses.dataclass(frozen=True)
class Rule:
    """One leaf of our params tree: `ours` <- transform(*torch keys), each key of the given shape.

    ours: '/'-joined path in our params ('blocks/self_attn/qkv/kernel').
    torch: the PyTorch key(s), passed to `transform` in this order; '{i}' marks a per-layer key (then
      every key of the rule is per-layer, and the rule's value is stacked over layers).
    shapes: each key's PyTorch shape (one layer's), checked before anything is converted.
    transform: the one-layer arrays -> our one-layer array.
    """

    ours: str
    torch: tuple[str, ...]
    shapes: tuple[Shape, ...]
    transform: Transform = identity

    def __post_init__(self):
        if len(self.torch) != len(self.shapes) or not self.torch:
            raise ValueError(f"rule {self.ours}: {len(self.torch)} keys but {len(self.shapes)} shapes")
        if len({LAYER in k for k in self.torch}) != 1:
            raise ValueError(f"rule {self.ours}: mixes per-layer and global keys {self.torch}")

    @property
    def per_layer(self) -> bool:
        return LAYER in self.torch[0]

    def keys(self, num_layers: int) -> list[str]:
        """Every PyTorch key this rule reads (layer by layer for a per-layer rule)."""
        if not self.per_layer:
            return list(self.torch)
        return [k.format(i=i) for i in range(num_layers) for k in self.torch]


# table-building shorthands: the layer vocabulary every key table is written in


def tensor(ours: str, torch: str, shape: Shape, transform: Transform = identity) -> Rule:
    """One PyTorch tensor -> one leaf."""
    return Rule(ours, (torch,), (tuple(shape),), transform)


def dense(ours: str, torch: str, c_in: int, c_out: int, bias: bool = True) -> list[Rule]:
    """nn.Linear `torch` (weight [c_out, c_in]) -> `ours/kernel` [c_in, c_out] (+ `ours/bias`)."""
    rules = [tensor(f"{ours}/kernel", f"{torch}.weight", (c_out, c_in), linear)]
    if bias:
        rules.append(tensor(f"{ours}/bias", f"{torch}.bias", (c_out,)))
    return rules


def fused_dense(ours: str, torches: Sequence[str], c_in: int, c_out: int) -> list[Rule]:
    """Several nn.Linear [c_out, c_in] -> one kernel [c_in, n * c_out] and bias [n * c_out] (e.g. q, k, v)."""
    n = len(torches)
    return [
        Rule(f"{ours}/kernel", tuple(f"{t}.weight" for t in torches), ((c_out, c_in),) * n, fused_linear),
        Rule(f"{ours}/bias", tuple(f"{t}.bias" for t in torches), ((c_out,),) * n, concat),
    ]


def conv(ours: str, torch: str, c_in: int, c_out: int, kernel: Shape, bias: bool = True) -> list[Rule]:
    """nn.Conv2d / Conv3d `torch` (weight [c_out, c_in, *kernel]) -> `ours/kernel` [*kernel, c_in, c_out]
    (+ `ours/bias`)."""
    rules = [tensor(f"{ours}/kernel", f"{torch}.weight", (c_out, c_in, *kernel), conv_kernel)]
    if bias:
        rules.append(tensor(f"{ours}/bias", f"{torch}.bias", (c_out,)))
    return rules


# ---------------------------------------------------------------------------------------------------
# checking


def torch_shapes(rules: Sequence[Rule], num_layers: int = 0) -> dict[str, Shape]:
    """Every PyTorch key the table reads, with its shape; a key read by two rules is a table bug."""
    shapes: dict[str, Shape] = {}
    for rule in rules:
        for i in range(num_layers) if rule.per_layer else [None]:
            for key, shape in zip(rule.torch, rule.shapes):
                key = key.format(i=i) if i is not None else key
                if key in shapes:
                    raise AssertionError(f"key table bug: {key} is read twice")
                shapes[key] = shape
    return shapes


def check_state_dict(
    state: Mapping[str, Any], rules: Sequence[Rule], what: str, num_layers: int = 0, ignore_prefixes: tuple[str, ...] = ()
) -> None:
    """Raise one CheckpointError naming every missing, unexpected and mis-shaped key.

    state: the checkpoint's tensors (torch or numpy: anything with `.shape`); keys starting with one of
    `ignore_prefixes` (a half of the file the model does not use) are skipped. what: the config in words,
    for the message ("the DiT config (dim=1536, ...)").
    """
    expected = torch_shapes(rules, num_layers)
    state = {k: v for k, v in state.items() if not k.startswith(ignore_prefixes)}
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    shapes = {k: tuple(getattr(state[k], "shape", ("not a tensor",))) for k in set(expected) & set(state)}
    wrong = sorted(f"{k}: {shapes[k]} (expected {expected[k]})" for k in shapes if shapes[k] != expected[k])
    if missing or unexpected or wrong:
        lines = [f"the checkpoint does not match {what}:"]
        for title, items in (("missing keys", missing), ("unexpected keys", unexpected), ("wrong shapes", wrong)):
            if items:
                more = " ..." if len(items) > 20 else ""
                lines.append(f"  {title} ({len(items)}): " + ", ".join(items[:20]) + more)
        raise CheckpointError("\n".join(lines))


# ---------------------------------------------------------------------------------------------------
# applying


def apply_rules(
    state: Mapping[str, Any],
    rules: Sequence[Rule],
    model: Any,
    what: str,
    *,
    num_layers: int = 0,
    ignore_prefixes: tuple[str, ...] = (),
    consume: bool = False,
    as_numpy: bool = False,
) -> dict:
    """Check `state` against the table, then build `model`'s params tree from it.

    model: the model the params are for (`CausalWanDiT`, `UMT5Encoder`, `WanVAE`, ...): each leaf is
    stored as its `config.param_dtype`, and the tree built must have the shapes of its `abstract_params()`
    (a guard on the table). what: the model and config, for error messages. consume: pop each source
    tensor from `state` (a dict the caller hands over) as it is
    used, so a large file is released tensor by tensor instead of living beside the converted tree.
    as_numpy: leaves as numpy arrays instead of jax arrays.
    """
    check_state_dict(state, rules, what, num_layers, ignore_prefixes)
    abstract_params = model.abstract_params()
    np_dtype = np.dtype(dtype_from_name(model.config.param_dtype))
    take = state.pop if consume else state.__getitem__
    params: dict = {}
    for rule in rules:

        def one_layer(i: int | None = None, rule: Rule = rule) -> np.ndarray:
            return rule.transform(*(to_numpy(take(k if i is None else k.format(i=i))) for k in rule.torch))

        if rule.per_layer:
            value = np.stack([one_layer(i) for i in range(num_layers)])  # [num_layers, *one layer's shape]
        else:
            value = one_layer()
        value = value.astype(np_dtype, copy=False)
        set_path(params, rule.ours, value if as_numpy else jax.numpy.asarray(value))
    want = jax.tree.map(lambda a: tuple(a.shape), abstract_params)
    got = jax.tree.map(lambda a: tuple(a.shape), params)
    if got != want:
        raise AssertionError(f"the key table for {what} produced a different tree: {got} vs {want}")
    return params


def set_path(tree: dict, path: str, value) -> None:
    """tree['a']['b']['c'] = value for path 'a/b/c', creating the dicts on the way."""
    *parents, leaf = path.split("/")
    for p in parents:
        tree = tree.setdefault(p, {})
    tree[leaf] = value


# ---------------------------------------------------------------------------------------------------
# the weight dtype of a conversion

C = TypeVar("C")


def check_dtype(dtype: str | None) -> None:
    """A clear error for a weight dtype other than None / 'bfloat16' / 'float32' (before any work)."""
    if dtype is not None and dtype not in DTYPES:
        raise ValueError(f"unknown weight dtype {dtype!r}; choose one of {', '.join(DTYPES)}")


def with_dtype(config: C, dtype: str | None) -> C:
    """`config` with weights stored and matmuls run in `dtype` (param_dtype = dtype = `dtype`); None
    keeps the config's own. Any residual_dtype is left as it is (float32 by default: Wan's precision)."""
    check_dtype(dtype)
    return config if dtype is None else config.replace(param_dtype=dtype, dtype=dtype)
