"""The `causal-dit` command line: convert and bench, run as a user would, and generate's refusals of
bad input (before any model work; generate's runs are in tests/test_pipeline.py)."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from dit_fixtures import SMALL, save_self_forcing_pt, torch_model
from xla_flags import cpu_flags

from causal_dit_jax.app.cli import build_parser, main
from causal_dit_jax.model.dit import load_dit


def test_convert_cli_writes_a_loadable_checkpoint(tmp_path, capsys):
    pt = save_self_forcing_pt(torch_model(seed=11), tmp_path / "sf.pt")
    (tmp_path / "config.json").write_text(json.dumps({"num_heads": 12}))
    assert main(["convert", "--checkpoint", str(pt), "--out", str(tmp_path / "ckpt")]) == 0
    dit, params = load_dit(tmp_path / "ckpt")
    assert dit.config.num_layers == SMALL.num_layers and dit.config.num_heads == 12
    assert params["blocks"]["self_attn"]["qkv"]["kernel"].shape == (2, 192, 576)
    # a second run refuses to overwrite, with a clear message and exit code 2
    assert main(["convert", "--checkpoint", str(pt), "--out", str(tmp_path / "ckpt")]) == 2
    assert "already exists" in capsys.readouterr().err


def test_convert_cli_reports_bad_checkpoint(tmp_path, capsys):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    assert main(["convert", "--checkpoint", str(bad), "--out", str(tmp_path / "out")]) == 2
    assert "not a PyTorch checkpoint" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_bench_cli_prints_and_writes_json(tmp_path):
    out = tmp_path / "bench.json"
    peer = tmp_path / "peer.json"  # made-up figures, far slower than any run: every speed-up is > 1
    peer.write_text(
        json.dumps(
            {
                "name": "made-up slow peer",
                "setting": {"preset": "tiny", "latent_frames": 6},
                "figures": {"dit_s": 1000.0, "first_chunk_ms": 1e6, "e2e_fps_wan": 0.001, "first_frame_tiny_s": 1000.0},
            }
        )
    )
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "causal_dit_jax.app.cli",
            "bench",
            "--preset",
            "tiny",
            "--frames",
            "21",
            "--height",
            "64",
            "--width",
            "96",
            "--json",
            str(out),
            "--e2e",
            "--vae-preset",
            "tiny",
            "--compare",
            str(peer),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert "first-chunk latency" in proc.stdout and "video frames / s" in proc.stdout
    assert "compared with made-up slow peer" in proc.stdout
    result = json.loads(out.read_text())
    assert result["device"] == "cpu" and result["date"]
    (comparison,) = result["comparison"]
    rows = comparison["figures"]
    assert comparison["name"] == "made-up slow peer" and set(rows) == {
        "dit_s",
        "first_chunk_ms",
        "e2e_fps_wan",
        "first_frame_tiny_s",
    }
    assert np.isclose(rows["dit_s"]["ours"], result["total_s"])
    assert np.isclose(rows["dit_s"]["speedup"], 1000.0 / result["total_s"])  # a time: theirs / ours
    assert np.isclose(rows["e2e_fps_wan"]["speedup"], result["vae"]["e2e_fps"] / 0.001)  # a rate: ours / theirs
    assert np.isclose(rows["first_frame_tiny_s"]["ours"], result["tiny_vae"]["first_frame_s"])
    assert all(r["speedup"] > 1 for r in rows.values())
    assert len(result["chunk_ms"]) == 2 and result["forwards"] == 10 and result["video_frames"] == 21
    assert np.isclose(result["first_chunk_ms"], result["chunk_ms"][0])
    assert result["vae"]["frames"] == 21 and len(result["vae"]["decode_ms"]) == 2 and result["vae"]["e2e_fps"] > 0
    # the loop without running ahead is timed too; the device's idle time is read from GPU traces only
    assert result["vae"]["e2e_fps_sequential"] > 0 and result["vae"]["device_idle_ms"] is None
    tiny = result["tiny_vae"]
    assert tiny["vae_preset"] == "taehv-tiny" and tiny["frames"] == 21 and tiny["e2e_fps"] > 0
    assert "end to end, DiT + tiny decoder" in proc.stdout


def test_bench_cli_compare_refuses_bad_peer_files_before_work(tmp_path, capsys, monkeypatch):
    """--compare: an unknown figure name, an unknown key or another setting is refused (exit 2, the valid
    names in the message) before any bench work."""
    import causal_dit_jax.bench

    def no_work(*a, **k):
        raise AssertionError("the bench ran before the peer file was checked")

    monkeypatch.setattr(causal_dit_jax.bench, "run_dit_bench", no_work)
    args = ["bench", "--preset", "tiny", "--frames", "21", "--height", "64", "--width", "96"]
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"name": "peer", "figures": {"dit_s": 2.0, "fps": 18.4}}))
    assert main(args + ["--compare", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "unknown figures ['fps']" in err and "dit_s" in err and "e2e_fps_wan" in err
    bad.write_text(
        json.dumps({"name": "peer", "figures": {"dit_s": 2.0}, "setting": {"preset": "wan2.1-t2v-1.3b", "latent_frames": 21}})
    )
    assert main(args + ["--compare", str(bad)]) == 2
    assert "another setting" in capsys.readouterr().err
    assert main(args + ["--compare", str(tmp_path / "missing.json")]) == 2
    bad.write_text("{not json")
    assert main(args + ["--compare", str(bad)]) == 2
    assert "not JSON" in capsys.readouterr().err


def test_bench_cli_per_layer_weights(tmp_path, capsys):
    """--per-layer-weights (unstack_blocks) runs the DiT rollout; with --mesh it is refused."""
    out = tmp_path / "bench.json"
    args = ["bench", "--preset", "tiny", "--frames", "21", "--height", "64", "--width", "96"]
    assert main(args + ["--per-layer-weights", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["forwards"] == 10 and result["total_s"] > 0
    assert main(args + ["--per-layer-weights", "--mesh", "2"]) == 2
    assert "--per-layer-weights runs on one device" in capsys.readouterr().err
    # float8 block GEMMs, with per-layer weights too
    assert main(args + ["--per-layer-weights", "--linear-precision", "float8", "--json", str(out)]) == 0
    assert json.loads(out.read_text())["linear_precision"] == "float8"


@pytest.mark.parametrize("decode_devices", [0, 2])
def test_bench_cli_sequence_parallel(tmp_path, decode_devices):
    """--mesh 8: the DiT over 8 devices and the Wan VAE in bands over them; with --decode-devices 2 the
    DiT over 6 and the decoders on the last 2 of their own (the Wan VAE in bands over both)."""
    out = tmp_path / "bench.json"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "causal_dit_jax.app.cli",
            "bench",
            "--preset",
            "tiny",
            "--frames",
            "21",
            "--height",
            "64",
            "--width",
            "96",
            "--mesh",
            "8",
            "--strategy",
            "hybrid",
            "--e2e",
            "--vae-preset",
            "tiny",
            "--decode-devices",
            str(decode_devices),
            "--json",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "XLA_FLAGS": cpu_flags(8)},
    )
    assert proc.returncode == 0, proc.stderr
    result = json.loads(out.read_text())
    dit_devices = 8 - decode_devices
    assert result["num_devices"] == dit_devices and result["strategy"] == "hybrid"
    assert result["comm_bytes_per_chunk"] > 0
    # the product loop: the Wan VAE in bands of rows (over the mesh, or over its own devices), every frame made
    vae, tiny = result["vae"], result["tiny_vae"]
    assert vae["frames"] == 21 and tiny["frames"] == 21
    if decode_devices:
        assert vae["banded_decode_devices"] == 2 and vae["decode_devices"] == [6, 7]
        assert tiny["banded_decode_devices"] == 1 and tiny["decode_devices"] == [6]  # TAEHV: the first of its own
    else:
        assert vae["banded_decode_devices"] == 8 and vae["decode_devices"] == list(range(8))
        assert tiny["banded_decode_devices"] == 1 and tiny["decode_devices"] == [0]  # the TAEHV decoder on one device


def test_convert_cli_taehv_needs_a_wan_folder(tmp_path, capsys):
    assert main(["convert", "--taehv", str(tmp_path / "taew2_1.pth"), "--out", str(tmp_path / "out")]) == 2
    assert "--taehv needs --wan-dir" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_multi_gpu_benchmark_script(tmp_path):
    """benchmarks/multi_gpu.py as on a GPU host, on 4 simulated CPU devices: one process per
    configuration, the N-device latents against the 1-device ones, strategies that coincide named."""
    import os
    import pathlib

    out = tmp_path / "multi.json"
    root = pathlib.Path(__file__).resolve().parents[1]
    proc = subprocess.run(
        [
            sys.executable,
            str(root / "benchmarks" / "multi_gpu.py"),
            "--gpus",
            "4",
            "--preset",
            "tiny",
            "--frames",
            "21",
            "--height",
            "64",
            "--width",
            "64",
            "--no-e2e",
            "--strategies",
            "ulysses,ring,hybrid",
            "--json",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "PYTHONPATH": str(root), "XLA_FLAGS": cpu_flags(4)},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    runs = json.loads(out.read_text())["runs"]
    assert [r["config"] for r in runs] == [
        "1 GPU",
        "4 GPUs ulysses (ring 1 x all-to-all 4)",
        "4 GPUs ring (ring 4 x all-to-all 1)",
        "4 GPUs hybrid",
    ]
    assert runs[3]["same_as"] == "ring x ulysses = (1, 4)"  # 12 heads: the hybrid of 4 is all-to-all
    for r in runs[1:3]:
        assert r["num_devices"] == 4 and r["compilations"] == 0
        # float32 on CPU: the sharded rollout equals one device's up to summation order
        assert r["latents_vs_1_gpu"]["rel_l2"] <= 1e-4
        assert r["speedup_dit_total"] > 0
    bad = [sys.executable, str(root / "benchmarks" / "multi_gpu.py"), "--gpus", "4", "--decode-devices", "4"]
    proc = subprocess.run(bad, capture_output=True, text=True, timeout=120, env={**os.environ, "PYTHONPATH": str(root)})
    assert proc.returncode == 2 and "--decode-devices must be in [0, 3]" in proc.stderr


def test_profile_kernel_classes():
    """The profile breakdown's kernel classes, by the names cuBLAS, cuDNN, NCCL and XLA give them."""
    from causal_dit_jax.bench.profile import classify

    assert classify("ncclDevKernel_SendRecv(ncclDevKernelArgsStorage<4096ul>)") == "collective"
    assert classify("cudnn_generated_fort_native_sdpa_sm90_flash_fprop_wgmma_f16") == "attention"
    assert classify("nvjet_sm90_tst_128x216_64x4_2x1_v_bz_coopA_NNT") == "matmul"
    assert classify("loop_multiply_fusion") == "other"


