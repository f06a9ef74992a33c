"""Accuracy cost of reduced-precision GEMMs (bf16, TF32) against float64, per kernel.

Accelerators run float32 matrix products faster at lower input precision: TF32 (10-bit
mantissa inputs, float32 accumulation; NVIDIA's default for float32 ``jnp.dot`` at
``precision=DEFAULT``) and bf16 (7-bit mantissa inputs; TPUs' default). Their ACCURACY does not
depend on the device, so it is measured here on the CPU by rounding the GEMM inputs the way the
hardware does (round to nearest even on the mantissa; products and sums in float32) and
comparing with float64, for each GEMM-bound kernel of the project:

* ``pairwise``: unit-row cosines of decoder-like dictionaries (B = noisy permuted copies of A
  plus unrelated rows): max |error| of the cosines, argmax agreement without refinement, and
  the share of rows the exact float64 refinement could not certify from ``k + margin``
  candidates with the precision's error bound (`engine.pairwise.cosine_tolerance`), i.e. the
  rows it would recompute in full on the host (its cost).
* ``correlation``: activation correlation of two TopK codes (values rounded; the sparse path
  multiplies and sums them): max |error| of the correlations and agreement of best partners.
* ``sae``: a TopK SAE forward (encoder GEMM, top-k, decoder GEMM): agreement of the selected
  features with float64 (Jaccard of the supports) and the reconstruction's relative error.
* ``cca``: SVCCA from covariances of rounded inputs: |error| of the score (the design asks
  1e-5 against float64 for the streamed statistics).

Peer: none (an accuracy benchmark, not a speed one): every number is a distance to the float64
result of the same kernel, the exact reference.

Run (CPU, about a minute)::

    python -m experiments.bench_precision --out=runs/bench/precision.json

The defaults chosen from these numbers are in docs/precision.md.
"""

from __future__ import annotations

from absl import app, flags

from experiments import common

FLAGS = flags.FLAGS
flags.DEFINE_integer("prec_n", 4096, "pairwise: rows per dictionary; sae/cca: rows.")
flags.DEFINE_integer("prec_d", 1024, "pairwise / sae: dimension.")
flags.DEFINE_integer("prec_features", 2048, "correlation / sae: features.")
flags.DEFINE_integer("prec_tokens", 50_000, "correlation: tokens.")
common.define_bench_flags()

PRECISIONS = ("float32", "tf32", "bf16")
# Unit roundoff of the rounded GEMM inputs (float32 accumulation adds d * 2**-24).
INPUT_ROUNDOFF = {"float32": 2.0**-24, "tf32": 2.0**-11, "bf16": 2.0**-8}


def round_mantissa(x, precision: str):
    """``x`` (float32) rounded to the precision's mantissa, round to nearest even, as float32."""
    import numpy as np

    x = np.ascontiguousarray(x, np.float32)
    if precision == "float32":
        return x
    drop = {"tf32": 13, "bf16": 16}[precision]
    bits = x.view(np.uint32).astype(np.uint64)
    half = np.uint64(1 << (drop - 1))
    lsb = (bits >> np.uint64(drop)) & np.uint64(1)
    bits = ((bits + half - np.uint64(1) + lsb) >> np.uint64(drop)) << np.uint64(drop)
    return bits.astype(np.uint32).view(np.float32)


def dot(a, b, precision: str):
    """float32 product of the rounded inputs (what the tensor cores compute)."""
    import numpy as np

    return np.asarray(round_mantissa(a, precision) @ round_mantissa(b, precision), np.float32)


