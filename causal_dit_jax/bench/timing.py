"""Timing on the device: one call's wall time, the median of repeats, compilations, peak memory, the
matmul peak (the MFU denominator)."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp


def timed_ms(fn: Callable, *args) -> tuple[Any, float]:
    """fn(*args) and its wall time in ms until its results are ready (one call, no warm-up)."""
    t0 = time.perf_counter()
    out = jax.block_until_ready(fn(*args))
    return out, 1e3 * (time.perf_counter() - t0)


def median_ms(fn: Callable, *args, repeats: int = 20, warmup: int = 1) -> float:
    """Median wall time in ms of fn(*args) until its results are ready, after `warmup` calls.

    A call that donates its inputs is timed as a closure (no args) that keeps the returned state for
    the next call and returns the outputs to wait for.
    """
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    for _ in range(warmup):
        jax.block_until_ready(fn(*args))
    times = sorted(timed_ms(fn, *args)[1] for _ in range(repeats))
    return times[len(times) // 2]


def matmul_peak_tflops(n: int = 8192, products: int = 20, repeats: int = 10, dtype=jnp.bfloat16) -> float:
    """The measured n^3 matmul rate in TFLOP/s (random data, `dtype`), the MFU denominator.

    `products` dependent products x <- x @ w run inside one jitted call (unrolled: no loop on the
    device), so the call's launch and host sync are shared by all of them; each product needs the
    last one's result, so XLA can drop or merge none. The median call time over `repeats` calls,
    divided by `products`. w is scaled by n^-1/2, so x keeps its magnitude along the chain.
    """
    if products < 1:
        raise ValueError(f"products must be >= 1, got {products}")
    x = jax.random.normal(jax.random.key(0), (n, n), dtype)
    w = (jax.random.normal(jax.random.key(1), (n, n), jnp.float32) * n**-0.5).astype(dtype)

    @jax.jit
    def chain(x, w):
        return jax.lax.fori_loop(0, products, lambda _, x: jnp.dot(x, w, preferred_element_type=dtype), x, unroll=True)

    ms = median_ms(chain, x, w, repeats=repeats)
    return 2 * n**3 * products / ms / 1e9


class CompileCounter:
    """Counts XLA backend compilations (jax.monitoring events) while active."""

    EVENT = "/jax/core/compile/backend_compile_duration"

    def __init__(self):
        self.count = 0
        self.active = False
        jax.monitoring.register_event_duration_secs_listener(self._listen)

    def _listen(self, name, *_args, **_kw):
        if self.active and name == self.EVENT:
            self.count += 1


def peak_memory_gb() -> float | None:
    """The first device's peak bytes in use so far, in GB (None where the backend does not say).

    The counter only grows and includes compile-time scratch (autotuning)."""
    stats = jax.devices()[0].memory_stats() or {}
    peak = stats.get("peak_bytes_in_use")
    return None if peak is None else peak / 1e9


__all__ = ["CompileCounter", "matmul_peak_tflops", "median_ms", "peak_memory_gb", "timed_ms"]
