"""The grain training data pipeline: sources, batches, seeds, shards, epochs, exact resume, errors."""

import json
import pathlib
import subprocess
import sys

import grain
import numpy as np
import pytest

from causal_dit_jax.app.video import Mp4Writer
from causal_dit_jax.train.data import (
    DataIterator,
    LatentTextSource,
    PromptListSource,
    VideoCaptionSource,
    iterate,
    make_dataset,
    write_latent_text_example,
)

LATENT, TEXT = (3, 4, 6, 16), (8, 32)


def latent_folder(folder: pathlib.Path, n: int, seed: int = 0) -> list[dict]:
    """n fresh random examples written in a shuffled order; returns them in file (index) order."""
    rng = np.random.default_rng(seed)
    records = [
        {"latents": rng.standard_normal(LATENT).astype(np.float32), "text": rng.standard_normal(TEXT).astype(np.float32)}
        for _ in range(n)
    ]
    for i in rng.permutation(n):
        write_latent_text_example(folder, int(i), records[i]["latents"], records[i]["text"], caption=f"clip {i}")
    return records


def record_ids(batch: dict, records: list[dict]) -> list[int]:
    """Which record each batch row is (exact match of latents and text), checking it matches one."""
    ids = []
    for lat, txt in zip(batch["latents"], batch["text"]):
        hits = [i for i, r in enumerate(records) if np.array_equal(r["latents"], lat)]
        assert len(hits) == 1, "a batch row equals no record (or several)"
        np.testing.assert_array_equal(txt, records[hits[0]]["text"])
        ids.append(hits[0])
    return ids


def take(it, n: int) -> list[dict]:
    return [next(it) for _ in range(n)]


@pytest.fixture(scope="module")
def latents12(tmp_path_factory):
    folder = tmp_path_factory.mktemp("latents12")
    return folder, latent_folder(folder, 12)


def order(folder, records, n_batches, **kw) -> list[int]:
    kw = {"batch_size": 3, "seed": 0, **kw}
    it = iterate(make_dataset(LatentTextSource(folder), **kw))
    return [i for b in take(it, n_batches) for i in record_ids(b, records)]


# ---------------------------------------------------------------------------------------------------
# sources and batches
# ---------------------------------------------------------------------------------------------------


def test_write_example_is_atomic_and_round_trips(tmp_path):
    lat = np.random.default_rng(1).standard_normal(LATENT).astype(np.float16)
    txt = np.random.default_rng(2).standard_normal(TEXT)  # float64 -> stored float32
    path = write_latent_text_example(tmp_path / "new", 7, lat, txt, caption="a red fox")
    assert path == (tmp_path / "new" / "00000007.npz").absolute()
    assert sorted(p.name for p in path.parent.iterdir()) == ["00000007.npz"]  # no temporary file left
    with np.load(path) as f:
        assert f["latents"].dtype == np.float16 and f["text"].dtype == np.float32 and str(f["caption"]) == "a red fox"
    rec = LatentTextSource(path.parent)[0]
    assert rec["latents"].dtype == np.float32 and rec["text"].dtype == np.float32
    np.testing.assert_array_equal(rec["latents"], lat.astype(np.float32))
    np.testing.assert_allclose(rec["text"], txt, rtol=1e-6)
    with pytest.raises(ValueError, match=r"latents must be float \[F, H, W, C\]"):
        write_latent_text_example(tmp_path, 0, np.zeros((3, 4, 6)), txt)


def test_batches_stack_the_files(latents12):
    folder, records = latents12
    src = LatentTextSource(folder)
    assert len(src) == 12 and src.shapes == {"latents": LATENT, "text": TEXT}
    it = iterate(make_dataset(src, batch_size=4, seed=3, shuffle=False, num_epochs=1))
    batches = list(it)
    assert len(batches) == 3
    for k, b in enumerate(batches):
        assert set(b) == {"latents", "text"}
        assert b["latents"].shape == (4, *LATENT) and b["latents"].dtype == np.float32
        assert b["text"].shape == (4, *TEXT) and b["text"].dtype == np.float32
        # unshuffled: the files in sorted (index) order, though they were written in another order
        assert record_ids(b, records) == list(range(4 * k, 4 * k + 4))


