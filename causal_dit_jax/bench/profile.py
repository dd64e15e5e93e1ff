"""Where a jitted call's device time goes: matmul / attention / other, read from a JAX profiler trace."""

from __future__ import annotations

import glob
import os
import tempfile
from collections.abc import Callable

import jax

MATMUL_MARKERS = ("gemm", "cublas", "nvjet", "xmma", "cutlass", "matmul", "dot")
ATTENTION_MARKERS = ("cudnn", "fmha", "flash", "attention", "sdpa")
COLLECTIVE_MARKERS = ("nccl",)  # XLA runs every GPU collective through NCCL kernels


def classify(kernel_name: str) -> str:
    name = kernel_name.lower()
    if any(m in name for m in COLLECTIVE_MARKERS):
        return "collective"
    if any(m in name for m in ATTENTION_MARKERS):
        return "attention"
    if any(m in name for m in MATMUL_MARKERS):
        return "matmul"
    return "other"


def _trace(fn: Callable[[], object], repeats: int):
    """The profiler's `ProfileData` of `repeats` calls of fn."""
    from jax.profiler import ProfileData

    with tempfile.TemporaryDirectory() as d:
        with jax.profiler.trace(d):
            for _ in range(repeats):
                jax.block_until_ready(fn())
        files = glob.glob(os.path.join(d, "**", "*.xplane.pb"), recursive=True)
        if not files:
            raise RuntimeError("the profiler wrote no trace")
        return ProfileData.from_file(files[0])


def busy_and_idle(intervals: list[tuple[int, int]]) -> dict[str, float]:
    """One device's kernel intervals [(start_ns, end_ns)] (any streams, overlapping or not) ->
    {'busy_ms': the union of the intervals, 'span_ms': first start to last end, 'idle_ms': span - busy,
    'gaps': the number of gaps between busy stretches, 'longest_gap_ms'}."""
    if not intervals:
        raise ValueError("no kernel intervals: nothing ran on the device")
    merged: list[list[int]] = []
    for start, end in sorted(intervals):
        if end < start:
            raise ValueError(f"a kernel interval ends before it starts: ({start}, {end})")
        if merged and start <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], end)
        else:
            merged.append([start, end])
    busy = sum(e - s for s, e in merged)
    span = merged[-1][1] - merged[0][0]
    gaps = [b[0] - a[1] for a, b in zip(merged, merged[1:])]
    return {
        "busy_ms": busy / 1e6,
        "span_ms": span / 1e6,
        "idle_ms": (span - busy) / 1e6,
        "gaps": len(gaps),
        "longest_gap_ms": max(gaps, default=0) / 1e6,
    }


def device_idle(fn: Callable[[], object]) -> dict[str, float]:
    """Run `fn` (compiled and warmed up) once under the profiler: `busy_and_idle` of each GPU's kernels
    (all its streams), averaged over the GPUs, with 'gpus'. The idle time is what the device waits
    between its first and last kernel: launch gaps and host round trips."""
    data = _trace(fn, 1)
    per_gpu: dict[str, list[tuple[int, int]]] = {}
    for plane in data.planes:
        if not plane.name.startswith("/device:GPU"):
            continue
        for line in plane.lines:
            if line.name.lower().startswith("stream"):
                per_gpu.setdefault(plane.name, []).extend((ev.start_ns, ev.end_ns) for ev in line.events)
    per_gpu = {k: v for k, v in per_gpu.items() if v}
    if not per_gpu:
        raise RuntimeError("no GPU kernel events in the trace (device_idle reads GPU traces only)")
    reports = [busy_and_idle(v) for v in per_gpu.values()]
    out = {k: sum(r[k] for r in reports) / len(reports) for k in reports[0]}
    out["gpus"] = len(reports)
    return out


def profile_breakdown(fn: Callable[[], object], repeats: int = 3, top: int = 20) -> dict[str, float]:
    """Run `fn` (already compiled and warmed up) `repeats` times under the profiler and return the
    device kernel time per call in ms: {'matmul', 'attention', 'collective', 'other', 'total', 'kernels',
    'gpus', 'top_kernels'} (the `top` longest kernels by name). On several GPUs the figures are per
    device (the kernels of all GPUs averaged)."""
    data = _trace(fn, repeats)
    sums = {"matmul": 0.0, "attention": 0.0, "collective": 0.0, "other": 0.0}
    per_kernel: dict[str, float] = {}
    kernels = 0
    gpus = set()
    for plane in data.planes:
        if not plane.name.startswith("/device:GPU"):
            continue
        for line in plane.lines:
            if not line.name.lower().startswith("stream"):
                continue
            for ev in line.events:
                sums[classify(ev.name)] += ev.duration_ns / 1e6
                per_kernel[ev.name] = per_kernel.get(ev.name, 0.0) + ev.duration_ns / 1e6
                kernels += 1
                gpus.add(plane.name)
    if kernels == 0:
        seen = [(p.name, [ln.name for ln in p.lines][:8]) for p in data.planes]
        raise RuntimeError(f"no GPU kernel events in the trace; planes/lines seen: {seen}")
    per_call = repeats * len(gpus)
    out = {k: v / per_call for k, v in sums.items()}
    out["total"] = sum(out.values())  # kernel time; collectives may overlap compute on their own stream
    out["kernels"] = kernels / per_call
    out["gpus"] = len(gpus)
    longest = sorted(per_kernel.items(), key=lambda kv: -kv[1])[:top]
    out["top_kernels"] = {name[:120]: round(ms / per_call, 3) for name, ms in longest}
    return out
