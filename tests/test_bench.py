"""The bench package: the JSON writer, the comparison with a peer's figures, the matmul peak, and the
probes of `benchmarks/` (each at least imports and parses its arguments: they run on GPUs)."""

import datetime
import json
import pathlib
import subprocess
import sys

import pytest

from causal_dit_jax import bench
from causal_dit_jax.bench.compare import FIGURES, peer_from_dict

ROOT = pathlib.Path(__file__).resolve().parents[1]
PROBES = sorted((ROOT / "benchmarks").glob("*.py"))
PEERS = sorted((ROOT / "benchmarks" / "peers").glob("*.json"))


def test_write_json_device_date_and_fields(tmp_path):
    path = tmp_path / "probe.json"
    record = bench.write_json(path, rows=[{"kernel": "k", "ms": 1.5}], note="x")
    written = json.loads(path.read_text())
    assert written == record
    assert list(written)[:2] == ["device", "date"]  # the device and date first, then the fields
    assert written["device"] == bench.device_kind() == "cpu"
    assert datetime.datetime.fromisoformat(written["date"]).tzinfo is not None
    assert written["rows"] == [{"kernel": "k", "ms": 1.5}] and written["note"] == "x"
    # a parent process that holds no device names the one its children measured on
    assert bench.write_json(path, device="NVIDIA H200", gpus=2)["device"] == "NVIDIA H200"
    assert json.loads(path.read_text())["gpus"] == 2
    with pytest.raises(ValueError, match="date"):
        bench.write_json(path, date="yesterday")


def _peer(figures, **extra):
    return peer_from_dict({"name": "made-up peer", "figures": figures, **extra})


def test_compare_ratio_oriented_ours_faster_above_one():
    peer = _peer({"dit_s": 3.0, "first_chunk_ms": 100, "e2e_fps_wan": 20.0, "e2e_fps_tiny": 60.0, "first_frame_s": 0.5})
    ours = {"dit_s": 2.0, "first_chunk_ms": 200.0, "e2e_fps_wan": 30.0, "e2e_fps_tiny": 40.0}
    c = bench.compare(ours, peer)
    rows = c["figures"]
    assert c["name"] == "made-up peer"
    assert rows["dit_s"] == {"ours": 2.0, "theirs": 3.0, "speedup": pytest.approx(1.5)}  # a time: theirs / ours
    assert rows["first_chunk_ms"]["speedup"] == pytest.approx(0.5)  # slower than them: below 1
    assert rows["e2e_fps_wan"]["speedup"] == pytest.approx(1.5)  # a rate: ours / theirs
    assert rows["e2e_fps_tiny"]["speedup"] == pytest.approx(2 / 3)
    assert rows["first_frame_s"] == {"ours": None, "theirs": 0.5, "speedup": None}  # not measured in this run
    table = bench.comparison_table(c)
    assert "compared with made-up peer" in table and "1.50x" in table and "0.50x" in table
    assert "not measured" in table


def test_measured_figures_read_from_a_bench_result():
    result = bench.BenchResult(
        preset="tiny",
        device="cpu",
        backend="cpu",
        num_devices=1,
        strategy="single",
        latent_shape=(1, 6, 8, 8, 16),
        video_frames=21,
        forwards=10,
        compile_s=1.0,
        chunk_ms=[10.0, 20.0],
        first_chunk_ms=10.0,
        total_s=0.03,
        frames_per_second=700.0,
        tiny_vae={"decode_total_s": 0.01, "first_frame_s": 0.02, "e2e_fps": 300.0},
    )
    assert bench.measured_figures(result) == {
        "dit_s": 0.03,
        "dit_fps": 700.0,
        "first_chunk_ms": 10.0,
        "tiny_decode_s": 0.01,
        "first_frame_tiny_s": 0.02,
        "e2e_fps_tiny": 300.0,
    }  # no Wan VAE run: its figures are absent
    assert "latents" not in result.as_dict() and result.as_dict()["total_s"] == 0.03


