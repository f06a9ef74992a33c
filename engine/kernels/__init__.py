"""Native CPU kernels, called from jitted JAX code through JAX's FFI (no pybind, no torch).

``sparse_cross.cc`` (the sparse correlation update of `engine.correlation`: the in-place
accumulation of the ``k_a x k_b`` products of TopK codes into the ``n_a x n_b`` cross sums,
bit-identical to XLA's scatter-add, counting-sorted by A feature so each row of the state
stays in cache, split over threads by A-feature range).

``sparse_sae.cc`` (the sparse TopK SAE primitives of `engine.sparse_ops`: TopK
bit-identical to ``jax.lax.top_k``, gather-dot, gather-combine and the scatter-add of outer
products, each an FFI handler of one library).

One source file is one library and may export several handlers: `LIBRARIES` maps a library
to its source and its kernels, `KERNELS` maps each kernel to ``(library, symbol, target)``.
The first use of any kernel of a library builds and loads the library and registers all its
handlers.

Build: on first use the C++ source is compiled with ``$CXX`` (default ``g++``) against the
XLA FFI headers of the installed jaxlib (``jax.ffi.include_dir()``), with ``-O3
-ffp-contract=off`` (no fused multiply-add and no fast-math: the results stay bit-identical
to the XLA path), into ``$SAE_KERNEL_CACHE`` (default ``~/.cache/sae-universality/kernels``).
The file name carries a hash of the source, the flags, the compiler and the jax version, so
a changed source or jax rebuilds; each build goes to a temporary name and is renamed into
place atomically, so concurrent first builds (pytest-xdist workers) are safe. The library
is loaded with ctypes and its handler registered with `jax.ffi.register_ffi_target`
(platform ``cpu``).

Environment: ``SAE_NATIVE_KERNELS=0`` switches the native kernels off; ``SAE_KERNEL_THREADS``
sets the threads of one kernel call (default: the CPUs this process may use, at most 8).
Fallback: with the kernels off, no compiler, or a failed build or load, one warning is logged
and callers use their XLA path (`available` returns False). GPUs and TPUs always use the
XLA path.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
import threading

import jax

log = logging.getLogger(__name__)

_DIR = os.path.dirname(os.path.abspath(__file__))
FLAGS = ("-O3", "-std=c++17", "-shared", "-fPIC", "-pthread", "-ffp-contract=off")
# library name -> (source file, {kernel name: (exported handler symbol, FFI target name)})
LIBRARIES: dict[str, tuple[str, dict[str, tuple[str, str]]]] = {
    "sparse_cross": ("sparse_cross.cc", {"sparse_cross": ("SaeSparseCross", "sae_sparse_cross")}),
    "sparse_sae": (
        "sparse_sae.cc",
        {
            "topk": ("SaeTopK", "sae_topk"),
            "gather_dot": ("SaeGatherDot", "sae_gather_dot"),
            "gather_combine": ("SaeGatherCombine", "sae_gather_combine"),
            "scatter_outer": ("SaeScatterOuter", "sae_scatter_outer"),
        },
    ),
}
# kernel name -> (library, exported handler symbol, FFI target name)
KERNELS: dict[str, tuple[str, str, str]] = {
    kernel: (lib, symbol, name)
    for lib, (_src, handlers) in LIBRARIES.items()
    for kernel, (symbol, name) in handlers.items()
}

_lock = threading.Lock()
# kernel -> registered target name, or None (failed); "_off_warned" once the switch-off is logged
_state: dict[str, str | None] = {}


def enabled() -> bool:
    """False when ``SAE_NATIVE_KERNELS`` is 0 / false / off / no."""
    return os.environ.get("SAE_NATIVE_KERNELS", "1").strip().lower() not in (
        "0",
        "false",
        "off",
        "no",
    )


def cache_dir() -> str:
    default = os.path.join(os.path.expanduser("~"), ".cache", "sae-universality", "kernels")
    return os.environ.get("SAE_KERNEL_CACHE") or default


def threads() -> int:
    """Threads per kernel call (``SAE_KERNEL_THREADS``, default the usable CPUs, <= 8)."""
    env = os.environ.get("SAE_KERNEL_THREADS")
    if env:
        try:
            return max(1, int(env))
        except ValueError:
            log.warning("SAE_KERNEL_THREADS=%r is not an integer; using 1", env)
            return 1
    try:
        n = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        n = os.cpu_count() or 1
    return max(1, min(8, n))


def _compiler() -> str | None:
    return shutil.which(os.environ.get("CXX", "g++"))


def _build(name: str) -> str:
    """Path of the compiled library ``name`` (or of the library of kernel ``name``), built now
    if not cached. Raises on failure."""
    library = name if name in LIBRARIES else KERNELS[name][0]
    src_name = LIBRARIES[library][0]
    src_path = os.path.join(_DIR, src_name)
    with open(src_path, "rb") as f:
        source = f.read()
    cxx = _compiler()
    if cxx is None:
        raise RuntimeError(f"no C++ compiler ({os.environ.get('CXX', 'g++')}) on PATH")
    version = subprocess.run(
        [cxx, "--version"], capture_output=True, text=True, check=False
    ).stdout.splitlines()[:1]
    key = hashlib.sha256(
        b"\0".join(
            [
                source,
                " ".join(FLAGS).encode(),
                cxx.encode(),
                "".join(version).encode(),
                jax.__version__.encode(),
                platform.machine().encode(),
            ]
        )
    ).hexdigest()[:16]
    out_dir = cache_dir()
    os.makedirs(out_dir, exist_ok=True)
    lib = os.path.join(out_dir, f"{library}-{key}.so")
    if os.path.exists(lib):
        return lib
    fd, tmp = tempfile.mkstemp(prefix=f".{library}-{key}-", suffix=".so", dir=out_dir)
    os.close(fd)
    try:
        cmd = [cxx, *FLAGS, "-I", jax.ffi.include_dir(), src_path, "-o", tmp]
        res = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if res.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed: {res.stderr.strip()[-2000:]}")
        os.replace(tmp, lib)  # atomic: a concurrent build of the same key writes the same file
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return lib


def target(kernel: str) -> str | None:
    """The registered FFI target name of ``kernel``, building and registering it on first
    use; None (after one logged warning) when native kernels are off or unavailable."""
    if not enabled():
        if _state.get("_off_warned") is None:
            _state["_off_warned"] = "1"
            log.warning("SAE_NATIVE_KERNELS=0: native kernels off, using the XLA paths")
        return None
    with _lock:
        if kernel in _state:
            return _state[kernel]
        library = KERNELS[kernel][0]
        handlers = LIBRARIES[library][1]
        try:
            lib = ctypes.CDLL(_build(library))
            for symbol, name in handlers.values():
                jax.ffi.register_ffi_target(
                    name, jax.ffi.pycapsule(getattr(lib, symbol)), platform="cpu"
                )
            for k, (_symbol, name) in handlers.items():
                _state[k] = name
        except Exception as e:  # noqa: BLE001 - any failure means: use the XLA path
            log.warning("native kernels %s unavailable (%s); using the XLA path", library, e)
            for k in handlers:
                _state[k] = None
        return _state[kernel]


def available(kernel: str) -> bool:
    return target(kernel) is not None
