"""GPU probe: the Wan VAE encoder's speed at the real size (bf16, 480x832): a whole 81-frame clip
encoded in Wan's order (frame 0 alone, then 4 frames per call, the caches carried) and one 4-frame
streaming call (the next 4 frames of a live video, after the first frame), with its first-call
compile time. Random weights of the real shapes.

    python benchmarks/vae_encoder_probe.py [--json out.json] [--frames 81] [--height 480 --width 832]
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp

from causal_dit_jax.autoencoders import WanVAEEncoder, get_vae_preset
from causal_dit_jax.bench import median_ms, peak_memory_gb, timed_ms, write_json
from causal_dit_jax.model.random_params import random_params


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--frames", type=int, default=81)
    ap.add_argument("--height", type=int, default=480)
    ap.add_argument("--width", type=int, default=832)
    ap.add_argument("--preset", default="wan2.1", help="VAE preset (wan2.1 or tiny)")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    config = get_vae_preset(args.preset).replace(dtype="bfloat16", param_dtype="bfloat16")
    encoder = WanVAEEncoder(config)
    encoder.check_frames((1, args.frames, args.height, args.width, 3), first_chunk=True)  # before any work
    params = random_params(encoder.abstract_params(), 0)
    clip = jax.random.uniform(jax.random.key(1), (1, args.frames, args.height, args.width, 3), jnp.float32, -1, 1)

    _, first_s = timed_ms(lambda: encoder.encode(params, clip))  # compiles the first and the 4-frame calls
    whole_ms = median_ms(lambda: encoder.encode(params, clip), repeats=args.repeats)
    cache = encoder.init_encode_cache(1, args.height, args.width)
    _, cache = encoder.jit_encode_chunk(params, clip[:, :1], cache)
    state = {"cache": cache}

    def four_frames():  # the next 4 frames of a stream, the cache handed on
        latents, state["cache"] = encoder.jit_encode_chunk(params, clip[:, 1:5], state["cache"])
        return latents

    step_ms = median_ms(four_frames, repeats=max(args.repeats, 10))
    row = {
        "preset": args.preset,
        "dtype": "bfloat16",
        "frames": args.frames,
        "height": args.height,
        "width": args.width,
        "latents": encoder.num_latents(args.frames),
        "first_encode_s": first_s / 1e3,
        "encode_s": whole_ms / 1e3,
        "frames_per_s": args.frames / (whole_ms / 1e3),
        "four_frame_call_ms": step_ms,
        "peak_memory_gb": peak_memory_gb(),
    }
    print(row, flush=True)
    if args.json:
        write_json(args.json, **row)


if __name__ == "__main__":
    main()
