"""Prompt switching mid-stream with LongLive's KV re-cache: sampler, sequence parallelism, pipeline, CLI.

The re-cache's contract: after a switch at chunk i, the cache holds what a fresh cache would hold
after fill passes with the new text over the last W clean chunks at their own positions (the sink's
slots kept as the stream wrote them), so the next chunks equal a stream built that way. Tolerance
1e-5 (relative, float32): both sides run the same executables on the same inputs; only masked (never
attended) cache slots differ, stale keys on one side and zeros on the other. Sequence parallelism:
1e-5 too, as tests/test_sequence_parallel.py (the same float32 math, another reduction order).
"""

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import ndimage

from causal_dit_jax import CausalWanDiT, InferenceConfig, SelfForcingSampler, initial_noise
from causal_dit_jax.app.pipeline import TextToVideoPipeline, prompt_switches, switch_prompts
from causal_dit_jax.bench import prompt_following
from causal_dit_jax.model.config import get_preset
from causal_dit_jax.model.random_params import random_params
from causal_dit_jax.model.sampler import draw_step_noise
from causal_dit_jax.train.procedural import COLOURS

TOL = 1e-5
CFG = get_preset("tiny")  # 12 heads, float32
LH, LW = 4, 6
C = 3  # frames per chunk
CHUNKS = 5
ROLLED = (12, 3)  # a window of 12 latent frames with a 3-frame sink: 4 slots, the ring rolls from chunk 4


def rel(a, b) -> float:
    return float(jnp.linalg.norm(a - b) / jnp.linalg.norm(b))


@pytest.fixture(scope="module")
def model():
    dit = CausalWanDiT(CFG)
    params = random_params(dit.abstract_params(), 0)  # seconds faster than the eager init
    encode = jax.jit(dit.encode_text)
    texts = [encode(params, jax.random.normal(jax.random.key(10 + j), (1, CFG.text_len, CFG.text_dim))) for j in range(3)]
    noise = initial_noise(jax.random.key(5), 1, CHUNKS * C, LH, LW)
    return dit, params, texts, noise, jax.random.key(6)


@pytest.fixture(scope="module")
def samplers(model):
    """One sampler per (local_attn_size, sink_size), so that the cases share their executables."""
    return functools.cache(
        lambda local, sink: SelfForcingSampler(
            model[0], InferenceConfig(local_attn_size=local, sink_size=sink, cache_dtype="float32")
        )
    )


def _fill(sampler, params, x, cache, text, start, rope):
    return sampler._fill_fn(params, x, cache, text, jnp.asarray(start, jnp.int32), rope)  # the stream's executable


def _denoise(sampler, params, noise, key, j, cache, text, rope):
    eps = draw_step_noise(key, j, (1, C, LH, LW, CFG.in_dim), len(sampler.timesteps))
    return sampler._denoise_fn(params, noise[:, j * C : (j + 1) * C], eps, cache, text, jnp.asarray(j * C, jnp.int32), rope)


