"""Sparse TopK primitives: top-k, gather-dot, gather-combine, scatter of outer products.

The building blocks of the sparse TopK SAE path (Gao et al. 2024, openai/sparse_autoencoder;
docs/references.md "SAE training"), each with an XLA implementation and a native CPU kernel
(`engine.kernels`, ``engine/kernels/sparse_sae.cc``) chosen by a static ``native`` flag:

* `top_k`: ``jax.lax.top_k`` (the native kernel is bit-identical to it: XLA's total order on
  floats, ties to the lower index; XLA's CPU top-k of a ``[1024, 1536]`` block is ~5x slower).
* `gather_combine`: ``out[..., :] = sum_j coef[..., j] * table[idx[..., j], :]`` (sparse
  decode); its VJP is `scatter_outer` for the table and `gather_dot` for ``coef``.
* `gather_dot`: ``out[..., j] = table[idx[..., j]] . vecs[...]`` (encode at chosen
  features); its VJP is `scatter_outer` for the table and `gather_combine` for ``vecs``.
* `scatter_outer`: ``out[f] = sum_{(b, j): idx[b, j] = f} coef[b, j] * vecs[b]``.

None of them materialises a ``[rows, k, d]`` tensor. The XLA versions loop over the k slots
with `jax.lax.scan` so that XLA fuses gather, multiply and accumulate per slot (an einsum over
a gathered ``[rows, k, d]`` tensor is ~10x slower on CPU and needs ``rows * k * d`` memory).

``native=True`` uses the FFI kernels through ``jax.lax.platform_dependent`` (CPU only: other
platforms keep the XLA code), and falls back to XLA when the kernels are unavailable
(`engine.kernels.available`, one logged warning) or an operand is not float32. Results of
the two paths agree to float32 rounding (top-k exactly; `scatter_outer` and `gather_combine`
add in the XLA path's order). `native_default` says when to ask for them: an FFI call inside
a multi-device jit is all-gathered by the SPMD partitioner (correct but redundant), so only
for single-device CPU programs. Under `jax.vmap` the kernels take the batch as leading axes
(``vmap_method="expand_dims"``: an unbatched table is not copied per batch element).
Leading axes of ``coef`` / ``vecs`` / ``idx`` are flattened into rows.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
    "gather_combine",
    "gather_dot",
    "gather_dot_values",
    "native_default",
    "scatter_outer",
    "scatter_rows",
    "top_k",
]


# -- native kernel plumbing ------------------------------------------------------------------


def native_default(mesh=None) -> bool:
    """Whether to use the native kernels: they are available, the platform is CPU and the
    program runs on one device (``mesh``: a `jax.sharding.Mesh`, or None for the default
    device)."""
    if mesh is not None:
        devices = np.asarray(mesh.devices).ravel()
        if devices.size != 1:
            return False
        platform = devices[0].platform
    else:
        platform = jax.default_backend()
    if platform != "cpu":
        return False
    from engine import kernels

    return kernels.available("topk")


def _use_native(native: bool, kernel: str, *floats) -> bool:
    if not native or any(jnp.result_type(a) != jnp.float32 for a in floats):
        return False
    from engine import kernels

    return kernels.available(kernel)


def _threads(threads: int | None) -> np.int64:
    from engine import kernels

    return np.int64(kernels.threads() if threads is None else threads)


def _ffi(kernel: str, result, *args, threads: int | None = None):
    from engine import kernels

    name = kernels.target(kernel)
    if name is None:  # checked by _use_native first
        raise RuntimeError(f"native kernel {kernel} unavailable")
    call = jax.ffi.ffi_call(name, result, vmap_method="expand_dims")
    return call(*args, threads=_threads(threads))


def _native_top_k_raw(x, k: int, threads: int | None = None):
    shape = x.shape[:-1] + (k,)
    return _ffi(
        "topk",
        (jax.ShapeDtypeStruct(shape, jnp.float32), jax.ShapeDtypeStruct(shape, jnp.int32)),
        x,
        threads=threads,
    )


def _native_dot(table, vecs, idx, threads: int | None = None):
    """`_dot` by the native kernel (2-D operands, float32)."""
    return _ffi(
        "gather_dot",
        jax.ShapeDtypeStruct(idx.shape, jnp.float32),
        table,
        vecs,
        idx.astype(jnp.int32),
        threads=threads,
    )


def _native_combine(table, coef, idx, threads: int | None = None):
    """`_combine` by the native kernel (2-D operands, float32)."""
    return _ffi(
        "gather_combine",
        jax.ShapeDtypeStruct((coef.shape[0], table.shape[1]), jnp.float32),
        table,
        coef,
        idx.astype(jnp.int32),
        threads=threads,
    )


def _native_scatter_outer(coef, vecs, idx, n_rows: int, threads: int | None = None):
    """`_scatter_outer` by the native kernel (2-D operands, float32)."""
    return _ffi(
        "scatter_outer",
        jax.ShapeDtypeStruct((n_rows, vecs.shape[1]), jnp.float32),
        coef,
        vecs,
        idx.astype(jnp.int32),
        threads=threads,
    )


# -- XLA implementations (2-D) ---------------------------------------------------------------


def _flat2(x: jax.Array, width: int) -> jax.Array:
    return x.reshape(-1, width)


def _combine(table: jax.Array, coef: jax.Array, idx: jax.Array) -> jax.Array:
    """``out[b] = sum_j coef[b, j] * table[idx[b, j]]`` for 2-D ``coef`` / ``idx``."""

    def body(out, slot):
        c, i = slot
        return out + c[:, None] * jnp.take(table, i, axis=0), None

    init = jnp.zeros((coef.shape[0], table.shape[1]), jnp.result_type(table, coef))
    return jax.lax.scan(body, init, (coef.T, idx.T))[0]


def _dot(table: jax.Array, vecs: jax.Array, idx: jax.Array) -> jax.Array:
    """``out[b, j] = table[idx[b, j]] . vecs[b]`` for 2-D ``vecs`` / ``idx``."""

    def body(carry, i):
        return carry, jnp.sum(jnp.take(table, i, axis=0) * vecs, axis=-1)

    return jax.lax.scan(body, None, idx.T)[1].T


def _scatter_outer(coef: jax.Array, vecs: jax.Array, idx: jax.Array, n_rows: int) -> jax.Array:
    """``out[f] = sum_{b, j: idx[b, j] = f} coef[b, j] * vecs[b]`` (``[n_rows, d]``)."""

    def body(out, slot):
        c, i = slot
        return out.at[i].add(c[:, None] * vecs), None

    init = jnp.zeros((n_rows, vecs.shape[1]), jnp.result_type(coef, vecs))
    return jax.lax.scan(body, init, (coef.T, idx.T))[0]


# -- dispatch (2-D) --------------------------------------------------------------------------


def _dot2(table, vecs, idx, native: bool):
    if _use_native(native, "gather_dot", table, vecs):
        return jax.lax.platform_dependent(table, vecs, idx, cpu=_native_dot, default=_dot)
    return _dot(table, vecs, idx)


def _combine2(table, coef, idx, native: bool):
    if _use_native(native, "gather_combine", table, coef):
        return jax.lax.platform_dependent(table, coef, idx, cpu=_native_combine, default=_combine)
    return _combine(table, coef, idx)


def _scatter2(coef, vecs, idx, n_rows: int, native: bool):
    if _use_native(native, "scatter_outer", coef, vecs):
        return jax.lax.platform_dependent(
            coef,
            vecs,
            idx,
            cpu=functools.partial(_native_scatter_outer, n_rows=n_rows),
            default=functools.partial(_scatter_outer, n_rows=n_rows),
        )
    return _scatter_outer(coef, vecs, idx, n_rows)


# -- public ops ------------------------------------------------------------------------------


@functools.partial(jax.custom_jvp, nondiff_argnums=(1,))
def _native_top_k(x, k: int):
    return _native_top_k_raw(x, k)


@_native_top_k.defjvp
def _native_top_k_jvp(k, primals, tangents):
    (x,), (t,) = primals, tangents
    vals, idx = _native_top_k(x, k)
    t_vals = jnp.take_along_axis(t, idx, axis=-1)
    return (vals, idx), (t_vals, np.zeros(idx.shape, jax.dtypes.float0))


def top_k(x: jax.Array, k: int, native: bool = False) -> tuple[jax.Array, jax.Array]:
    """``(values, indices)`` of the k largest entries of each row of ``x`` (last axis),
    descending, ties to the lower index: `jax.lax.top_k`, or with ``native`` on CPU the
    bit-identical native kernel (float32 only; others use XLA)."""
    if not _use_native(native, "topk", x):
        return jax.lax.top_k(x, k)
    vals, idx = jax.lax.platform_dependent(
        x,
        cpu=lambda x: tuple(_native_top_k(x, k)),
        default=lambda x: tuple(jax.lax.top_k(x, k)),
    )
    return vals, idx


def scatter_outer(
    coef: jax.Array, vecs: jax.Array, idx: jax.Array, n_rows: int, native: bool = False
) -> jax.Array:
    """``out[f] = sum_{(b, j): idx[b, j] = f} coef[b, j] * vecs[b]``, ``[n_rows, d]``.

    ``coef`` / ``idx`` ``[..., k]``, ``vecs`` ``[..., d]`` (leading axes are rows); ids
    outside ``[0, n_rows)`` are dropped. Not differentiable (the backward pass of the gathers).
    """
    k, d = coef.shape[-1], vecs.shape[-1]
    return _scatter2(_flat2(coef, k), _flat2(vecs, d), _flat2(idx, k), n_rows, native)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _gather_combine(table, coef, idx, native):
    k, d = coef.shape[-1], table.shape[-1]
    out = _combine2(table, _flat2(coef, k), _flat2(idx, k), native)
    return out.reshape(coef.shape[:-1] + (d,))


def _gather_combine_fwd(table, coef, idx, native):
    return _gather_combine(table, coef, idx, native), (table, coef, idx)


def _gather_combine_bwd(native, res, g):
    table, coef, idx = res
    k, d = coef.shape[-1], table.shape[-1]
    c2, i2, g2 = _flat2(coef, k), _flat2(idx, k), _flat2(g, d)
    d_table = _scatter2(c2, g2, i2, table.shape[0], native).astype(table.dtype)
    d_coef = _dot2(table, g2, i2, native).reshape(coef.shape).astype(coef.dtype)
    return d_table, d_coef, None


_gather_combine.defvjp(_gather_combine_fwd, _gather_combine_bwd)


def gather_combine(
    table: jax.Array, coef: jax.Array, idx: jax.Array, native: bool = False
) -> jax.Array:
    """Sparse decode: ``out[..., :] = sum_j coef[..., j] * table[idx[..., j], :]``.

    Equals ``dense(coef, idx) @ table`` where ``dense`` scatters each row's k values into a
    ``[..., n]`` vector. The VJP is sparse: the table gradient is a scatter-add of
    ``rows * k`` outer products, the coefficient gradient a gather-dot (Gao et al. 2024).

    Args:
      table: ``[n, d]`` (decoder rows).
      coef: ``[..., k]`` values.
      idx: ``[..., k]`` integer rows of ``table``.
      native: the native CPU kernels (static; see the module docstring).

    Returns:
      ``[..., d]``.
    """
    return _gather_combine(table, coef, idx, bool(native))


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _gather_dot(table, vecs, idx, native):
    k, d = idx.shape[-1], table.shape[-1]
    out = _dot2(table, _flat2(vecs, d), _flat2(idx, k), native)
    return out.reshape(idx.shape)


def _gather_dot_fwd(table, vecs, idx, native):
    return _gather_dot(table, vecs, idx, native), (table, vecs, idx)


def _gather_dot_bwd(native, res, g):
    table, vecs, idx = res
    k, d = idx.shape[-1], table.shape[-1]
    g2, v2, i2 = _flat2(g, k), _flat2(vecs, d), _flat2(idx, k)
    d_table = _scatter2(g2, v2, i2, table.shape[0], native).astype(table.dtype)
    d_vecs = _combine2(table, g2, i2, native).reshape(vecs.shape).astype(vecs.dtype)
    return d_table, d_vecs, None


_gather_dot.defvjp(_gather_dot_fwd, _gather_dot_bwd)


def gather_dot(
    table: jax.Array, vecs: jax.Array, idx: jax.Array, native: bool = False
) -> jax.Array:
    """Sparse encode at chosen features: ``out[..., j] = table[idx[..., j]] . vecs[...]``.

    The transpose of `gather_combine`; its VJP is a scatter-add into ``table`` and a
    `gather_combine` for ``vecs``.

    Args:
      table: ``[n, d]`` (encoder columns as rows: ``W_enc.T``).
      vecs: ``[..., d]`` inputs.
      idx: ``[..., k]`` integer rows of ``table``.
      native: the native CPU kernels (static; see the module docstring).

    Returns:
      ``[..., k]``.
    """
    return _gather_dot(table, vecs, idx, bool(native))


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _gather_dot_values(values, table, vecs, idx, native):
    del table, vecs, idx, native
    return values


def _gather_dot_values_fwd(values, table, vecs, idx, native):
    return values, (values, table, vecs, idx)


def _gather_dot_values_bwd(native, res, g):
    values, table, vecs, idx = res
    d_table, d_vecs, _ = _gather_dot_bwd(native, (table, vecs, idx), g)
    return jnp.zeros_like(values), d_table, d_vecs, None


_gather_dot_values.defvjp(_gather_dot_values_fwd, _gather_dot_values_bwd)


def gather_dot_values(
    values: jax.Array, table: jax.Array, vecs: jax.Array, idx: jax.Array, native: bool = False
) -> jax.Array:
    """`gather_dot` whose value is already known: returns ``values`` (which must equal
    ``gather_dot(table, vecs, idx)``, e.g. the top-k entries of the dense product they were
    chosen from) with `gather_dot`'s gradient for ``table`` and ``vecs`` (none for
    ``values``). Saves recomputing the k dot products per row in the forward pass.
    """
    return _gather_dot_values(values, table, vecs, idx, bool(native))


def scatter_rows(values: jax.Array, indices: jax.Array, width: int) -> jax.Array:
    """Dense ``[..., width]`` rows holding ``values`` at ``indices`` (zeros elsewhere)."""
    k = values.shape[-1]
    v2 = values.reshape(-1, k)
    i2 = indices.reshape(-1, k)
    rows = jnp.arange(v2.shape[0])[:, None]
    out = jnp.zeros((v2.shape[0], width), values.dtype).at[rows, i2].set(v2)
    return out.reshape(values.shape[:-1] + (width,))