def test_transform_is_applied_per_record(latents12):
    folder, records = latents12

    def transform(rec):
        return {"latents": rec["latents"] * 2.0, "mean_text": rec["text"].mean()}

    b = next(iterate(make_dataset(LatentTextSource(folder), 3, seed=0, shuffle=False, transform=transform)))
    assert b["mean_text"].shape == (3,)
    for i in range(3):
        np.testing.assert_array_equal(b["latents"][i], records[i]["latents"] * 2.0)
        np.testing.assert_allclose(b["mean_text"][i], records[i]["text"].mean(), rtol=1e-6)


def test_prompt_list_source(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text("# comment\na red fox\n\n  a lighthouse at dusk  \n#another\nthe sea\n", encoding="utf-8")
    src = PromptListSource(path)
    assert [src[i]["prompt"] for i in range(len(src))] == ["a red fox", "a lighthouse at dusk", "the sea"]
    b = next(iterate(make_dataset(src, 2, seed=0, shuffle=False)))
    assert b["prompt"].tolist() == ["a red fox", "a lighthouse at dusk"]


def write_video(path: pathlib.Path, frames: int, value: int, size=(32, 48), caption: str | None = "x"):
    with Mp4Writer(path) as w:
        w.write(np.full((frames, *size, 3), value, np.uint8))
    if caption is not None:
        path.with_suffix(".txt").write_text(caption + "\n", encoding="utf-8")


def test_video_caption_source(tmp_path):
    write_video(tmp_path / "a.mp4", 6, 60, caption="dark clip")
    write_video(tmp_path / "b.mp4", 5, 190, caption="bright clip")
    src = VideoCaptionSource(tmp_path, num_frames=4, height=32, width=48)
    assert len(src) == 2
    b = next(iterate(make_dataset(src, 2, seed=0, shuffle=False)))
    assert b["frames"].shape == (2, 4, 32, 48, 3) and b["frames"].dtype == np.uint8
    assert abs(b["frames"][0].mean() - 60) < 4 and abs(b["frames"][1].mean() - 190) < 4  # lossy mp4
    assert b["caption"].tolist() == ["dark clip", "bright clip"]


# ---------------------------------------------------------------------------------------------------
# order: seeds, shards, epochs
# ---------------------------------------------------------------------------------------------------


def test_seed_fixes_the_order(latents12):
    folder, records = latents12
    a = order(folder, records, 4, seed=5)
    assert sorted(a) == list(range(12))  # one epoch: a permutation
    assert a != list(range(12))  # shuffled
    assert order(folder, records, 4, seed=5) == a  # same seed: same order
    assert order(folder, records, 4, seed=6) != a  # another seed: another order
    # the shuffle is grain's: seeds are mixed, so seed 6's first epoch is not seed 5's second one
    assert order(folder, records, 4, seed=6) != order(folder, records, 8, seed=5)[12:]


def test_epochs_reshuffle(latents12):
    folder, records = latents12
    finite = order(folder, records, 8, seed=1, num_epochs=2)
    it = iterate(make_dataset(LatentTextSource(folder), 3, seed=1, num_epochs=2))
    take(it, 8)
    with pytest.raises(StopIteration):  # num_epochs=2: 8 batches of 3, then the end
        next(it)
    forever = order(folder, records, 12, seed=1)  # num_epochs=None: goes on
    assert forever[:24] == finite
    epochs = [forever[12 * e : 12 * (e + 1)] for e in range(3)]
    for ep in epochs:
        assert sorted(ep) == list(range(12))
    assert epochs[0] != epochs[1] and epochs[1] != epochs[2] and epochs[0] != epochs[2]


@pytest.mark.parametrize("shard_count,batch_size,drop_remainder", [(3, 2, True), (5, 1, False), (2, 4, False)])
def test_shards_are_disjoint_and_cover(latents12, shard_count, batch_size, drop_remainder):
    folder, records = latents12
    src = LatentTextSource(folder)
    seen = []
    for shard in range(shard_count):
        ds = make_dataset(src, batch_size, seed=2, shard_index=shard, shard_count=shard_count, drop_remainder=drop_remainder)
        assert ds.records == len(range(shard, 12, shard_count))
        batches = take(iterate(ds), 2 * ds.batches_per_epoch)
        ids = [i for b in batches for i in record_ids(b, records)]
        first, second = ids[: ds.records], ids[ds.records :]
        assert sorted(first) == sorted(second) == list(range(shard, 12, shard_count))  # the same shard each epoch
        if not drop_remainder and ds.records % batch_size:
            assert len(batches[ds.batches_per_epoch - 1]["latents"]) == ds.records % batch_size  # a short last batch
        seen += first
    assert sorted(seen) == list(range(12))  # disjoint, and every record exactly once per epoch


# ---------------------------------------------------------------------------------------------------
# exact resume
# ---------------------------------------------------------------------------------------------------


class Jitter(grain.transforms.RandomMap):
    """A random per-record transform: resume must reproduce its draws too."""

    def random_map(self, rec, rng):
        return {**rec, "noise": rng.standard_normal(2).astype(np.float32)}


def resume_dataset(folder):
    # 7 records, batches of 2: 3 batches an epoch, so 10 batches cross three epoch boundaries
    return make_dataset(LatentTextSource(folder), 2, seed=11, transform=Jitter())


def assert_same_batches(got, want):
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert set(g) == set(w)
        for k in w:
            np.testing.assert_array_equal(g[k], w[k])


def test_exact_resume(tmp_path):
    latent_folder(tmp_path, 7)
    whole = take(iterate(resume_dataset(tmp_path)), 10)
    assert not np.array_equal(whole[0]["noise"], whole[3]["noise"])  # the transform draws anew

    it = iterate(resume_dataset(tmp_path))
    assert_same_batches(take(it, 5), whole[:5])
    state = json.loads(json.dumps(it.get_state()))  # what Orbax's JsonSave / JsonRestore do
    it.close()

    fresh = iterate(resume_dataset(tmp_path))
    assert isinstance(fresh, DataIterator)
    fresh.set_state(state)
    assert_same_batches(take(fresh, 5), whole[5:10])


RESUME_SCRIPT = """
import json, sys
import numpy as np
sys.path.insert(0, {tests!r})
from test_train_data import resume_dataset
from causal_dit_jax.train.data import iterate
it = iterate(resume_dataset({folder!r}))
it.set_state(json.load(open({state!r})))
batches = [next(it) for _ in range(3)]
np.savez({out!r}, **{{f"{{k}}_{{i}}": b[k] for i, b in enumerate(batches) for k in b}})
"""


def test_exact_resume_in_a_fresh_process(tmp_path):
    folder = tmp_path / "data"
    latent_folder(folder, 7, seed=4)
    whole = take(iterate(resume_dataset(folder)), 7)
    it = iterate(resume_dataset(folder))
    take(it, 4)
    (tmp_path / "state.json").write_text(json.dumps(it.get_state()))
    script = RESUME_SCRIPT.format(
        tests=str(pathlib.Path(__file__).parent),
        folder=str(folder),
        state=str(tmp_path / "state.json"),
        out=str(tmp_path / "out.npz"),
    )
    subprocess.run([sys.executable, "-c", script], check=True, timeout=120)
    with np.load(tmp_path / "out.npz") as f:
        got = [{k: f[f"{k}_{i}"] for k in whole[0]} for i in range(3)]
    assert_same_batches(got, whole[4:7])


def test_state_of_other_settings_is_refused(latents12):
    folder, _ = latents12
    state = json.loads(json.dumps(iterate(make_dataset(LatentTextSource(folder), 2, seed=0)).get_state()))
    with pytest.raises(ValueError, match=r"batch_size: saved 2, now 3"):
        iterate(make_dataset(LatentTextSource(folder), 3, seed=0)).set_state(state)
    with pytest.raises(ValueError, match=r"shard_count: saved 1, now 2"):
        iterate(make_dataset(LatentTextSource(folder), 2, seed=0, shard_count=2)).set_state(state)
    with pytest.raises(ValueError, match="not a data iterator state"):
        iterate(make_dataset(LatentTextSource(folder), 2, seed=0)).set_state({"next_index": 3})


# ---------------------------------------------------------------------------------------------------
# errors
# ---------------------------------------------------------------------------------------------------


def test_latent_folder_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"latent folder .*missing does not exist"):
        LatentTextSource(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("no npz here")
    with pytest.raises(FileNotFoundError, match=r"empty holds no \*\.npz files"):
        LatentTextSource(tmp_path / "empty")
    np.savez(tmp_path / "nokeys.npz", latents=np.zeros(LATENT, np.float32))
    with pytest.raises(ValueError, match=r"nokeys\.npz lacks \['text'\]"):
        LatentTextSource(tmp_path)


def test_mismatched_shapes_name_the_file(tmp_path):
    rng = np.random.default_rng(0)
    write_latent_text_example(tmp_path, 0, rng.standard_normal(LATENT), rng.standard_normal(TEXT))
    write_latent_text_example(tmp_path, 1, rng.standard_normal(LATENT), rng.standard_normal(TEXT))
    write_latent_text_example(tmp_path, 2, rng.standard_normal((3, 4, 8, 16)), rng.standard_normal(TEXT))
    src = LatentTextSource(tmp_path)  # construction checks only the first file
    src[1]
    with pytest.raises(
        ValueError, match=r"00000002\.npz: latents has shape \(3, 4, 8, 16\), but 00000000\.npz .* \(3, 4, 6, 16\)"
    ):
        src[2]
    it = iterate(make_dataset(src, 3, seed=0, shuffle=False))
    with pytest.raises(ValueError, match=r"00000002\.npz"):  # through grain's reading threads too
        next(it)


def test_video_errors(tmp_path):
    write_video(tmp_path / "a.mp4", 6, 100)
    write_video(tmp_path / "b.mp4", 3, 100)  # too short
    write_video(tmp_path / "c.mp4", 6, 100, size=(48, 32))  # portrait: wrong size
    src = VideoCaptionSource(tmp_path, num_frames=4, height=32, width=48)
    assert src[0]["frames"].shape == (4, 32, 48, 3)
    with pytest.raises(ValueError, match=r"b\.mp4 has only 3 frames, 4 are needed"):
        src[1]
    with pytest.raises(ValueError, match=r"c\.mp4 is 48x32 \(height x width\), expected 32x48"):
        src[2]
    write_video(tmp_path / "d.mp4", 6, 100, caption=None)
    with pytest.raises(FileNotFoundError, match=r"d\.mp4 has no caption file d\.txt"):
        VideoCaptionSource(tmp_path, 4, 32, 48)
    with pytest.raises(FileNotFoundError, match=r"video folder .*none does not exist"):
        VideoCaptionSource(tmp_path / "none", 4, 32, 48)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=r"empty holds no \*\.mp4 files"):
        VideoCaptionSource(tmp_path / "empty", 4, 32, 48)


