"""Append-only JSON-lines metric log (``metrics.jsonl``) and JSON helpers."""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from typing import Any

import numpy as np


def to_jsonable(x: Any) -> Any:
    """Converts numpy / jax scalars and arrays (recursively) to plain JSON values.

    Non-finite floats become the strings "nan", "inf", "-inf" so the file stays valid JSON.
    """
    if isinstance(x, Mapping):
        return {str(k): to_jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [to_jsonable(v) for v in x]
    if hasattr(x, "__array__") and not isinstance(x, (str, bytes)):
        arr = np.asarray(x)
        return to_jsonable(arr.item() if arr.ndim == 0 else arr.tolist())
    if isinstance(x, float) and not math.isfinite(x):
        return "nan" if math.isnan(x) else ("inf" if x > 0 else "-inf")
    if isinstance(x, (np.integer,)):
        return int(x)
    if isinstance(x, (np.floating,)):
        return to_jsonable(float(x))
    if isinstance(x, (np.bool_,)):
        return bool(x)
    return x


def is_remote(path: str) -> bool:
    """True for object-store paths (``gs://...``, ``s3://...``): never made local/absolute."""
    return "://" in str(path)


def resolve_dir(path: str) -> str:
    """A run directory as given: local paths made absolute, remote ones passed through."""
    return str(path) if is_remote(path) else os.path.abspath(path)


def _primary() -> bool:
    import sys

    jax = sys.modules.get("jax")
    return jax is None or jax.process_index() == 0


# Files under a run directory go through `etils.epath` (one mechanism for local folders and
# object stores such as ``gs://bucket/run``, the same one orbax uses for checkpoints): code
# that writes run outputs calls these instead of open / os.makedirs / os.replace.


def epath_of(path: str):
    """``path`` as an `etils.epath.Path` (local or remote)."""
    from etils import epath

    return epath.Path(path)


def exists(path: str) -> bool:
    return epath_of(path).exists()


def makedirs(path: str) -> None:
    epath_of(path).mkdir(parents=True, exist_ok=True)


def write_bytes(path: str, data: bytes) -> None:
    """Writes a file whole: locally through a temporary file and a rename (a killed run never
    leaves half a file); on an object store in one put (objects appear whole)."""
    p = epath_of(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    if is_remote(path):
        p.write_bytes(data)
        return
    tmp = epath_of(f"{path}.tmp")
    tmp.write_bytes(data)
    tmp.replace(p)


def write_text(path: str, text: str) -> None:
    write_bytes(path, text.encode("utf-8"))


def read_text(path: str) -> str:
    return epath_of(path).read_text(encoding="utf-8")


def read_json(path: str) -> Any:
    return json.loads(read_text(path))


def write_json(path: str, obj: Any) -> None:
    """Writes ``obj`` as indented JSON atomically (`write_bytes`); only in process 0 of a
    multi-process run."""
    if not _primary():
        return
    write_text(path, json.dumps(to_jsonable(obj), indent=2, sort_keys=False) + "\n")


def read_jsonl(path: str) -> list[dict]:
    """The JSON objects of a metrics file; a half-written line (a killed run) is skipped."""
    if not exists(path):
        return []
    rows = []
    for line in read_text(path).splitlines():
        try:
            r = json.loads(line)
        except ValueError:
            continue
        if isinstance(r, dict):
            rows.append(r)
    return rows


class MetricWriter:
    """Appends one JSON object per line: ``{"step": s, **metrics}``.

    On resume, lines with ``step`` beyond the restored step are dropped first, so a run killed
    after logging but before checkpointing does not leave duplicate steps.
    """

    def __init__(self, path: str):
        self.path = path
        # Only process 0 of a multi-process run writes (the others hold the same metrics).
        self.enabled = _primary()
        if self.enabled:
            makedirs(str(epath_of(path).parent))

    def truncate_after(self, step: int) -> None:
        """Keeps only lines with ``step <= step`` (a half-written last line of a killed run
        is dropped too)."""
        if not self.enabled or not exists(self.path):
            return
        rows = [r for r in read_jsonl(self.path) if int(r.get("step", -1)) <= step]
        write_text(self.path, "".join(json.dumps(r) + "\n" for r in rows))

    def write(self, step: int, metrics: Mapping[str, Any]) -> None:
        if not self.enabled:
            return
        line = json.dumps({"step": int(step), **to_jsonable(dict(metrics))}) + "\n"
        p = epath_of(self.path)
        if is_remote(self.path):  # object stores cannot append: rewrite the file
            p.write_text((p.read_text() if p.exists() else "") + line)
            return
        with p.open("a") as f:
            f.write(line)
