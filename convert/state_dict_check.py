"""Shared pieces of every converter: one report of all key problems, and filling a params tree."""

from __future__ import annotations

from typing import Any, Mapping

import jax
import numpy as np

from causal_dit_jax.convert.torch_files import CheckpointError, _torch_to_numpy


def check_keys_and_shapes(state: Mapping[str, Any], expected: Mapping[str, tuple[int, ...]], what: str) -> None:
    """Raise one CheckpointError naming every missing, unexpected and mis-shaped key.

    state: the checkpoint's tensors (anything with `.shape`); expected: key -> shape; what: the config
    in words, for the message ("the DiT config (dim=1536, ...)").
    """
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    shapes = {k: tuple(getattr(state[k], "shape", ("not a tensor",))) for k in set(expected) & set(state)}
    wrong = sorted(f"{k}: {shapes[k]} (expected {tuple(expected[k])})"
                   for k in shapes if shapes[k] != tuple(expected[k]))
    if missing or unexpected or wrong:
        lines = [f"the checkpoint does not match {what}:"]
        for title, items in (("missing keys", missing), ("unexpected keys", unexpected), ("wrong shapes", wrong)):
            if items:
                lines.append(f"  {title} ({len(items)}): " + ", ".join(items[:20]) + (" ..." if len(items) > 20 else ""))
        raise CheckpointError("\n".join(lines))


def params_from_rules(state: Mapping[str, Any], rules, dtype, abstract_params, what: str) -> dict:
    """Our params tree from one-key rules (`.ours` path <- `.torch` key through `.transform`), each
    tensor (torch or numpy) converted in float32 and stored as `dtype`; the tree must have the shapes of
    `abstract_params` (a bug guard on the key table)."""
    params: dict = {}
    for rule in rules:
        value = state[rule.torch]
        value = _torch_to_numpy(value) if hasattr(value, "detach") else np.asarray(value)
        set_path(params, rule.ours, jax.numpy.asarray(rule.transform(value.astype(np.float32)).astype(dtype)))
    want = jax.tree.map(lambda a: tuple(a.shape), abstract_params)
    got = jax.tree.map(lambda a: tuple(a.shape), params)
    if got != want:
        raise AssertionError(f"{what} key table produced a different tree: {got} vs {want}")
    return params


def set_path(tree: dict, path: str, value) -> None:
    """tree['a']['b']['c'] = value for path 'a/b/c', creating the dicts on the way."""
    *parents, leaf = path.split("/")
    for p in parents:
        tree = tree.setdefault(p, {})
    tree[leaf] = value
