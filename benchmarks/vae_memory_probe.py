"""GPU probe: memory and time of one streaming Wan VAE decode call (one latent, 480x832, bf16) for
ways of running the large-resolution stages: all frames at once, or one frame at a time (the last
1 or 2 stages and the head; `VAEConfig.per_frame_stages`). Reports XLA's buffer assignment
(temporaries, arguments, outputs) and the median call time. With XLA_FLAGS=--xla_dump_to=DIR, XLA
writes each variant's `*memory-usage-report.txt` (the buffers live at the peak) there.

    python benchmarks/vae_memory_probe.py [--json out.json] [--variants NAME ...]
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp

from causal_dit_jax.autoencoders.wan_vae import WanVAE, get_vae_preset
from causal_dit_jax.bench import median_ms, timed_ms, write_json
from causal_dit_jax.model.random_params import random_params

VARIANTS = {
    "all frames at once": {"per_frame_stages": 0},
    "per frame: stages 2, 3 + head": {"per_frame_stages": 2},
    "per frame: stage 3 + head": {"per_frame_stages": 1},
}


def probe(overrides: dict, latents: int = 1, repeats: int = 10) -> dict:
    vae = WanVAE(get_vae_preset("wan2.1").replace(dtype="bfloat16", param_dtype="bfloat16", **overrides))
    params = random_params(vae.abstract_params(), 7)
    cache = vae.init_decode_cache(1, 60, 104).replace(first_chunk=False)
    z = jax.random.normal(jax.random.key(0), (1, latents, 60, 104, 16), jnp.float32)
    fn = jax.jit(vae.decode_chunk, donate_argnums=(2,))
    compiled, compile_ms = timed_ms(lambda: fn.lower(params, z, cache).compile())
    mem = compiled.memory_analysis()
    state = {"cache": cache}

    def call():  # the cache donated and handed back, as the stream runs it
        frames, state["cache"] = compiled(params, z, state["cache"])
        return frames

    return {
        **overrides,
        "latents": latents,
        "compile_s": compile_ms / 1e3,
        "temp_gb": mem.temp_size_in_bytes / 1e9,
        "args_gb": mem.argument_size_in_bytes / 1e9,
        "out_gb": mem.output_size_in_bytes / 1e9,
        "alias_gb": mem.alias_size_in_bytes / 1e9,
        "median_ms": median_ms(call, repeats=repeats),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", default=None)
    ap.add_argument("--variants", nargs="*", default=list(VARIANTS), choices=list(VARIANTS))
    args = ap.parse_args()
    rows = {}
    for name in args.variants:
        rows[name] = probe(VARIANTS[name])
        r = rows[name]
        print(
            f"{name:40s} temp {r['temp_gb']:.3f} GB  args {r['args_gb']:.3f}  out {r['out_gb']:.3f}  "
            f"alias {r['alias_gb']:.3f}  {r['median_ms']:.1f} ms/latent  compile {r['compile_s']:.1f} s",
            flush=True,
        )
    if args.json:
        write_json(args.json, variants=rows)


if __name__ == "__main__":
    main()
