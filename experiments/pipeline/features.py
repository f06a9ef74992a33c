"""Step 1 and 2 of the pipeline: feature activations of two SAEs on the same tokens, streamed.

One pass over a paired stream of ``(row_ids, acts_a, acts_b)`` chunks computes, on device:
both SAEs' feature activations (`engine.accumulators.accumulate` with a ``transform`` that
encodes each chunk, the SAEs travelling as replicated parameters), per-feature statistics of
each side (`engine.feature_stats`: density, mean, std, max, top-activating rows), and the
activation correlation of every feature of A with every feature of B
(`engine.correlation.CorrelationAccumulator`; the sparse TopK path when both SAEs are TopK,
cost O(tokens * k_a * k_b)). The pass checkpoints with orbax and resumes mid-stream.

Bounded memory (``memory_budget``, bytes; default half the machine's memory,
`engine.mesh.default_memory_budget`): when the single-pass correlation state (``n_a x n_b``
float32 per device, `engine.correlation.state_copies`) does not fit, the pass is tiled:

1. one pass for the per-feature statistics (as above, without the correlation; from the
   TopK codes when both SAEs are TopK, so no ``[rows, F]`` array is formed);
2. TopK SAEs: one pass that encodes both sides to ``(values, indices)`` codes, kept in memory
   when they take under a quarter of the budget, else written to ``<checkpoint_dir>/codes``
   (memory-mapped), so the token stream is encoded once;
3. `engine.correlation.correlate` over the codes with blocks of features sized by
   `engine.correlation.tiles_for_budget` (one pass over the codes per block, each block
   checkpointed). Non-TopK SAEs are re-encoded on the fly for every block.

The tiled result equals the single-pass one up to float32 summation order (tests).
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os

import jax
import jax.numpy as jnp
import numpy as np

from engine import (
    accumulators,
    checkpoint,
    checks,
    correlation,
    feature_stats,
    metrics_io,
    sparse_ops,
    streaming,
)
from engine import mesh as mesh_lib
from models import sae as sae_lib


@dataclasses.dataclass
class FeaturePass:
    stats_a: feature_stats.FeatureStats
    stats_b: feature_stats.FeatureStats
    matches: correlation.CorrelationMatches
    corr: np.ndarray | None  # [F_a, F_b] when small enough to keep


def _use_sparse(sae_a: sae_lib.SAE, sae_b: sae_lib.SAE) -> bool:
    return sae_a.config.activation == "topk" and sae_b.config.activation == "topk"


@dataclasses.dataclass(frozen=True)
class PassPlan:
    """How the correlation of one SAE pair is computed under a memory budget.

    Attributes:
      budget: bytes allowed.
      tiled: False = one pass with the full ``n_a x n_b`` state; True = blocks.
      tile_a / tile_b: features per block (``n_a`` / ``n_b`` when not tiled).
      blocks: number of blocks (passes over the codes).
      state_bytes: bytes of correlation state alive at once.
      codes_on_disk: TopK codes written to disk instead of memory.
    """

    budget: int
    tiled: bool
    tile_a: int
    tile_b: int
    blocks: int
    state_bytes: int
    codes_on_disk: bool = False


def plan_pass(
    n_a: int,
    n_b: int,
    *,
    n_data: int,
    memory_budget: int | None = None,
    sparse: bool = True,
    chunk_rows: int = 1024,
    rows: int | None = None,
    k_a: int = 0,
    k_b: int = 0,
    keep_matrix: bool = False,
    mesh=None,
) -> PassPlan:
    """The `PassPlan` for ``n_a x n_b`` features on a mesh with ``n_data`` data devices.

    ``rows`` (tokens, when known) and ``k_a`` / ``k_b`` size the TopK codes of the tiled path;
    ``chunk_rows`` sizes the per-chunk dense activations (``chunk_rows x (n_a + n_b)``).
    """
    budget = mesh_lib.default_memory_budget(mesh) if memory_budget is None else int(memory_budget)
    checks.check_positive_int("memory_budget", budget)
    # CPU devices share the host's RAM; accelerators each have their own memory (the budget
    # is then per device, as `default_memory_budget` reports it).
    shared = mesh is None or np.asarray(mesh.devices).flat[0].platform == "cpu"
    chunk_bytes = 4 * chunk_rows * (n_a + n_b) * 3
    single = (
        4
        * n_a
        * n_b
        * (
            correlation.state_copies(n_data, inplace=False, shared_memory=shared)
            + (2 if keep_matrix else 0)
        )
    )
    if single + chunk_bytes <= budget:
        return PassPlan(budget, False, n_a, n_b, 1, single)
    codes = 0 if rows is None else 8 * rows * (k_a + k_b)
    on_disk = sparse and (rows is None or codes > budget // 4)
    reserved = chunk_bytes + (0 if on_disk else codes)
    ta, tb = correlation.tiles_for_budget(
        n_a,
        n_b,
        budget,
        n_data=n_data,
        sparse=sparse,
        reserved_bytes=reserved,
        shared_memory=shared,
    )
    blocks = -(-n_a // ta) * -(-n_b // tb)
    return PassPlan(
        budget,
        True,
        ta,
        tb,
        blocks,
        4 * ta * tb * correlation.state_copies(n_data, shared_memory=shared),
        on_disk,
    )


def feature_pass(
    stream,
    sae_a: sae_lib.SAE,
    sae_b: sae_lib.SAE,
    mesh,
    *,
    top_n: int = 10,
    checkpoint_dir: str | None = None,
    progress: bool = False,
    sparse: bool | None = None,
    memory_budget: int | None = None,
) -> FeaturePass:
    """Runs both SAEs over a paired stream and accumulates statistics and correlations.

    Args:
      stream: `ChunkStream` of ``(row_ids [rows] int32, acts_a [rows, d_a], acts_b [rows,
        d_b])``; row ids are stream positions (used to find top-activating tokens).
      sae_a / sae_b: the two SAEs; their ``d_in`` must match the activation widths.
      top_n: top-activating rows kept per feature.
      checkpoint_dir: resume the pass from here after a kill.
      sparse: force the sparse (TopK values/indices) correlation path; default: when both
        SAEs are TopK.
      memory_budget: bytes the pass may use (default: `engine.mesh.default_memory_budget`);
        above it the correlation is tiled (module docstring).
    """
    fa, fb = sae_a.config.d_sae, sae_b.config.d_sae
    sparse = _use_sparse(sae_a, sae_b) if sparse is None else sparse
    plan = plan_pass(
        fa,
        fb,
        n_data=mesh.shape[mesh_lib.DATA],
        memory_budget=memory_budget,
        sparse=sparse,
        chunk_rows=stream.chunk_size,
        rows=stream.num_rows or getattr(stream, "num_rows_hint", None),
        k_a=sae_a.config.k,
        k_b=sae_b.config.k,
        mesh=mesh,
        keep_matrix=fa * fb <= correlation.DEFAULT_KEEP_MATRIX,
    )
    if plan.tiled:
        logging.info(
            "feature pass %d x %d: tiled %d x %d (%d blocks, %.2f GB of state, budget %.2f GB)",
            fa,
            fb,
            plan.tile_a,
            plan.tile_b,
            plan.blocks,
            plan.state_bytes / 1e9,
            plan.budget / 1e9,
        )
        return _tiled_pass(
            stream,
            sae_a,
            sae_b,
            mesh,
            plan,
            top_n=top_n,
            sparse=sparse,
            checkpoint_dir=checkpoint_dir,
            progress=progress,
        )
    acc, step = _single_pass_program(fa, fb, top_n, sparse, mesh)
    ckpt = None if checkpoint_dir is None else checkpoint.Checkpointer(checkpoint_dir)
    state = accumulators.accumulate(
        acc,
        stream,
        mesh,
        checkpointer=ckpt,
        save_every=50,
        progress=progress,
        params=(sae_a, sae_b),
        step=step,
    )
    if ckpt is not None:
        ckpt.close()
    out = acc.finalize(state)
    result = out["corr"]
    matches = correlation.correlation_matches(result, n_a=fa, n_b=fb)
    return FeaturePass(
        stats_a=out["stats_a"], stats_b=out["stats_b"], matches=matches, corr=result.corr
    )


@functools.lru_cache(maxsize=16)
def _single_pass_program(fa: int, fb: int, top_n: int, sparse: bool, mesh):
    """The single pass's accumulator and its compiled step, built once per shape and mesh:
    every comparison of a grid (and every rerun in one process) reuses the jitted step
    instead of tracing it again and fetching it from the persistent compilation cache
    (~0.3-0.6 s per comparison on 2 cores)."""
    parts = _stats_parts(fa, fb, top_n, sparse)
    if sparse:
        parts["corr"] = (correlation.CorrelationAccumulator(fa, fb, sparse=True), (1, 2, 3, 4))
    else:
        parts["corr"] = (correlation.CorrelationAccumulator(fa, fb), (1, 2))
    acc = accumulators.Combined(parts)
    # Chunks are (row_ids, acts_a, acts_b): three arrays in, the transform encodes them.
    return acc, accumulators.make_sharded_update(acc, mesh, 3, _transform(sparse))


def _stats_parts(fa: int, fb: int, top_n: int, sparse: bool) -> dict:
    """Per-feature statistics of both sides: from the TopK codes ``(values, indices)`` when
    ``sparse`` (O(rows * k) per chunk, `feature_stats.SparseFeatureStatsAccumulator`), else
    from the dense activations (O(rows * F)). Indices refer to `_transform`'s outputs."""
    if sparse:
        return {
            "stats_a": (feature_stats.SparseFeatureStatsAccumulator(fa, top_n), (1, 2, 0)),
            "stats_b": (feature_stats.SparseFeatureStatsAccumulator(fb, top_n), (3, 4, 0)),
        }
    return {
        "stats_a": (feature_stats.FeatureStatsAccumulator(fa, top_n), (1, 0)),
        "stats_b": (feature_stats.FeatureStatsAccumulator(fb, top_n), (2, 0)),
    }


