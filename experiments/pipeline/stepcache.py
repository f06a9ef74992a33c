"""Completed pipeline steps saved in the workdir, so that a killed run resumes after them.

A step's result is a flat dict of numpy arrays and JSON values. It is written atomically
(``<name>.npz`` + ``<name>.json``, then a ``<name>.done`` marker) when the step finishes; a
rerun with the same workdir loads it instead of recomputing. Long steps inside (SAE training,
token streams) checkpoint themselves with orbax; this cache records what finished.

Several processes (`jax.distributed`): every process computes the step (it runs collectives),
process 0 alone writes it, and every process then reads process 0's files (a shared
filesystem, as for orbax checkpoints), so all continue with the same values; whether a step
is done is process 0's answer (`engine.mesh.agree`).
"""

from __future__ import annotations

import io
import os
from collections.abc import Callable
from typing import Any

import numpy as np
from absl import logging

from engine import mesh as mesh_lib
from engine import metrics_io


class StepCache:
    """Get-or-compute of named steps under ``directory``."""

    def __init__(self, directory: str):
        self.directory = directory
        if mesh_lib.is_primary():
            metrics_io.makedirs(directory)

    def _path(self, name: str, ext: str) -> str:
        return os.path.join(self.directory, f"{name}.{ext}")

    def done(self, name: str) -> bool:
        return mesh_lib.agree(metrics_io.exists(self._path(name, "done")))

    def load(self, name: str) -> dict:
        out: dict[str, Any] = dict(metrics_io.read_json(self._path(name, "json")))
        npz = self._path(name, "npz")
        if metrics_io.exists(npz):
            with metrics_io.epath_of(npz).open("rb") as f:
                with np.load(io.BytesIO(f.read()), allow_pickle=False) as z:
                    out.update({k: z[k] for k in z.files})
        return out

    def save(self, name: str, result: dict) -> None:
        if not mesh_lib.is_primary():
            return
        arrays = {k: v for k, v in result.items() if isinstance(v, np.ndarray)}
        rest = {k: v for k, v in result.items() if k not in arrays}
        if arrays:
            buf = io.BytesIO()
            np.savez(buf, **arrays)
            metrics_io.write_bytes(self._path(name, "npz"), buf.getvalue())
        metrics_io.write_json(self._path(name, "json"), rest)
        metrics_io.write_text(self._path(name, "done"), "ok\n")

    def get(self, name: str, compute: Callable[[], dict]) -> dict:
        """Loads step ``name`` if it finished before, else computes and saves it."""
        if self.done(name):
            logging.info("step %s: loaded from %s", name, self.directory)
            return self.load(name)
        result = compute()
        self.save(name, result)
        mesh_lib.barrier(f"step {name}")  # the others read what process 0 wrote
        return self.load(name)
