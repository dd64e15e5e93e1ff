"""Result files: one JSON writer for the bench and every probe in `benchmarks/`.

Each file is one object: {"device": the device kind, "date": UTC ISO date, ...the caller's fields}.
"""

from __future__ import annotations

import datetime
import json
import os

import jax


def device_kind() -> str:
    """The first device's kind ('NVIDIA H200', 'cpu', ...): starts JAX's backend."""
    dev = jax.devices()[0]
    return getattr(dev, "device_kind", str(dev))


def utc_date() -> str:
    """Now, UTC, ISO 8601 to the second."""
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def write_json(path: str | os.PathLike, /, *, device: str | None = None, **fields) -> dict:
    """Write {"device", "date", **fields} as JSON to `path` and return it.

    device: the device kind the figures were measured on; None asks JAX (`device_kind`), which
    starts its backend: a process that must not hold a device (a parent of measuring processes)
    passes the kind its children reported. A field named "date" is refused (the writer sets it)."""
    if "date" in fields:
        raise ValueError("write_json dates the file itself; leave 'date' out of the fields")
    record = {"device": device_kind() if device is None else device, "date": utc_date(), **fields}
    with open(path, "w") as f:
        json.dump(record, f, indent=1)
        f.write("\n")
    print(f"wrote {path}")
    return record


__all__ = ["device_kind", "utc_date", "write_json"]