def _transform(sparse: bool):
    """On-device featurisation of a chunk ``(row_ids, xa, xb)`` for `accumulate`: ``(row_ids,
    va, ia, vb, ib)`` TopK codes when ``sparse`` (the dense ``[rows, F]`` activations are
    never formed), else ``(row_ids, za, zb)``."""

    # Each device encodes its own rows (inside shard_map), so the native top-k kernel runs
    # locally on every CPU device (engine.sparse_ops; other platforms keep XLA's).
    native = sparse_ops.native_default()

    def transform(params, row_ids, xa, xb):
        a, b = params
        if sparse:
            va, ia = a.encode_sparse(xa, forward_only=True, native=native)
            vb, ib = b.encode_sparse(xb, forward_only=True, native=native)
            return row_ids, va, ia.astype(jnp.int32), vb, ib.astype(jnp.int32)
        return row_ids, a.encode(xa), b.encode(xb)

    return transform


def _sub(root: str | None, name: str) -> str | None:
    return None if root is None else os.path.join(root, name)


def _tiled_pass(
    stream,
    sae_a,
    sae_b,
    mesh,
    plan: PassPlan,
    *,
    top_n: int,
    sparse: bool,
    checkpoint_dir: str | None,
    progress: bool,
) -> FeaturePass:
    fa, fb = sae_a.config.d_sae, sae_b.config.d_sae
    acc = accumulators.Combined(_stats_parts(fa, fb, top_n, sparse))
    ckpt_dir = _sub(checkpoint_dir, "stats")
    ckpt = None if ckpt_dir is None else checkpoint.Checkpointer(ckpt_dir)
    stream.seek(0)
    state = accumulators.accumulate(
        acc,
        stream,
        mesh,
        checkpointer=ckpt,
        save_every=50,
        progress=progress,
        transform=_transform(sparse),
        params=(sae_a, sae_b),
    )
    if ckpt is not None:
        ckpt.close()
    stats = acc.finalize(state)
    del state
    if sparse:
        codes = encode_codes(
            stream,
            sae_a,
            sae_b,
            directory=_sub(checkpoint_dir, "codes") if plan.codes_on_disk else None,
            progress=progress,
        )
        # Codes are rows * k: the correlation streams them in larger chunks than the
        # activations (the native kernel's per-chunk sort pays off with more rows).
        corr_chunk = max(
            stream.chunk_size,
            correlation.sparse_chunk_rows(codes[0].shape[0], mesh.shape[mesh_lib.DATA]),
        )
        corr_source = streaming.ChunkStream(codes, corr_chunk, name="codes", check_finite=False)
    else:
        corr_source = _encoded_stream(stream, sae_a, sae_b)
    matches = correlation.correlate(
        corr_source,
        fa,
        fb,
        mesh,
        sparse=sparse,
        tile_a=plan.tile_a,
        tile_b=plan.tile_b,
        progress=progress,
        checkpoint_dir=_sub(checkpoint_dir, "blocks"),
    )
    return FeaturePass(
        stats_a=stats["stats_a"], stats_b=stats["stats_b"], matches=matches, corr=None
    )


