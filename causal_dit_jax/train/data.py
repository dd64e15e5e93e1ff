"""Training data on grain: random-access sources, a sharded, shuffled, batched stream, and exact resume.

Sources (each a grain random-access source: `len(src)`, `src[i]` -> one record dict):

    LatentTextSource(folder)     *.npz with `latents` [F, H, W, C] and `text` [K, D] (precomputed)
                                 -> {"latents": f32 [F, H, W, C], "text": f32 [K, D]}
    VideoCaptionSource(folder, num_frames, height, width)
                                 *.mp4 + same-stem *.txt -> {"frames": u8 [T, H, W, 3], "caption": str}
    TextStateSource(folder)      *.npz with `text` [K, D] (latents, if any, are not read)
                                 -> {"text": f32 [K, D]}: the prompts of a distillation run
    PromptListSource(path)       one prompt a line -> {"prompt": str}

`make_dataset(source, batch_size, seed, ...)` builds the grain pipeline

    MapDataset.source -> slice [shard_index::shard_count] -> seed -> shuffle -> map(transform)
                      -> batch -> repeat(num_epochs) -> to_iter_dataset

and yields batches: dicts of numpy arrays stacked on a new leading axis B (string fields become numpy
str arrays [B] of dtype '<U…'; `.tolist()` gives Python strs). Every epoch is reshuffled (grain's
`repeat` reseeds the shuffle and any `grain.transforms.RandomMap` transform with the epoch).

Exact resume: `iterate(dataset)` returns a `DataIterator`; its `get_state()` is a small JSON dict (the
number of batches taken plus the pipeline settings it belongs to). Save it next to the train state,
e.g. `RunCheckpoints.save(step, state, data_state=it.get_state(), config=...)` (Orbax `JsonSave`); in
the resumed process build the same dataset, `it = iterate(dataset)`, `it.set_state(data_state)`, and
`next(it)` is the batch an uninterrupted run would have got next. A state saved under other settings
(batch size, seed, shards, record count, ...) is refused with a ValueError that names them.
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
import threading
import uuid
import zipfile
from collections.abc import Callable, Sequence
from typing import Any

import grain
import numpy as np

STATE_FORMAT = "causal_dit_jax.train.data/1"

# Default reading: 4 threads, 4 batches read ahead (grain's defaults, 16 threads and 500 elements, would
# hold 500 batches of video latents in memory).
DEFAULT_READ_OPTIONS = grain.ReadOptions(num_threads=4, prefetch_buffer_size=4)


def _folder(folder: str | os.PathLike, pattern: str, what: str) -> tuple[pathlib.Path, list[pathlib.Path]]:
    """The folder (which must exist) and its files matching `pattern` (at least one), sorted by name."""
    root = pathlib.Path(folder).expanduser().absolute()
    if not root.is_dir():
        raise FileNotFoundError(f"{what} folder {root} does not exist" + (" (it is a file)" if root.exists() else ""))
    files = sorted(p for p in root.glob(pattern) if p.is_file())
    if not files:
        raise FileNotFoundError(f"{what} folder {root} holds no {pattern} files")
    return root, files


def _positive_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return int(value)


# --------------------------------------------------------------------------------------------------
# Precomputed latents + text states
# --------------------------------------------------------------------------------------------------


def _is_float(dtype: np.dtype) -> bool:
    return np.issubdtype(dtype, np.floating) or dtype.name == "bfloat16"


def write_latent_text_example(
    folder: str | os.PathLike, index: int, latents: Any, text: Any, caption: str | None = None
) -> pathlib.Path:
    """Write FOLDER/{index:08d}.npz with `latents` [F, H, W, C], `text` [K, D] (and `caption`), atomically:
    written to a hidden temporary file in the same folder, then renamed into place. float16 is stored
    as float16, other floats (bf16, f64) as float32. Creates the folder if needed; returns the path."""
    if isinstance(index, bool) or not isinstance(index, (int, np.integer)) or index < 0:
        raise ValueError(f"index must be a non-negative int, got {index!r}")  # before any array work
    latents, text = np.asarray(latents), np.asarray(text)
    if latents.ndim != 4 or not _is_float(latents.dtype):
        raise ValueError(f"latents must be float [F, H, W, C], got {latents.dtype} {latents.shape}")
    if text.ndim != 2 or not _is_float(text.dtype):
        raise ValueError(f"text must be float [K, D], got {text.dtype} {text.shape}")
    if caption is not None and not isinstance(caption, str):
        raise ValueError(f"caption must be a str or None, got {type(caption).__name__}")
    arrays = {
        name: a if a.dtype in (np.float16, np.float32) else a.astype(np.float32)
        for name, a in (("latents", latents), ("text", text))
    }
    if caption is not None:
        arrays["caption"] = np.array(caption)  # '<U…' scalar: loads without pickle
    return _write_npz(folder, index, arrays)


def _write_npz(folder: str | os.PathLike, index: int, arrays: dict[str, np.ndarray]) -> pathlib.Path:
    """FOLDER/{index:08d}.npz, written to a hidden temporary file then renamed into place."""
    if isinstance(index, bool) or not isinstance(index, (int, np.integer)) or index < 0:
        raise ValueError(f"index must be a non-negative int, got {index!r}")
    root = pathlib.Path(folder).expanduser().absolute()
    root.mkdir(parents=True, exist_ok=True)
    path = root / f"{int(index):08d}.npz"
    tmp = root / f".{path.name}.partial-{uuid.uuid4().hex[:8]}"  # not *.npz: sources never list it
    try:
        with open(tmp, "wb") as fh:  # a file object: np.savez appends no suffix
            np.savez(fh, **arrays)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


# np.load parses each array's header with ast.literal_eval, which CPython 3.11 does not make safe for
# threads ("AST constructor recursion depth mismatch" under grain's reader threads): one read at a time.
_NPY_READ = threading.Lock()


class LatentTextSource:
    """Records {"latents": f32 [F, H, W, C], "text": f32 [K, D]} from FOLDER/*.npz (sorted by name).

    The first file fixes the keys' shapes; a later file of other shapes is an error when it is read.
    """

    KEYS = ("latents", "text")

    def __init__(self, folder: str | os.PathLike):
        self.folder, self.files = _folder(folder, "*.npz", "latent")
        first = self._load(self.files[0], check=False)
        if first["latents"].ndim != 4:
            raise ValueError(f"{self.files[0]}: latents must be [F, H, W, C], got shape {first['latents'].shape}")
        if first["text"].ndim != 2:
            raise ValueError(f"{self.files[0]}: text must be [K, D], got shape {first['text'].shape}")
        self.shapes = {k: first[k].shape for k in self.KEYS}  # e.g. latents (21, 60, 104, 16), text (512, 4096)

    def _load(self, path: pathlib.Path, check: bool = True) -> dict[str, np.ndarray]:
        try:
            with _NPY_READ, np.load(path, allow_pickle=False) as f:
                missing = [k for k in self.KEYS if k not in f.files]
                if missing:
                    raise ValueError(f"{path} lacks {missing} (it holds {f.files}; needs {list(self.KEYS)})")
                raw = {k: f[k] for k in self.KEYS}
        except (OSError, zipfile.BadZipFile, EOFError) as e:
            raise ValueError(f"{path} is not a readable .npz file: {e}") from e
        for k, a in raw.items():
            if not _is_float(a.dtype):
                raise ValueError(f"{path}: {k} must be a float array, got {a.dtype}")
            if check and a.shape != self.shapes[k]:
                raise ValueError(
                    f"{path}: {k} has shape {a.shape}, but {self.files[0].name} (the first file) has {self.shapes[k]}"
                )
        return {k: np.asarray(a, dtype=np.float32) for k, a in raw.items()}

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        return self._load(self.files[index])

    def __repr__(self) -> str:
        return f"LatentTextSource({str(self.folder)!r}, {len(self)} records, {self.shapes})"


NEGATIVE_TEXT_FILE = "negative_text.npy"  # beside the records: the negative prompt's states [K, D]


def write_text_example(folder: str | os.PathLike, index: int, text: Any, caption: str | None = None) -> pathlib.Path:
    """Write FOLDER/{index:08d}.npz with `text` [K, D] (and `caption`) alone, atomically: a record of
    `TextStateSource` (a prompt of a distillation run, which needs no video)."""
    text = np.asarray(text)
    if text.ndim != 2 or not _is_float(text.dtype):
        raise ValueError(f"text must be float [K, D], got {text.dtype} {text.shape}")
    if caption is not None and not isinstance(caption, str):
        raise ValueError(f"caption must be a str or None, got {type(caption).__name__}")
    arrays = {"text": text if text.dtype in (np.float16, np.float32) else text.astype(np.float32)}
    if caption is not None:
        arrays["caption"] = np.array(caption)
    return _write_npz(folder, index, arrays)


def write_negative_text(folder: str | os.PathLike, text: Any) -> pathlib.Path:
    """FOLDER/negative_text.npy: the negative prompt's text states [K, D] (float32), atomically; the
    teacher's classifier-free guidance reads it (not a record: sources list *.npz only)."""
    text = np.asarray(text)
    if text.ndim != 2 or not _is_float(text.dtype):
        raise ValueError(f"negative text must be float [K, D], got {text.dtype} {text.shape}")
    root = pathlib.Path(folder).expanduser().absolute()
    root.mkdir(parents=True, exist_ok=True)
    path = root / NEGATIVE_TEXT_FILE
    tmp = root / f".{path.name}.partial-{uuid.uuid4().hex[:8]}"
    try:
        with open(tmp, "wb") as fh:
            np.save(fh, text.astype(np.float32))
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


class TextStateSource:
    """Records {"text": f32 [K, D]} from FOLDER/*.npz (a `write_text_example` folder, or a latents
    folder whose latents are then not read): the prompts of a distillation run.

    latent_shape: the first file's latents [F, H, W] when it holds them (else None); negative_text:
    FOLDER/negative_text.npy [K, D] when present (else None)."""

    def __init__(self, folder: str | os.PathLike):
        self.folder, self.files = _folder(folder, "*.npz", "text-state")
        try:
            with _NPY_READ, np.load(self.files[0], allow_pickle=False) as f:
                if "text" not in f.files:
                    raise ValueError(f"{self.files[0]} lacks 'text' (it holds {f.files})")
                text = f["text"]
                self.latent_shape = tuple(f["latents"].shape[:3]) if "latents" in f.files else None
        except (OSError, zipfile.BadZipFile, EOFError) as e:
            raise ValueError(f"{self.files[0]} is not a readable .npz file: {e}") from e
        if text.ndim != 2 or not _is_float(text.dtype):
            raise ValueError(f"{self.files[0]}: text must be float [K, D], got {text.dtype} {text.shape}")
        self.shapes = {"text": text.shape}
        negative = self.folder / NEGATIVE_TEXT_FILE
        self.negative_text = None
        if negative.is_file():
            with _NPY_READ:
                self.negative_text = np.load(negative, allow_pickle=False).astype(np.float32)
            if self.negative_text.shape != text.shape:
                raise ValueError(f"{negative} has shape {self.negative_text.shape}, the records' text {text.shape}")

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        path = self.files[index]
        with _NPY_READ, np.load(path, allow_pickle=False) as f:
            if "text" not in f.files:
                raise ValueError(f"{path} lacks 'text' (it holds {f.files})")
            text = np.asarray(f["text"], np.float32)
        if text.shape != self.shapes["text"]:
            raise ValueError(
                f"{path}: text has shape {text.shape}, but {self.files[0].name} (the first file) has {self.shapes['text']}"
            )
        return {"text": text}

    def __repr__(self) -> str:
        return f"TextStateSource({str(self.folder)!r}, {len(self)} records, {self.shapes})"


# --------------------------------------------------------------------------------------------------
# Videos + captions
# --------------------------------------------------------------------------------------------------

# ffmpeg is started with an environment variable set for the spawn (see causal_dit_jax/ffmpeg.py); grain reads with
# several threads, so the set-and-restore is serialised.
_FFMPEG_SPAWN = threading.Lock()


class VideoCaptionSource:
    """Records {"frames": u8 [num_frames, height, width, 3], "caption": str} from FOLDER/*.mp4, each with
    a same-stem .txt caption: the video's first `num_frames` frames (decoded lazily, only those)."""

    def __init__(self, folder: str | os.PathLike, num_frames: int, height: int, width: int):
        self.num_frames = _positive_int("num_frames", num_frames)
        self.height = _positive_int("height", height)
        self.width = _positive_int("width", width)
        self.folder, self.files = _folder(folder, "*.mp4", "video")
        for video in self.files:
            if not video.with_suffix(".txt").is_file():
                raise FileNotFoundError(f"video {video} has no caption file {video.with_suffix('.txt').name}")

    def __len__(self) -> int:
        return len(self.files)

    def _frames(self, path: pathlib.Path) -> np.ndarray:
        import imageio.v2 as imageio

        from causal_dit_jax.ffmpeg import ffmpeg_without_preexec

        want = (self.height, self.width, 3)
        with _FFMPEG_SPAWN, ffmpeg_without_preexec():
            reader = imageio.get_reader(str(path), format="FFMPEG")
        try:
            w, h = reader.get_meta_data().get("size", (self.width, self.height))
            if (h, w) != (self.height, self.width):
                raise ValueError(f"{path} is {h}x{w} (height x width), expected {self.height}x{self.width}")
            frames = []
            for frame in reader:  # decodes only up to the frames taken
                if frame.shape != want:
                    raise ValueError(f"{path}: a frame has shape {frame.shape}, expected {want}")
                frames.append(np.asarray(frame))
                if len(frames) == self.num_frames:
                    break
        finally:
            reader.close()
        if len(frames) < self.num_frames:
            raise ValueError(f"{path} has only {len(frames)} frames, {self.num_frames} are needed")
        return np.stack(frames).astype(np.uint8, copy=False)  # [T, H, W, 3]

    def __getitem__(self, index: int) -> dict[str, Any]:
        path = self.files[index]
        caption = path.with_suffix(".txt").read_text(encoding="utf-8").strip()
        if not caption:
            raise ValueError(f"caption file {path.with_suffix('.txt')} is empty")
        return {"frames": self._frames(path), "caption": caption}

    def __repr__(self) -> str:
        return f"VideoCaptionSource({str(self.folder)!r}, {len(self)} videos, {self.num_frames}x{self.height}x{self.width})"


# --------------------------------------------------------------------------------------------------
# Prompts
# --------------------------------------------------------------------------------------------------


class PromptListSource:
    """Records {"prompt": str}: the lines of a text file, stripped; blank lines and '#' lines skipped."""

    def __init__(self, path: str | os.PathLike):
        self.path = pathlib.Path(path).expanduser().absolute()
        if not self.path.is_file():
            raise FileNotFoundError(
                f"prompt file {self.path} does not exist" + (" (it is a folder)" if self.path.exists() else "")
            )
        lines = (line.strip() for line in self.path.read_text(encoding="utf-8").splitlines())
        self.prompts = [line for line in lines if line and not line.startswith("#")]
        if not self.prompts:
            raise ValueError(f"prompt file {self.path} holds no prompts (only blank or '#' lines)")

    def __len__(self) -> int:
        return len(self.prompts)

    def __getitem__(self, index: int) -> dict[str, str]:
        return {"prompt": self.prompts[index]}

    def __repr__(self) -> str:
        return f"PromptListSource({str(self.path)!r}, {len(self)} prompts)"


# --------------------------------------------------------------------------------------------------
# The batched stream
# --------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class BatchedDataset:
    """What `make_dataset` returns. `grain_dataset` is the grain IterDataset of batches (iterate it
    directly for grain's own iterator); `iter()` / `iterate()` give a `DataIterator`.

    records: this shard's record count; batches_per_epoch: batches this shard yields per epoch.
    spec: the settings a saved iterator state must match (JSON-serialisable).
    """

    grain_dataset: grain.IterDataset
    records: int
    batches_per_epoch: int
    spec: dict[str, Any]

    def __iter__(self) -> DataIterator:
        return DataIterator(iter(self.grain_dataset), self.spec)


def make_dataset(
    source: Sequence | Any,
    batch_size: int,
    seed: int,
    *,
    shard_index: int = 0,
    shard_count: int = 1,
    shuffle: bool = True,
    num_epochs: int | None = None,
    transform: Callable[[Any], Any] | grain.transforms.Map | grain.transforms.RandomMap | None = None,
    drop_remainder: bool = True,
    read_options: grain.ReadOptions | None = None,
) -> BatchedDataset:
    """Batches of `batch_size` records of this host's shard of `source`.

    source: any random-access source (`len`, `[i]`), e.g. the classes above or a list.
    seed: non-negative int; seeds the shuffle (reshuffled every epoch) and a RandomMap transform.
    shard_index of shard_count: this host takes records shard_index, shard_index + shard_count, ...
        (shards are disjoint and together cover the source). Every host passes the same seed.
    num_epochs: None repeats forever.
    transform: per record, before batching: a callable or grain Map (grain's `map`), or a grain
        RandomMap (grain's `random_map`, seeded per record and epoch).
    drop_remainder: drop each epoch's last partial batch (keeps shapes fixed for jit); with False
        the last batch of an epoch may be smaller. Shards of unequal size (len % shard_count != 0) can
        give hosts different batches_per_epoch; with num_epochs set they then stop at different times.
    read_options: grain's reading threads / read-ahead (in batches); default DEFAULT_READ_OPTIONS.
    """
    batch_size = _positive_int("batch_size", batch_size)
    shard_count = _positive_int("shard_count", shard_count)
    if isinstance(shard_index, bool) or not isinstance(shard_index, (int, np.integer)):
        raise ValueError(f"shard_index must be an int, got {shard_index!r}")
    if not 0 <= shard_index < shard_count:
        raise ValueError(f"shard_index must be in [0, {shard_count}) for shard_count={shard_count}, got {shard_index}")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be a non-negative int, got {seed!r}")
    if num_epochs is not None:
        num_epochs = _positive_int("num_epochs (or None: forever)", num_epochs)
    if transform is not None and not (
        callable(transform) or isinstance(transform, (grain.transforms.Map, grain.transforms.RandomMap))
    ):
        raise ValueError(f"transform must be a callable, a grain Map or RandomMap, or None; got {type(transform).__name__}")
    try:
        total = len(source)
    except TypeError as e:
        raise ValueError(f"source must support len() and indexing, got {type(source).__name__}") from e
    if total < 1:
        raise ValueError(f"source {source!r} has no records")
    records = len(range(shard_index, total, shard_count))
    if records == 0:
        raise ValueError(f"shard {shard_index} of {shard_count} is empty: the source has only {total} records")
    if drop_remainder and records < batch_size:
        raise ValueError(
            f"shard {shard_index} of {shard_count} has {records} records (of {total}), fewer than batch_size={batch_size}: "
            "with drop_remainder=True it would yield no batches"
        )
    batches_per_epoch = records // batch_size if drop_remainder else -(-records // batch_size)

    ds = grain.MapDataset.source(source)
    ds = ds.slice(slice(int(shard_index), None, shard_count))  # this host's records
    ds = ds.seed(int(seed))  # grain derives the shuffle's and a RandomMap's seeds from it
    if shuffle:
        ds = ds.shuffle()
    if transform is not None:
        ds = ds.random_map(transform) if isinstance(transform, grain.transforms.RandomMap) else ds.map(transform)
    ds = ds.batch(batch_size, drop_remainder=drop_remainder)  # batched per epoch: no batch spans two
    ds = ds.repeat(num_epochs)  # reseeds the shuffle / random_map with each epoch
    spec = {
        "source": type(source).__name__,
        "records_in_source": int(total),
        "batch_size": batch_size,
        "seed": int(seed),
        "shard_index": int(shard_index),
        "shard_count": shard_count,
        "shuffle": bool(shuffle),
        "num_epochs": num_epochs,
        "drop_remainder": bool(drop_remainder),
    }
    return BatchedDataset(ds.to_iter_dataset(read_options or DEFAULT_READ_OPTIONS), records, batches_per_epoch, spec)


class DataIterator:
    """Iterator over a `BatchedDataset`'s batches with a JSON state for exact resume.

    get_state() -> {"format", "pipeline": the dataset's spec, "grain": grain's iterator state}
    set_state(state): continue right after the batch the state was taken at; the pipeline settings
    must match the saved ones.
    """

    def __init__(self, grain_iterator: grain.DatasetIterator, spec: dict[str, Any] | None = None):
        self._it = grain_iterator
        self.spec = dict(spec or {})

    def __iter__(self) -> DataIterator:
        return self

    def __next__(self) -> Any:
        return next(self._it)

    def get_state(self) -> dict[str, Any]:
        return {"format": STATE_FORMAT, "pipeline": dict(self.spec), "grain": self._it.get_state()}

    def set_state(self, state: dict[str, Any]) -> None:
        if not isinstance(state, dict) or state.get("format") != STATE_FORMAT or "grain" not in state:
            got = state.get("format") if isinstance(state, dict) else type(state).__name__
            raise ValueError(f"not a data iterator state of format {STATE_FORMAT!r} (got {got!r})")
        saved = state.get("pipeline", {})
        diff = [
            f"{k}: saved {saved.get(k)!r}, now {self.spec.get(k)!r}"
            for k in sorted(set(saved) | set(self.spec))
            if saved.get(k) != self.spec.get(k)
        ]
        if diff:
            raise ValueError("the data iterator state was saved under other pipeline settings: " + "; ".join(diff))
        self._it.set_state(state["grain"])

    def close(self) -> None:
        """Stop grain's reading threads."""
        close = getattr(self._it, "close", None)
        if close is not None:
            close()


def iterate(dataset: BatchedDataset | grain.IterDataset) -> DataIterator:
    """A `DataIterator` over `dataset` (a `make_dataset` result, or any grain IterDataset: then the state
    carries no pipeline settings to check)."""
    if isinstance(dataset, BatchedDataset):
        return iter(dataset)
    if isinstance(dataset, grain.IterDataset):
        return DataIterator(iter(dataset))
    raise ValueError(f"iterate() takes a make_dataset() result or a grain IterDataset, got {type(dataset).__name__}")


__all__ = [
    "DEFAULT_READ_OPTIONS",
    "BatchedDataset",
    "DataIterator",
    "NEGATIVE_TEXT_FILE",
    "LatentTextSource",
    "PromptListSource",
    "TextStateSource",
    "VideoCaptionSource",
    "iterate",
    "make_dataset",
    "write_latent_text_example",
    "write_negative_text",
    "write_text_example",
]
