"""Sequence-parallel scaling on the GPUs of one host: one GPU, then each attention strategy on N GPUs.

For every configuration, `run_dit_bench` (real Wan2.1-1.3B shapes, random bf16 weights, 480x832,
81 frames = 21 latent frames; --frames counts video frames, as `causal-dit generate` and `bench` do:
per-chunk times, first chunk, end to end with the tiny and the Wan decoder, a profile of one
full-cache forward with its collective time; on N GPUs the Wan VAE decodes in bands of rows over
them, as the pipeline does, unless --no-banded-decode), then the N-GPU latents against the one-GPU latents of
the same seed, and the speed-ups. Writes one JSON.

    python benchmarks/multi_gpu.py --gpus 2 --json benchmarks/DATE_h200x2_multi_gpu.json
    python benchmarks/multi_gpu.py --gpus 2 --strategies ulysses --linear-precision float8 --json ...
    python benchmarks/multi_gpu.py --gpus 8 --decode-devices 1 --json ...   # the DiT on 7 GPUs, the decoders on the 8th

Tolerance of the latents: both runs are bf16; sharding changes the matmul shapes (cuBLAS picks other
tilings) and, for a ring, the order of the softmax merge, so the two rollouts differ by bf16
rounding that 35 forwards of random weights carry along. The figure is reported, not asserted
(the exact equality is checked in float32 on CPU by tests/test_sequence_parallel.py).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

import numpy as np

from causal_dit_jax.app.pipeline import video_spec
from causal_dit_jax.autoencoders.wan_vae import get_vae_preset
from causal_dit_jax.bench import run_dit_bench, utc_date, write_json
from causal_dit_jax.model.config import LINEAR_PRECISIONS, InferenceConfig, KernelConfig, get_preset
from causal_dit_jax.model.dit import CausalWanDiT
from causal_dit_jax.sharding.mesh import split_sequence_devices
from causal_dit_jax.sharding.sequence_parallel import sequence_parallel_dit


def latents_error(a: np.ndarray, b: np.ndarray, frames_per_chunk: int) -> dict:
    """Relative L2 and max-abs difference of two rollouts' latents, overall and per chunk."""
    c = frames_per_chunk
    per_chunk = [
        float(np.linalg.norm(a[:, i : i + c] - b[:, i : i + c]) / np.linalg.norm(b[:, i : i + c]))
        for i in range(0, b.shape[1], c)
    ]
    return {
        "rel_l2": float(np.linalg.norm(a - b) / np.linalg.norm(b)),
        "max_abs": float(np.max(np.abs(a - b))),
        "rel_l2_per_chunk": per_chunk,
    }


def latent_frames(args, cfg) -> int:
    """--frames (video frames, validated as `causal-dit bench` does) as the rollout's latent frames."""
    return video_spec(
        args.frames, args.height, args.width, cfg, get_vae_preset("wan2.1"), InferenceConfig().frames_per_chunk
    ).latent_frames


