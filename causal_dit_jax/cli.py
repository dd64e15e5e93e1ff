"""The `causal-dit` command line: convert, bench (and generate, see pipeline)."""

from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence

from causal_dit_jax.config import PRESETS, InferenceConfig


def _add_convert(sub) -> None:
    p = sub.add_parser("convert", help="convert PyTorch checkpoints to an Orbax checkpoint folder")
    p.add_argument("--checkpoint", required=True,
                   help="Self-Forcing .pt, or Wan2.1 diffusion_pytorch_model.safetensors (file, index json "
                        "or the model folder)")
    p.add_argument("--out", required=True, help="output checkpoint folder (written atomically)")
    p.add_argument("--preset", choices=sorted(PRESETS), default=None,
                   help="expected model shapes (default: inferred from the weights)")
    p.add_argument("--which", default="generator_ema", help="entry of a Self-Forcing .pt (generator_ema)")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")


def _add_bench(sub) -> None:
    p = sub.add_parser("bench", help="time the DiT rollout with random weights")
    p.add_argument("--preset", choices=sorted(PRESETS), default="demo")
    p.add_argument("--frames", type=int, default=9, help="latent frames (multiple of 3; 21 = 81 video frames)")
    p.add_argument("--height", type=int, default=128)
    p.add_argument("--width", type=int, default=128)
    p.add_argument("--mesh", type=int, default=0, help="devices for sequence parallelism (0: one device)")
    p.add_argument("--strategy", default="ulysses", choices=["ulysses", "ring", "hybrid"],
                   help="sequence-parallel attention (with --mesh)")
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--profile", action="store_true", help="profile one forward (GPU): matmul/attention/other")
    p.add_argument("--json", default=None, help="write the result as JSON here")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="causal-dit", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    _add_convert(sub)
    _add_bench(sub)
    return parser


def cmd_convert(args) -> int:
    from causal_dit_jax.config import get_preset
    from convert import convert_dit_checkpoint

    config = get_preset(args.preset) if args.preset else None
    out = convert_dit_checkpoint(args.checkpoint, args.out, config, args.which, args.overwrite)
    print(f"wrote {out}")
    return 0


def cmd_bench(args) -> int:
    from causal_dit_jax.bench import run_dit_bench, write_json

    dit, strategy, comm = None, "single", None
    if args.mesh:
        from causal_dit_jax.config import get_preset
        from sharding.sequence_parallel import sequence_parallel_dit

        dit, comm = sequence_parallel_dit(get_preset(args.preset), args.mesh, args.strategy,
                                          height=args.height, width=args.width)
        strategy = args.strategy
    result = run_dit_bench(args.preset, args.frames, args.height, args.width, InferenceConfig(),
                           dit=dit, strategy=strategy, comm_bytes_per_chunk=comm, repeats=args.repeats,
                           profile=args.profile)
    print(result.table())
    if args.json:
        write_json(result, args.json)
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return {"convert": cmd_convert, "bench": cmd_bench}[args.command](args)
    except (ValueError, FileNotFoundError, PermissionError) as e:
        print(f"causal-dit {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