def test_prompt_file_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"prompts\.txt does not exist"):
        PromptListSource(tmp_path / "prompts.txt")
    (tmp_path / "prompts.txt").write_text("\n# only a comment\n   \n")
    with pytest.raises(ValueError, match=r"prompts\.txt holds no prompts"):
        PromptListSource(tmp_path / "prompts.txt")


def test_make_dataset_errors(latents12):
    src = LatentTextSource(latents12[0])  # 12 records
    with pytest.raises(ValueError, match="batch_size must be a positive int, got 0"):
        make_dataset(src, 0, seed=0)
    with pytest.raises(ValueError, match=r"shard_index must be in \[0, 3\) for shard_count=3, got 3"):
        make_dataset(src, 2, seed=0, shard_index=3, shard_count=3)
    with pytest.raises(ValueError, match=r"shard_index must be in \[0, 3\)"):
        make_dataset(src, 2, seed=0, shard_index=-1, shard_count=3)
    with pytest.raises(ValueError, match=r"shard 1 of 4 has 3 records \(of 12\), fewer than batch_size=4"):
        make_dataset(src, 4, seed=0, shard_index=1, shard_count=4)
    make_dataset(src, 4, seed=0, shard_index=1, shard_count=4, drop_remainder=False)  # a short batch is allowed
    with pytest.raises(ValueError, match="shard 12 of 13 is empty"):
        make_dataset(src, 1, seed=0, shard_index=12, shard_count=13, drop_remainder=False)
    with pytest.raises(ValueError, match="seed must be a non-negative int"):
        make_dataset(src, 2, seed=-1)
    with pytest.raises(ValueError, match="num_epochs"):
        make_dataset(src, 2, seed=0, num_epochs=0)
