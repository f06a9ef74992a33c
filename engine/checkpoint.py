"""Orbax checkpoints of a pytree plus a small JSON record (stream position, progress).

One mechanism for everything long-running: training state, streaming accumulators mid-stream,
pipeline steps. A checkpoint is ``{"state": <pytree>, "meta": <json dict>}`` saved with
`ocp.args.StandardSave` / `ocp.args.JsonSave` under ``directory/<step>/``.

A damaged checkpoint (truncated data files, a missing item, garbled item metadata: anything
that cannot be read back even without a target structure) is reported in one warning line,
moved to ``directory/damaged/<step>-<n>/`` (kept for inspection, out of the way of new saves)
and the newest intact checkpoint is restored instead. A checkpoint that is intact but does not
fit the requested structure is an error, not damage (nothing is moved).
"""

from __future__ import annotations

import logging
import os
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp


class Checkpointer:
    """Saves and restores ``(step, state pytree, meta dict)``.

    Args:
      directory: where checkpoints live (created if missing).
      max_to_keep: how many recent checkpoints to keep.
    """

    def __init__(self, directory: str, max_to_keep: int = 2):
        from engine import metrics_io

        # gs:// (and other remote) directories go to orbax as they are: orbax writes them
        # itself and coordinates the processes of a multi-process run.
        self.directory = metrics_io.resolve_dir(directory)
        if not metrics_io.is_remote(self.directory) and jax.process_index() == 0:
            # several processes: orbax's CheckpointManager (create=True) makes the folder
            # on process 0 and syncs the others.
            os.makedirs(self.directory, exist_ok=True)
        self._manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True),
            item_names=("state", "meta"),
        )

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def save(self, step: int, state: Any, meta: dict | None = None, *, wait: bool = True) -> None:
        """Saves ``state`` (any pytree of arrays) and ``meta`` (JSON-serialisable) at ``step``."""
        # Orbax refuses zero-size arrays (e.g. an empty feature subset); they carry no data, so
        # a 1-element placeholder is written and `restore` rebuilds them from the template.
        # The placeholder is a host numpy array: a single-device jax array would not be
        # serialisable in a multi-process run.
        state = jax.tree.map(
            lambda x: np.zeros((1,), x.dtype) if hasattr(x, "size") and x.size == 0 else x, state
        )
        self._manager.save(
            int(step),
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(dict(meta or {}))
            ),
            force=True,
        )
        if wait:
            self._manager.wait_until_finished()

    def restore(self, abstract_state: Any, step: int | None = None) -> tuple[int, Any, dict] | None:
        """Restores the latest intact (or the given) checkpoint, or returns None when there is
        none.

        Args:
          abstract_state: a pytree with the target structure, shapes, dtypes and shardings
            (concrete arrays or `jax.ShapeDtypeStruct`s).
          step: a specific step (no fallback: its errors are raised).
        """
        if step is not None:
            return self._restore_step(abstract_state, int(step))
        steps = sorted(self._manager.all_steps(), reverse=True)
        for i, s in enumerate(steps):
            try:
                return self._restore_step(abstract_state, s)
            except Exception as e:  # noqa: BLE001  (re-raised unless the files are damaged)
                damage = self._damage(s)
                if damage is None:
                    raise
                older = steps[i + 1] if i + 1 < len(steps) else None
                moved = self._set_aside(s)
                logging.warning(
                    "checkpoint %s/%d is damaged (%s); moved to %s; %s",
                    self.directory,
                    s,
                    damage or " ".join(str(e).split())[:160],
                    moved,
                    f"falling back to step {older}"
                    if older is not None
                    else "no intact checkpoint left: starting from scratch",
                )
        return None

    def _restore_step(self, abstract_state: Any, step: int) -> tuple[int, Any, dict]:
        target = jax.tree.map(_abstract, abstract_state)
        empty = jax.tree.map(lambda x: hasattr(x, "size") and x.size == 0, abstract_state)
        target = jax.tree.map(lambda t, e: np.zeros((1,), t.dtype) if e else t, target, empty)
        restored = self._manager.restore(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardRestore(target), meta=ocp.args.JsonRestore()
            ),
        )
        meta = restored["meta"]
        if not isinstance(meta, dict):
            raise ValueError(f"checkpoint meta is {type(meta).__name__}, expected a dict")
        state = jax.tree.map(
            lambda r, t, e: jax.numpy.zeros(t.shape, t.dtype) if e else r,
            restored["state"],
            abstract_state,
            empty,
        )
        return int(step), state, dict(meta)

    def _damage(self, step: int) -> str | None:
        """Why checkpoint ``step`` cannot be read at all (None: it reads back fine without a
        target, so a failure to restore it is a mismatch with the requested structure)."""
        try:
            restored = self._manager.restore(
                step,
                args=ocp.args.Composite(
                    state=ocp.args.StandardRestore(), meta=ocp.args.JsonRestore()
                ),
            )
        except Exception as e:  # noqa: BLE001  (any failure to read the files is damage)
            return f"{type(e).__name__}: {' '.join(str(e).split())[:160]}"
        if not isinstance(restored["meta"], dict):
            return f"meta item is {type(restored['meta']).__name__}, expected a dict"
        return None

    def _set_aside(self, step: int) -> str:
        from engine import metrics_io

        root = os.path.join(self.directory, "damaged")
        metrics_io.makedirs(root)
        n = 0
        while metrics_io.exists(os.path.join(root, f"{step}-{n}")):
            n += 1
        dest = os.path.join(root, f"{step}-{n}")
        metrics_io.epath_of(os.path.join(self.directory, str(step))).rename(dest)
        self._manager.reload()
        return dest

    def close(self) -> None:
        self._manager.wait_until_finished()
        self._manager.close()


def _abstract(x):
    if isinstance(x, jax.Array):
        return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding)
    return x