def pairwise_section() -> list[dict]:
    import numpy as np

    from engine import pairwise

    rng = np.random.default_rng(0)
    n, d = FLAGS.prec_n, FLAGS.prec_d
    a = rng.standard_normal((n, d)).astype(np.float32)
    b = a[rng.permutation(n)] + 1.5 * rng.standard_normal((n, d)).astype(np.float32)
    b[: n // 4] = rng.standard_normal((n // 4, d)).astype(np.float32)
    a /= np.linalg.norm(a, axis=1, keepdims=True)
    b /= np.linalg.norm(b, axis=1, keepdims=True)
    ref = a.astype(np.float64) @ b.astype(np.float64).T
    best = ref.argmax(1)
    out = []
    for p in PRECISIONS:
        s = dot(a, b.T, p)
        err = float(np.max(np.abs(s - ref)))
        tol = pairwise.cosine_tolerance(d, p)
        row = {
            "name": f"pairwise cosine {n}x{n} d={d} ({p})",
            "precision": p,
            "max_abs_err": err,
            "error_bound": tol,
            "bound_holds": err <= tol,
            "argmax_agreement_unrefined": float(np.mean(s.argmax(1) == best)),
        }
        srt = -np.sort(-s, axis=1)
        for margin in (4, 16, 64):
            kk = 1 + margin
            # certified: the K-th candidate more than 2 tol below the best (k = 1)
            row[f"uncertified_rows_margin{margin}"] = float(
                np.mean(srt[:, kk - 1] >= srt[:, 0] - 2 * tol)
            )
        # The true argmax is among the top k + margin candidates of the rounded product
        # (refinement would find it) for every row?
        top16 = np.argsort(-s, axis=1)[:, :17]
        row["true_argmax_in_top17"] = float(np.mean((top16 == best[:, None]).any(1)))
        out.append(row)
    return out


def correlation_section() -> list[dict]:
    import numpy as np

    rng = np.random.default_rng(1)
    f, t, k = FLAGS.prec_features, FLAGS.prec_tokens, 32
    ia = np.stack([rng.choice(f, k, replace=False) for _ in range(t)])
    perm = rng.permutation(f)
    ib = perm[ia]
    va = rng.exponential(1.0, (t, k)).astype(np.float32)
    vb = (va * rng.uniform(0.5, 1.5, (t, k))).astype(np.float32)
    vb[rng.random((t, k)) < 0.5] = 0.0

    def corr(va_, vb_, dtype):
        za = np.zeros((t, f), dtype)
        zb = np.zeros((t, f), dtype)
        np.put_along_axis(za, ia, va_.astype(dtype), 1)
        np.put_along_axis(zb, ib, vb_.astype(dtype), 1)
        c = (za.T @ zb).astype(np.float64) / t
        ma, mb = za.mean(0, dtype=np.float64), zb.mean(0, dtype=np.float64)
        sa = np.sqrt(np.maximum((za.astype(np.float64) ** 2).mean(0) - ma**2, 0))
        sb = np.sqrt(np.maximum((zb.astype(np.float64) ** 2).mean(0) - mb**2, 0))
        return (c - np.outer(ma, mb)) / np.maximum(np.outer(sa, sb), 1e-30)

    ref = corr(va, vb, np.float64)
    best = ref.argmax(1)
    out = []
    for p in PRECISIONS:
        got = corr(round_mantissa(va, p), round_mantissa(vb, p), np.float32)
        out.append(
            {
                "name": f"correlation TopK k={k} {f}x{f}, {t} tokens ({p})",
                "precision": p,
                "max_abs_err": float(np.max(np.abs(got - ref))),
                "best_partner_agreement": float(np.mean(got.argmax(1) == best)),
                "best_value_max_abs_err": float(np.max(np.abs(got.max(1) - ref.max(1)))),
            }
        )
    return out


def sae_section() -> list[dict]:
    import numpy as np

    rng = np.random.default_rng(2)
    n, d, f, k = min(FLAGS.prec_n, 4096), FLAGS.prec_d // 2, FLAGS.prec_features, 32
    w_enc = (rng.standard_normal((d, f)) / np.sqrt(d)).astype(np.float32)
    w_dec = np.ascontiguousarray(w_enc.T)
    x = rng.standard_normal((n, d)).astype(np.float32)

    def forward(x_, we, wd, p):
        pre = x_.astype(np.float64) @ we.astype(np.float64) if p == "float64" else dot(x_, we, p)
        idx = np.argpartition(-pre, k, axis=1)[:, :k]
        vals = np.maximum(np.take_along_axis(pre, idx, 1), 0)
        z = np.zeros(pre.shape, np.float64)
        np.put_along_axis(z, idx, vals, 1)
        rec = z @ wd.astype(np.float64) if p == "float64" else dot(z.astype(np.float32), wd, p)
        return idx, rec

    idx_ref, rec_ref = forward(x, w_enc, w_dec, "float64")
    sets_ref = [set(r) for r in idx_ref]
    out = []
    for p in PRECISIONS:
        idx, rec = forward(x, w_enc, w_dec, p)
        jac = np.mean(
            [len(sets_ref[i] & set(idx[i])) / len(sets_ref[i] | set(idx[i])) for i in range(n)]
        )
        out.append(
            {
                "name": f"TopK SAE forward d={d} F={f} k={k} ({p})",
                "precision": p,
                "support_jaccard": float(jac),
                "reconstruction_rel_err": float(
                    np.linalg.norm(rec - rec_ref) / np.linalg.norm(rec_ref)
                ),
            }
        )
    return out


def cca_section() -> list[dict]:
    import numpy as np

    from engine import cca

    rng = np.random.default_rng(3)
    n, d, latent = 20_000, 128, 32
    z = rng.standard_normal((n, latent))
    x = z @ rng.standard_normal((latent, d)) + 0.3 * rng.standard_normal((n, d)) + 2.0
    y = z @ rng.standard_normal((latent, d)) + 0.3 * rng.standard_normal((n, d)) - 1.0
    x, y = x.astype(np.float32), y.astype(np.float32)
    ref = cca.svcca(x.astype(np.float64), y.astype(np.float64)).score
    out = []
    for p in PRECISIONS:
        xr, yr = round_mantissa(x - x.mean(0), p), round_mantissa(y - y.mean(0), p)
        # covariance blocks as the accumulator forms them: one rounded-input GEMM each
        sxx, syy, sxy = dot(xr.T, xr, p) / n, dot(yr.T, yr, p) / n, dot(xr.T, yr, p) / n

        def inv_sqrt(c, thr=0.99):
            e, v = np.linalg.eigh(c.astype(np.float64))
            e, v = e[::-1], v[:, ::-1]
            keep = int(np.searchsorted(np.cumsum(e) / e.sum(), thr)) + 1
            return v[:, :keep] / np.sqrt(e[:keep])

        wx, wy = inv_sqrt(sxx), inv_sqrt(syy)
        s = np.linalg.svd(wx.T @ sxy.astype(np.float64) @ wy, compute_uv=False)
        score = float(np.mean(np.clip(s, 0, 1)))
        out.append(
            {
                "name": f"SVCCA from covariances n={n} d={d} ({p}, centred inputs)",
                "precision": p,
                "score": score,
                "score_float64": float(ref),
                "abs_err": abs(score - float(ref)),
                "goal_abs_err": 1e-5,
            }
        )
    return out


SECTIONS = {
    "pairwise": pairwise_section,
    "correlation": correlation_section,
    "sae": sae_section,
    "cca": cca_section,
}


def main(argv):
    del argv
    import json
    import os

    from engine import bench

    budget = bench.set_thread_budget(FLAGS.threads)
    results = []
    for name in common.bench_sections(tuple(SECTIONS)):
        for r in SECTIONS[name]():
            r.update(threads=budget, load=os.getloadavg()[0], section=name)
            results.append(r)
            print(json.dumps(r, default=float))
    path = common.bench_out("precision")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        json.dump({"env": bench.environment(), "results": results}, f, indent=2, default=float)
    print(f"wrote {path}")


if __name__ == "__main__":
    app.run(main)
