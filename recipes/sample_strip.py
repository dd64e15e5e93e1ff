"""A contact sheet of a recipe run's videos (rows: prompts; columns: every 8th frame) as a PNG.

python recipes/sample_strip.py --run runs/default --model teacher --out teacher.png
python recipes/sample_strip.py --run runs/default --model embedded --out student.png
"""

from __future__ import annotations

import argparse
import pathlib

import numpy as np

PROMPTS = (
    "a red circle moving left",
    "a blue square moving up on a white background",
    "a green triangle moving right on a gray background",
    "a yellow square moving down",
    "a purple ball going left on a grey background",
    "an orange triangle moving down on a white background",
)


def main(argv=None) -> pathlib.Path:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--run", required=True, help="the recipe's run folder")
    p.add_argument("--model", choices=("teacher", "embedded"), default="embedded")
    p.add_argument("--out", required=True)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    import imageio.v3 as iio

    from causal_dit_jax.train.recipe import RecipeConfig, teacher_generate

    run = pathlib.Path(args.run)
    config = RecipeConfig.from_file(run / "recipe.json")
    size = (config.frames, config.height, config.width)
    if args.model == "teacher":
        video = teacher_generate(config, run)(list(PROMPTS), args.seed, *size)
    else:
        from causal_dit_jax.app.pipeline import TextToVideoPipeline

        video = TextToVideoPipeline.from_embedded(run / "embedded").generate(list(PROMPTS), *size, seed=args.seed)
    rows = [np.concatenate(list(v[::8]), axis=1) for v in video]  # each: h (n w) 3
    out = pathlib.Path(args.out)
    iio.imwrite(out, np.concatenate(rows, axis=0))
    print(f"wrote {out} ({len(PROMPTS)} prompts)")
    return out


if __name__ == "__main__":
    main()
