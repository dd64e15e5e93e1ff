"""The bench's target rows (issue 8's one-GPU targets) from a result of its setting: met / missed by
how much, and the floor a missed DiT target is held to by its own profile."""

import json
import pathlib

import pytest

from causal_dit_jax.bench import BenchResult
from causal_dit_jax.bench_targets import dit_floor, format_rows, target_report
from causal_dit_jax.config import get_preset

CONFIG = get_preset("wan2.1-t2v-1.3b")


def _result(**changes) -> BenchResult:
    base = dict(preset="wan2.1-t2v-1.3b", device="GPU", backend="gpu", num_devices=1, strategy="single",
                latent_shape=(1, 21, 60, 104, 16), video_frames=81, forwards=35, compile_s=1.0,
                chunk_ms=[100.0] * 7, first_chunk_ms=100.0, total_s=2.0, frames_per_second=40.5,
                forward_breakdown_ms={"matmul": 15.0, "attention": 50.0, "other": 10.0, "total": 75.0},
                vae={"decode_total_s": 0.7, "first_frame_s": 0.16, "e2e_fps": 30.0, "frames": 81,
                     "peak_memory_gb": 11.5})
    return BenchResult(**{**base, **changes})


def test_rows_say_met_or_missed_by_how_much():
    rows = {r["figure"]: r for r in target_report(_result(), CONFIG, 4680, 5)}
    dit = rows["DiT, 35 forwards"]
    assert not dit["met"] and dit["missed_by"] == pytest.approx(0.2) and "attention alone takes" in dit["bound"]
    assert rows["Wan VAE decode, 21 latents"]["met"] and rows["Wan VAE decode, 21 latents"]["bound"] is None
    assert rows["first frame (Wan VAE)"]["missed_by"] == pytest.approx(0.01)
    e2e = rows["end to end (Wan VAE)"]
    assert e2e["sense"] == ">=" and e2e["missed_by"] == pytest.approx(5.0) and "within 2.31 s" in e2e["bound"]
    assert rows["peak memory, DiT + Wan VAE"]["met"]
    text = dict(format_rows(list(rows.values())))
    assert text["target: DiT, 35 forwards"].startswith("2 s vs <= 1.8: missed by 0.2 s")


def test_dit_floor_from_the_profile_rates():
    """990 TF in the rollout: attention 580 TF (self 565 + cross 15) and GEMMs 410 TF; at the rates of
    one full-cache forward (its attention FLOPs / 50 ms, its GEMM FLOPs / 15 ms) the floor follows."""
    floor = dit_floor(_result(), CONFIG, 4680, 5)
    assert floor["matmul_tflops"] == pytest.approx(11.72e12 / 15e-3 / 1e12, rel=1e-2)
    assert floor["attention_s"] + floor["matmul_s"] == pytest.approx(
        580 / floor["attention_tflops"] + 410 / floor["matmul_tflops"], rel=1e-2)
    assert dit_floor(_result(forward_breakdown_ms=None), CONFIG, 4680, 5) is None


def test_only_the_issue_setting_gets_targets():
    assert target_report(_result(preset="demo"), CONFIG, 4680, 5) is None
    assert target_report(_result(num_devices=2), CONFIG, 4680, 5) is None
    assert target_report(_result(latent_shape=(1, 9, 60, 104, 16)), CONFIG, 4680, 5) is None


def test_float8_rows_say_they_are_outside_the_setting():
    rows = target_report(_result(linear_precision="float8"), CONFIG, 4680, 5)
    assert rows and all(r["figure"].endswith("[float8 GEMMs, not the bf16 setting]") for r in rows)


def test_committed_h200_result_meets_the_memory_and_first_frame_targets():
    """The committed v12 run (H200): its rows, recomputed from its own fields."""
    path = pathlib.Path(__file__).parents[1] / "benchmarks" / "2026-11-30_h200_e2e_v12_warm_cache.json"
    fields = json.loads(path.read_text())
    fields.pop("targets", None)
    rows = {r["figure"]: r for r in target_report(BenchResult(**fields), CONFIG, 4680, 5)}
    assert rows["peak memory, DiT + Wan VAE"]["met"] and rows["first frame (Wan VAE)"]["met"]
    assert not rows["DiT, 35 forwards"]["met"]


def test_write_probe_json_names_the_device(tmp_path):
    """What the GPU probes write: their fields after the device they ran on."""
    import jax

    from causal_dit_jax.bench import write_probe_json

    path = tmp_path / "probe.json"
    write_probe_json(str(path), variants={"a": {"ms": 1.5}})
    assert json.loads(path.read_text()) == {"device": jax.devices()[0].device_kind, "variants": {"a": {"ms": 1.5}}}
