"""Sample videos during a training run: at each checkpoint the EMA weights of the DiT make one video
per prompt, decoded by a pipeline's text encoder and VAE, written to the run's samples/ folder."""

from __future__ import annotations

import pathlib

import jax
import jax.numpy as jnp

from causal_dit_jax.app.pipeline import TextToVideoPipeline
from causal_dit_jax.app.video import Mp4Writer


class SampleWriter:
    """on_checkpoint(step, ema_params, out_dir) for `train.run.train`: samples/step_{step:06d}_{i}.mp4."""

    def __init__(self, pipe: TextToVideoPipeline, prompts, frames: int, height: int, width: int, seed: int = 0):
        self.pipe, self.prompts = pipe, tuple(prompts)
        self.frames, self.height, self.width, self.seed = frames, height, width, seed
        pipe.plan(len(self.prompts), frames, height, width)  # sizes checked now, not at the first checkpoint

    @classmethod
    def for_run(cls, config) -> SampleWriter:
        """The writer a `RunConfig` asks for; its DiT shapes must be the run's."""
        from causal_dit_jax.train.run import check_run

        model, _, (_, h, w) = check_run(config)
        if config.sample_with == "embedded":
            pipe = TextToVideoPipeline.embedded_default()
        else:
            pipe = TextToVideoPipeline.from_checkpoint(config.sample_with)
        ours = pipe.dit.config.replace(param_dtype=model.param_dtype, dtype=model.dtype, residual_dtype=model.residual_dtype)
        if ours != model:
            raise ValueError(
                f"sample_with={config.sample_with!r} holds a DiT of other shapes than the run's; its text encoder "
                "must feed the run's DiT (same text_dim, text_len and sizes)"
            )
        s = pipe.vae.config.spatial_factor
        return cls(pipe, config.sample_prompts, config.sample_frames, h * s, w * s, config.seed)

    def __call__(self, step: int, ema_params, out_dir) -> list[pathlib.Path]:
        folder = pathlib.Path(out_dir) / "samples"
        folder.mkdir(exist_ok=True)
        like = self.pipe.dit_params
        self.pipe.dit_params = jax.tree.map(lambda p, q: jnp.asarray(p, q.dtype), ema_params, like)
        try:
            video = self.pipe.generate(list(self.prompts), self.frames, self.height, self.width, self.seed)
        finally:
            self.pipe.dit_params = like
        paths = []
        for i, clip in enumerate(video):
            path = folder / f"step_{step:06d}_{i}.mp4"
            with Mp4Writer(path) as w:
                w.write(clip)
            paths.append(path)
        return paths


__all__ = ["SampleWriter"]
