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


def profile_breakdown(fn: Callable[[], object], repeats: int = 3, top: int = 20) -> dict[str, float]:
    """Run `fn` (already compiled and warmed up) `repeats` times under the profiler and return the
    device kernel time per call in ms: {'matmul', 'attention', 'collective', 'other', 'total', 'kernels',
    'gpus', 'top_kernels'} (the `top` longest kernels by name). On several GPUs the figures are per
    device (the kernels of all GPUs averaged)."""
    from jax.profiler import ProfileData

    with tempfile.TemporaryDirectory() as d:
        with jax.profiler.trace(d):
            for _ in range(repeats):
                jax.block_until_ready(fn())
        files = glob.glob(os.path.join(d, "**", "*.xplane.pb"), recursive=True)
        if not files:
            raise RuntimeError("the profiler wrote no trace")
        data = ProfileData.from_file(files[0])
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