# ------------------------------------------------------------------------------------------------ refusals
def _run_cli(*args, cwd=None, env=None, timeout=300):
    return subprocess.run(
        [sys.executable, "-m", "causal_dit_jax.app.cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=cwd,
        env={**os.environ, **(env or {})},
    )


def _assert_one_line_error(proc, command: str, *parts: str) -> None:
    """Exit code 2 and a single stderr line `causal-dit COMMAND: error: ...` holding every part."""
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr[-3000:]
    assert lines[0].startswith(f"causal-dit {command}: error: "), lines
    for part in parts:
        assert part in lines[0], (part, lines[0])


def _listing(folder):
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*"))


@pytest.mark.parametrize(
    "args,parts",
    [
        (["--frames", "0"], ["--frames must be positive, got 0"]),
        (["--height", "0"], ["--height must be positive, got 0"]),
        (["--width", "0"], ["--width must be positive, got 0"]),
        (["--frames", "-9"], ["--frames must be positive, got -9"]),
        (["--mesh", "-1"], ["--mesh must be a device count", "got -1"]),
        (["--strategy", "ring"], ["--strategy ring needs --mesh"]),
        (
            ["--mesh", "4", "--strategy", "ulysses"],
            ["asked for 4 devices, only 2 are visible (backend cpu)", "XLA_FLAGS=--xla_force_host_platform_device_count=4"],
        ),
        (["--checkpoint", "{tmp}/no-such-ckpt"], ["checkpoint folder {tmp}/no-such-ckpt does not exist"]),
        (["--checkpoint", "{tmp}/empty"], ["{tmp}/empty is not a causal-dit-jax checkpoint (no config.json)"]),
        (["--checkpoint", "{tmp}/corrupt"], ["{tmp}/corrupt/config.json is not valid JSON"]),
        (["--out", "{tmp}"], ["output {tmp} is a directory", "{tmp}/video.mp4"]),
        (["--out", "{tmp}/old.mp4"], ["{tmp}/old.mp4 already exists (pass --overwrite to replace it)"]),
        # a batch writes OUT_0.mp4, OUT_1.mp4: each is checked
        (["--prompt", "a second prompt", "--out", "{tmp}/batch.mp4"], ["{tmp}/batch_1.mp4 already exists"]),
    ],
    ids=[
        "frames0",
        "height0",
        "width0",
        "frames-9",
        "mesh-1",
        "strategy-without-mesh",
        "mesh-too-large",
        "checkpoint-missing",
        "checkpoint-without-config",
        "checkpoint-corrupt-config",
        "out-directory",
        "out-exists",
        "batch-out-exists",
    ],
)
def test_generate_refuses_bad_input_in_one_line(args, parts, tmp_path):
    """Each refusal: exit 2, one stderr line naming the problem, before any model work, nothing written."""
    (tmp_path / "empty").mkdir()
    (tmp_path / "corrupt").mkdir()
    (tmp_path / "corrupt" / "config.json").write_text('{"format": "causal-dit-jax/1", ')
    (tmp_path / "old.mp4").write_bytes(b"an older video")
    (tmp_path / "batch_1.mp4").write_bytes(b"an older video")
    before = _listing(tmp_path)
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    proc = _run_cli(
        "generate", "--prompt", "a red fox", "--out", str(tmp_path / "new.mp4"), *args, env={"XLA_FLAGS": cpu_flags(2)}
    )
    _assert_one_line_error(proc, "generate", *(p.replace("{tmp}", str(tmp_path)) for p in parts))
    assert "UNTRAINED" not in proc.stdout  # no model was built
    assert _listing(tmp_path) == before
    assert (tmp_path / "old.mp4").read_bytes() == b"an older video"


def test_convert_refuses_a_text_file_named_pt(tmp_path):
    text = tmp_path / "weights.pt"
    text.write_text("these are not weights\n")  # torch.load's unpickler: 'pop from empty list'
    proc = _run_cli("convert", "--checkpoint", str(text), "--out", str(tmp_path / "ckpt"))
    _assert_one_line_error(
        proc, "convert", f"cannot read {text}: not a PyTorch checkpoint", "expected a torch.save file", "b'these are not"
    )
    assert "pop from empty list" not in proc.stderr
    assert _listing(tmp_path) == ["weights.pt"]


@pytest.mark.parametrize(
    "args,parts",
    [
        (["--frames", "6"], ["6 frames do not fit the decoder: use 1 + 4k frames"]),  # 6 was once 6 latent frames
        (["--frames", "17"], ["17 frames are 5 latent frames, not a multiple of the chunk size 3"]),
        (["--strategy", "ring"], ["--strategy ring needs --mesh"]),
        (["--mesh", "-2"], ["--mesh must be a device count", "got -2"]),
    ],
    ids=["frames6", "frames17", "strategy-without-mesh", "mesh-2"],
)
def test_bench_refuses_bad_input_in_one_line(args, parts, tmp_path):
    """bench --frames counts video frames, as generate's does, and is checked the same way."""
    proc = _run_cli(
        "bench", "--preset", "tiny", "--height", "64", "--width", "96", "--json", str(tmp_path / "bench.json"), *args
    )
    _assert_one_line_error(proc, "bench", *parts)
    assert _listing(tmp_path) == []


def test_bench_frames_are_video_frames(monkeypatch, capsys):
    """bench --frames 81 rolls out 21 latent frames; the default 33 is 9; --compare settings stay latent."""
    import causal_dit_jax.bench

    seen = []

    def record(config, latent_frames, *a, **k):
        seen.append(latent_frames)
        raise ValueError("stop here")

    monkeypatch.setattr(causal_dit_jax.bench, "run_dit_bench", record)
    assert main(["bench", "--preset", "tiny", "--frames", "81", "--height", "64", "--width", "96"]) == 2
    assert main(["bench", "--preset", "tiny", "--height", "64", "--width", "96"]) == 2
    assert seen == [21, 9]
    assert build_parser().parse_args(["bench"]).frames == 33
