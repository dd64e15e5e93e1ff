"""GPU probe: where one streaming Wan VAE decode call goes (bf16, 480x832, one latent after the first),
with its compiled memory (temp buffers, caches).

    python benchmarks/vae_profile.py [--latents 1] [--upsample-conv phases|repeat] [--json out.json]
"""

from __future__ import annotations

import argparse
import pprint

import jax
import jax.numpy as jnp

from causal_dit_jax.autoencoders.wan_vae import UPSAMPLE_CONVS, WanVAE, get_vae_preset
from causal_dit_jax.bench import profile_breakdown, write_json
from causal_dit_jax.model.random_params import random_params


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--latents", type=int, default=1)
    parser.add_argument("--upsample-conv", default="phases", choices=UPSAMPLE_CONVS)
    parser.add_argument("--json", default=None)
    parser.add_argument("--hlo", default=None, help="also write the compiled HLO text here")
    parser.add_argument("--top", type=int, default=20, help="kernels listed by name")
    args = parser.parse_args()
    vae = WanVAE(get_vae_preset("wan2.1").replace(dtype="bfloat16", param_dtype="bfloat16", upsample_conv=args.upsample_conv))
    params = random_params(vae.abstract_params(), 0)
    cache = vae.init_decode_cache(1, 60, 104, wan_first_frame=False)
    z = jax.random.normal(jax.random.key(0), (1, args.latents, 60, 104, 16), jnp.float32)
    step = jax.jit(vae.decode_chunk, donate_argnums=(2,))
    compiled = step.lower(params, z, cache).compile()
    mem = compiled.memory_analysis()
    if args.hlo:
        with open(args.hlo, "w") as f:
            f.write(compiled.as_text())
    state = {"cache": cache}

    def one():
        frames, state["cache"] = step(params, z, state["cache"])
        return frames

    jax.block_until_ready(one())
    breakdown = profile_breakdown(one, top=args.top)
    cache_bytes = sum(a.nbytes for a in jax.tree.leaves(state["cache"]))
    result = {
        "latents_per_call": args.latents,
        "upsample_conv": args.upsample_conv,
        "breakdown_ms": breakdown,
        "temp_gb": mem.temp_size_in_bytes / 1e9,
        "cache_gb": cache_bytes / 1e9,
        "output_gb": mem.output_size_in_bytes / 1e9,
    }
    pprint.pprint(result, sort_dicts=False)
    if args.json:
        write_json(args.json, **result)


if __name__ == "__main__":
    main()