@functools.partial(jax.jit, static_argnums=4)
def _encode_pair(sae_a, sae_b, xa, xb, native: bool):
    va, ia = sae_a.encode_sparse(xa, forward_only=True, native=native)
    vb, ib = sae_b.encode_sparse(xb, forward_only=True, native=native)
    return va, ia.astype(jnp.int32), vb, ib.astype(jnp.int32)


@jax.jit
def _encode_dense_pair(sae_a, sae_b, xa, xb):
    return sae_a.encode(xa), sae_b.encode(xb)


def encode_codes(
    stream, sae_a, sae_b, *, directory: str | None = None, progress: bool = False
) -> tuple[np.ndarray, ...]:
    """Both SAEs' TopK codes ``(vals_a, idx_a, vals_b, idx_b)`` over the whole stream.

    Kept in memory, or (``directory``) appended to raw files and returned memory-mapped, so
    that memory stays at one chunk; a finished directory (``done`` marker) is reused.
    """
    if directory is not None and metrics_io.is_remote(directory):
        # Memory-mapped codes need a local file system: a one-process gs:// run keeps them in a
        # local scratch folder named after the remote one (a rerun on this machine reuses
        # them); several processes share no local folder, so they keep the codes in memory.
        import hashlib
        import tempfile

        digest = hashlib.sha256(directory.encode()).hexdigest()[:16]
        directory = (
            os.path.join(tempfile.gettempdir(), "sae-universality-codes", digest)
            if jax.process_count() == 1
            else None
        )
    ka, kb = sae_a.config.k, sae_b.config.k
    specs = (
        ("vals_a", np.float32, ka),
        ("idx_a", np.int32, ka),
        ("vals_b", np.float32, kb),
        ("idx_b", np.int32, kb),
    )

    def mapped():
        rows = int(open(os.path.join(directory, "done")).read())
        return tuple(
            np.memmap(os.path.join(directory, f"{n}.bin"), dt, "r", shape=(rows, k))
            for n, dt, k in specs
        )

    # Several processes: whether the codes are on disk is process 0's answer (the encoding
    # below runs on the global mesh, so all processes must take the same branch); process 0
    # alone writes them, the others keep theirs in memory.
    if directory is not None and mesh_lib.agree(os.path.exists(os.path.join(directory, "done"))):
        return mapped()
    parts: list[list[np.ndarray]] = [[] for _ in specs]
    files = None
    if directory is not None and mesh_lib.is_primary():
        os.makedirs(directory, exist_ok=True)
        files = [open(os.path.join(directory, f"{n}.bin"), "wb") for n, _, _ in specs]
    rows = 0
    stream.seek(0)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=stream.num_rows, unit="rows", desc="encode")
    native = sparse_ops.native_default()
    for chunk in stream:
        n = chunk.num_valid
        xa, xb = jnp.asarray(chunk.arrays[1][:n]), jnp.asarray(chunk.arrays[2][:n])
        out = jax.device_get(_encode_pair(sae_a, sae_b, xa, xb, native))
        for i, a in enumerate(out):
            a = np.ascontiguousarray(a, specs[i][1])
            if files is not None:
                files[i].write(a.tobytes())
            else:
                parts[i].append(a)
        rows += n
        if bar is not None:
            bar.update(n)
    if bar is not None:
        bar.close()
    if files is None:
        return tuple(np.concatenate(p) for p in parts)
    for f in files:
        f.close()
    with open(os.path.join(directory, "done"), "w") as f:
        f.write(str(rows))
    return mapped()


