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


def write_json(path: str, obj: Any) -> None:
    """Writes ``obj`` as indented JSON atomically (write then rename); only in process 0 of
    a multi-process run, and through `etils.epath` for remote paths."""
    if not _primary():
        return
    if is_remote(path):
        from etils import epath

        epath.Path(path).write_text(json.dumps(to_jsonable(obj), indent=2) + "\n")
        return
    tmp = f"{path}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(to_jsonable(obj), f, indent=2, sort_keys=False)
        f.write("\n")
    os.replace(tmp, path)


def read_jsonl(path: str) -> list[dict]:
    """The JSON objects of a metrics file; a half-written line (a killed run) is skipped."""
    if not os.path.exists(path):
        return []
    rows = []
    with open(path, encoding="utf-8") as f:
        for line in f:
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
        if self.enabled and not is_remote(path):
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)

    def truncate_after(self, step: int) -> None:
        """Keeps only lines with ``step <= step`` (a half-written last line of a killed run
        is dropped too)."""
        if not self.enabled or is_remote(self.path):
            return
        rows = [r for r in read_jsonl(self.path) if int(r.get("step", -1)) <= step]
        with open(self.path, "w", encoding="utf-8") as f:
            for r in rows:
                f.write(json.dumps(r) + "\n")

    def write(self, step: int, metrics: Mapping[str, Any]) -> None:
        if not self.enabled:
            return
        if is_remote(self.path):  # object stores cannot append: rewrite the file
            from etils import epath

            p = epath.Path(self.path)
            old = p.read_text() if p.exists() else ""
            p.write_text(old + json.dumps({"step": int(step), **to_jsonable(dict(metrics))}) + "\n")
            return
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps({"step": int(step), **to_jsonable(dict(metrics))}) + "\n")
