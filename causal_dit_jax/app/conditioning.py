"""Video conditioning for the pipeline: image-to-video, continuing a clip, video-to-video.

Everything here runs on the host before any model work: reading the image or clip, checking it against
the model's sizes, and choosing which frames are encoded. Frame counts (Wan's VAE: 4 frames per latent
after the first, the DiT's chunks of 3 latents; `tf` and `c` below):

- image: the context is the image held still for 1 + tf (c - 1) frames (9), encoded to c latents; the
  first is the image encoded alone (the VAE encodes frame 0 by itself), the rest its stillness. Run at
  t=0 into the KV cache as one chunk; the video (its first 9 frames that chunk, decoded) continues from it.
- extend: the context is the clip's last 1 + tf (c m - 1) frames (m whole chunks); the new frames follow.
- video: the first 1 + tf (L - 1) frames (L latents, a multiple of c), encoded, noised to the step the
  strength selects and denoised chunk by chunk.
"""

from __future__ import annotations

import dataclasses
import pathlib

import numpy as np

MODES = ("text", "image", "extend", "video")


@dataclasses.dataclass(frozen=True)
class Conditioning:
    """What a request is conditioned on, checked: the frames to encode as context or as the video to
    restyle ([B, T, H, W, 3] uint8, None for text), and the step video-to-video starts from."""

    mode: str  # one of MODES
    frames: np.ndarray | None  # uint8 [B, T, H, W, 3]: the context (image, extend) or the video (video)
    first_step: int = 0


def read_image(path: str | pathlib.Path) -> np.ndarray:
    """An image file as uint8 [H, W, 3] (grey is repeated to RGB, an alpha channel dropped)."""
    import imageio.v3 as iio

    p = pathlib.Path(path).expanduser()
    if not p.is_file():
        raise FileNotFoundError(f"image {p} does not exist")
    try:
        img = np.asarray(iio.imread(p, plugin="pillow"))
    except Exception as e:  # imageio raises several types for a file it cannot decode
        raise ValueError(f"cannot read {p} as an image ({type(e).__name__}: {e})") from None
    if img.ndim == 2:
        img = np.repeat(img[..., None], 3, axis=-1)
    if img.ndim != 3 or img.shape[-1] not in (3, 4):
        raise ValueError(f"image {p} must be an RGB(A) or grey picture, got an array of shape {img.shape}")
    if img.dtype != np.uint8:
        raise ValueError(f"image {p} must be 8-bit, got {img.dtype}")
    return img[..., :3]


def read_video(path: str | pathlib.Path) -> np.ndarray:
    """A video file (mp4 or any format ffmpeg reads) as uint8 [T, H, W, 3]."""
    from causal_dit_jax.app.video import read_mp4

    p = pathlib.Path(path).expanduser()
    if not p.is_file():
        raise FileNotFoundError(f"video {p} does not exist")
    try:
        frames = read_mp4(p)
    except Exception as e:
        raise ValueError(f"cannot read {p} as a video ({type(e).__name__}: {e})") from None
    return frames


def batched(media: np.ndarray, single_ndim: int, batch: int, what: str) -> np.ndarray:
    """uint8 media of one request (ndim `single_ndim`) or of each prompt (a leading batch axis) ->
    [batch, ...]: a single one is shared by every prompt."""
    media = np.asarray(media)
    if media.dtype != np.uint8:
        raise ValueError(f"the {what} must be uint8 RGB, got {media.dtype}")
    if media.ndim == single_ndim:
        media = np.broadcast_to(media[None], (batch, *media.shape))
    if media.ndim != single_ndim + 1 or media.shape[-1] != 3:
        want = "[H, W, 3]" if single_ndim == 3 else "[T, H, W, 3]"
        raise ValueError(f"the {what} must be uint8 {want} (or one per prompt, [B, ...]), got shape {media.shape}")
    if media.shape[0] != batch:
        raise ValueError(f"{media.shape[0]} {what}s for {batch} prompts: give one, or one per prompt")
    return media


def still_clip(images: np.ndarray, frames: int) -> np.ndarray:
    """[B, H, W, 3] -> the images held still: [B, frames, H, W, 3]."""
    return np.repeat(images[:, None], frames, axis=1)


def extend_context(clips: np.ndarray, context_chunks: int, temporal_factor: int, frames_per_chunk: int) -> np.ndarray:
    """The last 1 + tf (c m - 1) frames of clips [B, T, H, W, 3]: m = context_chunks whole chunks of
    latents, or as many as the clip holds (at least one)."""
    if context_chunks < 1:
        raise ValueError(f"context_chunks must be >= 1, got {context_chunks}")
    tf, c = temporal_factor, frames_per_chunk
    t = clips.shape[1]
    need = 1 + tf * (c - 1)
    if t < need:
        raise ValueError(f"a clip to extend needs at least {need} frames (one chunk of {c} latents), got {t}")
    m = min(context_chunks, ((t - 1) // tf + 1) // c)
    return clips[:, t - (1 + tf * (c * m - 1)) :]


def video_frames(clips: np.ndarray, frames: int | None, temporal_factor: int, frames_per_chunk: int) -> np.ndarray:
    """The first `frames` frames of clips [B, T, H, W, 3] for video-to-video (None: as many as make
    whole chunks); `frames` must be 1 + tf (L - 1) with L a multiple of the chunk size."""
    tf, c = temporal_factor, frames_per_chunk
    t = clips.shape[1]
    most = ((t - 1) // tf + 1) // c * c  # latents of the longest usable prefix
    if most == 0:
        raise ValueError(f"video-to-video needs at least {1 + tf * (c - 1)} frames (one chunk of {c} latents), got {t}")
    if frames is None:
        frames = 1 + tf * (most - 1)
    if frames > t:
        raise ValueError(f"{frames} frames asked of a {t}-frame video (at most {1 + tf * (most - 1)} usable)")
    return clips[:, :frames]


__all__ = ["MODES", "Conditioning", "batched", "extend_context", "read_image", "read_video", "still_clip", "video_frames"]
