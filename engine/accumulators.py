"""Streaming accumulators: ``init / update / merge / finalize`` over row chunks.

Everything that reduces over rows (tokens, pairs) is an accumulator: a small pytree of running
statistics that is updated chunk by chunk inside `jax.jit`, merged across devices (inside a
`jax.shard_map` over the ``data`` axis) and across hosts, checkpointed mid-stream with orbax,
and finalised on the host. CCA, CKA, activation correlation and feature statistics all build on
`CrossMoments`.

Numerics (the reason for the ``shift`` fields): sums of products of raw values cancel
catastrophically when the mean is large against the spread (float32 keeps ~7 digits). Each
state keeps a fixed reference point ``shift`` (the first chunk's mean); every chunk is
centred twice (on the shift, then on its own mean, refined by a second pass) and merged with
Chan et al.'s pairwise update ``C = Ca + Cb + dx dy^T na nb / n``. All stored quantities are
then of the order of the spread, so float32 agrees with a float64 reference to ~1e-6.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from engine import checks
from engine import mesh as mesh_lib

HIGHEST = jax.lax.Precision.HIGHEST


class Accumulator(Protocol):
    """The protocol every streaming statistic follows (all methods are jit-able but finalize).

    ``update`` receives the row-aligned arrays of one chunk and per-row ``weights`` ([rows],
    0 for padding rows, 1 for real rows, or any non-negative row weight).
    """

    def init(self) -> Any: ...

    def update(self, state: Any, arrays: tuple, weights: jax.Array) -> Any: ...

    def merge(self, a: Any, b: Any) -> Any: ...

    def finalize(self, state: Any) -> Any: ...


def merge_across(acc: Accumulator, state: Any, axis_name: str) -> Any:
    """Merges per-device states over a mesh axis (call inside `shard_map`).

    Uses ``acc.merge_across`` when the accumulator has an exact collective form, else gathers
    all device states and folds them with ``acc.merge`` in device order (deterministic).
    """
    if hasattr(acc, "merge_across"):
        return acc.merge_across(state, axis_name)
    gathered = jax.tree.map(lambda x: jax.lax.all_gather(x, axis_name), state)
    n = jax.tree.leaves(gathered)[0].shape[0]
    out = jax.tree.map(lambda x: x[0], gathered)
    for i in range(1, n):
        out = acc.merge(out, jax.tree.map(lambda x, i=i: x[i], gathered))
    return out


def make_sharded_update(acc: Accumulator, mesh, num_arrays: int, transform: Callable | None = None):
    """Returns ``step(state, arrays, weights, params=None) -> state`` jitted over the mesh.

    Each device folds its rows into a fresh local state, the local states are merged over
    ``data``, and the result is merged into the (replicated) running state. The answer does
    not depend on the number of devices beyond float rounding.

    Args:
      transform: optional ``transform(params, *arrays) -> arrays`` applied on device to each
        device's rows before the update (e.g. encode activations with two SAEs, whose
        parameters travel as the replicated ``params`` argument rather than as constants).
    """
    data_spec = P(mesh_lib.DATA)

    def local(state, arrays, weights, params):
        if transform is not None:
            arrays = tuple(transform(params, *arrays))
        part = acc.update(acc.init(), arrays, weights)
        part = merge_across(acc, part, mesh_lib.DATA)
        return acc.merge(state, part)

    sharded = jax.shard_map(
        local,
        mesh=mesh,
        in_specs=(P(), tuple(data_spec for _ in range(num_arrays)), data_spec, P()),
        out_specs=P(),
        check_vma=False,
    )
    jitted = jax.jit(sharded, donate_argnums=0)

    def step(state, arrays, weights, params=None):
        return jitted(state, arrays, weights, params)

    return step


@functools.lru_cache(maxsize=64)
def _init_program(acc: Accumulator, mesh):
    # Cached per (accumulator, mesh): ``jax.jit(acc.init)`` on a fresh bound method misses
    # jit's cache, so callers folding many small inputs (loop nulls, bootstrap, calibration
    # tests) would otherwise compile the same zeros program once per call.
    return jax.jit(lambda: _strong(acc.init()), out_shardings=mesh_lib.replicated(mesh))


def _strong(state: Any) -> Any:
    """``state`` with weakly typed leaves made strong (same dtype and values): the step's
    output state is strongly typed, so a weakly typed first state (``jnp.full(n, 0.0)``)
    would compile the step a second time for the second chunk (1.6 s of a comparison's
    cold start, 1536 features on 2 cores)."""
    return jax.tree.map(lambda x: jax.lax.convert_element_type(x, x.dtype), state)


def _fresh_state(acc: Accumulator, mesh) -> Any:
    try:
        program = _init_program(acc, mesh)  # type: ignore[arg-type]
    except TypeError:  # an unhashable accumulator: compile for this call only
        program = jax.jit(lambda: _strong(acc.init()), out_shardings=mesh_lib.replicated(mesh))
    return program()


def accumulate(
    acc: Accumulator,
    stream,
    mesh,
    state: Any = None,
    *,
    checkpointer=None,
    save_every: int = 0,
    progress: bool = False,
    transform: Callable | None = None,
    params: Any = None,
    step: Callable | None = None,
) -> Any:
    """Folds every chunk of a `ChunkStream` into ``state`` on the mesh.

    Args:
      acc: the accumulator.
      stream: a `engine.streaming.ChunkStream`; its chunk size must divide over ``data``.
      mesh: the device mesh.
      state: a running state to continue (default ``acc.init()``).
      checkpointer: optional `engine.checkpoint.Checkpointer`; with it the state and the
        stream position are saved every ``save_every`` chunks and at the end, and a previous
        checkpoint is resumed (the stream seeks to the saved position).
      progress: show a tqdm bar (rows).
      transform / params: see `make_sharded_update` (on-device featurisation of each chunk).
      step: a step from `make_sharded_update` to reuse (callers that fold many streams of one
        shape keep it to compile once); built here by default.

    Returns:
      The final (replicated) state; call ``acc.finalize`` on it.
    """
    from engine import streaming  # local import keeps this module light

    mesh_lib.check_divisible(mesh, stream.chunk_size, f"{stream.name} chunk_size")
    # A fresh state is built by ONE compiled program placed on the mesh (eager zeros and
    # per-leaf copies would each compile a small program: dozens per comparison).
    state = _fresh_state(acc, mesh) if state is None else mesh_lib.replicate(mesh, state, copy=True)
    params = mesh_lib.replicate(mesh, params)
    step_count = 0
    if checkpointer is not None:
        restored = checkpointer.restore(state)
        if restored is not None:
            step_count, state, meta = restored
            stream.seek(int(meta["position"]))
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=stream.num_rows, initial=stream.position, unit="rows", desc=stream.name)
    any_chunk = False
    for chunk in streaming.prefetch_to_device(stream, mesh):
        any_chunk = True
        if step is None:
            step = make_sharded_update(acc, mesh, len(chunk.arrays), transform)
        state = step(state, chunk.arrays, chunk.mask.astype(jnp.float32), params)
        step_count += 1
        if bar is not None:
            bar.update(int(chunk.mask.shape[0]))
        # The prefetch reads ahead, so the stream's own position is past the chunks folded
        # in so far; the resume point is the end of THIS chunk.
        position = chunk.start + stream.chunk_size
        if checkpointer is not None and save_every and step_count % save_every == 0:
            checkpointer.save(step_count, state, {"position": position})
    if bar is not None:
        bar.close()
    if checkpointer is not None and any_chunk and checkpointer.latest_step() != step_count:
        checkpointer.save(step_count, state, {"position": position})
    return state


# --------------------------------------------------------------------------------------------
# Running moments of two row-aligned streams.
# --------------------------------------------------------------------------------------------


@flax.struct.dataclass
class MomentsState:
    """Running weighted moments of X [*, d1] and Y [*, d2] (Y optional: d2 = 0)."""

    count: jax.Array  # sum of row weights
    shift_x: jax.Array  # [d1] fixed reference point
    shift_y: jax.Array  # [d2]
    mean_x: jax.Array  # [d1] mean of (x - shift_x)
    mean_y: jax.Array  # [d2]
    sxx: jax.Array  # [d1, d1] centred sum of weighted products
    syy: jax.Array  # [d2, d2]
    sxy: jax.Array  # [d1, d2]


@flax.struct.dataclass
class Moments:
    """Finalised moments (host numpy, float64). Covariances are population (divide by n)."""

    count: Any
    mean_x: Any
    mean_y: Any
    cov_xx: Any
    cov_yy: Any
    cov_xy: Any
    # Relative precision of the accumulation (machine epsilon of its dtype): rank decisions
    # downstream (engine/cca.py) compare eigenvalues with this noise level, not with the scale.
    precision: float = float(np.finfo(np.float32).eps)


def _chunk_moments(x, y, w, shift_x, shift_y):
    """Weighted moments of one chunk, relative to the given shifts (two-pass mean)."""
    n = jnp.sum(w)
    safe_n = jnp.where(n > 0, n, 1.0)
    xs = x - shift_x
    ys = y - shift_y
    mx = jnp.einsum("r,rd->d", w, xs, precision=HIGHEST) / safe_n
    my = jnp.einsum("r,rd->d", w, ys, precision=HIGHEST) / safe_n
    # Second pass: corrects the rounding of the first mean (matters when the chunk mean is
    # far from the shift, e.g. on the very first chunk).
    mx = mx + jnp.einsum("r,rd->d", w, xs - mx, precision=HIGHEST) / safe_n
    my = my + jnp.einsum("r,rd->d", w, ys - my, precision=HIGHEST) / safe_n
    xc = (xs - mx) * w[:, None]
    yc = ys - my
    xc_raw = xs - mx
    sxx = jnp.einsum("ri,rj->ij", xc, xc_raw, precision=HIGHEST)
    syy = jnp.einsum("ri,rj->ij", yc * w[:, None], yc, precision=HIGHEST)
    sxy = jnp.einsum("ri,rj->ij", xc, yc, precision=HIGHEST)
    return n, mx, my, sxx, syy, sxy


def _chan_merge(
    a: MomentsState,
    shift_x: jax.Array,
    shift_y: jax.Array,
    nb: jax.Array,
    mb_x: jax.Array,
    mb_y: jax.Array,
    sb: Sequence[jax.Array],
) -> MomentsState:
    """Chan et al. merge of ``a`` with a part's (count, means, centred sums); the means of
    both are relative to (``shift_x``, ``shift_y``), which the merged state keeps."""
    n = a.count + nb
    safe_n = jnp.where(n > 0, n, 1.0)
    dx = mb_x - a.mean_x
    dy = mb_y - a.mean_y
    frac = nb / safe_n
    coef = a.count * nb / safe_n
    return MomentsState(
        count=n,
        shift_x=shift_x,
        shift_y=shift_y,
        mean_x=a.mean_x + dx * frac,
        mean_y=a.mean_y + dy * frac,
        sxx=a.sxx + sb[0] + coef * jnp.outer(dx, dx),
        syy=a.syy + sb[1] + coef * jnp.outer(dy, dy),
        sxy=a.sxy + sb[2] + coef * jnp.outer(dx, dy),
    )


class CrossMoments:
    """Running count, means, XtX, YtY and XtY (centred) of two row-aligned streams.

    ``update(state, (x,), w)`` accumulates X alone (d2 must be 0); ``update(state, (x, y), w)``
    accumulates both. This is the base of CCA, CKA and Pearson correlation.

    Args:
      d1: columns of X.
      d2: columns of Y (0 for a single stream).
      dtype: accumulation dtype (float32; float64 when ``jax_enable_x64`` is on).
    """

    def __init__(self, d1: int, d2: int = 0, dtype=jnp.float32):
        self.d1 = checks.check_positive_int("CrossMoments d1", d1)
        self.d2 = checks.check_positive_int("CrossMoments d2", d2, minimum=0)
        self.dtype = dtype

    def init(self) -> MomentsState:
        z = lambda *s: jnp.zeros(s, self.dtype)
        return MomentsState(
            count=z(),
            shift_x=z(self.d1),
            shift_y=z(self.d2),
            mean_x=z(self.d1),
            mean_y=z(self.d2),
            sxx=z(self.d1, self.d1),
            syy=z(self.d2, self.d2),
            sxy=z(self.d1, self.d2),
        )

    def _split(self, arrays):
        x = jnp.asarray(arrays[0], self.dtype)
        if len(arrays) > 1:
            y = jnp.asarray(arrays[1], self.dtype)
        else:
            y = jnp.zeros((x.shape[0], self.d2), self.dtype)
        if x.shape[1:] != (self.d1,) or y.shape[1:] != (self.d2,):
            raise checks.InputError(
                f"CrossMoments: expected chunks X [rows, {self.d1}] and Y [rows, {self.d2}], "
                f"got {tuple(x.shape)} and {tuple(y.shape)}"
            )
        return x, y

    def update(self, state: MomentsState, arrays, weights) -> MomentsState:
        x, y = self._split(arrays)
        w = jnp.asarray(weights, self.dtype)
        # The first rows ever seen fix the shift (their weighted mean).
        first = state.count == 0
        n0 = jnp.maximum(jnp.sum(w), 1e-30)
        shift_x = jnp.where(
            first, jnp.einsum("r,rd->d", w, x, precision=HIGHEST) / n0, state.shift_x
        )
        shift_y = jnp.where(
            first, jnp.einsum("r,rd->d", w, y, precision=HIGHEST) / n0, state.shift_y
        )
        nb, mbx, mby, *sb = _chunk_moments(x, y, w, shift_x, shift_y)
        # When ``first``, the state is empty and its means carry no weight in the merge.
        return _chan_merge(state, shift_x, shift_y, nb, mbx, mby, sb)

    def merge(self, a: MomentsState, b: MomentsState) -> MomentsState:
        # Express b relative to a's shift (or take b's shift when a is empty).
        a_empty = a.count == 0
        shift_x = jnp.where(a_empty, b.shift_x, a.shift_x)
        shift_y = jnp.where(a_empty, b.shift_y, a.shift_y)
        mbx = b.mean_x + (b.shift_x - shift_x)
        mby = b.mean_y + (b.shift_y - shift_y)
        sb = (b.sxx, b.syy, b.sxy)
        return _chan_merge(a, shift_x, shift_y, b.count, mbx, mby, sb)

    def merge_across(self, state: MomentsState, axis_name: str) -> MomentsState:
        """Exact k-way merge by collectives: centre every part on the pooled mean."""
        # A common shift: the first non-empty device's shift (all shifts are close to the
        # data, so differences of shifts are small and exact in float).
        idx = jax.lax.axis_index(axis_name)
        nonempty = state.count > 0
        big = jnp.iinfo(jnp.int32).max
        leader = jax.lax.pmin(jnp.where(nonempty, idx, big), axis_name)
        is_leader = (idx == leader).astype(self.dtype)
        shift_x = jax.lax.psum(state.shift_x * is_leader, axis_name)
        shift_y = jax.lax.psum(state.shift_y * is_leader, axis_name)
        mx_i = state.mean_x + (state.shift_x - shift_x)
        my_i = state.mean_y + (state.shift_y - shift_y)
        n = jax.lax.psum(state.count, axis_name)
        safe_n = jnp.where(n > 0, n, 1.0)
        mx = jax.lax.psum(state.count * mx_i, axis_name) / safe_n
        my = jax.lax.psum(state.count * my_i, axis_name) / safe_n
        dx = mx_i - mx
        dy = my_i - my
        c = state.count
        sxx = jax.lax.psum(state.sxx + c * jnp.outer(dx, dx), axis_name)
        syy = jax.lax.psum(state.syy + c * jnp.outer(dy, dy), axis_name)
        sxy = jax.lax.psum(state.sxy + c * jnp.outer(dx, dy), axis_name)
        return MomentsState(
            count=n,
            shift_x=shift_x,
            shift_y=shift_y,
            mean_x=mx,
            mean_y=my,
            sxx=sxx,
            syy=syy,
            sxy=sxy,
        )

    def finalize(self, state: MomentsState) -> Moments:
        s = jax.tree.map(lambda v: np.asarray(jax.device_get(v), np.float64), state)
        n = float(s.count)
        if n <= 0:
            raise checks.InputError(
                "CrossMoments: no rows were accumulated (empty stream or all rows masked)"
            )
        return Moments(
            count=n,
            mean_x=s.shift_x + s.mean_x,
            mean_y=s.shift_y + s.mean_y,
            cov_xx=s.sxx / n,
            cov_yy=s.syy / n,
            cov_xy=s.sxy / n,
            precision=float(np.finfo(state.sxx.dtype).eps),
        )


# --------------------------------------------------------------------------------------------
# Several accumulators over one stream.
# --------------------------------------------------------------------------------------------


class Combined:
    """Runs several accumulators on one pass; each reads a subset of the chunk's arrays.

    Args:
      parts: ``{name: (accumulator, (array indices...))}``; state and result are dicts.
    """

    def __init__(self, parts: dict[str, tuple[Any, tuple[int, ...]]]):
        if not parts:
            raise checks.InputError("Combined: no accumulators given")
        self.parts = dict(parts)

    def init(self) -> dict:
        return {k: acc.init() for k, (acc, _) in self.parts.items()}

    def update(self, state: dict, arrays, weights) -> dict:
        return {
            k: acc.update(state[k], tuple(arrays[i] for i in idx), weights)
            for k, (acc, idx) in self.parts.items()
        }

    def merge(self, a: dict, b: dict) -> dict:
        return {k: acc.merge(a[k], b[k]) for k, (acc, _) in self.parts.items()}

    def merge_across(self, state: dict, axis_name: str) -> dict:
        return {k: merge_across(acc, state[k], axis_name) for k, (acc, _) in self.parts.items()}

    def finalize(self, state: dict) -> dict:
        return {k: acc.finalize(state[k]) for k, (acc, _) in self.parts.items()}


# --------------------------------------------------------------------------------------------
# Weighted sums of row-aligned arrays (compensated across chunks).
# --------------------------------------------------------------------------------------------


@flax.struct.dataclass
class SumsState:
    """Running compensated sums: ``total + comp`` is the sum (Neumaier's two-term form)."""

    total: dict
    comp: dict


def _two_sum(s: jax.Array, x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``t = s + x`` and its exact rounding error (Neumaier 1974; branch-free)."""
    t = s + x
    err = jnp.where(jnp.abs(s) >= jnp.abs(x), (s - t) + x, (x - t) + s)
    return t, err


class Sums:
    """Weighted sums over rows of named arrays, optionally split by an integer segment id.

    ``parts = {name: (index, segment_index, n_segments)}``: the sum over rows ``r`` of
    ``weights[r] * arrays[index][r]`` (shape ``arrays[index].shape[1:]``), or with a segment
    column ``s = arrays[segment_index]`` (int, ``-1`` = none) the per-segment sums
    ``[n_segments, ...]`` (segment ids outside ``[0, n_segments)`` count nowhere). Use
    ``segment_index=None`` for plain sums.

    Numerics: a chunk is reduced in the accumulation dtype (error ~ eps log(rows) of the
    chunk's absolute sum), and chunks, devices and hosts are added with a compensated
    (Neumaier) sum, so the error does not grow with the number of chunks. The dtype is float64
    when ``jax_enable_x64`` is on, else float32. Identical input columns give bitwise
    identical sums (each column is reduced by the same sequence of operations).

    Args:
      parts: see above.
      shapes: ``{name: trailing shape}`` of each part's input rows (without the segment axis).
      dtype: accumulation dtype (default: float64 under x64, else float32).
    """

    def __init__(
        self,
        parts: dict[str, tuple[int, int | None, int]],
        shapes: dict[str, tuple[int, ...]],
        dtype=None,
    ):
        if not parts:
            raise checks.InputError("Sums: no parts given")
        if set(parts) != set(shapes):
            raise checks.InputError(
                f"Sums: parts {sorted(parts)} and shapes {sorted(shapes)} name different arrays"
            )
        self.parts = {
            k: (int(i), None if s is None else int(s), int(n)) for k, (i, s, n) in parts.items()
        }
        self.shapes = {k: tuple(int(d) for d in v) for k, v in shapes.items()}
        if dtype is None:
            dtype = jnp.float64 if jnp.asarray(0.0).dtype == jnp.float64 else jnp.float32
        self.dtype = dtype

    def _shape(self, name: str) -> tuple[int, ...]:
        _, seg, n = self.parts[name]
        return ((n,) if seg is not None else ()) + self.shapes[name]

    def init(self) -> SumsState:
        zeros = {k: jnp.zeros(self._shape(k), self.dtype) for k in self.parts}
        return SumsState(total=zeros, comp=jax.tree.map(jnp.zeros_like, zeros))

    def _chunk_sum(self, name: str, arrays, w: jax.Array) -> jax.Array:
        index, seg, n = self.parts[name]
        x = jnp.asarray(arrays[index], self.dtype)
        if x.shape[1:] != self.shapes[name]:
            raise checks.InputError(
                f"Sums {name!r}: expected rows of shape "
                f"{self.shapes[name]}, got {tuple(x.shape[1:])}"
            )
        wx = x * w.reshape((-1,) + (1,) * (x.ndim - 1))
        if seg is None:
            return jnp.sum(wx, axis=0)
        ids = jnp.asarray(arrays[seg]).astype(jnp.int32)
        onehot = (ids[:, None] == jnp.arange(n, dtype=jnp.int32)[None, :]).astype(self.dtype)
        return jnp.einsum("rc,r...->c...", onehot, wx, precision=HIGHEST)

    def update(self, state: SumsState, arrays, weights) -> SumsState:
        w = jnp.asarray(weights, self.dtype)
        part = {k: self._chunk_sum(k, arrays, w) for k in self.parts}
        return self._add(state, part, None)

    def _add(self, state: SumsState, total: dict, comp: dict | None) -> SumsState:
        new_total, new_comp = {}, {}
        for k in self.parts:
            t, err = _two_sum(state.total[k], total[k])
            new_total[k] = t
            new_comp[k] = state.comp[k] + err + (0.0 if comp is None else comp[k])
        return SumsState(total=new_total, comp=new_comp)

    def merge(self, a: SumsState, b: SumsState) -> SumsState:
        return self._add(a, b.total, b.comp)

    def finalize(self, state: SumsState) -> dict[str, np.ndarray]:
        """``{name: float64 numpy sum}`` (``total + comp`` added in float64)."""
        out = {}
        for k in self.parts:
            t = np.asarray(jax.device_get(state.total[k]), np.float64)
            c = np.asarray(jax.device_get(state.comp[k]), np.float64)
            out[k] = t + c
        return out