def _encoded_stream(stream, sae_a, sae_b) -> streaming.ChunkStream:
    """Dense feature activations ``(za, zb)`` encoded on the fly (re-read per block)."""

    def open_at(start):
        stream.seek(start)
        for chunk in stream:
            n = chunk.num_valid
            yield jax.device_get(
                _encode_dense_pair(
                    sae_a, sae_b, jnp.asarray(chunk.arrays[1][:n]), jnp.asarray(chunk.arrays[2][:n])
                )
            )

    return streaming.ChunkStream(open_at, stream.chunk_size, name="encoded", check_finite=False)


def cache_pair_stream(
    cache_a,
    hookpoint_a: str,
    cache_b,
    hookpoint_b: str,
    chunk_size: int,
    *,
    exclude_special: bool = False,
) -> streaming.ChunkStream:
    """``(row_ids, acts_a, acts_b)`` chunks of two activation caches over the same tokens,
    read from disk chunk by chunk (the streaming input of `feature_pass`; row ids are token
    positions among the selected rows, as `top_rows` expects)."""
    from models import activation_cache

    paired = activation_cache.paired_source(
        cache_a,
        hookpoint_a,
        cache_b,
        hookpoint_b,
        exclude_special=exclude_special,
        block_rows=chunk_size,
    )

    def open_at(start: int):
        pos = start
        for tokens, xa, xb in paired.open_at(start):
            n = tokens.shape[0]
            yield np.arange(pos, pos + n, dtype=np.int32), xa, xb
            pos += n

    stream = streaming.ChunkStream(open_at, chunk_size, name="cache pair")
    stream.num_rows_hint = paired.num_rows
    return stream


def check_widths(sae: sae_lib.SAE, width: int, what: str) -> None:
    """One-line error when an SAE does not fit the hookpoint it is applied to."""
    if sae.config.d_in != width:
        raise checks.InputError(
            f"{what}: SAE d_in={sae.config.d_in} does not match the "
            f"activation width {width} of its hookpoint"
        )


def checkpoint_path(root: str, name: str) -> str:
    return os.path.join(root, "feature_pass", name)
