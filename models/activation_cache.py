"""On-disk activation caches: harvest once (resumable, bounded memory), read back as a source.

`harvest` runs a `models.lm.LanguageModel` over token contexts and streams the activations of
one or more hookpoints to disk in shards; `ActivationCache` reads a cache back, and its
`ActivationCache.source` is an activation source (`models.activation_source`) whose
``open_at(start_row)`` plugs into `engine.streaming.ChunkStream`.

Layout of a cache directory::

    metadata.json          format, version, model (name, revision, type, depth, width, compute
                           dtype), tokenizer fingerprint, hookpoints (+ SAELens / sparsify
                           names), widths, context_length, storage dtype, shard_contexts,
                           text source, special-token ids, complete flag, token counts, shards
    progress.json          the shards finished so far: the resume point
    tokens/00000.npy       [contexts, context_length] int32: the token ids of shard 0
    mask/00000.npy         [contexts, context_length] bool: False on padding
    <hookpoint>/00000.npy  [contexts, context_length, d]: float32 | float16 | uint16 holding
                           bfloat16 bits (numpy has no bfloat16; the metadata says which)

Plain ``.npy`` files so that reads are memory-mapped, need no library, and run at the speed
of the disk (experiments/bench_harvest.py compares against raw ``np.load``).

Resumability: a shard is written to ``*.npy.tmp`` files through memory maps (memory stays at
one batch: the page cache, not the process, holds the shard), flushed, renamed into place,
and only then recorded in ``progress.json`` (written atomically). A run killed at any point
(SIGKILL included) leaves a cache whose recorded shards are complete; rerunning `harvest` with
the same settings checks that the text gives the same tokens for the recorded shards, then
continues after them. Different settings into the same directory are refused.

Rows of a source are tokens: the real (unmasked) tokens of each context, context after
context, optionally without special tokens (``exclude_special``, BOS/EOS/PAD/CLS/SEP...).

Several processes (`jax.distributed`, e.g. ``launch/cpu_multiprocess.sh``): every process
reads the same deterministic text and runs the model on its own slice of it, shard ``i``
going to process ``i % process_count``; each writes its own shards into the shared cache
directory. Shard boundaries do not depend on the number of processes, so the cache is the
one a single process writes. Process 0 alone writes ``metadata.json`` and ``progress.json``:
after every round of ``process_count`` shards the per-shard counts are gathered
(`jax.experimental.multihost_utils`) and the round is recorded, so a killed run resumes after
the last finished round.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import jax
import numpy as np

from engine import checks, fingerprint, metrics_io
from engine import mesh as mesh_lib
from models import activation_source as src_lib
from models import lm as lm_lib
from models import text

FORMAT = "sae-universality-activation-cache"
VERSION = 1
STORAGE_DTYPES = lm_lib.STORAGE_DTYPES
OUT_DTYPES = STORAGE_DTYPES + ("native",)
DEFAULT_SHARD_BYTES = 128 << 20  # per hookpoint and shard
_FILE_DTYPE = {"float32": np.float32, "float16": np.float16, "bfloat16": np.uint16}
_ITEMSIZE = {"float32": 4, "float16": 2, "bfloat16": 2}


def _shard_file(root: str, kind: str, index: int) -> str:
    return os.path.join(root, kind, f"{index:05d}.npy")


def _read_json(path: str) -> Any:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise checks.InputError(f"{path}: not valid JSON ({e.msg}); the file is damaged") from None
    except UnicodeDecodeError:
        raise checks.InputError(
            f"{path}: not UTF-8 JSON text (a binary file?); the file is damaged"
        ) from None


NPY_MAGIC = b"\x93NUMPY"


def npy_header(path: str, what: str) -> tuple[tuple, np.dtype, int]:
    """``(shape, dtype, data offset)`` of a .npy file, with one-line errors for a missing
    file, a file that is not .npy at all (garbage, text, .npz, pickle), a damaged header, or
    object (pickled) arrays. Never unpickles."""
    if not os.path.isfile(path):
        raise checks.InputError(f"{what} {path}: no such file")
    with open(path, "rb") as f:
        head = f.read(len(NPY_MAGIC))
        if head != NPY_MAGIC:
            kind = (
                "an .npz archive"
                if head[:2] == b"PK"
                else "empty"
                if not head
                else "not a .npy file (no NUMPY header: garbage, text or a pickle?)"
            )
            raise checks.InputError(
                f"{what} {path}: {kind}; expected a .npy array written by numpy.save"
            )
        f.seek(0)
        try:
            version = np.lib.format.read_magic(f)
            if version == (1, 0):
                shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
            else:
                shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
        except (ValueError, EOFError, SyntaxError) as e:
            raise checks.InputError(
                f"{what} {path}: damaged .npy header ({str(e).splitlines()[0][:80]})"
            ) from None
        offset = f.tell()
    if np.dtype(dtype).hasobject:
        raise checks.InputError(
            f"{what} {path}: holds object (pickled) arrays; refused (only "
            "plain numeric arrays are read, never pickles)"
        )
    return tuple(shape), np.dtype(dtype), offset


def load_npy(path: str, what: str, *, mmap_mode: str | None = "r") -> np.ndarray:
    """A plain numeric .npy (memory-mapped by default), checked first by `npy_header` and
    for truncation: every problem is one line naming ``what`` and the file."""
    shape, dtype, offset = npy_header(path, what)
    need = offset + int(np.prod(shape)) * dtype.itemsize
    size = os.path.getsize(path)
    if size < need:
        raise checks.InputError(
            f"{what} {path} is truncated ({size} bytes, expected {need} for {shape} {dtype})"
        )
    return np.load(path, allow_pickle=False, mmap_mode=mmap_mode)


def _check_npy(path: str, shape: tuple, dtype) -> None:
    """Raises unless ``path`` is a complete .npy of ``shape`` / ``dtype`` (header + size)."""
    if not os.path.exists(path):
        raise checks.InputError(f"activation cache file {path} is missing")
    got_shape, got_dtype, offset = npy_header(path, "activation cache file")
    if tuple(got_shape) != tuple(shape) or np.dtype(got_dtype) != np.dtype(dtype):
        raise checks.InputError(
            f"activation cache file {path}: expected shape {tuple(shape)} "
            f"{np.dtype(dtype)}, found {tuple(got_shape)} {got_dtype}"
        )
    need = offset + int(np.prod(shape)) * np.dtype(dtype).itemsize
    size = os.path.getsize(path)
    if size < need:
        raise checks.InputError(
            f"activation cache file {path} is truncated ({size} bytes, expected {need})"
        )


# --------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------


class _Puller:
    """Takes exactly ``k`` contexts at a time from a stream of `text.Contexts` blocks."""

    def __init__(self, blocks: Iterator[text.Contexts]):
        self._it = iter(blocks)
        self._buf: text.Contexts | None = None

    def take(self, k: int) -> text.Contexts | None:
        parts, have = [], 0
        while have < k:
            if self._buf is None or len(self._buf) == 0:
                self._buf = next(self._it, None)
                if self._buf is None:
                    break
                continue
            part = self._buf[: k - have]
            self._buf = self._buf[k - have :]
            parts.append(part)
            have += len(part)
        return text.Contexts.concat(parts) if parts else None


def _settings_diff(a: dict, b: dict) -> str | None:
    """The differing settings in one phrase (`engine.fingerprint.diff`, the same mechanism
    that guards experiment workdirs), or None."""
    changes = fingerprint.diff(a, b)
    return (
        "; ".join(f"{k}: cache has {x!r}, this run has {y!r}" for k, x, y in changes[:3])
        if changes
        else None
    )


def harvest(
    lm: lm_lib.LanguageModel,
    contexts: text.Contexts | np.ndarray | Callable,
    hookpoints: str | Sequence[str],
    cache_dir: str,
    *,
    dtype: str = "float32",
    batch_size: int = 8,
    shard_contexts: int | None = None,
    max_contexts: int | None = None,
    num_contexts: int | None = None,
    text_info: Any = None,
    progress: bool = True,
    on_batch: Callable[[int, int], None] | None = None,
) -> ActivationCache:
    """Runs ``lm`` over ``contexts`` and writes the hookpoints' activations to ``cache_dir``.

    Rerunning with the same arguments resumes a killed run, or returns the finished cache.

    Args:
      lm: the language model.
      contexts: `text.Contexts`, an ``[n, seq]`` id array, or ``open_at(start_context) ->
        iterator of text.Contexts`` (streamed corpora; must be deterministic).
      hookpoints: names (`models.lm.parse_hookpoint`), all captured in one pass per batch.
      cache_dir: output directory (created).
      dtype: storage dtype float32 | float16 | bfloat16.
      batch_size: contexts per forward pass.
      shard_contexts: contexts per shard (default: about 128 MiB per hookpoint and shard).
      max_contexts: stop after this many contexts.
      num_contexts: total contexts, for the progress bar of streamed sources.
      text_info: JSON-able description of the text (recorded; part of the resume check).
      progress: show a tqdm bar in tokens (its rate is tokens/s).
      on_batch: called as ``on_batch(contexts_done, tokens_done)`` after each batch.

    Returns:
      The finished `ActivationCache`.

    Raises:
      InputError: bad hookpoints / dtype, no contexts, a directory holding a cache made with
        other settings, or a resumed text that no longer gives the recorded tokens.
    """
    hps = lm.parse(hookpoints)
    names = [h.name for h in hps]
    if dtype not in STORAGE_DTYPES:
        raise checks.InputError(f"dtype: expected one of {STORAGE_DTYPES}, got {dtype!r}")
    batch_size = checks.check_positive_int("batch_size", batch_size)
    open_at = text.context_factory(contexts)
    if num_contexts is None and not callable(contexts):
        num_contexts = len(contexts)
    if max_contexts is not None:
        max_contexts = checks.check_positive_int("max_contexts", max_contexts)
        num_contexts = max_contexts if num_contexts is None else min(num_contexts, max_contexts)
    first = next(iter(open_at(0)), None)
    if first is None or len(first) == 0:
        raise checks.InputError("harvest: no contexts to run (empty text?)")
    ctx_len = first.context_length
    if shard_contexts is None:
        shard_contexts = max(1, DEFAULT_SHARD_BYTES // (ctx_len * lm.d_model * _ITEMSIZE[dtype]))
    shard_contexts = checks.check_positive_int("shard_contexts", shard_contexts)

    desc = lm.describe()
    tok = desc.pop("tokenizer")
    settings = metrics_io.to_jsonable(
        {
            "format": FORMAT,
            "version": VERSION,
            "model": desc,
            "tokenizer": tok,
            "hookpoints": names,
            "widths": {n: lm.d_model for n in names},
            "context_length": ctx_len,
            "dtype": dtype,
            "shard_contexts": shard_contexts,
            "max_contexts": max_contexts,
            "text": text_info,
        }
    )
    meta_path = os.path.join(cache_dir, "metadata.json")
    prog_path = os.path.join(cache_dir, "progress.json")
    # Process 0 reads and prepares the directory; the others follow its answers (they run
    # the same collectives below only if they take the same branch).
    primary = mesh_lib.is_primary()
    refused: checks.InputError | None = None
    complete = False
    if primary:
        try:
            complete = _prepare_cache(cache_dir, settings, hps, tok, names)
        except checks.InputError as e:
            refused = e
    if mesh_lib.agree(refused is not None):
        raise refused or checks.InputError(
            f"cache {cache_dir}: process 0 refused it (its error line says why)"
        )
    if mesh_lib.agree(complete):
        return ActivationCache(cache_dir)
    mesh_lib.barrier(f"harvest {cache_dir}: prepared")
    shards = _read_json(prog_path)["shards"] if os.path.exists(prog_path) else []

    puller = _Puller(open_at(0))
    for i, shard in enumerate(shards):  # same text must give the same tokens
        part = puller.take(shard["contexts"])
        stored = load_npy(
            _shard_file(cache_dir, "tokens", i), "activation cache file", mmap_mode=None
        )
        if part is None or not np.array_equal(part.token_ids, stored):
            raise checks.InputError(
                f"cache {cache_dir}: the text now gives other tokens than "
                f"the {len(shards)} shard(s) already written (shard {i} "
                "differs); resume with the same text or use a new directory"
            )
    done_ctx = sum(s["contexts"] for s in shards)
    done_tok = sum(s["tokens"] for s in shards)

    bar = None
    if progress:
        from tqdm.auto import tqdm

        total = None if num_contexts is None else num_contexts * ctx_len
        bar = tqdm(
            total=total,
            initial=done_tok,
            unit="tok",
            unit_scale=True,
            desc=f"harvest {os.path.basename(os.path.normpath(cache_dir))}",
        )
    file_dtype = _FILE_DTYPE[dtype]
    nproc, rank = jax.process_count(), jax.process_index()
    index = len(shards)
    finished = False
    while not finished:
        # One round: the next `nproc` shards, shard `index` run by process `index % nproc`
        # (the others only read past its contexts). Every process sees the same text, so all
        # agree on the round's shards and call the same gather.
        done_round: list[dict] = []
        for _ in range(nproc):
            target = (
                shard_contexts
                if max_contexts is None
                else min(shard_contexts, max_contexts - done_ctx)
            )
            if target <= 0:
                finished = True
                break
            mine = index % nproc == rank
            files: dict[str, tuple[str, np.memmap]] = {}
            filled = tokens = non_special = 0
            while filled < target:
                part = puller.take(min(batch_size, target - filled))
                if part is None:
                    break
                if mine:
                    out = lm.forward_batch(
                        part.token_ids, names, attention_mask=part.mask, out_dtype=dtype
                    )
                    if not files:
                        files = _open_shard(
                            cache_dir, index, names, target, ctx_len, lm.d_model, file_dtype
                        )
                    sl = slice(filled, filled + len(part))
                    files["tokens"][1][sl] = part.token_ids
                    files["mask"][1][sl] = part.mask
                    for n in names:
                        files[n][1][sl] = (
                            out.acts[n].view(file_dtype) if dtype == "bfloat16" else out.acts[n]
                        )
                    non_special += int((part.mask & ~out.special).sum())
                filled += len(part)
                tokens += part.num_tokens
                done_ctx += len(part)
                done_tok += part.num_tokens
                if bar is not None:
                    bar.update(part.num_tokens)
                if on_batch is not None:
                    on_batch(done_ctx, done_tok)
            if filled == 0:
                finished = True
                break
            if mine:
                _commit_shard(cache_dir, index, files, filled)
            done_round.append(
                {"contexts": filled, "tokens": tokens, "tokens_non_special": non_special}
            )
            index += 1
            if filled < target:
                finished = True
                break
        if nproc > 1:
            # Each shard's non-special count is known to its process only: sum the gathered
            # per-process vectors (zeros elsewhere). The shards are on disk before this.
            from jax.experimental import multihost_utils

            counts = np.zeros(nproc, np.int64)
            first = index - len(done_round)
            for j, rec in enumerate(done_round):
                if (first + j) % nproc == rank:
                    counts[j] = rec["tokens_non_special"]
            summed = np.asarray(multihost_utils.process_allgather(counts)).sum(0)
            for j, rec in enumerate(done_round):
                rec["tokens_non_special"] = int(summed[j])
        shards.extend(done_round)
        if done_round:
            metrics_io.write_json(prog_path, {"shards": shards})  # process 0 only
    if bar is not None:
        bar.close()
    if not shards:
        raise checks.InputError("harvest: no contexts to run (empty text?)")
    if primary:
        meta = _read_json(meta_path)
        meta.update(
            {
                "complete": True,
                "shards": shards,
                "num_contexts": sum(s["contexts"] for s in shards),
                "token_count": sum(s["tokens"] for s in shards),
                "token_count_non_special": sum(s["tokens_non_special"] for s in shards),
                "finished": time.strftime("%Y-%m-%dT%H:%M:%S"),
            }
        )
        metrics_io.write_json(meta_path, meta)
    mesh_lib.barrier(f"harvest {cache_dir}: complete")
    return ActivationCache(cache_dir)


def _prepare_cache(cache_dir: str, settings: dict, hps, tok, names: list[str]) -> bool:
    """Creates (or checks) the cache directory and its metadata; clears stale temporaries.

    Returns True when the cache is already complete. Raises InputError when the directory
    holds a cache made with other settings.
    """
    os.makedirs(cache_dir, exist_ok=True)
    meta_path = os.path.join(cache_dir, "metadata.json")
    if os.path.exists(meta_path):
        old = _read_json(meta_path)
        diff = _settings_diff({k: old.get(k) for k in settings}, settings)
        if diff:
            raise checks.InputError(
                f"cache {cache_dir} was made with other settings ({diff}); "
                "use another directory or the same settings"
            )
        if old.get("complete"):
            return True
    else:
        meta = dict(settings)
        meta.update(
            {
                "complete": False,
                "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
                "hookpoint_aliases": {
                    h.name: {"saelens": h.saelens_name, "sparsify": _sparsify_or_none(h)}
                    for h in hps
                },
                "special_ids": (tok or {}).get("special_ids", []),
                "layout": "tokens/NNNNN.npy [contexts, context_length] int32; "
                "mask/NNNNN.npy bool; <hookpoint>/NNNNN.npy "
                "[contexts, context_length, d] (bfloat16 stored as uint16 bits)",
            }
        )
        metrics_io.write_json(meta_path, meta)
    for kind in ["tokens", "mask"] + names:  # stale temporaries of a killed run
        folder = os.path.join(cache_dir, kind)
        os.makedirs(folder, exist_ok=True)
        for f in os.listdir(folder):
            if f.endswith(".tmp"):
                os.remove(os.path.join(folder, f))
    return False


def harvest_models(
    models: Sequence[lm_lib.LanguageModel],
    contexts: text.Contexts | np.ndarray,
    hookpoints: str | Sequence[str] | Sequence[Sequence[str]],
    cache_dirs: Sequence[str],
    **kwargs: Any,
) -> list[ActivationCache]:
    """Harvests several models over the SAME contexts, after checking their tokenizers agree.

    ``hookpoints`` is one list for all models or one list per model. The caches can then be
    zipped with `paired_source`. Raises `text.TokenizerMismatchError` before any forward pass
    when two tokenizers differ (harvest each model on its own contexts instead and pair the
    caches with `models.alignment`).
    """
    models = list(models)
    if len(cache_dirs) != len(models):
        raise checks.InputError(
            f"cache_dirs: {len(cache_dirs)} directories for {len(models)} models"
        )
    if any(m.tokenizer is None for m in models):
        raise checks.InputError(
            "harvest_models: every model needs its tokenizer loaded to check that they agree"
        )
    for m in models[1:]:
        text.check_same_tokenizer(models[0].tokenizer, m.tokenizer, names=(models[0].name, m.name))
    per_model = (
        hookpoints
        if hookpoints and not isinstance(hookpoints, str) and not isinstance(hookpoints[0], str)
        else [hookpoints] * len(models)
    )
    return [
        harvest(m, contexts, hps, d, **kwargs) for m, hps, d in zip(models, per_model, cache_dirs)
    ]


def _sparsify_or_none(h: lm_lib.Hookpoint) -> str | None:
    try:
        return h.sparsify_name
    except checks.InputError:
        return None


def _open_shard(
    root: str, index: int, names: list[str], n: int, ctx: int, d: int, file_dtype
) -> dict[str, tuple[str, np.memmap]]:
    out = {}
    specs = {"tokens": ((n, ctx), np.int32), "mask": ((n, ctx), np.bool_)}
    specs.update({name: ((n, ctx, d), file_dtype) for name in names})
    for kind, (shape, dt) in specs.items():
        tmp = _shard_file(root, kind, index) + ".tmp"
        out[kind] = (tmp, np.lib.format.open_memmap(tmp, mode="w+", dtype=dt, shape=shape))
    return out


def _commit_shard(
    root: str, index: int, files: dict[str, tuple[str, np.memmap]], filled: int
) -> None:
    """Flushes, truncates a short last shard, and renames into place (tokens last)."""
    order = [k for k in files if k not in ("tokens",)] + ["tokens"]
    for kind in order:
        tmp, mm = files[kind]
        if mm.shape[0] != filled:  # short final shard: copy the filled rows to a right-sized file
            short = tmp + ".short"
            dst = np.lib.format.open_memmap(
                short, mode="w+", dtype=mm.dtype, shape=(filled,) + mm.shape[1:]
            )
            step = max(1, (64 << 20) // max(1, int(np.prod(mm.shape[1:])) * mm.dtype.itemsize))
            for lo in range(0, filled, step):
                dst[lo : min(filled, lo + step)] = mm[lo : min(filled, lo + step)]
            dst.flush()
            del dst, mm
            os.replace(short, tmp)
        else:
            mm.flush()
            del mm
        os.replace(tmp, _shard_file(root, kind, index))
    files.clear()


# --------------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------------


def bf16_bits_to_float32(bits: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """bfloat16 values (as uint16 bits or an ``ml_dtypes.bfloat16`` array) widened to float32.

    bfloat16 is the top half of a float32, so the widening is exact: each value's bits are
    moved 16 places up (NaN payloads and signed zeros kept).

    Args:
      bits: any shape; 2-byte items.
      out: float32 array of the same shape to write into (default: a new one).
    """
    if bits.dtype.itemsize != 2:
        raise checks.InputError(f"bfloat16 bits: expected 2-byte items, got {bits.dtype}")
    u16 = np.ascontiguousarray(bits).view(np.uint16).reshape(-1)
    if out is None:
        out = np.empty(bits.shape, np.float32)
    elif out.shape != bits.shape or out.dtype != np.float32 or not out.flags.c_contiguous:
        raise checks.InputError(
            f"out: expected a contiguous float32 array of shape {bits.shape}, "
            f"got {out.dtype} {out.shape}"
        )
    # one ufunc: numpy casts the uint16 input to uint32 in cache-sized buffers and shifts them
    # straight into the output (measured faster than a chunked copy-then-shift and than
    # ml_dtypes' cast)
    np.left_shift(u16, 16, out=out.reshape(-1).view(np.uint32), dtype=np.uint32)
    return out


def _to_out(raw: np.ndarray, storage: str, out_dtype: str) -> np.ndarray:
    if storage == "bfloat16":
        # Consumers that can take bfloat16 (JAX) should ask for "native" and skip the widening.
        if out_dtype in ("native", "bfloat16"):
            import ml_dtypes

            return np.ascontiguousarray(raw).view(ml_dtypes.bfloat16)
        f32 = bf16_bits_to_float32(raw)
        return f32 if out_dtype == "float32" else f32.astype(out_dtype)
    if out_dtype in ("native", storage):
        return raw
    if out_dtype == "bfloat16":
        import ml_dtypes

        return raw.astype(ml_dtypes.bfloat16)
    return raw.astype(out_dtype)


class ActivationCache:
    """A harvested cache on disk (see the module docstring for the layout).

    Args:
      path: the cache directory.
      allow_partial: open a cache whose harvest has not finished (its finished shards only).

    Raises:
      InputError: not a cache, an unknown format version, an unfinished cache (unless
        ``allow_partial``), or a missing / truncated / mis-shaped shard file.
    """

    def __init__(self, path: str, *, allow_partial: bool = False):
        self.path = path
        meta_path = os.path.join(path, "metadata.json")
        if not os.path.exists(meta_path):
            raise checks.InputError(f"{path} is not an activation cache (no metadata.json)")
        meta = _read_json(meta_path)
        if meta.get("format") != FORMAT:
            raise checks.InputError(
                f"{meta_path}: format {meta.get('format')!r}, expected {FORMAT!r}"
            )
        if int(meta.get("version", 0)) > VERSION:
            raise checks.InputError(
                f"{meta_path}: cache version {meta.get('version')} is newer "
                f"than this code reads ({VERSION})"
            )
        self.metadata = meta
        if meta.get("complete"):
            shards = meta["shards"]
        else:
            if not allow_partial:
                raise checks.InputError(
                    f"activation cache {path} is unfinished; rerun the harvest with the same "
                    "settings to resume it, or open it with allow_partial=True"
                )
            prog = os.path.join(path, "progress.json")
            shards = _read_json(prog)["shards"] if os.path.exists(prog) else []
        self.shards: list[dict] = list(shards)
        self.hookpoints: tuple[str, ...] = tuple(meta["hookpoints"])
        self.widths: dict[str, int] = {k: int(v) for k, v in meta["widths"].items()}
        self.context_length = int(meta["context_length"])
        self.dtype: str = meta["dtype"]
        self.special_ids = np.asarray(meta.get("special_ids", []), np.int64)
        for i, s in enumerate(self.shards):
            shape = (int(s["contexts"]), self.context_length)
            _check_npy(_shard_file(path, "tokens", i), shape, np.int32)
            _check_npy(_shard_file(path, "mask", i), shape, np.bool_)
            for hp in self.hookpoints:
                _check_npy(
                    _shard_file(path, hp, i), shape + (self.widths[hp],), _FILE_DTYPE[self.dtype]
                )
        self._maps: dict[tuple[str, int], np.ndarray] = {}

    # -- facts ------------------------------------------------------------------------------

    @property
    def model(self) -> dict:
        return self.metadata["model"]

    @property
    def tokenizer(self) -> dict | None:
        return self.metadata.get("tokenizer")

    @property
    def num_contexts(self) -> int:
        return sum(int(s["contexts"]) for s in self.shards)

    @property
    def num_tokens(self) -> int:
        """Real (unmasked) tokens, special tokens included."""
        return sum(int(s["tokens"]) for s in self.shards)

    def __repr__(self) -> str:
        return (
            f"ActivationCache({self.path!r}, model={self.model.get('name')!r}, "
            f"hookpoints={list(self.hookpoints)}, tokens={self.num_tokens}, "
            f"dtype={self.dtype})"
        )

    # -- raw access -------------------------------------------------------------------------

    def memmap(self, kind: str, shard: int) -> np.ndarray:
        """Read-only memory map of ``kind`` (tokens | mask | a hookpoint) of one shard."""
        key = (kind, shard)
        if key not in self._maps:
            if kind not in ("tokens", "mask") and kind not in self.hookpoints:
                raise checks.InputError(
                    f"hookpoint {kind!r} is not in the cache at {self.path}"
                    f" (it has {list(self.hookpoints)})"
                )
            self._maps[key] = load_npy(_shard_file(self.path, kind, shard), "activation cache file")
        return self._maps[key]

    def token_ids(self) -> np.ndarray:
        """All token ids ``[contexts, context_length]`` int32."""
        return np.concatenate(
            [np.asarray(self.memmap("tokens", i)) for i in range(len(self.shards))]
        )

    def mask(self) -> np.ndarray:
        """``[contexts, context_length]`` bool, False on padding."""
        return np.concatenate([np.asarray(self.memmap("mask", i)) for i in range(len(self.shards))])

    def check_hookpoints(self, hookpoints: str | Sequence[str] | None) -> list[str]:
        """Normalises names (aliases like ``blocks.3.hook_resid_post`` accepted)."""
        if hookpoints is None:
            return list(self.hookpoints)
        names = [hookpoints] if isinstance(hookpoints, str) else list(hookpoints)
        out = []
        n_layers = self.model.get("n_layers")
        for n in names:
            name = lm_lib.parse_hookpoint(n, n_layers).name if n not in self.hookpoints else n
            if name not in self.hookpoints:
                raise checks.InputError(
                    f"hookpoint {n!r} is not in the cache at {self.path} "
                    f"(it has {list(self.hookpoints)})"
                )
            out.append(name)
        return out

    # -- sources ----------------------------------------------------------------------------

    def source(
        self,
        hookpoints: str | Sequence[str] | None = None,
        *,
        exclude_special: bool = False,
        out_dtype: str = "float32",
        block_rows: int = 8192,
        repeat: bool = False,
        shuffle_seed: int | None = None,
        shuffle_buffer: int = 1 << 16,
        shuffle_block: int = 1024,
    ) -> CacheSource | src_lib.ShuffledSource:
        """An activation source over this cache (rows = tokens).

        Args:
          hookpoints: one name or several (default: all), yielded in that order after the
            token ids.
          exclude_special: drop special tokens (BOS/EOS/PAD/CLS/SEP...).
          out_dtype: float32 (default) | float16 | bfloat16 | native (the storage dtype).
          block_rows: rows per yielded block (unshuffled).
          repeat: loop forever (training).
          shuffle_seed: shuffle with `activation_source.ShuffledSource` (bounded buffer of
            ``shuffle_buffer`` rows read in blocks of ``shuffle_block`` rows).
        """
        base = CacheSource(
            self,
            hookpoints,
            exclude_special=exclude_special,
            out_dtype=out_dtype,
            block_rows=block_rows,
            repeat=repeat and shuffle_seed is None,
        )
        if shuffle_seed is None:
            return base
        return src_lib.ShuffledSource(
            base, shuffle_seed, buffer_rows=shuffle_buffer, block_rows=shuffle_block, repeat=repeat
        )

    def read(
        self, hookpoint: str, *, exclude_special: bool = False, out_dtype: str = "float32"
    ) -> tuple[np.ndarray, np.ndarray]:
        """``(token_ids [rows], acts [rows, d])`` of one hookpoint, all in memory."""
        s = CacheSource(self, hookpoint, exclude_special=exclude_special, out_dtype=out_dtype)
        return s.read_rows(0, s.num_rows)


class CacheSource(src_lib.RowSource):
    """Random-access activation source over an `ActivationCache` (see `ActivationCache.source`)."""

    def __init__(
        self,
        cache: ActivationCache,
        hookpoints=None,
        *,
        exclude_special: bool = False,
        out_dtype: str = "float32",
        block_rows: int = 8192,
        repeat: bool = False,
    ):
        if out_dtype not in OUT_DTYPES:
            raise checks.InputError(f"out_dtype: expected one of {OUT_DTYPES}, got {out_dtype!r}")
        if not cache.shards:
            raise checks.InputError(f"activation cache {cache.path} holds no shards yet")
        self.cache = cache
        self.hookpoints = tuple(cache.check_hookpoints(hookpoints))
        self.widths = tuple(cache.widths[h] for h in self.hookpoints)
        self.exclude_special = exclude_special
        self.out_dtype = out_dtype
        self.block_rows = checks.check_positive_int("block_rows", block_rows)
        self.repeat = repeat
        key = "tokens_non_special" if exclude_special else "tokens"
        self._counts = np.asarray([int(s[key]) for s in cache.shards], np.int64)
        self._offsets = np.concatenate([[0], np.cumsum(self._counts)])
        self._full = [
            int(s[key]) == int(s["contexts"]) * cache.context_length for s in cache.shards
        ]
        self._sel: dict[int, np.ndarray] = {}
        if self.num_rows == 0:
            raise checks.InputError(f"activation cache {cache.path}: no rows selected")

    @property
    def num_rows(self) -> int:
        return int(self._offsets[-1])

    def describe(self) -> dict:
        return {
            "kind": "cache",
            "path": os.path.abspath(self.cache.path),
            "model": self.cache.model,
            "hookpoints": list(self.hookpoints),
            "exclude_special": self.exclude_special,
            "num_rows": self.num_rows,
            "dtype": self.cache.dtype,
        }

    def _selection(self, shard: int) -> np.ndarray:
        if shard not in self._sel:
            if len(self._sel) >= 4:  # bounded: a few shards' indices
                self._sel.pop(next(iter(self._sel)))
            sel = np.asarray(self.cache.memmap("mask", shard)).reshape(-1)
            if self.exclude_special:
                tokens = np.asarray(self.cache.memmap("tokens", shard)).reshape(-1)
                sel = sel & ~np.isin(tokens, self.cache.special_ids)
            idx = np.flatnonzero(sel)
            if idx.shape[0] != self._counts[shard]:
                raise checks.InputError(
                    f"activation cache {self.cache.path}: shard {shard} has "
                    f"{idx.shape[0]} selected tokens but the metadata says "
                    f"{self._counts[shard]}; the cache is damaged"
                )
            self._sel[shard] = idx
        return self._sel[shard]

    def finish_rows(self, rows: src_lib.Rows) -> src_lib.Rows:
        return (rows[0],) + tuple(_to_out(a, self.cache.dtype, self.out_dtype) for a in rows[1:])

    def read_rows(self, lo: int, hi: int) -> src_lib.Rows:
        if self.cache.dtype == "bfloat16" and self.out_dtype == "float32":
            # widen straight out of the memory map into the block: one pass over the file's
            # bytes instead of a copy and then a widening
            return self._read(lo, hi, widen=True)
        return super().read_rows(lo, hi)

    def read_rows_stored(self, lo: int, hi: int) -> src_lib.Rows:
        return self._read(lo, hi, widen=False)

    def _read(self, lo: int, hi: int, *, widen: bool) -> src_lib.Rows:
        """Rows ``[lo, hi)`` as stored, or widened from bfloat16 to float32 (``widen``).

        Each hookpoint's block is allocated once and every shard's rows are written into it
        (no concatenation of per-shard pieces: a block often spans two shards). Blocks own
        their memory (never a view of the file)."""
        self._check_range(lo, hi)
        spans = []
        s = int(np.searchsorted(self._offsets, lo, side="right")) - 1
        pos = lo
        while pos < hi:
            a = pos - int(self._offsets[s])
            b = min(hi, int(self._offsets[s + 1])) - int(self._offsets[s])
            if b > a:
                spans.append((s, slice(a, b) if self._full[s] else self._selection(s)[a:b]))
                pos += b - a
            s += 1
        n = hi - lo
        tok = np.empty((n,), np.int32)
        dtype = np.float32 if widen else _FILE_DTYPE[self.cache.dtype]
        acts = [np.empty((n, w), dtype) for w in self.widths]
        at = 0
        for s, rows in spans:
            flat_tok = self.cache.memmap("tokens", s).reshape(-1)
            part = flat_tok[rows]
            m = part.shape[0]
            tok[at : at + m] = part
            for hp, out in zip(self.hookpoints, acts):
                mm = self.cache.memmap(hp, s)
                stored = mm.reshape(-1, mm.shape[-1])
                if widen:  # a view of the file for a slice, a (narrow) copy for a selection
                    bf16_bits_to_float32(stored[rows], out=out[at : at + m])
                elif isinstance(rows, slice):
                    out[at : at + m] = stored[rows]
                else:
                    np.take(stored, rows, axis=0, out=out[at : at + m])
            at += m
        if widen:
            return (tok, *acts)
        return (tok, *(_to_out(x, self.cache.dtype, "native") for x in acts))


class CachedActs:
    """One hookpoint's ``[rows, d]`` activations left on disk, with an array's ``shape``.

    What the universality pipeline passes where it would hold an in-memory activation matrix
    (`experiments.pipeline.lm_preset`, streaming mode): SAE training reads `source`
    through a bounded shuffle buffer, the feature pass pairs two of them chunk by chunk
    (`experiments.pipeline.features.cache_pair_stream`), and only a slice ``x[lo:hi]``
    (e.g. a sample for initialisation) is ever read into memory. There is deliberately no
    ``__array__``: ``np.asarray`` on it fails instead of loading the whole cache.
    """

    def __init__(self, cache: ActivationCache, hookpoint: str, *, exclude_special: bool = False):
        self.cache = cache
        self.hookpoint = cache.check_hookpoints(hookpoint)[0]
        self.exclude_special = bool(exclude_special)
        self.source = CacheSource(cache, self.hookpoint, exclude_special=self.exclude_special)
        self.shape = (self.source.num_rows, int(cache.widths[self.hookpoint]))
        self.ndim = 2

    def __len__(self) -> int:
        return self.shape[0]

    def __array__(self, *args, **kwargs):
        raise checks.InputError(
            f"{self!r}: the activations stay on disk; read a slice "
            "x[lo:hi] or stream the cache source"
        )

    def __getitem__(self, key) -> np.ndarray:
        if not isinstance(key, slice) or key.step not in (None, 1):
            raise checks.InputError(
                "CachedActs: only contiguous row slices x[lo:hi] are read "
                "(the activations stay on disk)"
            )
        lo, hi, _ = key.indices(self.shape[0])
        return self.source.read_rows(lo, max(lo, hi))[1]

    def key(self) -> str:
        """Identity of the rows (cache metadata, hookpoint, special-token filter), for
        step-cache keys: a finished cache never changes."""
        meta = {
            k: self.cache.metadata.get(k)
            for k in (
                "model",
                "tokenizer",
                "text",
                "context_length",
                "dtype",
                "shards",
                "finished",
                "created",
            )
        }
        return fingerprint.digest(
            os.path.abspath(self.cache.path),
            self.hookpoint,
            self.exclude_special,
            json.dumps(meta, sort_keys=True, default=str),
        )

    def __repr__(self) -> str:
        return (
            f"CachedActs({self.cache.path!r}, {self.hookpoint!r}, rows={self.shape[0]}, "
            f"d={self.shape[1]})"
        )


def paired_source(
    cache_a: ActivationCache,
    hookpoint_a: str,
    cache_b: ActivationCache,
    hookpoint_b: str,
    *,
    exclude_special: bool = False,
    out_dtype: str = "float32",
    block_rows: int = 8192,
    repeat: bool = False,
    shuffle_seed: int | None = None,
    shuffle_buffer: int = 1 << 16,
    shuffle_block: int = 1024,
    names: tuple[str, str] = ("a", "b"),
) -> src_lib.ZipSource | src_lib.ShuffledSource:
    """``(token_ids, acts_a, acts_b)`` rows of two caches over the same tokens (two models).

    Refuses (one-line `InputError` / `text.TokenizerMismatchError`) caches whose tokenizers,
    context lengths or token ids differ: the rows would not be the same tokens.
    """
    ta, tb = cache_a.tokenizer or {}, cache_b.tokenizer or {}
    if ta.get("vocab_sha256") != tb.get("vocab_sha256") or (
        ta.get("special_ids") != tb.get("special_ids")
    ):
        raise text.TokenizerMismatchError(
            f"caches {cache_a.path} and {cache_b.path} were made with different tokenizers "
            f"({ta.get('name_or_path')!r}, {tb.get('name_or_path')!r}); cross-tokenizer "
            "rows pair through models.alignment (AlignedSource), not token by token"
        )
    if cache_a.context_length != cache_b.context_length or (
        cache_a.num_contexts != cache_b.num_contexts
    ):
        raise checks.InputError(
            f"caches {cache_a.path} and {cache_b.path} hold different contexts "
            f"({cache_a.num_contexts}x{cache_a.context_length} vs "
            f"{cache_b.num_contexts}x{cache_b.context_length}); harvest both from the same text"
        )
    if not (
        np.array_equal(cache_a.token_ids(), cache_b.token_ids())
        and np.array_equal(cache_a.mask(), cache_b.mask())
    ):
        raise checks.InputError(
            f"caches {cache_a.path} and {cache_b.path} hold different token "
            "ids; harvest both from the same text and contexts"
        )
    kw = dict(exclude_special=exclude_special, out_dtype=out_dtype, block_rows=block_rows)
    zipped = src_lib.ZipSource(
        [CacheSource(cache_a, hookpoint_a, **kw), CacheSource(cache_b, hookpoint_b, **kw)],
        names=names,
        repeat=repeat and shuffle_seed is None,
    )
    if shuffle_seed is None:
        return zipped
    return src_lib.ShuffledSource(
        zipped, shuffle_seed, buffer_rows=shuffle_buffer, block_rows=shuffle_block, repeat=repeat
    )
