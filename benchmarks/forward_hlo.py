"""Write the compiled (optimised) HLO of one chunk forward at full cache, to read XLA's fusion
decisions: real Wan2.1-1.3B shapes at 480x832 by default (abstract inputs, no weights allocated).

    python benchmarks/forward_hlo.py out.txt [--preset demo --frames 6 --height 128 --width 128]
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp

from causal_dit_jax.autoencoders.wan_vae import get_vae_preset
from causal_dit_jax.model.config import InferenceConfig, get_preset
from causal_dit_jax.model.dit import CausalWanDiT
from causal_dit_jax.model.sampler import SelfForcingSampler


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out")
    ap.add_argument("--preset", default="wan2.1-t2v-1.3b")
    ap.add_argument("--frames", type=int, default=21)
    ap.add_argument("--height", type=int, default=480)
    ap.add_argument("--width", type=int, default=832)
    args = ap.parse_args()
    cfg = get_preset(args.preset)
    dit = CausalWanDiT(cfg)
    inference = InferenceConfig()
    sampler = SelfForcingSampler(dit, inference)
    down = get_vae_preset("wan2.1").spatial_factor  # pixels per latent, each way
    lh, lw = args.height // down, args.width // down
    c = inference.frames_per_chunk
    params = dit.abstract_params()
    cache = jax.eval_shape(lambda: sampler.init_cache(1, args.frames, lh, lw))
    text = jax.eval_shape(lambda p: dit.encode_text(p, jnp.zeros((1, cfg.text_len, cfg.text_dim))), params)
    rope = dit.rope_tables(args.frames, lh, lw)
    x = jax.ShapeDtypeStruct((1, c, lh, lw, cfg.in_dim), jnp.float32)
    t = jax.ShapeDtypeStruct((1, c), jnp.float32)
    compiled = jax.jit(dit.forward, donate_argnums=(4,)).lower(params, x, t, text, cache, args.frames - c, rope).compile()
    with open(args.out, "w") as f:
        f.write(compiled.as_text())
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
