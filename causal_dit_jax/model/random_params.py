"""Deterministic random weights for the embedded demo, drawn on the host with numpy.

Drawing them with jax.random under jit costs tens of seconds of CPU compilation for the VAE alone;
numpy fills the same trees in well under a second. Rules by leaf name: norm scales 1, biases 0,
kernels and embeddings N(0, 1/fan_in) (fan_in = all but the output axis, not counting a stacked layer
axis), modulation tables N(0, 1/C).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np


def _leaf(path, spec, rng: np.random.Generator) -> jax.Array:
    names = [str(getattr(p, "key", p)) for p in path]
    name = names[-1]
    shape = tuple(spec.shape)
    stacked = "blocks" in names
    if name == "scale":
        value = np.ones(shape, np.float32)
    elif name == "bias":
        value = np.zeros(shape, np.float32)
    else:
        core = shape[1:] if stacked else shape
        fan_in = math.prod(core[:-1]) if name in ("kernel",) else core[-1]
        value = rng.standard_normal(shape, dtype=np.float32) / np.sqrt(max(fan_in, 1))
    return jnp.asarray(value, spec.dtype)


def random_params(abstract_params, seed: int = 0):
    """A params tree shaped like `abstract_params` (ShapeDtypeStructs) with seeded random values."""
    rng = np.random.default_rng(seed)
    return jax.tree_util.tree_map_with_path(lambda p, s: _leaf(p, s, rng), abstract_params)
