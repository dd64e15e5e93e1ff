"""The product: text-to-video pipeline, mp4 writing, the `causal-dit` command line."""

from causal_dit_jax.app.pipeline import TextToVideoPipeline, VideoSpec, save_pipeline_checkpoint, video_spec
from causal_dit_jax.app.video import Mp4Writer, read_mp4

__all__ = ["Mp4Writer", "TextToVideoPipeline", "VideoSpec", "read_mp4", "save_pipeline_checkpoint", "video_spec"]
