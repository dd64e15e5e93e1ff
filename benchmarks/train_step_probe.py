"""GPU probe: one teacher-forcing train step of the causal DiT at the real 1.3B shapes on one device
(float32 master weights, bf16 compute, AdamW + EMA, rematerialised blocks): step time, tokens/s, model
FLOPs utilisation against the measured matmul peak, peak memory; then the largest batch that fits
(batches tried in order until one runs out of memory). Random weights and latents of the real shapes.

    python benchmarks/train_step_probe.py [--json out.json] [--latent-frames 21] [--batches 1 2 4]
    python benchmarks/train_step_probe.py --preset procedural --latent-frames 9 --height 16 --width 24 \
        --batches 64 128 --no-remat --profile    # the embedded default's teacher step
"""

from __future__ import annotations

import argparse
import time

import jax
import numpy as np

from causal_dit_jax.bench import matmul_peak_tflops, peak_memory_gb, timed_ms, write_json
from causal_dit_jax.model.config import KernelConfig, get_preset
from causal_dit_jax.model.dit import CausalWanDiT
from causal_dit_jax.model.random_params import random_params
from causal_dit_jax.train.block_attention import attended_pairs, teacher_forcing_plan
from causal_dit_jax.train.config import ObjectiveConfig, OptimizerConfig
from causal_dit_jax.train.objectives import FlowObjective
from causal_dit_jax.train.trainer import Trainer


def model_flops(config, frames: int, tokens_per_frame: int, batch: int) -> float:
    """Forward + backward (3x the forward) matmul FLOPs of one teacher-forcing step, without the
    rematerialised recompute: the block linears on the 2F frames' tokens, self-attention on the plan's
    attended pairs, cross-attention to the text (its K/V projections on the text tokens)."""
    d, f, k = config.dim, config.ffn_dim, config.text_len
    seq = 2 * frames * tokens_per_frame
    linear_per_token = 2 * (4 * d * d + 2 * d * d + 2 * d * f)  # self qkvo, cross q o, ffn
    pairs = attended_pairs(teacher_forcing_plan(frames, 3), tokens_per_frame)
    per_layer = linear_per_token * seq + 4 * d * pairs + 4 * d * seq * k + 2 * 2 * d * d * k
    return 3.0 * batch * config.num_layers * per_layer


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="wan2.1-t2v-1.3b")
    ap.add_argument("--latent-frames", type=int, default=21)
    ap.add_argument("--height", type=int, default=60, help="latent rows (480 pixels)")
    ap.add_argument("--width", type=int, default=104, help="latent columns (832 pixels)")
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 2, 4])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--no-remat", action="store_true")
    ap.add_argument("--profile", action="store_true", help="also profile one step: device time by kernel class")
    ap.add_argument("--scan-unroll", type=int, default=1, help="layers per iteration of the layer loop (KernelConfig)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    model = get_preset(args.preset)
    master = model.replace(param_dtype="float32")
    dit = CausalWanDiT(master, KernelConfig(scan_unroll=args.scan_unroll))
    params = random_params(dit.abstract_params(), 0)
    trainer = Trainer(FlowObjective(dit, ObjectiveConfig(), remat=not args.no_remat), OptimizerConfig(learning_rate=1e-5))
    tpf = model.tokens_per_frame(args.height, args.width)
    peak = matmul_peak_tflops(n=8192 if jax.default_backend() == "gpu" else 512)  # a CPU dry run: small products
    print(f"matmul peak {peak:.0f} TFLOP/s; {tpf} tokens per frame, sequence {2 * args.latent_frames * tpf} tokens")
    results = []
    for batch_size in args.batches:
        state = trainer.init_state(params)
        key = jax.random.key(batch_size)
        batch = {
            "latents": jax.random.normal(key, (batch_size, args.latent_frames, args.height, args.width, model.in_dim)),
            "text": jax.random.normal(key, (batch_size, model.text_len, model.text_dim)),
        }
        try:
            t0 = time.perf_counter()
            state, metrics = trainer.step(state, batch)
            jax.block_until_ready(metrics)
            first_s = time.perf_counter() - t0
            times = []
            for _ in range(args.repeats):
                (state, metrics), ms = timed_ms(trainer.step, state, batch)
                times.append(ms)
        except Exception as e:  # out of memory: the previous batch was the largest
            print(f"batch {batch_size}: {type(e).__name__}: {str(e).splitlines()[0][:200]}")
            results.append({"batch": batch_size, "fits": False})
            break
        ms = float(np.median(times))
        flops = model_flops(model, args.latent_frames, tpf, batch_size)
        breakdown = None
        if args.profile:
            from causal_dit_jax.bench.profile import profile_breakdown

            held = [state]

            def one_step(held=held, batch=batch):
                held[0], m = trainer.step(held[0], batch)
                return m

            breakdown = profile_breakdown(one_step, repeats=3, top=15)
            state = held[0]
        row = {
            "batch": batch_size,
            "fits": True,
            "step_ms": ms,
            "first_step_s": first_s,
            "tokens_per_s": batch_size * args.latent_frames * tpf / (ms / 1e3),
            "model_tflops_per_step": flops / 1e12,
            "mfu_vs_measured_peak": flops / (ms / 1e3) / (peak * 1e12),
            "peak_memory_gb": peak_memory_gb(),
            "loss": float(metrics["loss"]),
            "profile_ms": breakdown,
        }
        print(row)
        results.append(row)
        del state
    write_json(
        args.json or "train_step_probe.json",
        probe="train_step_probe",
        preset=args.preset,
        latent_frames=args.latent_frames,
        latent_height=args.height,
        latent_width=args.width,
        remat=not args.no_remat,
        scan_unroll=args.scan_unroll,
        objective="teacher_forcing",
        matmul_peak_tflops=peak,
        results=results,
        largest_batch=max((r["batch"] for r in results if r["fits"]), default=None),
        jax_version=jax.__version__,
        dtype=f"params {master.param_dtype}, compute {master.dtype}",
        notes="tokens_per_s counts the clip's tokens (the clean copy not counted); MFU counts fwd + bwd "
        "matmuls, not the remat recompute",
    )


if __name__ == "__main__":
    main()