def test_peer_file_refuses_unknown_names():
    with pytest.raises(ValueError, match="valid figure names") as e:
        _peer({"dit_s": 2.0, "dit_seconds": 2.0})
    assert "dit_seconds" in str(e.value) and all(k in str(e.value) for k in FIGURES)
    with pytest.raises(ValueError, match="unknown keys"):
        peer_from_dict({"name": "p", "figure": {"dit_s": 1.0}})
    with pytest.raises(ValueError, match="positive number"):
        _peer({"dit_s": "fast"})
    with pytest.raises(ValueError, match="'name'"):
        peer_from_dict({"figures": {"dit_s": 1.0}})
    with pytest.raises(ValueError, match="setting"):
        _peer({"dit_s": 1.0}, setting={"resolution": "480p"})


def test_peer_setting_must_match_the_run():
    peer = _peer({"dit_s": 1.0}, setting={"preset": "wan2.1-t2v-1.3b", "latent_frames": 21})
    peer.check_setting(preset="wan2.1-t2v-1.3b", latent_frames=21, height=480, width=832)
    with pytest.raises(ValueError, match="another setting.*latent_frames: ours 9, theirs 21"):
        peer.check_setting(preset="wan2.1-t2v-1.3b", latent_frames=9, height=480, width=832)


@pytest.mark.parametrize("path", PEERS, ids=lambda p: p.name)
def test_committed_peer_files_load(path):
    peer = bench.load_peer(path)
    assert peer.figures and "gpu_baseline.md" in peer.source
    assert peer.setting == {"preset": "wan2.1-t2v-1.3b", "latent_frames": 21, "height": 480, "width": 832}


def test_peer_files_committed():
    assert {p.name for p in PEERS} >= {
        "2026-12-01_h200_self_forcing_eager.json",
        "2026-12-01_h200_self_forcing_compile.json",
        "2026-11-24_h100_self_forcing_eager.json",
    }


def test_matmul_peak_on_cpu_small():
    peak = bench.matmul_peak_tflops(n=128, products=3, repeats=2)
    assert isinstance(peak, float) and peak > 0


def test_timers():
    import jax.numpy as jnp

    out, ms = bench.timed_ms(lambda a: a + 1, jnp.ones(3))
    assert ms >= 0 and out.tolist() == [2.0, 2.0, 2.0]
    calls = []

    def step():  # a closure keeping its state between calls, as a donated cache is timed
        calls.append(len(calls))
        return jnp.asarray(len(calls))

    assert bench.median_ms(step, repeats=3, warmup=2) >= 0 and len(calls) == 5
    with pytest.raises(ValueError, match="repeats"):
        bench.median_ms(step, repeats=0)


@pytest.mark.parametrize("probe", PROBES, ids=lambda p: p.name)
def test_probe_parses_its_arguments(probe):
    proc = subprocess.run([sys.executable, str(probe), "--help"], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "usage:" in proc.stdout


def test_device_idle_is_the_span_not_covered_by_kernels():
    from causal_dit_jax.bench.profile import busy_and_idle

    # two streams: [0, 10) and [5, 20) overlap (busy 0..20), a gap of 5 ns, then [25, 30) and [40, 41)
    got = busy_and_idle([(25, 30), (0, 10), (40, 41), (5, 20)])
    assert got == {"busy_ms": 26e-6, "span_ms": 41e-6, "idle_ms": 15e-6, "gaps": 2, "longest_gap_ms": 10e-6}
    assert busy_and_idle([(3, 7)])["idle_ms"] == 0 and busy_and_idle([(3, 7)])["gaps"] == 0
    with pytest.raises(ValueError, match="no kernel intervals"):
        busy_and_idle([])
    with pytest.raises(ValueError, match="ends before it starts"):
        busy_and_idle([(5, 4)])
