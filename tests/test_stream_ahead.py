"""The pipeline's stream runs one chunk ahead of the host: chunk i + 1's DiT work is queued before
chunk i's frames are pulled, unless the prompt schedule is a live callable (polled only after the
frames before its chunk). The frames are the same either way, bit for bit."""

import numpy as np

from causal_dit_jax.app.pipeline import TextToVideoPipeline

PROMPT = "a red circle moving left"


def _logged_stream(pipe, **kw):
    """[(frame batch, latent chunks the sampler had yielded when the batch reached the host)]."""
    yielded = []
    stream = pipe.sampler.stream

    def counting(*args, **kwargs):
        for latents in stream(*args, **kwargs):
            yielded.append(1)
            yield latents

    pipe.sampler.stream = counting
    try:
        return [(frames, len(yielded)) for frames in pipe.stream(PROMPT, seed=3, **kw)]
    finally:
        del pipe.sampler.stream


def test_the_stream_runs_one_chunk_ahead_unless_the_schedule_is_live():
    pipe = TextToVideoPipeline.embedded_default()  # 33 frames: 3 chunks, 3 decode calls each (1 + 4 + 4, then 4s)
    ahead = _logged_stream(pipe)
    live = _logged_stream(pipe, prompt_schedule=lambda chunk: None)
    per_chunk = 3
    assert [n for _, n in ahead] == [min(i // per_chunk + 2, 3) for i in range(len(ahead))]  # 2 2 2 3 3 3 3 3 3
    assert [n for _, n in live] == [i // per_chunk + 1 for i in range(len(live))]  # 1 1 1 2 2 2 3 3 3
    a, b = np.concatenate([f for f, _ in ahead], axis=1), np.concatenate([f for f, _ in live], axis=1)
    assert a.shape == (1, 33, 128, 192, 3)
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(a, pipe.generate(PROMPT, seed=3))
