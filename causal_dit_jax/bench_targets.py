"""Issue 8's speed targets for one GPU, checked against a `BenchResult`, with what bounds each miss.

The targets hold for one setting only: the real Wan2.1-T2V-1.3B shapes at 480x832, 21 latent frames
(81 video frames, 7 chunks x 5 forwards), batch 1, one device, bf16 weights. A float8 run
(`--linear-precision float8`) gets the same rows with its figures marked as outside that setting.
Nothing here is asserted anywhere: `causal-dit bench` prints the rows and writes them to its JSON.
"""

from __future__ import annotations

from typing import Optional

from causal_dit_jax.config import ModelConfig
from causal_dit_jax.flops import chunk_forward_flops_parts, rollout_flops_parts

SETTING = {"preset": "wan2.1-t2v-1.3b", "latent_shape": (1, 21, 60, 104, 16), "num_devices": 1}


def _row(figure: str, value: float, unit: str, target: float, at_most: bool, bound: Optional[str] = None) -> dict:
    met = value <= target if at_most else value >= target
    return {"figure": figure, "value": value, "unit": unit, "target": target,
            "sense": "<=" if at_most else ">=", "met": met, "missed_by": None if met else abs(value - target),
            "bound": None if met else bound}


def dit_floor(result, config: ModelConfig, chunk_tokens: int, forwards_per_chunk: int) -> Optional[dict]:
    """Attention and GEMM time of the whole rollout at the rates the profile measured in one forward at
    the full cache (the rates there are the highest; shorter caches run attention slower): a floor
    under the DiT time before any other kernel runs. None without a profile."""
    b = result.forward_breakdown_ms
    if not b or not b.get("attention") or not b.get("matmul"):
        return None
    n_chunks = len(result.chunk_ms)
    one = chunk_forward_flops_parts(config, chunk_tokens, n_chunks * chunk_tokens)
    attention_rate = (one["self_attention"] + one["cross_attention"]) / (b["attention"] / 1e3)
    matmul_rate = one["linear"] / (b["matmul"] / 1e3)
    every = rollout_flops_parts(config, chunk_tokens, n_chunks, forwards_per_chunk)
    attention_s = (every["self_attention"] + every["cross_attention"]) / attention_rate
    matmul_s = every["linear"] / matmul_rate
    return {"attention_tflops": attention_rate / 1e12, "matmul_tflops": matmul_rate / 1e12,
            "attention_s": attention_s, "matmul_s": matmul_s, "other_ms_per_forward": b["other"]}


def target_report(result, config: ModelConfig, chunk_tokens: int, forwards_per_chunk: int) -> Optional[list[dict]]:
    """Rows {figure, value, unit, target, sense, met, missed_by, bound} for the issue's setting, else None."""
    if (result.preset, tuple(result.latent_shape), result.num_devices) != tuple(SETTING.values()):
        return None
    floor = dit_floor(result, config, chunk_tokens, forwards_per_chunk)
    dit_bound = None if floor is None else (
        f"at the profiled kernel rates (attention {floor['attention_tflops']:.0f} TFLOP/s, GEMMs "
        f"{floor['matmul_tflops']:.0f} TFLOP/s at the full cache) attention alone takes "
        f"{floor['attention_s']:.2f} s and GEMMs {floor['matmul_s']:.2f} s: "
        f"{floor['attention_s'] + floor['matmul_s']:.2f} s before the other kernels "
        f"({floor['other_ms_per_forward']:.1f} ms per forward)")
    rows = [_row("DiT, 35 forwards", result.total_s, "s", 1.8, True, dit_bound)]
    for label, v, fps_target in (("Wan VAE", result.vae, 35.0), ("tiny decoder", result.tiny_vae, 45.0)):
        if not v:
            continue
        if label == "Wan VAE":
            rows.append(_row("Wan VAE decode, 21 latents", v["decode_total_s"], "s", 0.8, True))
        rows.append(_row(f"first frame ({label})", v["first_frame_s"], "s", 0.15, True,
                         f"the first chunk's 4 forwards take {result.first_chunk_ms / 1e3:.3f} s"))
        rows.append(_row(f"end to end ({label})", v["e2e_fps"], "frames/s", fps_target, False,
                         f"the DiT and the decoder take turns on one GPU: {fps_target:g} frames/s needs both "
                         f"within {v['frames'] / fps_target:.2f} s; the DiT takes {result.total_s:.2f} s (35 "
                         f"forwards; the stream skips the last cache fill), the decoder {v['decode_total_s']:.2f} s"))
        if v.get("peak_memory_gb") is not None:
            rows.append(_row(f"peak memory, DiT + {label}", v["peak_memory_gb"], "GB", 12.0, True,
                             "the bf16 KV cache (6.0 GB), the weights (2.8 GB) and the decoder's caches"))
    if result.linear_precision != "bfloat16":  # not the setting: say so on every row
        for r in rows:
            r["figure"] = f"{r['figure']} [{result.linear_precision} GEMMs, not the bf16 setting]"
    return rows


def format_rows(rows: list[dict]) -> list[tuple[str, str]]:
    """Table rows: ('target: <figure>', '<value> <unit> vs <sense> <target>: met | missed by ... (bound)')."""
    out = []
    for r in rows:
        verdict = "met" if r["met"] else f"missed by {r['missed_by']:.3g} {r['unit']}"
        text = f"{r['value']:.4g} {r['unit']} vs {r['sense']} {r['target']:g}: {verdict}"
        if r["bound"]:
            text += f" ({r['bound']})"
        out.append((f"target: {r['figure']}", text))
    return out


__all__ = ["SETTING", "dit_floor", "format_rows", "target_report"]