def _expected_chunks(sampler, params, chunks, noise, key, first_text, new_text, switch, redo):
    """Chunks switch .. the end from a fresh cache: the sink's slots as a stream from frame 0 writes
    them (with `first_text`), then fill passes with `new_text` over the `redo` clean chunks before
    `switch` at their own frames, then denoising and filling with `new_text`. redo 0 (a cut): no sink
    either, a new stream from chunk `switch` on."""
    frames = noise.shape[1]
    sink = sampler.init_cache(1, frames, LH, LW).sink_chunks if redo else 0
    cache = sampler.init_cache(1, frames, LH, LW, (switch - redo - sink) * C)  # the first re-filled chunk after the sink
    rope = sampler.dit.rope_tables(frames, LH, LW)
    if sink:
        first = sampler.init_cache(1, frames, LH, LW)
        for j in range(sink):
            first = _fill(sampler, params, chunks[j], first, first_text, j * C, rope)
        keys = sink * C * CFG.tokens_per_frame(LH, LW)
        cache = cache.replace(
            k=cache.k.at[:, :, :keys].set(first.k[:, :, :keys]), v=cache.v.at[:, :, :keys].set(first.v[:, :, :keys])
        )
    for j in range(switch - redo, switch):
        cache = _fill(sampler, params, chunks[j], cache, new_text, j * C, rope)
    out = []
    for j in range(switch, frames // C):
        x0, cache = _denoise(sampler, params, noise, key, j, cache, new_text, rope)
        cache = _fill(sampler, params, x0, cache, new_text, j * C, rope)
        out.append(x0)
    return out


@pytest.mark.parametrize(
    "window,switches,recache_chunks,redo",
    [
        ((-1, 0), {3: 1}, None, 3),  # global attention: every earlier chunk (the new prompt all along)
        (ROLLED, {4: 1}, None, 2),  # a rolled window: the 2 chunks it attends after the sink
        ((10, 0), {4: 1}, 2, 2),  # a frame-granular window (masked keys): 2 of the 3 chunks it attends
        ((-1, 0), {2: 1, 4: 2}, 1, 1),  # two switches, one chunk re-cached at each
        (ROLLED, {4: 1}, 0, 0),  # a cut: a new stream, the sink dropped too
    ],
)
def test_recache_equals_a_fresh_cache_filled_with_the_new_prompt(model, samplers, window, switches, recache_chunks, redo):
    dit, params, texts, noise, key = model
    sampler = samplers(*window)
    schedule = {i: texts[j] for i, j in switches.items()}
    out = list(sampler.stream(params, texts[0], noise, key, text_for_chunk=schedule.get, recache_chunks=recache_chunks))
    plain = sampler.generate(params, texts[0], noise, key)
    first, last = min(switches), max(switches)
    np.testing.assert_array_equal(jnp.concatenate(out[:first], 1), plain[:, : first * C])  # the same until the switch
    want = _expected_chunks(sampler, params, out, noise, key, texts[0], texts[switches[last]], last, redo)
    for j, x in enumerate(want, last):
        assert rel(out[j], x) <= TOL, j
    assert rel(out[last], plain[:, last * C : (last + 1) * C]) > 1e-3  # the new prompt does change the chunk


def test_without_recache_the_old_keys_stay_and_no_switch_is_the_plain_stream(model, samplers):
    dit, params, texts, noise, key = model
    sampler = samplers(-1, 0)
    plain = sampler.generate(params, texts[0], noise, key)
    compiled = sampler._denoise_fn._cache_size(), sampler._fill_fn._cache_size()
    for recache in (True, False):  # a schedule that never switches: the plain stream, bit for bit
        same = sampler.generate(params, texts[0], noise, key, text_for_chunk=lambda i: None, recache=recache)
        np.testing.assert_array_equal(same, plain)
    switch = {2: texts[1]}.get
    kept = sampler.generate(params, texts[0], noise, key, text_for_chunk=switch, recache=False)
    recached = sampler.generate(params, texts[0], noise, key, text_for_chunk=switch)
    # the switch, the re-cache included, runs the plain stream's executables: nothing compiles
    assert (sampler._denoise_fn._cache_size(), sampler._fill_fn._cache_size()) == compiled
    # no re-cache: chunk 2 reads the keys chunks 0 and 1 made under the old prompt
    rope = dit.rope_tables(CHUNKS * C, LH, LW)
    cache = sampler.init_cache(1, CHUNKS * C, LH, LW)
    for j in range(2):
        cache = _fill(sampler, params, plain[:, j * C : (j + 1) * C], cache, texts[0], j * C, rope)
    want, _ = _denoise(sampler, params, noise, key, 2, cache, texts[1], rope)
    assert rel(kept[:, 6:9], want) <= TOL
    assert rel(kept[:, 6:9], recached[:, 6:9]) > 1e-3


def test_sampler_refuses_bad_switch_settings(model, samplers):
    dit, params, texts, noise, key = model
    never = lambda i: None  # noqa: E731
    with pytest.raises(ValueError, match=r"recache_chunks must be an int in \[0, 2\]"):
        next(samplers(*ROLLED).stream(params, texts[0], noise, key, text_for_chunk=never, recache_chunks=3))
    with pytest.raises(ValueError, match="sink of whole chunks"):  # a 1-frame sink
        next(samplers(7, 1).stream(params, texts[0], noise, key, text_for_chunk=never))
    other = dit.encode_text(params, jnp.zeros((2, CFG.text_len, CFG.text_dim)))
    with pytest.raises(ValueError, match=r"text_for_chunk\(1\) gave a TextKV of shape"):
        list(samplers(-1, 0).stream(params, texts[0], noise, key, text_for_chunk=lambda i: other))


def test_switch_on_8_devices_equals_one_device(model, samplers):
    """Two switches over a rolled window with a sink (the second re-cache moves the cache's origin),
    sequence-parallel over 8 simulated devices (ring x all-to-all): one device's latents (1e-5)."""
    from causal_dit_jax.sharding import SequenceParallelDiT, make_mesh

    dit, params, texts, noise, key = model
    schedule = {2: texts[1], 4: texts[2]}.get
    one = samplers(*ROLLED).generate(params, texts[0], noise, key, text_for_chunk=schedule)
    sp = SequenceParallelDiT(dit, make_mesh(8, strategy="hybrid", num_heads=CFG.num_heads))
    sharded = SelfForcingSampler(sp, samplers(*ROLLED).inference)
    place = sp.place
    texts8 = [place(t) for t in texts]
    eight = sharded.generate(place(params), texts8[0], place(noise), key, text_for_chunk={2: texts8[1], 4: texts8[2]}.get)
    assert rel(eight, one) <= TOL
    plain = samplers(*ROLLED).generate(params, texts[0], noise, key)
    assert rel(eight[:, 6:], plain[:, 6:]) > 1e-3  # the switches took effect


# ------------------------------------------------------------------------------------------ pipeline
RED, BLUE = "a red square moving right", "a blue square moving right"
FRAMES = 57  # 5 chunks: the switch at chunk 3, then chunks 3 and 4 (frames 33-44 and 45-56)


@pytest.fixture(scope="module")
def pipe():
    return TextToVideoPipeline.embedded_default()


@pytest.fixture(scope="module")
def videos(pipe):
    """The embedded default: red, switched to blue at chunk 3, with a re-cache and with a cut; and red
    throughout (no switch)."""
    schedule = [(3, BLUE)]
    recached = pipe.generate(RED, FRAMES, seed=0, prompt_schedule=schedule)[0]
    stats = {}  # a callable polled per chunk: BLUE from chunk 3 on (the same prompt again is no switch)
    live = lambda chunk: BLUE if chunk >= 3 else None  # noqa: E731
    cut = pipe.generate(RED, FRAMES, seed=0, stats=stats, prompt_schedule=live, recache_chunks=0)
    assert stats["switches"] == [(3, [BLUE])]
    return recached, cut[0], pipe.generate(RED, FRAMES, seed=0)[0]


def object_colour(frames: np.ndarray) -> np.ndarray:
    """The median RGB of the object's interior pixels over frames [F, H, W, 3] (`prompt_following`'s
    reading of the object: pixels far from the clip's median colour, the largest component)."""
    median = np.median(frames[:, ::2, ::2].reshape(-1, 3), axis=0).astype(np.float32)
    pixels = []
    for frame, mask in zip(frames, prompt_following.object_masks(prompt_following.distances(frames, median))):
        pixels.append(frame[ndimage.binary_erosion(prompt_following.largest_component(mask))])
    return np.median(np.concatenate(pixels), axis=0)


def _distances(rgb: np.ndarray) -> dict[str, float]:  # to the renderer's red and blue
    return {name: float(np.linalg.norm(rgb - np.asarray(COLOURS[name], np.float32))) for name in ("red", "blue")}


def test_switch_to_blue_on_the_embedded_default(videos):
    """Red before the switch; after it, a cut turns the object blue (a new stream from chunk 3 on: its
    window holds only blue-prompted chunks). The re-cache keeps the stream's red-prompted latents in
    the window and the sink (the stream's first chunk), and this model, trained on one prompt per
    clip, continues them: the object's colour is the unswitched stream's (RGB within 40; this
    model's red warms towards orange past frame 33 either way), nowhere near blue."""
    recached, cut, red = videos
    before = _distances(object_colour(recached[:33]))
    assert before["red"] < 40 < before["blue"], before
    after_cut = _distances(object_colour(cut[45:]))
    assert after_cut["blue"] < 60 < after_cut["red"], after_cut
    after_recache, unswitched = object_colour(recached[33:]), object_colour(red[33:])
    print(f"object colour: before {before}; after a cut {after_cut}; after a re-cache {after_recache}, unswitched {unswitched}")
    assert np.linalg.norm(after_recache - unswitched) < 40, (after_recache, unswitched)  # the object it holds goes on
    assert _distances(after_recache)["blue"] > 200, after_recache


def test_pipeline_schedule_is_checked_before_model_work(pipe, monkeypatch):
    def no_models(*a, **k):
        raise AssertionError("the model ran before the schedule was checked")

    monkeypatch.setattr(pipe, "encode_prompts", no_models)
    bad = [
        (dict(prompt_schedule=[(0, BLUE)]), "chunk 0 is not a later chunk of this video: it has 5 latent chunks"),
        (dict(prompt_schedule=[(5, BLUE)]), "switches go at chunks 1 .. 4"),
        (dict(prompt_schedule=[(3, BLUE), (2, RED)]), "chunk indices must increase, got 2 after 3"),
        (dict(prompt_schedule=[(3, BLUE), (3, RED)]), "must increase"),
        (dict(prompt_schedule=[(2, "  ")]), "at chunk 2: a prompt must be a non-empty string"),
        (dict(prompt_schedule=[(2.0, BLUE)]), "a chunk index must be an int"),
        (dict(prompt_schedule=[(2, BLUE, RED)]), "entries are (chunk index, prompt) pairs"),
        (dict(prompt_schedule=BLUE), "must be (chunk index, prompt) pairs or a callable"),
        (dict(prompt_schedule=[(2, BLUE)], recache_chunks=3), "recache_chunks must be an int in [0, 1]"),  # sink + 1 chunk
        (dict(prompt_schedule=[(2, BLUE)], recache=False, recache_chunks=1), "recache_chunks needs a prompt_schedule"),
        (dict(recache_chunks=1), "recache_chunks needs a prompt_schedule"),
        (dict(prompt_schedule=[(2, BLUE)], recache="yes"), "recache must be True or False"),
    ]
    for kw, msg in bad:
        with pytest.raises(ValueError, match=re.escape(msg)):
            next(pipe.stream(RED, FRAMES, **kw))
    assert switch_prompts(BLUE, 2, "x") == [BLUE, BLUE]
    assert prompt_switches([(1, [RED, BLUE])], 2, 2) == {1: [RED, BLUE]}
    with pytest.raises(ValueError, match="or 2 of them, one per video"):
        switch_prompts([BLUE], 2, "x")


# ------------------------------------------------------------------------------------------ CLI
def test_cli_switch_gives_the_python_api_frames(pipe, videos, tmp_path, monkeypatch, capsys):
    """`generate --switch 3:PROMPT --recache-chunks 0` writes the frames `pipe.generate` gives for
    that schedule (the same seed; the frames as handed to the mp4 writer) and a playable mp4. The CLI
    passes (chunk, prompt) pairs, the fixture a callable polled per chunk: the two forms agree."""
    from causal_dit_jax.app import cli, video
    from causal_dit_jax.app.conditioning import read_video

    written = []

    class Recording(video.Mp4Writer):
        def write(self, frames):
            written.append(np.asarray(frames))
            super().write(frames)

    monkeypatch.setattr(video, "Mp4Writer", Recording)
    monkeypatch.setattr(TextToVideoPipeline, "embedded_default", lambda *a, **k: pipe)  # compiled already
    out = tmp_path / "switch.mp4"
    argv = ["generate", "--prompt", RED, "--switch", f"3:{BLUE}", "--recache-chunks", "0", "--frames", str(FRAMES)]
    assert cli.main([*argv, "--out", str(out)]) == 0
    assert "prompt switches (a cut): chunk 3: 'a blue square moving right'" in capsys.readouterr().out
    np.testing.assert_array_equal(np.concatenate(written), videos[1])
    assert read_video(out).shape == (FRAMES, 128, 192, 3)


@pytest.mark.parametrize(
    "args,msg",
    [
        (["--switch", "3"], "--switch takes CHUNK:PROMPT"),
        (["--switch", "x:a blue square"], "--switch takes CHUNK:PROMPT"),
        (["--switch", "0:a blue square"], "--switch: chunk 0 is not a later chunk of this video: it has 3 latent chunks"),
        (["--switch", "3:a blue square"], "switches go at chunks 1 .. 2"),
        (["--switch", "2:a blue square", "--switch", "1:a red square"], "must increase, got 1 after 2"),
        (["--switch", "2:  "], "--switch at chunk 2: a prompt must be a non-empty string"),
        (["--no-recache"], "give a --switch"),
        (["--recache-chunks", "1"], "give a --switch"),
        (["--switch", "2:b", "--no-recache", "--recache-chunks", "1"], "give one of them"),
    ],
)
def test_cli_refuses_bad_switches_before_model_work(args, msg, tmp_path, capsys, monkeypatch):
    from causal_dit_jax.app import cli

    def no_models(*a, **k):
        raise AssertionError("models were built before the input was checked")

    monkeypatch.setattr(TextToVideoPipeline, "embedded_default", no_models)
    assert cli.main(["generate", "--prompt", RED, "--frames", "33", "--out", str(tmp_path / "x.mp4"), *args]) == 2
    assert msg in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []
