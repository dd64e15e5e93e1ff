"""Prompt following: clips of the procedural world read back to their labels (clean, at two sizes and
two lengths, straddling the torus's edges, and degraded as a generator's output is), balanced prompt
pairs, the scoring of a generator, and the benchmark script end to end on the random-weights pipeline."""

import collections
import dataclasses
import importlib.util
import itertools
import json
import pathlib

import numpy as np
import pytest
from scipy import ndimage

from causal_dit_jax.bench.prompt_following import (
    ATTRIBUTES,
    PromptPair,
    evaluate,
    format_table,
    largest_component,
    prompt_pairs,
    read_clip,
)
from causal_dit_jax.train.procedural import BACKGROUNDS, COLOURS, DIRECTIONS, SHAPES, ClipLabels, parse_caption, render_clip

ROOT = pathlib.Path(__file__).resolve().parents[1]
EVERY_LABEL = [ClipLabels(*c) for c in itertools.product(COLOURS, SHAPES, DIRECTIONS, BACKGROUNDS)]  # 216


def _degrade(clip: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A generator's flaws: a 3x3 box blur (on the torus), a colour shift of +-15 per channel (one per
    clip), gaussian noise of sigma 12 grey levels, clipped to uint8."""
    x = ndimage.uniform_filter(clip.astype(np.float32), size=(1, 3, 3, 1), mode="wrap")
    x += rng.uniform(-15, 15, 3).astype(np.float32)
    x += 12 * rng.standard_normal(x.shape, dtype=np.float32)
    return np.clip(np.rint(x), 0, 255).astype(np.uint8)


def _straddles(clip: np.ndarray, labels: ClipLabels) -> bool:
    """Whether the object lies across an edge of the torus in some frame."""

    def shown(edge):  # edge [F, N, 3] -> bool [F, N]: object pixels
        return np.abs(edge.astype(int) - BACKGROUNDS[labels.background]).sum(-1) > 60

    rows = shown(clip[:, 0]) & shown(clip[:, -1])
    return bool(rows.any() or (shown(clip[:, :, 0]) & shown(clip[:, :, -1])).any())


def _accuracy(reads: list[tuple[ClipLabels, dict]]) -> dict[str, float]:
    return {a: float(np.mean([got[a] == getattr(want, a) for want, got in reads])) for a in ATTRIBUTES}


def _read_all(frames: int, height: int, width: int, seed: int, degraded: bool = False) -> dict:
    """Every label combination rendered from a random start and read: {'clean': [(labels, read)],
    'degraded': [...] (when asked), 'straddling': clips across an edge}."""
    rng = np.random.default_rng(seed)
    out = collections.defaultdict(list)
    for labels in EVERY_LABEL:
        clip = render_clip(labels, frames, height, width, rng)
        out["clean"].append((labels, read_clip(clip)))
        if degraded:
            out["degraded"].append((labels, read_clip(_degrade(clip, rng))))
        out["straddling"].append(_straddles(clip, labels))
    return out


@pytest.fixture(scope="module")
def reads_128x192():
    """The 216 clips at 128x192, 33 frames, each read clean and degraded (rendered once)."""
    return _read_all(33, 128, 192, seed=0, degraded=True)


@pytest.mark.slow
def test_reads_every_label_at_128x192(reads_128x192):
    # tolerance: none, every label of every clip read right (the clips are exact renders)
    assert np.mean(reads_128x192["straddling"]) > 0.5  # most clips cross an edge of the torus
    assert _accuracy(reads_128x192["clean"]) == dict.fromkeys(ATTRIBUTES, 1.0)


@pytest.mark.parametrize("frames, height, width", [(33, 64, 96), (9, 128, 192), (9, 64, 96)])
def test_reads_every_label_at_other_sizes_and_lengths(frames, height, width):
    # tolerance: none; 9 frames move the object 1/8 of the frame, still over the motion threshold
    reads = _read_all(frames, height, width, seed=1)
    assert np.mean(reads["straddling"]) > 0.25
    assert _accuracy(reads["clean"]) == dict.fromkeys(ATTRIBUTES, 1.0)


@pytest.mark.slow
def test_reads_degraded_clips(reads_128x192):
    # tolerance: >= 0.95 of the clips per attribute (noise, blur and a colour shift may cost a few)
    accuracy = _accuracy(reads_128x192["degraded"])
    assert all(v >= 0.95 for v in accuracy.values()), accuracy


@pytest.mark.parametrize("background", list(BACKGROUNDS))
def test_blank_clip_reads_no_object(background):
    # exact: a background alone has no colour, shape or direction, clean or noisy
    blank = np.broadcast_to(np.asarray(BACKGROUNDS[background], np.uint8), (9, 64, 96, 3))
    noisy = _degrade(blank, np.random.default_rng(0))
    for clip in (blank, noisy):
        assert read_clip(clip) == {"colour": None, "shape": None, "direction": None, "background": background}


def test_noise_reads_nothing():
    # exact: uniform noise (an untrained generator's output) has no plain background, so nothing is read
    rng = np.random.default_rng(0)
    for clip in (rng.integers(0, 256, (9, 64, 96, 3), dtype=np.uint8), rng.integers(0, 256, (1, 4, 4, 3), dtype=np.uint8)):
        assert read_clip(clip) == dict.fromkeys(ATTRIBUTES)
    with pytest.raises(ValueError, match="F, H, W, 3"):
        read_clip(np.zeros((9, 64, 96), np.uint8))


def test_largest_component_joins_across_the_edges():
    # exact: a 6x6 square over the four corners (pieces of 6, 12, 6 and 12 pixels) is one component of
    # 36, larger than a 5x5 blob in the middle that beats each piece alone
    mask = np.zeros((20, 30), bool)
    mask[np.arange(-3, 3)[:, None], np.arange(-2, 4)[None, :]] = True  # rows 17..2, columns 28..3
    mask[8:13, 12:17] = True
    assert largest_component(mask).sum() == 36 and not largest_component(mask)[10, 14]


def test_stray_blob_is_ignored():
    # exact: a 6x6 blob of another colour, away from the object's path, does not change the read
    labels = ClipLabels("orange", "triangle", "down", "white")
    clip = render_clip(labels, 17, 128, 192, np.random.default_rng(2))
    assert read_clip(clip) == dataclasses.asdict(labels)
    columns = np.nonzero((clip[0] != 255).any(axis=(0, 2)))[0]  # the object's columns (it moves down)
    x = int(np.mean(columns) + 96) % 192 if columns.max() - columns.min() < 96 else 96  # the opposite side
    clip[:, 60:66, max(x - 3, 0) : x + 3] = COLOURS["blue"]
    assert read_clip(clip) == dataclasses.asdict(labels)


def test_still_object_has_no_direction():
    # exact: a clip of one frame repeated shows the object but no motion
    clip = render_clip(ClipLabels("blue", "square", "left", "white"), 1, 64, 96, np.random.default_rng(0))
    got = read_clip(np.repeat(clip, 9, axis=0))
    assert got == {"colour": "blue", "shape": "square", "direction": None, "background": "white"}


def test_prompt_pairs_balanced_deterministic_and_parse_back():
    pairs = prompt_pairs(48)
    assert len(pairs) == 48 and pairs == prompt_pairs(48) and pairs != prompt_pairs(48, seed=1)
    for name, values in (("colour", COLOURS), ("shape", SHAPES), ("direction", DIRECTIONS), ("background", BACKGROUNDS)):
        counts = collections.Counter(getattr(p.labels, name) for p in pairs)
        assert counts == dict.fromkeys(values, 48 // len(values)), name  # exact: 48 divides evenly
    for p in pairs:  # the grammar's own words, the background named or (black only) left out
        assert p.prompt in (p.labels.caption(), f"{p.labels.caption()} on a black background"), p.prompt
        assert parse_caption(p.prompt) == dataclasses.asdict(p.labels), p.prompt
    blacks = [p.prompt for p in pairs if p.labels.background == "black"]
    assert any("background" in b for b in blacks) and any("background" not in b for b in blacks)  # both forms
    assert 1 < len({p.seed for p in pairs}) < 48  # seeds vary, shared by runs of pairs (one batch each)
    for n in (7, 50):  # uneven: every value n / len(values) times, +-1
        odd = prompt_pairs(n)
        for name, values in (("colour", COLOURS), ("shape", SHAPES), ("direction", DIRECTIONS)):
            counts = collections.Counter(getattr(p.labels, name) for p in odd)
            assert all(abs(counts[v] - n / len(values)) <= 1 for v in values), (n, name, counts)


def _render_fake(labels_of):
    """A fake generate: each prompt rendered with the labels `labels_of(prompt)`; logs its calls."""
    calls = []

    def generate(prompts, seed, frames, height, width):
        calls.append((len(prompts), seed))
        rng = np.random.default_rng(seed)
        return np.stack([render_clip(labels_of(p), frames, height, width, rng) for p in prompts])

    return generate, calls


def test_evaluate_a_perfect_generator():
    pairs = prompt_pairs(20)
    generate, calls = _render_fake(lambda prompt: ClipLabels(**parse_caption(prompt)))
    result = evaluate(generate, pairs, 9, 64, 96, batch=3, progress=False)
    assert result["accuracy"] == {**dict.fromkeys(ATTRIBUTES, 1.0), "all": 1.0}  # exact
    assert result["pairs"] == 20 and [r["prompt"] for r in result["records"]] == [p.prompt for p in pairs]
    assert result["records"][0]["want"] == dataclasses.asdict(pairs[0].labels) == result["records"][0]["got"]
    # grouped by seed, at most 3 prompts a call, every pair once
    by_seed = collections.Counter(p.seed for p in pairs)
    assert all(n <= 3 for n, _ in calls) and sum(n for n, _ in calls) == 20
    assert {s: sum(n for n, t in calls if t == s) for s in by_seed} == by_seed
    assert json.loads(json.dumps(result)) == result  # plain JSON


def test_evaluate_a_generator_that_ignores_the_prompt():
    fixed = ClipLabels("green", "square", "up")
    pairs = prompt_pairs(24) + [PromptPair(fixed.caption(), 5, fixed)]  # one pair it gets right
    generate, _ = _render_fake(lambda prompt: fixed)
    result = evaluate(generate, pairs, 9, 64, 96, progress=False)
    want = {a: np.mean([getattr(p.labels, a) == getattr(fixed, a) for p in pairs]) for a in ATTRIBUTES}
    want["all"] = np.mean([p.labels == fixed for p in pairs])
    assert result["accuracy"] == pytest.approx(want, abs=1e-12)  # exact fractions of matching pairs
    assert 0 < want["colour"] < 1 and want["all"] == 1 / 25  # only the pair added matches all four


def test_evaluate_refuses_a_wrong_shape():
    with pytest.raises(ValueError, match="expected"):
        evaluate(lambda p, s, f, h, w: np.zeros((len(p), f, h, w + 1, 3), np.uint8), prompt_pairs(2), 9, 64, 96, progress=False)


def test_format_table():
    result = {"accuracy": {"colour": 1.0, "shape": 0.5, "direction": 0.25, "background": 1.0, "all": 0.125}, "pairs": 8}
    table = format_table({"random": result, "runs/step_4000": result}).splitlines()
    assert len(table) == 3 and all(c in table[0] for c in (*ATTRIBUTES, "all"))
    assert table[2].startswith("runs/step_4000") and "100.0%" in table[1] and "12.5%" in table[1]


def test_script_end_to_end_on_random_weights(tmp_path):
    # the random-weights pipeline on CPU (well under a minute): structure and ranges, not the scores
    spec = importlib.util.spec_from_file_location(
        "evaluate_prompt_following", ROOT / "benchmarks" / "evaluate_prompt_following.py"
    )
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    path = tmp_path / "out" / "prompt_following.json"
    argv = ["--model", "random", "--pairs", "2", "--frames", "9", "--height", "64", "--width", "96", "--quiet"]
    record = script.main([*argv, "--json", str(path)])
    written = json.loads(path.read_text())
    assert written == record and list(path.parent.iterdir()) == [path]  # moved into place, no partial left
    assert written["settings"]["denoising_steps"] == [1000, 750, 500, 250]
    result = written["results"]["random"]
    assert result["pairs"] == 2 and len(result["records"]) == 2
    assert set(result["accuracy"]) == {*ATTRIBUTES, "all"} and all(0 <= v <= 1 for v in result["accuracy"].values())
    for r in result["records"]:
        assert set(r) == {"prompt", "seed", "want", "got"} and set(r["got"]) == set(ATTRIBUTES)
    with pytest.raises(SystemExit):
        script.parse_args(["--model", "random", "--denoising-steps", "1000,x"])


def test_script_references_rendered_and_through_the_vae():
    """'rendered' (the prompt's own clip) reads back exactly; 'vae' (that clip encoded and decoded by
    the embedded default's VAE, `decode_latents`) gives frames of the clip's size that stay close to
    it (mean abs error under 12 of 255) and read as their prompt's colour."""
    spec = importlib.util.spec_from_file_location(
        "evaluate_prompt_following", ROOT / "benchmarks" / "evaluate_prompt_following.py"
    )
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    from causal_dit_jax.model.config import InferenceConfig

    pairs = prompt_pairs(4)
    rendered = evaluate(script.load_generate("rendered", InferenceConfig()), pairs, 17, 128, 192, progress=False)
    assert rendered["accuracy"] == {**dict.fromkeys(ATTRIBUTES, 1.0), "all": 1.0}
    prompts = [p.prompt for p in pairs]
    clips = script.load_generate("rendered", InferenceConfig())(prompts, 3, 17, 128, 192)
    through = script.load_generate("vae", InferenceConfig())(prompts, 3, 17, 128, 192)
    assert through.shape == clips.shape == (4, 17, 128, 192, 3) and through.dtype == np.uint8
    assert np.mean(np.abs(through.astype(np.float32) - clips)) < 12
    assert [read_clip(v)["colour"] for v in through] == [p.labels.colour for p in pairs]
    package = ROOT / "causal_dit_jax" / "embedded_default"
    named = script.load_generate(f"vae:{package}", InferenceConfig())(prompts, 3, 17, 128, 192)
    np.testing.assert_array_equal(named, through)  # an exported folder's VAE: here the package's own
    with pytest.raises(ValueError, match="not an exported model folder"):
        script.load_generate(f"vae:{ROOT / 'recipes'}", InferenceConfig())


def test_vae_long_drift_script_reads_each_window(tmp_path):
    """benchmarks/vae_long_drift.py on the embedded default within the clip length it trained on
    (25 frames, 4 pairs, windows of 8): every window of the round trip reads as its prompt's colour
    (`read_clip`, exact); the JSON holds the same table; a clip shorter than a window is refused."""
    spec = importlib.util.spec_from_file_location("vae_long_drift", ROOT / "benchmarks" / "vae_long_drift.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    out = tmp_path / "drift.json"
    result = script.main(["--pairs", "4", "--frames", "25", "--window", "8", "--json", str(out)])
    assert result["colour_by_window"] == {"0": 1.0, "8": 1.0, "16": 1.0}  # three whole windows of 8 in 25 frames
    assert json.loads(out.read_text())["colour_by_window"] == result["colour_by_window"]
    with pytest.raises(SystemExit):
        script.main(["--frames", "21", "--window", "32"])
