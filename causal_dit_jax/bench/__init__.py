"""Measuring the library, one job per module:

- `timing`: one call's wall time (`timed_ms`), the median of repeats (`median_ms`), backend
  compilations (`CompileCounter`), the device's peak memory (`peak_memory_gb`), the matmul peak
  (`matmul_peak_tflops`, the MFU denominator);
- `results`: the one JSON writer of the bench and the probes (`write_json`: {"device", "date", ...});
- `rollout`: the DiT rollout and the product's loop timed (`run_dit_bench`, `run_e2e`, `BenchResult`);
- `compare`: our figures against a peer's measured ones (`load_peer`, `compare`; `causal-dit bench --compare`);
- `flops`: analytic FLOPs of the chunk forwards; `profile`: device kernel time by kind from a trace.
"""

from causal_dit_jax.bench.compare import FIGURES, Peer, compare, comparison_table, load_peer, measured_figures
from causal_dit_jax.bench.flops import chunk_forward_flops, rollout_flops
from causal_dit_jax.bench.profile import profile_breakdown
from causal_dit_jax.bench.results import device_kind, utc_date, write_json
from causal_dit_jax.bench.rollout import BenchResult, run_dit_bench, run_e2e
from causal_dit_jax.bench.timing import CompileCounter, matmul_peak_tflops, median_ms, peak_memory_gb, timed_ms

__all__ = [
    "FIGURES",
    "BenchResult",
    "CompileCounter",
    "Peer",
    "chunk_forward_flops",
    "compare",
    "comparison_table",
    "device_kind",
    "load_peer",
    "matmul_peak_tflops",
    "measured_figures",
    "median_ms",
    "peak_memory_gb",
    "profile_breakdown",
    "rollout_flops",
    "run_dit_bench",
    "run_e2e",
    "timed_ms",
    "utc_date",
    "write_json",
]
