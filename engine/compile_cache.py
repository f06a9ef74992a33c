"""JAX's persistent compilation cache: compile each program once per shape, reuse it everywhere.

A comparison of two SAEs compiles a few dozen programs (encoders, accumulator updates, the
batched nulls); on 2 CPU cores that is most of a small comparison's time. The programs depend
only on shapes and code, so the compiled executables are written to a directory and later
processes (other comparisons, grid cells, reruns, other experiments) load them instead of
compiling (`experiments/bench_e2e.py` measures cold vs warm).

`enable` sets ``jax_compilation_cache_dir`` and caches every program (JAX's default skips
programs that compile in under a second, which is most of ours). Directory, in order: the
argument, ``$SAE_JAX_CACHE_DIR``, ``$JAX_COMPILATION_CACHE_DIR``, ``~/.cache/sae_universality/
jax``. ``SAE_JAX_CACHE_DIR=off`` (or ``none``) disables it. JAX keys entries on the program, the
JAX / jaxlib version, the device kind and the compile options, so a stale entry is never used;
the directory can be deleted at any time.
"""

from __future__ import annotations

import os

import jax

ENV = "SAE_JAX_CACHE_DIR"
DEFAULT_DIR = os.path.join("~", ".cache", "sae_universality", "jax")
OFF = ("off", "none", "0", "false")

_enabled: str | None = None


def cache_dir(directory: str | None = None) -> str | None:
    """The directory `enable` would use, or None when the cache is switched off."""
    d = (
        directory
        or os.environ.get(ENV)
        or os.environ.get("JAX_COMPILATION_CACHE_DIR")
        or DEFAULT_DIR
    )
    if d.strip().lower() in OFF:
        return None
    return os.path.abspath(os.path.expanduser(d))


def enable(directory: str | None = None, *, min_compile_seconds: float = 0.0) -> str | None:
    """Turns the persistent compilation cache on (idempotent); returns its directory.

    Call it before the first compilation (JAX initialises the cache at the first compile and
    ignores later changes of the directory in that process).
    """
    global _enabled
    d = cache_dir(directory)
    if d is None:
        return None
    if _enabled == d:
        return d
    try:
        os.makedirs(d, exist_ok=True)
    except OSError:
        return None  # read-only home etc.: run without the cache rather than fail
    jax.config.update("jax_compilation_cache_dir", d)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", float(min_compile_seconds))
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)
    _enabled = d
    return d
