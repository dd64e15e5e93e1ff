"""When a VAE's colours drift over a long clip: the colour read off each window of a round trip.

For balanced prompt/seed pairs the procedural world renders `--frames` frames; the model's VAE
encodes them and its decoder streams the latents back chunk by chunk, as the pipeline decodes a long
run. Prints the colour accuracy of each `--window`-frame window, so a drift shows where it starts
(`evaluate_prompt_following.py --model vae` reads one colour per whole clip).

    python benchmarks/vae_long_drift.py --model embedded --frames 129 --json out.json
"""

from __future__ import annotations

import argparse
import collections
import json

import numpy as np


def window_colours(video: np.ndarray, window: int) -> list[str | None]:
    """The colour read off each whole `window`-frame slice of one video [T, H, W, 3] (uint8)."""
    from causal_dit_jax.bench.prompt_following import read_clip

    return [read_clip(video[s : s + window])["colour"] for s in range(0, len(video) - window + 1, window)]


def main(argv=None) -> dict:
    from causal_dit_jax.app.pipeline import TextToVideoPipeline
    from causal_dit_jax.bench.prompt_following import prompt_pairs, reference_generate
    from causal_dit_jax.bench.results import device_kind, utc_date

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="embedded", help="'embedded' or a model folder the recipe exported")
    ap.add_argument("--pairs", type=int, default=48)
    ap.add_argument("--frames", type=int, default=129, help="1 + 4k")
    ap.add_argument("--window", type=int, default=32, help="frames per scored window (at least 8)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    if (args.frames - 1) % 4 or args.window < 8 or args.frames < args.window:
        ap.error(f"--frames must be 1 + 4k and hold a --window of >= 8 frames; got {args.frames}, {args.window}")
    pipe = TextToVideoPipeline.from_embedded(None if args.model == "embedded" else args.model)
    _, height, width = pipe.default_size
    right = collections.defaultdict(list)  # first frame of a window -> [colour right?] over pairs
    by_seed = collections.defaultdict(list)
    for pair in prompt_pairs(args.pairs, 0):
        by_seed[pair.seed].append(pair)
    round_trip = reference_generate(pipe)  # the rendered clips, encoded and decoded
    for seed, pairs in by_seed.items():
        videos = round_trip([p.prompt for p in pairs], seed, args.frames, height, width)  # [B, T, H, W, 3]
        for pair, video in zip(pairs, videos):
            for i, got in enumerate(window_colours(video, args.window)):
                right[i * args.window].append(got == pair.labels.colour)
    table = {str(start): float(np.mean(v)) for start, v in sorted(right.items())}
    print(f"colour accuracy of the round trip by window of {args.window} frames (the window's first frame):")
    print("  " + "  ".join(f"{s:>3}: {100 * a:5.1f}%" for s, a in table.items()))
    result = {"device": device_kind(), "date": utc_date(), "settings": vars(args), "colour_by_window": table}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    return result


if __name__ == "__main__":
    main()