def run_one(args, cfg, strategy: str) -> dict:
    """One configuration in this process ('single' or a strategy over args.gpus)."""
    kw = dict(
        preset=cfg,
        latent_frames=latent_frames(args, cfg),
        height=args.height,
        width=args.width,
        inference=InferenceConfig(),
        profile=True,
        keep_latents=True,
        e2e_vae=None if args.no_e2e else "wan2.1",
    )
    dit = CausalWanDiT(cfg, KernelConfig(linear_precision=args.linear_precision))
    if strategy == "single":
        res = run_dit_bench(dit=dit, **kw)
        config = "1 GPU"
    else:
        n = args.gpus - args.decode_devices  # the DiT's GPUs; the decoders' own are the last
        sizes = split_sequence_devices(n, strategy, cfg.num_heads)
        down = get_vae_preset("wan2.1").spatial_factor  # run_dit_bench's latents
        sp, comm = sequence_parallel_dit(
            dit,
            n,
            strategy,
            kw["inference"],
            num_frames=kw["latent_frames"],
            latent_height=args.height // down,
            latent_width=args.width // down,
        )
        import jax

        own = tuple(jax.devices()[n : args.gpus]) if args.decode_devices else None
        res = run_dit_bench(
            dit=sp,
            strategy=strategy,
            comm_bytes_per_chunk=comm,
            banded_decode=not args.no_banded_decode,
            decode_devices=own,
            **kw,
        )
        config = f"{n} GPUs {strategy} (ring {sizes[0]} x all-to-all {sizes[1]})"
        if own:
            config += f" + {len(own)} decoding"
    print(res.table(), flush=True)
    np.save(args.latents_out, res.latents)
    return {"config": config, **res.as_dict()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gpus", type=int, required=True, help="GPUs of the sequence-parallel runs")
    ap.add_argument("--strategies", default="ulysses,ring,hybrid")
    ap.add_argument("--preset", default="wan2.1-t2v-1.3b")
    ap.add_argument("--frames", type=int, default=81, help="video frames, 1 + 4k (81 = 21 latent frames)")
    ap.add_argument("--height", type=int, default=480)
    ap.add_argument("--width", type=int, default=832)
    ap.add_argument("--no-e2e", action="store_true")
    ap.add_argument("--no-banded-decode", action="store_true", help="on N GPUs, decode on the first GPU (not in bands of rows)")
    ap.add_argument(
        "--decode-devices",
        type=int,
        default=0,
        help="of the N GPUs, the last K decode on their own and the DiT runs over N - K (a 7 + 1 split: --gpus 8 "
        "--decode-devices 1)",
    )
    ap.add_argument(
        "--linear-precision",
        default="bfloat16",
        choices=LINEAR_PRECISIONS,
        help="the block linears' GEMMs, in every configuration (float8: opt-in, inference)",
    )
    ap.add_argument("--json", default=None)
    ap.add_argument("--only", default=None, help=argparse.SUPPRESS)  # internal: one configuration
    ap.add_argument("--latents-out", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    cfg = get_preset(args.preset)
    try:
        latent_frames(args, cfg)  # a bad --frames / size fails here, before any child starts
    except ValueError as e:
        ap.error(str(e))
    if not 0 <= args.decode_devices < args.gpus:
        ap.error(f"--decode-devices must be in [0, {args.gpus - 1}] (some of the --gpus {args.gpus} run the DiT)")
    if args.only:  # the child: measure one configuration, write its JSON
        write_json(args.json, **run_one(args, cfg, args.only))
        return

    # This process never starts JAX's backend (it would take GPU memory from the children).
    started = utc_date()
    runs: list[dict] = []
    work = tempfile.mkdtemp(prefix="multi_gpu_")

    def save():  # after every configuration, so a run cut short keeps what it measured
        if args.json:  # the device as the children reported it: this process starts no backend
            write_json(
                args.json,
                device=runs[0]["device"],
                gpus=args.gpus,
                linear_precision=args.linear_precision,
                started=started,
                runs=runs,
            )

    def child(strategy: str) -> tuple[dict, np.ndarray]:
        """Each configuration in a fresh process: its peak memory is its own, nothing is shared."""
        part, lat = os.path.join(work, f"{strategy}.json"), os.path.join(work, f"{strategy}.npy")
        cmd = (
            [
                sys.executable,
                __file__,
                "--only",
                strategy,
                "--json",
                part,
                "--latents-out",
                lat,
                "--gpus",
                str(args.gpus),
                "--preset",
                args.preset,
                "--frames",
                str(args.frames),
                "--height",
                str(args.height),
                "--width",
                str(args.width),
                "--linear-precision",
                args.linear_precision,
            ]
            + (["--no-e2e"] if args.no_e2e else [])
            + (["--no-banded-decode"] if args.no_banded_decode else [])
            + ["--decode-devices", str(args.decode_devices)]
        )
        subprocess.run(cmd, check=True)
        with open(part) as f:
            return json.load(f), np.load(lat)

    single, single_latents = child("single")
    runs.append(single)
    save()
    seen = set()
    for strategy in args.strategies.split(","):
        try:
            sizes = split_sequence_devices(args.gpus - args.decode_devices, strategy, cfg.num_heads)
        except ValueError as e:
            runs.append({"config": f"{args.gpus} GPUs {strategy}", "error": str(e)})
            continue
        if sizes in seen:  # e.g. hybrid on 2 GPUs is the all-to-all
            runs.append({"config": f"{args.gpus} GPUs {strategy}", "same_as": f"ring x ulysses = {sizes}"})
            continue
        seen.add(sizes)
        entry, latents = child(strategy)
        entry.update(
            {
                "latents_vs_1_gpu": latents_error(latents, single_latents, InferenceConfig().frames_per_chunk),
                "speedup_dit_total": single["total_s"] / entry["total_s"],
                "speedup_per_chunk": [a / b for a, b in zip(single["chunk_ms"], entry["chunk_ms"])],
                "speedup_first_chunk": single["first_chunk_ms"] / entry["first_chunk_ms"],
            }
        )
        if single.get("vae") and entry.get("vae"):  # the Wan VAE's decode, banded over the GPUs or not
            entry["speedup_vae_decode"] = single["vae"]["decode_total_s"] / entry["vae"]["decode_total_s"]
            entry["speedup_e2e_wan"] = entry["vae"]["e2e_fps"] / single["vae"]["e2e_fps"]
        print({k: entry[k] for k in ("config", "latents_vs_1_gpu", "speedup_dit_total", "speedup_first_chunk")}, flush=True)
        runs.append(entry)
        save()
    save()


if __name__ == "__main__":
    main()
