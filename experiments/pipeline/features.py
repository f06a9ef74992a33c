"""Step 1 and 2 of the pipeline: feature activations of two SAEs on the same tokens, streamed.

One pass over a paired stream of ``(row_ids, acts_a, acts_b)`` chunks computes, on device:
both SAEs' feature activations (`engine.accumulators.accumulate` with a ``transform`` that
encodes each chunk, the SAEs travelling as replicated parameters), per-feature statistics of
each side (`engine.feature_stats`: density, mean, std, max, top-activating rows), and the
activation correlation of every feature of A with every feature of B
(`engine.correlation.CorrelationAccumulator`; the sparse TopK path when both SAEs are TopK,
cost O(tokens * k_a * k_b)). The pass checkpoints with orbax and resumes mid-stream.
"""

from __future__ import annotations

import dataclasses
import os

import jax.numpy as jnp
import numpy as np

from engine import accumulators, checkpoint, checks, correlation, feature_stats
from models import sae as sae_lib


@dataclasses.dataclass
class FeaturePass:
    stats_a: feature_stats.FeatureStats
    stats_b: feature_stats.FeatureStats
    matches: correlation.CorrelationMatches
    corr: np.ndarray | None     # [F_a, F_b] when small enough to keep


def _use_sparse(sae_a: sae_lib.SAE, sae_b: sae_lib.SAE) -> bool:
    return sae_a.config.activation == "topk" and sae_b.config.activation == "topk"


def feature_pass(stream, sae_a: sae_lib.SAE, sae_b: sae_lib.SAE, mesh, *, top_n: int = 10,
                 checkpoint_dir: str | None = None, progress: bool = False,
                 sparse: bool | None = None) -> FeaturePass:
    """Runs both SAEs over a paired stream and accumulates statistics and correlations.

    Args:
      stream: `ChunkStream` of ``(row_ids [rows] int32, acts_a [rows, d_a], acts_b [rows,
        d_b])``; row ids are stream positions (used to find top-activating tokens).
      sae_a / sae_b: the two SAEs; their ``d_in`` must match the activation widths.
      top_n: top-activating rows kept per feature.
      checkpoint_dir: resume the pass from here after a kill.
      sparse: force the sparse (TopK values/indices) correlation path; default: when both
        SAEs are TopK.
    """
    fa, fb = sae_a.config.d_sae, sae_b.config.d_sae
    sparse = _use_sparse(sae_a, sae_b) if sparse is None else sparse
    parts = {"stats_a": (feature_stats.FeatureStatsAccumulator(fa, top_n), (1, 0)),
             "stats_b": (feature_stats.FeatureStatsAccumulator(fb, top_n), (2, 0))}
    if sparse:
        corr_acc = correlation.CorrelationAccumulator(fa, fb, sparse=True)
        parts["corr"] = (corr_acc, (3, 4, 5, 6))
    else:
        corr_acc = correlation.CorrelationAccumulator(fa, fb)
        parts["corr"] = (corr_acc, (1, 2))
    acc = accumulators.Combined(parts)

    def transform(params, row_ids, xa, xb):
        a, b = params
        za, zb = a.encode(xa), b.encode(xb)
        out = (row_ids, za, zb)
        if sparse:
            va, ia = a.encode_sparse(xa)
            vb, ib = b.encode_sparse(xb)
            out = out + (va, ia.astype(jnp.int32), vb, ib.astype(jnp.int32))
        return out

    ckpt = None if checkpoint_dir is None else checkpoint.Checkpointer(checkpoint_dir)
    state = accumulators.accumulate(acc, stream, mesh, checkpointer=ckpt, save_every=50,
                                    progress=progress, transform=transform,
                                    params=(sae_a, sae_b))
    if ckpt is not None:
        ckpt.close()
    out = acc.finalize(state)
    result = out["corr"]
    matches = correlation.correlation_matches(result, n_a=fa, n_b=fb)
    return FeaturePass(stats_a=out["stats_a"], stats_b=out["stats_b"], matches=matches,
                       corr=result.corr)


def check_widths(sae: sae_lib.SAE, width: int, what: str) -> None:
    """One-line error when an SAE does not fit the hookpoint it is applied to."""
    if sae.config.d_in != width:
        raise checks.InputError(f"{what}: SAE d_in={sae.config.d_in} does not match the "
                                f"activation width {width} of its hookpoint")


def checkpoint_path(root: str, name: str) -> str:
    return os.path.join(root, "feature_pass", name)
