"""Fixed-size chunk streams over host arrays or generators, with masks, positions and prefetch.

A `ChunkStream` turns a row source into chunks of exactly ``chunk_size`` rows so that jitted
consumers compile once. The ragged last chunk is zero-padded and carries a boolean ``mask``
(True = real row). The stream's ``position`` counts rows handed out so far; a consumer that
checkpoints it can `seek` back to it after a restart and sees exactly the same chunks.

Sources:

* one array or a tuple of row-aligned arrays (random access; optional per-epoch shuffling and
  ``repeat`` for training);
* a callable ``open_at(start_row) -> iterator of arrays (or tuples of arrays)`` yielding blocks
  of any row count (generators, on-disk caches, model forward passes). It is re-opened at the
  saved row on resume.
"""

from __future__ import annotations

import collections
import dataclasses
import itertools
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np

from engine import checks
from engine import mesh as mesh_lib

Arrays = tuple[np.ndarray, ...]


@dataclasses.dataclass(frozen=True)
class Chunk:
    """``chunk_size`` rows of every stream, zero-padded, plus a validity mask.

    Attributes:
      arrays: row-aligned arrays, each ``[chunk_size, ...]``.
      mask: ``[chunk_size]`` bool, True for real rows (False only in a ragged last chunk).
      start: stream position (row count) of the chunk's first row.
    """

    arrays: Arrays
    mask: np.ndarray
    start: int

    @property
    def num_valid(self) -> int:
        return int(np.sum(self.mask))


def _as_tuple(x) -> Arrays:
    return tuple(x) if isinstance(x, (tuple, list)) else (x,)


