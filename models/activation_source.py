"""Activation sources: resumable streams of ``(token_ids, acts...)`` row blocks (DESIGN.md).

An activation source is what the SAE trainer and the universality pipeline consume: rows are
tokens, ``token_ids [b]`` int32 and, per hookpoint, ``acts [b, d]`` (float32 unless asked
otherwise). It has a row position it can be re-opened at, which is exactly the
``open_at(start_row)`` factory of `engine.streaming.ChunkStream`, so::

    stream = activation_source.stream(source, chunk_size=4096)   # a ChunkStream
    for chunk in stream: tokens, acts = chunk.arrays ...          # position checkpointable

Implementations:

* `ArraySource`: in-memory arrays (toy models, tests).
* `models.activation_cache.CacheSource`: an on-disk activation cache (random access).
* `LMSource`: a live transformers forward pass over token contexts (no disk).
* `RowRange` / `RowSubset`: a contiguous range / a sorted subset of a source's rows.
* `ZipSource`: several random-access sources over the SAME tokens (two models, or two
  hookpoints) yielding ``(token_ids, acts_1, acts_2, ...)``; token ids are checked per block.
* `ShuffledSource`: a deterministic, resumable shuffle of any random-access source with a
  bounded buffer (below), optionally repeating over epochs (training).

Shuffling with bounded memory that still resumes exactly: rows are cut into blocks of
``block_rows`` consecutive rows; each epoch draws a permutation of the blocks (seeded by
``(seed, epoch)``), groups ``buffer_rows // block_rows`` consecutive blocks of that permutation
into a window, and emits each window's rows in a permutation seeded by ``(seed, epoch,
window)``. A row's place in the shuffled stream is therefore a pure function of the seed, so
``open_at(start_row)`` rebuilds only the window that holds ``start_row``. Memory is one window;
reads are whole blocks (sequential on disk).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Protocol, runtime_checkable

import numpy as np

from engine import checks, streaming

Rows = tuple[np.ndarray, ...]


@runtime_checkable
class ActivationSource(Protocol):
    """What a consumer may rely on.

    Attributes:
      hookpoints: names of the activation arrays, in yield order after ``token_ids``.
      widths: width ``d`` of each of them.
      num_rows: rows per pass (None when unknown or infinite).
    """

    hookpoints: tuple[str, ...]
    widths: tuple[int, ...]
    num_rows: int | None

    def open_at(self, start_row: int) -> Iterator[Rows]:
        """Blocks ``(token_ids [b], acts_1 [b, d_1], ...)`` starting at row ``start_row``."""
        ...

    def describe(self) -> dict:
        """JSON-able provenance (model, hookpoints, data...)."""
        ...


def stream(
    source: ActivationSource,
    chunk_size: int,
    *,
    start: int = 0,
    drop_remainder: bool = False,
    check_finite: bool = True,
    name: str | None = None,
) -> streaming.ChunkStream:
    """A `ChunkStream` of fixed-size chunks over ``source`` (resumable via its position)."""
    return streaming.ChunkStream(
        source.open_at,
        chunk_size,
        start=start,
        drop_remainder=drop_remainder,
        check_finite=check_finite,
        name=name or "+".join(source.hookpoints),
    )


class RowSource:
    """Base of random-access sources: subclasses define `num_rows` and `read_rows`.

    Args:
      block_rows: rows per block yielded by `open_at`.
      repeat: loop over the rows forever (row ``i`` of epoch ``e`` is position
        ``e * num_rows + i``).
    """

    hookpoints: tuple[str, ...] = ()
    widths: tuple[int, ...] = ()
    block_rows: int = 8192
    repeat: bool = False

    @property
    def num_rows(self) -> int:
        raise NotImplementedError

    def read_rows(self, lo: int, hi: int) -> Rows:
        """Rows ``[lo, hi)`` (0 <= lo <= hi <= num_rows) as ``(token_ids, acts...)``."""
        return self.finish_rows(self.read_rows_stored(lo, hi))

    def read_rows_stored(self, lo: int, hi: int) -> Rows:
        """Rows as stored (e.g. bfloat16); `finish_rows` turns them into `read_rows` output.

        Shuffling moves stored rows and converts only what it yields, so narrow storage
        dtypes are permuted at their own width. Subclasses override one of the two readers.
        """
        raise NotImplementedError

    def finish_rows(self, rows: Rows) -> Rows:
        """Stored rows -> output rows (dtype conversion); identity by default."""
        return rows

    def describe(self) -> dict:
        return {"hookpoints": list(self.hookpoints), "num_rows": self.num_rows}

    def open_at(self, start_row: int) -> Iterator[Rows]:
        n = self.num_rows
        start = checks.check_positive_int("start_row", start_row, minimum=0)
        epoch, offset = divmod(start, n) if n else (0, 0)
        if epoch and not self.repeat:
            return
        while True:
            for lo in range(offset, n, self.block_rows):
                yield self.read_rows(lo, min(lo + self.block_rows, n))
            if not self.repeat:
                return
            offset = 0

    def _check_range(self, lo: int, hi: int) -> None:
        if not 0 <= lo <= hi <= self.num_rows:
            raise checks.InputError(f"rows [{lo}, {hi}) outside the source's {self.num_rows} rows")


class ArraySource(RowSource):
    """Row-aligned in-memory arrays: ``token_ids [n]`` and one or more ``acts [n, d]``."""

    def __init__(
        self,
        token_ids,
        acts,
        hookpoints: Sequence[str] | None = None,
        *,
        block_rows: int = 8192,
        repeat: bool = False,
        metadata: dict | None = None,
    ):
        acts_list = list(acts) if isinstance(acts, (list, tuple)) else [acts]
        self.token_ids = np.asarray(token_ids).astype(np.int32).reshape(-1)
        self.acts = [checks.as_float_matrix(f"acts[{i}]", a) for i, a in enumerate(acts_list)]
        for i, a in enumerate(self.acts):
            checks.check_rows_match("token_ids", self.token_ids, f"acts[{i}]", a)
        if self.token_ids.shape[0] == 0:
            raise checks.InputError("ArraySource: no rows")
        names = (
            list(hookpoints)
            if hookpoints is not None
            else [f"acts{i}" for i in range(len(self.acts))]
        )
        if len(names) != len(self.acts):
            raise checks.InputError(
                f"hookpoints: {len(names)} names for {len(self.acts)} activation arrays"
            )
        self.hookpoints = tuple(names)
        self.widths = tuple(int(a.shape[1]) for a in self.acts)
        self.block_rows = checks.check_positive_int("block_rows", block_rows)
        self.repeat = repeat
        self.metadata = dict(metadata or {})

    @property
    def num_rows(self) -> int:
        return int(self.token_ids.shape[0])

    def read_rows_stored(self, lo: int, hi: int) -> Rows:
        self._check_range(lo, hi)
        return (self.token_ids[lo:hi],) + tuple(a[lo:hi] for a in self.acts)

    def describe(self) -> dict:
        return {"kind": "arrays", **super().describe(), **self.metadata}


class RowRange(RowSource):
    """Rows ``[lo, hi)`` of a random-access source (e.g. held-out vs training rows)."""

    def __init__(self, source: RowSource, lo: int, hi: int, *, repeat: bool = False):
        n = source.num_rows
        if not 0 <= lo < hi <= n:
            raise checks.InputError(f"RowRange [{lo}, {hi}): expected 0 <= lo < hi <= {n}")
        self.source, self.lo, self.hi = source, int(lo), int(hi)
        self.hookpoints, self.widths = source.hookpoints, source.widths
        self.block_rows = source.block_rows
        self.repeat = repeat

    @property
    def num_rows(self) -> int:
        return self.hi - self.lo

    def read_rows_stored(self, lo: int, hi: int) -> Rows:
        self._check_range(lo, hi)
        return self.source.read_rows_stored(self.lo + lo, self.lo + hi)

    def finish_rows(self, rows: Rows) -> Rows:
        return self.source.finish_rows(rows)

    def describe(self) -> dict:
        return {"kind": "rows", "lo": self.lo, "hi": self.hi, "source": self.source.describe()}


class RowSubset(RowSource):
    """The rows ``rows`` (sorted, distinct) of a random-access source, in that order.

    A training subset or fold read straight from the source (e.g. a cache on disk): a block
    of output rows is one read of the stored span from its first to its last row, then a
    gather, so memory stays at one span (``hi - lo`` output rows of a fraction ``f`` of the
    source span about ``(hi - lo) / f`` stored rows).
    """

    def __init__(self, source: RowSource, rows, *, repeat: bool = False):
        rows = np.asarray(rows, np.int64).reshape(-1)
        n = source.num_rows
        if rows.size == 0 or rows[0] < 0 or rows[-1] >= n or np.any(np.diff(rows) <= 0):
            raise checks.InputError(
                f"RowSubset: expected sorted distinct row ids in [0, {n}), got {rows.size} ids"
            )
        self.source, self.rows = source, rows
        self.hookpoints, self.widths = source.hookpoints, source.widths
        self.block_rows = source.block_rows
        self.repeat = repeat

    @property
    def num_rows(self) -> int:
        return int(self.rows.shape[0])

    def read_rows_stored(self, lo: int, hi: int) -> Rows:
        self._check_range(lo, hi)
        idx = self.rows[lo:hi]
        if idx.size == 0:
            return tuple(p[:0] for p in self.source.read_rows_stored(0, 0))
        start = int(idx[0])
        span = self.source.read_rows_stored(start, int(idx[-1]) + 1)
        return tuple(np.asarray(p)[idx - start] for p in span)

    def finish_rows(self, rows: Rows) -> Rows:
        return self.source.finish_rows(rows)

    def describe(self) -> dict:
        return {"kind": "subset", "rows": self.num_rows, "source": self.source.describe()}


class ZipSource(RowSource):
    """Several random-access sources over the same tokens, zipped row by row.

    Yields ``(token_ids, acts of source 1..., acts of source 2...)``. Raises `InputError` when
    the row counts differ or, at read time, when the token ids of a block differ (the sources
    did not see the same text).
    """

    def __init__(
        self,
        sources: Sequence[RowSource],
        *,
        block_rows: int | None = None,
        repeat: bool = False,
        names: Sequence[str] | None = None,
    ):
        self.sources = list(sources)
        if len(self.sources) < 2:
            raise checks.InputError("ZipSource: give at least two sources")
        n = self.sources[0].num_rows
        for i, s in enumerate(self.sources[1:], 1):
            if s.num_rows != n:
                raise checks.InputError(
                    f"ZipSource: source 0 has {n} rows but source {i} has "
                    f"{s.num_rows}; they must cover the same tokens"
                )
        self.names = list(names) if names else [f"source{i}" for i in range(len(self.sources))]
        self.hookpoints = tuple(
            f"{nm}:{hp}" for nm, s in zip(self.names, self.sources) for hp in s.hookpoints
        )
        self.widths = tuple(w for s in self.sources for w in s.widths)
        self.block_rows = block_rows or self.sources[0].block_rows
        self.repeat = repeat

    @property
    def num_rows(self) -> int:
        return self.sources[0].num_rows

    def read_rows_stored(self, lo: int, hi: int) -> Rows:
        parts = [s.read_rows_stored(lo, hi) for s in self.sources]
        tokens = parts[0][0]
        for i, p in enumerate(parts[1:], 1):
            if not np.array_equal(p[0], tokens):
                bad = int(np.flatnonzero(p[0] != tokens)[0])
                raise checks.InputError(
                    f"ZipSource: token ids differ at row {lo + bad} ({self.names[0]}: "
                    f"{int(tokens[bad])}, {self.names[i]}: {int(p[0][bad])}); the sources must "
                    "be built from the same text and tokenizer"
                )
        return (tokens,) + tuple(a for p in parts for a in p[1:])

    def finish_rows(self, rows: Rows) -> Rows:
        out, i = [rows[0]], 1
        for s in self.sources:
            k = len(s.hookpoints)
            out.extend(s.finish_rows((rows[0],) + tuple(rows[i : i + k]))[1:])
            i += k
        return tuple(out)

    def describe(self) -> dict:
        return {
            "kind": "zip",
            "sources": {nm: s.describe() for nm, s in zip(self.names, self.sources)},
        }


class ShuffledSource:
    """Deterministic, resumable, bounded-memory shuffle of a `RowSource` (module docstring).

    Args:
      source: a random-access source.
      seed: shuffle seed.
      buffer_rows: rows held in memory at once (rounded down to whole blocks, >= 1 block).
      block_rows: rows of consecutive storage read together.
      repeat: go on with a new permutation each epoch (training); ``num_rows`` is then None.
    """

    def __init__(
        self,
        source: RowSource,
        seed: int = 0,
        *,
        buffer_rows: int = 1 << 16,
        block_rows: int = 1024,
        repeat: bool = False,
    ):
        self.source = source
        self.seed = int(seed)
        self.block_rows = checks.check_positive_int("block_rows", block_rows)
        buffer_rows = checks.check_positive_int("buffer_rows", buffer_rows)
        self.blocks_per_window = max(1, buffer_rows // self.block_rows)
        self.repeat = repeat
        self.hookpoints = source.hookpoints
        self.widths = source.widths

    @property
    def num_rows(self) -> int | None:
        return None if self.repeat else self.source.num_rows

    def describe(self) -> dict:
        return {
            "kind": "shuffled",
            "seed": self.seed,
            "block_rows": self.block_rows,
            "buffer_rows": self.blocks_per_window * self.block_rows,
            "repeat": self.repeat,
            "source": self.source.describe(),
        }

    def _windows(self, epoch: int) -> tuple[list[np.ndarray], np.ndarray]:
        n = self.source.num_rows
        nb = -(-n // self.block_rows)
        perm = np.random.default_rng([self.seed, epoch]).permutation(nb)
        windows = [
            np.sort(perm[i : i + self.blocks_per_window])
            for i in range(0, nb, self.blocks_per_window)
        ]
        sizes = np.asarray(
            [sum(min(self.block_rows, n - b * self.block_rows) for b in w) for w in windows],
            np.int64,
        )
        return windows, np.concatenate([[0], np.cumsum(sizes)])

    def _window_rows(self, epoch: int, w: int, blocks: np.ndarray) -> Rows:
        n = self.source.num_rows
        parts = [
            self.source.read_rows_stored(
                int(b) * self.block_rows, min((int(b) + 1) * self.block_rows, n)
            )
            for b in blocks
        ]
        rows = tuple(np.concatenate([p[i] for p in parts]) for i in range(len(parts[0])))
        order = np.random.default_rng([self.seed, epoch, w]).permutation(rows[0].shape[0])
        return tuple(r[order] for r in rows)

    def open_at(self, start_row: int) -> Iterator[Rows]:
        n = self.source.num_rows
        start = checks.check_positive_int("start_row", start_row, minimum=0)
        epoch, r = divmod(start, n)
        if epoch and not self.repeat:
            return
        while True:
            windows, offsets = self._windows(epoch)
            w0 = int(np.searchsorted(offsets, r, side="right")) - 1
            for w in range(w0, len(windows)):
                rows = self._window_rows(epoch, w, windows[w])
                skip = r - int(offsets[w]) if w == w0 else 0
                for lo in range(skip, rows[0].shape[0], self.block_rows):
                    yield self.source.finish_rows(tuple(x[lo : lo + self.block_rows] for x in rows))
            if not self.repeat:
                return
            epoch, r = epoch + 1, 0


class LMSource:
    """A live forward pass as a source: `models.lm.LanguageModel` over token contexts.

    Rows are the contexts' real tokens (padding removed; special tokens too when
    ``exclude_special``), context after context. ``open_at(row)`` restarts at the context that
    holds ``row``. Good for small jobs; big ones should go through an activation cache.
    """

    def __init__(
        self,
        lm,
        contexts,
        hookpoints: str | Sequence[str],
        *,
        batch_size: int = 8,
        exclude_special: bool = False,
        out_dtype: str = "float32",
    ):
        from models import text

        self.lm = lm
        self.contexts = (
            contexts
            if isinstance(contexts, text.Contexts)
            else (text.Contexts.from_array(contexts))
        )
        self.hps = lm.parse(hookpoints)
        self.hookpoints = tuple(h.name for h in self.hps)
        self.widths = tuple(lm.d_model for _ in self.hps)
        self.batch_size = checks.check_positive_int("batch_size", batch_size)
        self.exclude_special = exclude_special
        self.out_dtype = out_dtype
        sel = self.contexts.mask.copy()
        if exclude_special:
            sel &= ~lm.special_mask(self.contexts.token_ids)
        self._sel = sel
        self._offsets = np.concatenate([[0], np.cumsum(sel.sum(axis=1))]).astype(np.int64)

    @property
    def num_rows(self) -> int:
        return int(self._offsets[-1])

    def describe(self) -> dict:
        return {
            "kind": "lm",
            "model": self.lm.describe(),
            "hookpoints": list(self.hookpoints),
            "contexts": len(self.contexts),
            "context_length": self.contexts.context_length,
            "exclude_special": self.exclude_special,
            "num_rows": self.num_rows,
        }

    def open_at(self, start_row: int) -> Iterator[Rows]:
        start = checks.check_positive_int("start_row", start_row, minimum=0)
        if start >= self.num_rows:
            return
        c0 = int(np.searchsorted(self._offsets, start, side="right")) - 1
        skip = start - int(self._offsets[c0])
        for lo in range(c0, len(self.contexts), self.batch_size):
            part = self.contexts[lo : lo + self.batch_size]
            out = self.lm.forward_batch(
                part.token_ids,
                list(self.hookpoints),
                attention_mask=part.mask,
                out_dtype=self.out_dtype,
            )
            sel = self._sel[lo : lo + self.batch_size]
            rows = (out.token_ids[sel],) + tuple(out.acts[h][sel] for h in self.hookpoints)
            if skip:
                rows = tuple(r[skip:] for r in rows)
                skip = 0
            yield rows


class WindowShuffledSource:
    """Deterministic, resumable, bounded-memory shuffle of a SEQUENTIAL source (live models).

    A source without random access (`LMSource`: a forward pass, context after context) cannot
    be block-shuffled like `ShuffledSource`; here each run of ``buffer_rows`` consecutive rows
    (a window) is read, permuted with a generator seeded by ``(seed, epoch, window)`` and
    emitted. Mixing is therefore local (within a window), memory is one window, and
    ``open_at(start_row)`` re-opens the inner source at the start of the window holding
    ``start_row`` (its rows are a pure function of the seed), so a resumed run sees exactly
    the same rows.

    Args:
      source: anything with ``open_at(start_row)``, ``num_rows`` (not None), ``hookpoints``,
        ``widths``.
      seed: shuffle seed.
      buffer_rows: rows per window (held in memory at once).
      block_rows: rows per yielded block.
      repeat: go on over epochs (training); ``num_rows`` is then None.
    """

    def __init__(
        self,
        source,
        seed: int = 0,
        *,
        buffer_rows: int = 1 << 16,
        block_rows: int = 1024,
        repeat: bool = False,
    ):
        if getattr(source, "num_rows", None) is None:
            raise checks.InputError(
                "WindowShuffledSource: the source must know its num_rows (an epoch)"
            )
        self.source = source
        self.seed = int(seed)
        self.buffer_rows = checks.check_positive_int("buffer_rows", buffer_rows)
        self.block_rows = checks.check_positive_int("block_rows", block_rows)
        self.repeat = repeat
        self.hookpoints = source.hookpoints
        self.widths = source.widths

    @property
    def num_rows(self) -> int | None:
        return None if self.repeat else int(self.source.num_rows)

    def describe(self) -> dict:
        return {
            "kind": "window_shuffled",
            "seed": self.seed,
            "buffer_rows": self.buffer_rows,
            "repeat": self.repeat,
            "source": self.source.describe(),
        }

    def _window(self, epoch: int, w: int) -> Rows:
        n = int(self.source.num_rows)
        lo = w * self.buffer_rows
        want = min(self.buffer_rows, n - lo)
        parts, have = [], 0
        for block in self.source.open_at(lo):
            block = tuple(np.asarray(a) for a in block)
            parts.append(tuple(a[: want - have] for a in block))
            have += parts[-1][0].shape[0]
            if have >= want:
                break
        rows = tuple(np.concatenate([p[i] for p in parts]) for i in range(len(parts[0])))
        order = np.random.default_rng([self.seed, epoch, w]).permutation(rows[0].shape[0])
        return tuple(r[order] for r in rows)

    def open_at(self, start_row: int) -> Iterator[Rows]:
        n = int(self.source.num_rows)
        start = checks.check_positive_int("start_row", start_row, minimum=0)
        epoch, r = divmod(start, n)
        if epoch and not self.repeat:
            return
        n_windows = -(-n // self.buffer_rows)
        while True:
            w0 = r // self.buffer_rows
            for w in range(w0, n_windows):
                rows = self._window(epoch, w)
                skip = r - w0 * self.buffer_rows if w == w0 else 0
                for lo in range(skip, rows[0].shape[0], self.block_rows):
                    yield tuple(x[lo : lo + self.block_rows] for x in rows)
            if not self.repeat:
                return
            epoch, r = epoch + 1, 0


def shuffled(
    source: ActivationSource,
    seed: int,
    *,
    buffer_rows: int = 1 << 16,
    block_rows: int = 1024,
    repeat: bool = False,
) -> ShuffledSource | WindowShuffledSource:
    """The bounded-buffer shuffle that fits ``source``: `ShuffledSource` (block permutation
    across the whole epoch) for random-access `RowSource`s, `WindowShuffledSource` (windows of
    consecutive rows) for sequential ones such as `LMSource`."""
    if isinstance(source, RowSource):
        return ShuffledSource(
            source, seed, buffer_rows=buffer_rows, block_rows=block_rows, repeat=repeat
        )
    return WindowShuffledSource(
        source, seed, buffer_rows=buffer_rows, block_rows=block_rows, repeat=repeat
    )
