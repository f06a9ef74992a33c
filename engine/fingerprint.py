"""Fingerprints of runs and caches: settings, data identity and code version, and their diff.

One mechanism for "is this directory the result of the same computation?": an experiment's
workdir (`experiments.common.start`) and an activation cache (`models.activation_cache`)
both record a JSON dict of what their results depend on and refuse to continue a directory
whose recorded dict differs, naming the differing keys (`diff`, `describe_diff`).

Pure standard library (hashlib, os, json): importable before JAX starts, so a refused rerun
costs no JAX start-up.

Data identity: `path_identity` hashes a file or a directory tree with BLAKE2b over the full
bytes (every file, not a sample), and reuses a hash recorded earlier for a file whose size and
modification time are unchanged (``stat_cache``), so a rerun over large SAE or model files
does not re-read them.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable, Mapping
from typing import Any

_MISSING = "<absent>"


def diff(
    old: Mapping[str, Any], new: Mapping[str, Any], prefix: str = ""
) -> list[tuple[str, Any, Any]]:
    """The dotted keys whose values differ between two nested dicts, with both values.

    A key present on one side only is reported with ``"<absent>"`` on the other.
    """
    out: list[tuple[str, Any, Any]] = []
    for key in sorted(set(old) | set(new), key=str):
        va, vb = old.get(key, _MISSING), new.get(key, _MISSING)
        if isinstance(va, Mapping) and isinstance(vb, Mapping):
            out.extend(diff(va, vb, f"{prefix}{key}."))
        elif va != vb:
            out.append((f"{prefix}{key}", va, vb))
    return out


def _short(v: Any, n: int = 40) -> str:
    s = repr(v)
    return s if len(s) <= n else s[: n - 3] + "..."


def describe_diff(
    changes: list[tuple[str, Any, Any]],
    old_name: str = "recorded",
    new_name: str = "now",
    limit: int = 4,
) -> str:
    """One line: ``key (recorded X, now Y), ...`` for the first ``limit`` differences."""
    parts = [f"{k} ({old_name} {_short(a)}, {new_name} {_short(b)})" for k, a, b in changes[:limit]]
    if len(changes) > limit:
        parts.append(f"and {len(changes) - limit} more")
    return ", ".join(parts)


def digest(*parts: Any, size: int = 16) -> str:
    """BLAKE2b of in-memory values: arrays by their full bytes (plus dtype and shape), anything
    else by its ``repr``. The one key of cached pipeline steps, spliced metrics and SAEs (an
    SAE's key covers every weight, never a sample of rows)."""
    h = hashlib.blake2b(digest_size=size)
    for part in parts:
        if hasattr(part, "__array__") and hasattr(part, "dtype"):
            import numpy as np  # only when arrays are hashed: keeps start-up standard-library

            a = np.ascontiguousarray(part)
            h.update(f"{a.dtype.str}{a.shape}".encode())
            h.update(a.data)
        else:
            h.update(repr(part).encode())
    return h.hexdigest()


def hash_file(path: str, chunk: int = 1 << 22) -> str:
    """BLAKE2b-128 of a file's full contents."""
    h = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as f:
        while True:
            block = f.read(chunk)
            if not block:
                break
            h.update(block)
    return h.hexdigest()


def _files(path: str) -> Iterable[str]:
    if os.path.isfile(path):
        yield path
        return
    for root, dirs, files in os.walk(path):
        dirs.sort()
        for name in sorted(files):
            yield os.path.join(root, name)


def path_identity(path: str, stat_cache: Mapping[str, Any] | None = None) -> dict:
    """Identity of a file or directory: ``{"hash", "files", "bytes", "stat"}``.

    ``hash`` covers every file's relative name and full contents. ``stat`` maps each file to
    ``[size, mtime_ns, hash]``; pass a previous identity's ``stat`` as ``stat_cache`` to skip
    re-reading files whose size and mtime are unchanged. A missing path has hash "missing".
    """
    if not os.path.exists(path):
        return {"hash": "missing"}
    stat_cache = stat_cache or {}
    h = hashlib.blake2b(digest_size=16)
    stat: dict[str, list] = {}
    total = 0
    base = path if os.path.isdir(path) else os.path.dirname(path)
    for f in _files(path):
        rel = os.path.relpath(f, base)
        st = os.stat(f)
        old = stat_cache.get(rel)
        if old and old[0] == st.st_size and old[1] == st.st_mtime_ns:
            fh = old[2]
        else:
            fh = hash_file(f)
        stat[rel] = [st.st_size, st.st_mtime_ns, fh]
        total += st.st_size
        h.update(rel.encode() + b"\0" + fh.encode() + b"\0")
    return {"hash": h.hexdigest(), "files": len(stat), "bytes": total, "stat": stat}


def source_hash(roots: Iterable[str], suffixes: tuple[str, ...] = (".py",)) -> str:
    """Hash of the source files (name and contents) under ``roots``: the code version."""
    h = hashlib.blake2b(digest_size=16)
    for root in roots:
        top = os.path.dirname(os.path.abspath(root))
        for f in _files(root):
            if f.endswith(suffixes) and "__pycache__" not in f:
                h.update(os.path.relpath(f, top).encode() + b"\0")
                with open(f, "rb") as fh:
                    h.update(fh.read())
    return h.hexdigest()


def comparable(identity: Mapping[str, Any]) -> Mapping[str, Any]:
    """An identity without its stat cache (sizes and mtimes do not decide equality)."""
    return {k: v for k, v in identity.items() if k != "stat"}