class ChunkStream:
    """Iterator of fixed-size `Chunk`s with a resumable position.

    Args:
      source: an array, a tuple of row-aligned arrays, or ``open_at(start_row)`` returning an
        iterator of arrays / tuples of arrays (blocks of any size).
      chunk_size: rows per chunk (> 0).
      repeat: loop over an array source forever (epochs); positions keep growing.
      shuffle_seed: with an array source, visit rows in a fresh permutation each epoch, derived
        from ``(shuffle_seed, epoch)`` so that a resumed stream reproduces it.
      drop_remainder: drop a ragged last chunk instead of padding it.
      start: initial position (rows already consumed).
      check_finite: raise on NaN/Inf in any chunk (names the stream and row).
      name: used in error messages.
    """

    def __init__(
        self,
        source: Any,
        chunk_size: int,
        *,
        repeat: bool = False,
        shuffle_seed: int | None = None,
        drop_remainder: bool = False,
        start: int = 0,
        check_finite: bool = True,
        name: str = "stream",
    ):
        self.chunk_size = checks.check_positive_int(f"{name} chunk_size", chunk_size)
        self.name = name
        self.repeat = repeat
        self.shuffle_seed = shuffle_seed
        self.drop_remainder = drop_remainder
        self.check_finite = check_finite
        self._open_at: Callable[[int], Iterator] | None = None
        self._arrays: Arrays | None = None
        if callable(source):
            if repeat or shuffle_seed is not None:
                raise checks.InputError(
                    f"{name}: repeat/shuffle need an array source, not a generator factory"
                )
            self._open_at = source
        else:
            arrays = tuple(np.asarray(a) for a in _as_tuple(source))
            if not arrays:
                raise checks.InputError(f"{name}: no arrays given")
            for i, a in enumerate(arrays):
                if a.ndim == 0:
                    raise checks.InputError(
                        f"{name}[{i}]: expected rows (>= 1-D array), got a scalar"
                    )
                checks.check_rows_match(f"{name}[0]", arrays[0], f"{name}[{i}]", a)
            if arrays[0].shape[0] == 0:
                raise checks.InputError(f"{name}: the stream is empty (0 rows)")
            self._arrays = arrays
        self._position = checks.check_positive_int(f"{name} start", start, minimum=0)
        self._iter: Iterator[Chunk] | None = None

    # -- position ---------------------------------------------------------------------------

    @property
    def position(self) -> int:
        """Rows handed out so far (the start of the next chunk)."""
        return self._position

    @property
    def num_rows(self) -> int | None:
        """Rows per epoch for array sources, None for generator sources."""
        return None if self._arrays is None else int(self._arrays[0].shape[0])

    def seek(self, position: int) -> None:
        """Continues from ``position`` (a value previously read from `position`)."""
        self._position = checks.check_positive_int(f"{self.name} position", position, 0)
        self._iter = None

    # -- iteration --------------------------------------------------------------------------

    def __iter__(self) -> ChunkStream:
        return self

    def __next__(self) -> Chunk:
        if self._iter is None:
            self._iter = self._chunks_from(self._position)
        chunk = next(self._iter)
        self._position = (
            chunk.start + self.chunk_size if chunk.mask.all() else (chunk.start + chunk.num_valid)
        )
        return chunk

    def _rows_from(self, start: int) -> Iterator[Arrays]:
        if self._open_at is not None:
            for block in self._open_at(start):
                yield tuple(np.asarray(a) for a in _as_tuple(block))
            return
        # Array sources: open_at sources returned above.
        assert self.num_rows is not None and self._arrays is not None
        n = int(self.num_rows)
        epoch, offset = divmod(start, n)
        if not self.repeat and epoch > 0:
            return
        while True:
            order = None
            if self.shuffle_seed is not None:
                order = np.random.default_rng([self.shuffle_seed, epoch]).permutation(n)
            for lo in range(offset, n, self.chunk_size):
                idx = (
                    slice(lo, min(lo + self.chunk_size, n))
                    if order is None
                    else (order[lo : lo + self.chunk_size])
                )
                yield tuple(a[idx] for a in self._arrays)
            if not self.repeat:
                return
            epoch, offset = epoch + 1, 0

    def _chunks_from(self, start: int) -> Iterator[Chunk]:
        pending: list[Arrays] = []
        have = 0
        pos = start
        produced = False
        for block in self._rows_from(start):
            pending.append(block)
            have += block[0].shape[0]
            while have >= self.chunk_size:
                rows = tuple(np.concatenate([b[i] for b in pending]) for i in range(len(block)))
                head = tuple(r[: self.chunk_size] for r in rows)
                tail = tuple(r[self.chunk_size :] for r in rows)
                pending, have = ([tail] if tail[0].shape[0] else []), have - self.chunk_size
                yield self._make_chunk(head, self.chunk_size, pos)
                produced = True
                pos += self.chunk_size
        if have and not self.drop_remainder:
            rows = tuple(np.concatenate([b[i] for b in pending]) for i in range(len(pending[0])))
            yield self._make_chunk(rows, have, pos)
            produced = True
        if not produced and start == 0:
            raise checks.InputError(f"{self.name}: the stream is empty (no rows produced)")

    def _make_chunk(self, rows: Arrays, valid: int, start: int) -> Chunk:
        if self.check_finite:
            for i, r in enumerate(rows):
                try:
                    checks.check_finite(f"{self.name}[{i}] rows {start}..{start + valid}", r)
                except checks.InputError as e:
                    raise checks.InputError(str(e)) from None
        if valid < self.chunk_size:
            rows = tuple(
                np.concatenate([r, np.zeros((self.chunk_size - valid,) + r.shape[1:], r.dtype)])
                for r in rows
            )
        mask = np.arange(self.chunk_size) < valid
        return Chunk(arrays=rows, mask=mask, start=start)


def prefetch_to_device(chunks: Iterator[Chunk], mesh, size: int = 2) -> Iterator[Chunk]:
    """Puts chunks on the mesh (rows split over ``data``) ``size`` chunks ahead.

    `jax.device_put` is asynchronous, so keeping a short queue overlaps host work (reading,
    padding) and host-to-device copies with the consumer's computation.
    """
    queue: collections.deque = collections.deque()

    def put(chunk: Chunk) -> Chunk:
        arrays, mask = mesh_lib.shard_batch(mesh, (chunk.arrays, chunk.mask))
        return Chunk(arrays=arrays, mask=mask, start=chunk.start)

    for chunk in itertools.islice(chunks, size):
        queue.append(put(chunk))
    while queue:
        yield queue.popleft()
        for chunk in itertools.islice(chunks, 1):
            queue.append(put(chunk))


def batches(stream: ChunkStream) -> Iterator[Arrays]:
    """Yields only the arrays of full chunks (training: no ragged batches)."""
    for chunk in stream:
        if not chunk.mask.all():
            return
        yield chunk.arrays
