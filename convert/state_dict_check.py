"""Shared pieces of every converter: one report of all key problems, and filling a params tree."""

from __future__ import annotations

from typing import Any, Mapping

from convert.torch_files import CheckpointError


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


def set_path(tree: dict, path: str, value) -> None:
    """tree['a']['b']['c'] = value for path 'a/b/c', creating the dicts on the way."""
    *parents, leaf = path.split("/")
    for p in parents:
        tree = tree.setdefault(p, {})
    tree[leaf] = value
