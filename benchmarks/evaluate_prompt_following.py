"""Prompt following of text-to-video models in the procedural world: each model generates balanced
prompts (`a red circle moving left on a gray background`), each video is read back (colour, shape,
direction, background) and scored against its prompt; prints a table of accuracies by model.

    python benchmarks/evaluate_prompt_following.py --model embedded --model random --json out.json
    python benchmarks/evaluate_prompt_following.py --model runs/step_4000 --pairs 96 --denoising-steps 1000,500

--model: 'embedded' (the pipeline's embedded default weights), 'random' (random weights: chance level)
or a checkpoint folder written by `causal-dit convert` or training; repeat it to compare models. Two
references bound what a model can score: 'rendered' (the prompt's own clip, drawn by the procedural
world: the reader's accuracy) and 'vae' (that clip through the embedded default's VAE, encoded and
decoded: the most a DiT generating in its latent space can show; 'vae:FOLDER' through an exported
model folder's VAE).
The JSON: {"device", "date", "settings": {...}, "results": {model: {"accuracy", "pairs", "records"}}}.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import tempfile

from causal_dit_jax.bench.prompt_following import evaluate, format_table, pipeline_generate, prompt_pairs, reference_generate


def load_generate(model: str, inference):
    """The `generate(prompts, seed, frames, height, width)` a --model value names: 'embedded' (the
    shipped model), 'random' (the random-weights demo: chance), a folder the recipe exported
    (embedded/), a converted checkpoint folder, 'rendered' / 'vae' / 'vae:FOLDER' (the references),
    or 'teacher:RUN' (the recipe run RUN's many-step
    teacher: its guided streamed ODE, what the 4-step model was distilled from; `inference` unused)."""
    from causal_dit_jax.app.pipeline import TextToVideoPipeline

    if model.startswith("teacher:"):
        from causal_dit_jax.train.recipe import RecipeConfig, teacher_generate

        run = pathlib.Path(model.split(":", 1)[1]).expanduser()
        if not (run / "recipe.json").is_file():
            raise ValueError(f"--model {model!r}: {run} is not a recipe run folder (no recipe.json)")
        return teacher_generate(RecipeConfig.from_file(run / "recipe.json"), run)
    if model.startswith("vae:"):
        folder = pathlib.Path(model.split(":", 1)[1]).expanduser()
        if not (folder / "vae.npz").is_file():
            raise ValueError(f"--model {model!r}: {folder} is not an exported model folder (no vae.npz)")
        return reference_generate(TextToVideoPipeline.from_embedded(folder, inference=inference))
    if model in ("rendered", "vae"):
        return reference_generate(TextToVideoPipeline.embedded_default(inference=inference) if model == "vae" else None)
    if model == "embedded":
        return pipeline_generate(TextToVideoPipeline.embedded_default(inference=inference))
    if model == "random":
        return pipeline_generate(TextToVideoPipeline.random_demo(inference=inference))
    folder = pathlib.Path(model).expanduser()
    if not folder.is_dir():
        raise ValueError(f"--model {model!r} is neither 'embedded', 'random', 'teacher:RUN' nor a model folder")
    if (folder / "dit.npz").is_file():
        return pipeline_generate(TextToVideoPipeline.from_embedded(folder, inference=inference))
    return pipeline_generate(TextToVideoPipeline.from_checkpoint(folder, inference=inference))


def timesteps(text: str) -> tuple[int, ...]:
    """'1000,750,500,250' -> (1000, 750, 500, 250): denoising timesteps in (0, 1000]."""
    try:
        steps = tuple(int(s) for s in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integer timesteps, got {text!r}") from None
    if not all(0 < s <= 1000 for s in steps):
        raise argparse.ArgumentTypeError(f"timesteps must lie in (0, 1000], got {text!r}")
    return steps


def write_atomic(path: str | os.PathLike, record: dict) -> None:
    """Write record as JSON to a temporary file beside path, then move it into place."""
    path = pathlib.Path(path).expanduser()
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".partial", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(record, f, indent=1)
            f.write("\n")
        os.replace(tmp, path)
    finally:
        pathlib.Path(tmp).unlink(missing_ok=True)


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--model",
        action="append",
        required=True,
        help="'embedded', 'random', 'rendered', 'vae', 'vae:FOLDER', 'teacher:RUN', or a model folder; repeatable",
    )
    ap.add_argument("--pairs", type=int, default=48, help="prompts (balanced over every attribute)")
    ap.add_argument("--seed", type=int, default=0, help="draws the prompts and their seeds")
    ap.add_argument("--frames", type=int, default=33)
    ap.add_argument("--height", type=int, default=128)
    ap.add_argument("--width", type=int, default=192)
    ap.add_argument("--batch", type=int, default=8, help="prompts per generate call")
    ap.add_argument("--denoising-steps", type=timesteps, default=(1000, 750, 500, 250), help="e.g. 1000,750,500,250")
    ap.add_argument(
        "--local-attn-size",
        type=int,
        default=-1,
        help="the rolling window in latent frames (-1: the pipeline's default, for the embedded default the clip it learnt)",
    )
    ap.add_argument("--sink-size", type=int, default=None, help="attention-sink latent frames (default: the pipeline's)")
    ap.add_argument("--json", default=None, help="write the results here")
    ap.add_argument("--quiet", action="store_true", help="no progress bars")
    args = ap.parse_args(argv)
    if len(set(args.model)) != len(args.model):
        ap.error(f"--model names a model twice: {args.model}")
    if min(args.pairs, args.frames, args.height, args.width, args.batch) < 1:
        ap.error("--pairs, --frames, --height, --width and --batch must be >= 1")
    return args


def main(argv=None) -> dict:
    """Evaluate every --model; print the table; return (and with --json write) {"device", "date",
    "settings", "results": {model: `evaluate`'s result}}."""
    from causal_dit_jax.bench.results import device_kind, utc_date
    from causal_dit_jax.model.config import InferenceConfig

    args = parse_args(argv)
    inference = InferenceConfig(denoising_steps=args.denoising_steps, local_attn_size=args.local_attn_size)
    if args.sink_size is not None:
        inference = inference.replace(sink_size=args.sink_size)
    pairs = prompt_pairs(args.pairs, args.seed)
    results = {}
    for model in args.model:
        generate = load_generate(model, inference)
        results[model] = evaluate(generate, pairs, args.frames, args.height, args.width, args.batch, progress=not args.quiet)
        del generate
    print(format_table(results))
    settings = {
        k: getattr(args, k) for k in ("pairs", "seed", "frames", "height", "width", "batch", "local_attn_size", "sink_size")
    }
    record = {
        "device": device_kind(),
        "date": utc_date(),
        "settings": {**settings, "denoising_steps": list(args.denoising_steps)},
        "results": results,
    }
    if args.json:
        write_atomic(args.json, record)
        print(f"wrote {args.json}")
    return record


if __name__ == "__main__":
    main()
