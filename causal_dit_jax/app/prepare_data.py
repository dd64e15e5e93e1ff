"""Training data from videos: a folder of captioned mp4s -> a folder of latents and text states.

Each `name.mp4` with its `name.txt` caption becomes one `.npz` of `train.data.LatentTextSource`: the
clip's first `frames` frames encoded by the pipeline's encoder (the Wan VAE's, or TAEHV's) and the
caption's umT5 states. `prepare_prompts` makes the data of a distillation run (`ode_regression`,
`dmd`), which needs prompts alone: one `.npz` of umT5 states per line of a prompt file
(`train.data.TextStateSource`). Both write the negative prompt's states as negative_text.npy (the
teacher's classifier-free guidance). The folder is written whole under a temporary name and moved
into place, so a stopped run leaves no half-made dataset.
"""

from __future__ import annotations

import pathlib
import shutil
import uuid

import numpy as np

from causal_dit_jax.app.pipeline import TextToVideoPipeline


def video_size(path: str | pathlib.Path) -> tuple[int, int]:
    """(height, width) of a video file, from its header."""
    import imageio.v2 as imageio

    from causal_dit_jax.ffmpeg import ffmpeg_without_preexec

    with ffmpeg_without_preexec():
        reader = imageio.get_reader(str(path), format="FFMPEG")
    try:
        w, h = reader.get_meta_data()["size"]
    finally:
        reader.close()
    return int(h), int(w)


def prepare_latents(
    pipe: TextToVideoPipeline,
    videos: str | pathlib.Path,
    out_dir: str | pathlib.Path,
    frames: int = 81,
    overwrite: bool = False,
    progress: bool = True,
    negative_prompt: str = "",
) -> pathlib.Path:
    """Encode every captioned video of `videos` (all of one size) into `out_dir`; returns out_dir.
    frames: 1 + 4k with whole chunks of latents (81 -> 21 latents)."""
    from tqdm import tqdm

    from causal_dit_jax.checkpoint import check_output_dir
    from causal_dit_jax.train.data import VideoCaptionSource, write_latent_text_example, write_negative_text

    out = check_output_dir(out_dir, overwrite)
    first = sorted(pathlib.Path(videos).expanduser().glob("*.mp4"))
    if not first:
        raise FileNotFoundError(f"video folder {videos} holds no *.mp4 files")
    height, width = video_size(first[0])
    pipe.plan(1, frames, height, width)  # the frame count and size rules, before any encoding
    if pipe.encoder is None:
        raise ValueError("the pipeline has no encoder: load a checkpoint converted with the VAE's encoder half")
    source = VideoCaptionSource(videos, frames, height, width)
    tmp = out.parent / f".{out.name}.partial-{uuid.uuid4().hex[:8]}"
    try:
        for i in tqdm(range(len(source)), unit="video", desc="encoding", disable=not progress):
            record = source[i]
            latents = np.asarray(pipe.encode_frames(record["frames"][None]))[0]  # f h w c
            text = np.asarray(pipe.text_context(record["caption"]))[0]  # k d
            write_latent_text_example(tmp, i, latents, text, caption=record["caption"])
        write_negative_text(tmp, np.asarray(pipe.negative_text_context(negative_prompt))[0])
        _move_into_place(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def prepare_prompts(
    pipe: TextToVideoPipeline,
    prompts: str | pathlib.Path,
    out_dir: str | pathlib.Path,
    overwrite: bool = False,
    progress: bool = True,
    negative_prompt: str = "",
) -> pathlib.Path:
    """Encode every prompt of a prompt file (one a line; blank and '#' lines skipped) with the
    pipeline's text encoder into `out_dir`, with the negative prompt's states; returns out_dir."""
    from tqdm import tqdm

    from causal_dit_jax.checkpoint import check_output_dir
    from causal_dit_jax.train.data import PromptListSource, write_negative_text, write_text_example

    out = check_output_dir(out_dir, overwrite)
    source = PromptListSource(prompts)
    tmp = out.parent / f".{out.name}.partial-{uuid.uuid4().hex[:8]}"
    try:
        for i in tqdm(range(len(source)), unit="prompt", desc="encoding", disable=not progress):
            prompt = source[i]["prompt"]
            write_text_example(tmp, i, np.asarray(pipe.text_context(prompt))[0], caption=prompt)
        write_negative_text(tmp, np.asarray(pipe.negative_text_context(negative_prompt))[0])
        _move_into_place(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def _move_into_place(tmp: pathlib.Path, out: pathlib.Path) -> None:
    if out.exists():
        shutil.rmtree(out)
    tmp.replace(out)


__all__ = ["prepare_latents", "prepare_prompts", "video_size"]
