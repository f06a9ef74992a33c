"""Measurements of a joint cross-model SAE (issue 15): reconstruction, sharing, truth, geometry.

For a trained `models.joint_sae.JointSAE` (or M independent SAEs) on row-aligned activations
of M >= 2 models: reconstruction per model, and everything below per model pair (A, B) =
(a, b), a < b (``pairs``; for two models also at the top level):

* reconstruction per model: FVU, L0 and dead fraction (latents that never fire on the
  evaluation rows), plus universal SAEs' cross-model FVU matrix (source s -> target t);
* sharing by relative decoder norm (crosscoder, universal): ``r_i = ||d_i^B|| / (||d_i^A|| +
  ||d_i^B||)`` (Lindsey et al. 2024). Documented thresholds: shared when ``0.3 <= r <= 0.7``
  (`SHARED_R`), exclusive to A when ``r <= 0.1`` and to B when ``r >= 0.9`` (`EXCLUSIVE_R`),
  "partial" otherwise; dead latents are excluded. With M > 2 models every pair ``(a, b)``
  gets this call with ``r = ||d^b|| / (||d^a|| + ||d^b||)``, counting only latents whose pair
  holds more than `EXCLUSIVE_R` of their summed decoder norm over all models;
* sharing by activation (universal, aligned, independent): the correlation over tokens of
  latent i's activation in A with (a) latent i in B (``same_index``: what an alignment loss
  buys) and (b) its best partner in B (``best_partner``: the universality pipeline's
  correlation pairing, `engine.correlation.correlate`). Shared when the correlation is
  ``>= 0.5`` (`SHARED_CORR`), exclusive when the best partner's correlation is ``< 0.2``
  (`EXCLUSIVE_CORR`);
* known truth (toy pairs from `models.dictionary_pair.make_partial_pair`): a latent side
  matches a true feature when its decoder row has cosine ``>= 0.8`` (`TRUTH_MIN_COS`) with
  that feature's direction; precision / recall of the predicted-shared pairs against the
  true shared features and of the predicted-exclusive latents against each side's exclusive
  features, and how many latents matching an exclusive feature were called shared. Also the
  shared precision among latents firing on >= 1 % of rows (`FREQUENT_DENSITY`): on the toy,
  the wrong "shared" calls are rare latents that barely trained and kept the r = 0.5 of the
  initialisation (equal decoder norms per model), a bias of the decoder-norm criterion that
  the floor pair also shows;
* geometry of the shared latents: their paired decoder rows through the universality
  pipeline's metrics with random-pairing nulls (`engine.similarity.evaluate`,
  `experiments.pipeline.compare.DEFAULT_METRICS`);
* latent scaling (Minder et al. 2025, arXiv 2504.02922; `models.joint_sae.latent_scaling`;
  crosscoders only, as it needs one code for all models): norm-exclusive latents whose ``nu`` in
  the other model is ``>= 0.5`` (`ARTIFACT_NU`) are flagged as exclusive only through a
  sparsity artifact.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Sequence

import numpy as np

from engine import checks, correlation, similarity
from experiments.pipeline import compare
from models import dictionary_pair
from models import joint_sae as js
from models import sae as sae_lib

SHARED_R = (0.3, 0.7)
EXCLUSIVE_R = 0.1  # r <= 0.1: only A; r >= 0.9: only B
SHARED_CORR = 0.5
EXCLUSIVE_CORR = 0.2
TRUTH_MIN_COS = 0.8
ARTIFACT_NU = 0.5
FREQUENT_DENSITY = 0.01  # diagnostic: shared-call precision among latents this frequent
GEOMETRY_MIN_PAIRS = 5
R_BINS = np.linspace(0.0, 1.0, 21)


@dataclasses.dataclass(frozen=True)
class Sharing:
    """A sharing call: predicted-shared pairs (A latent, B latent) and exclusive latents."""

    criterion: str
    n_live: int
    shared_a: np.ndarray
    shared_b: np.ndarray
    exclusive_a: np.ndarray
    exclusive_b: np.ndarray
    n_live_b: int | None = None  # activation criteria: B's own live latents

    def summary(self) -> dict:
        n = max(self.n_live, 1)
        # Exclusive latents over the latents they come from: one set (decoder norm) or A's
        # plus B's (activation criteria, each SAE its own latents).
        n_ex = max(self.n_live + (self.n_live_b or 0), 1)
        return {
            "criterion": self.criterion,
            "n_live": int(self.n_live),
            "n_shared": int(self.shared_a.size),
            "n_exclusive_a": int(self.exclusive_a.size),
            "n_exclusive_b": int(self.exclusive_b.size),
            "fraction_shared": self.shared_a.size / n,
            "fraction_exclusive": (self.exclusive_a.size + self.exclusive_b.size) / n_ex,
        }


def reconstruction(codes: js.JointCodes, shared_code: bool) -> dict:
    """Per-model FVU, L0, dead fraction (normalised space; FVU is scale-free)."""
    out = {"per_model": []}
    for m, (x, xh, z) in enumerate(zip(codes.xns, codes.recons, codes.codes)):
        out["per_model"].append(
            {
                "model": m,
                "fvu": js.fvu(x, xh),
                "l0": float((z > 0).sum(1).mean()),
                "dead_fraction": float(np.mean(~(z > 0).any(0))),
            }
        )
    out["mean_fvu"] = float(np.mean([p["fvu"] for p in out["per_model"]]))
    if codes.cross_fvu is not None:
        out["cross_fvu"] = codes.cross_fvu.tolist()
    out["shared_code"] = bool(shared_code)
    return out


def sharing_by_norm(r_b: np.ndarray, live: np.ndarray) -> Sharing:
    """Two models: classify latents by ``r = ||d^B|| / (||d^A|| + ||d^B||)``."""
    r_b = np.asarray(r_b, np.float64)
    live = np.asarray(live, bool)
    shared = np.flatnonzero(live & (r_b >= SHARED_R[0]) & (r_b <= SHARED_R[1]))
    return Sharing(
        "decoder_norm",
        int(live.sum()),
        shared,
        shared,
        np.flatnonzero(live & (r_b <= EXCLUSIVE_R)),
        np.flatnonzero(live & (r_b >= 1 - EXCLUSIVE_R)),
    )


def _corr_columns(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Per-column Pearson correlation of two ``[N, F]`` matrices (0 where constant)."""
    a = a - a.mean(0)
    b = b - b.mean(0)
    den = np.sqrt((a**2).sum(0) * (b**2).sum(0))
    return np.where(den > 0, (a * b).sum(0) / np.where(den > 0, den, 1.0), 0.0)


def sharing_by_activation(
    z_a: np.ndarray, z_b: np.ndarray, mesh, *, pairing: str
) -> tuple[Sharing, dict]:
    """Classify A's live latents by activation correlation with B's (see module docstring).

    ``pairing``: ``same_index`` (partner of latent i is latent i) or ``best_partner``
    (`engine.correlation.correlate`'s best match, the pipeline's correlation pairing).
    Returns the call and a summary of the correlations.
    """
    z_a = np.asarray(z_a, np.float64)
    z_b = np.asarray(z_b, np.float64)
    live_a = (z_a > 0).any(0)
    live_b = (z_b > 0).any(0)
    same = _corr_columns(z_a, z_b)
    matches = correlation.correlate(
        (z_a.astype(np.float32), z_b.astype(np.float32)), z_a.shape[1], z_b.shape[1], mesh
    )
    best_a = np.where(matches.a_has_match, matches.a_value, 0.0)
    best_b = np.where(matches.b_has_match, matches.b_value, 0.0)
    if pairing == "same_index":
        partner = np.arange(z_a.shape[1])
        value = same
    elif pairing == "best_partner":
        partner = matches.a_match
        value = best_a
    else:
        raise checks.InputError(
            f"sharing_by_activation pairing: unknown {pairing!r}; "
            "expected 'same_index' or 'best_partner'"
        )
    ok = live_a & (partner >= 0) & (value >= SHARED_CORR)
    ok &= live_b[np.maximum(partner, 0)]
    shared_a = np.flatnonzero(ok)
    call = Sharing(
        f"activation_{pairing}",
        int(live_a.sum()),
        shared_a,
        partner[shared_a],
        np.flatnonzero(live_a & (best_a < EXCLUSIVE_CORR)),
        np.flatnonzero(live_b & (best_b < EXCLUSIVE_CORR)),
        int(live_b.sum()),
    )
    stats = {
        "mean_same_index_corr": float(same[live_a].mean()) if live_a.any() else 0.0,
        "mean_best_partner_corr": float(best_a[live_a].mean()) if live_a.any() else 0.0,
        "fraction_same_index_ge_shared": float(np.mean(same[live_a] >= SHARED_CORR))
        if live_a.any()
        else 0.0,
        "fraction_best_partner_ge_shared": float(np.mean(best_a[live_a] >= SHARED_CORR))
        if live_a.any()
        else 0.0,
    }
    return call, stats


def _match_truth(w_dec: np.ndarray, true_dirs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Each decoder row's best true feature and cosine."""
    w = np.asarray(w_dec, np.float64)
    t = np.asarray(true_dirs, np.float64)
    w = w / np.maximum(np.linalg.norm(w, axis=1, keepdims=True), 1e-300)
    t = t / np.maximum(np.linalg.norm(t, axis=1, keepdims=True), 1e-300)
    cos = w @ t.T
    return cos.argmax(1), cos.max(1)


def truth_scores(
    call: Sharing,
    w_dec_a: np.ndarray,
    w_dec_b: np.ndarray,
    features_a: np.ndarray,
    features_b: np.ndarray,
    n_shared: int,
    live_a: np.ndarray,
    live_b: np.ndarray,
    density_a: np.ndarray | None = None,
) -> dict:
    """Precision / recall of a sharing call against a partial pair's known truth.

    True features ``0 .. n_shared-1`` of each side are the shared ones (same index on both
    sides), the rest exclusive to that side (`models.dictionary_pair.make_partial_pair`).
    """
    fa, ca = _match_truth(w_dec_a, features_a)
    fb, cb = _match_truth(w_dec_b, features_b)
    ok_a, ok_b = ca >= TRUTH_MIN_COS, cb >= TRUTH_MIN_COS
    n_ea, n_eb = features_a.shape[0] - n_shared, features_b.shape[0] - n_shared
    # Predicted-shared pairs that join the same true shared feature in both sides.
    good = (
        ok_a[call.shared_a]
        & ok_b[call.shared_b]
        & (fa[call.shared_a] < n_shared)
        & (fa[call.shared_a] == fb[call.shared_b])
    )
    found = set(fa[call.shared_a][good].tolist())
    out = {
        "n_true_shared": int(n_shared),
        "n_true_exclusive_a": int(n_ea),
        "n_true_exclusive_b": int(n_eb),
        "shared_precision": float(good.mean()) if call.shared_a.size else None,
        "shared_recall": len(found) / n_shared if n_shared else None,
    }
    if density_a is not None:
        frequent = np.asarray(density_a)[call.shared_a] >= FREQUENT_DENSITY
        out["shared_precision_frequent"] = float(good[frequent].mean()) if frequent.any() else None
        out["n_shared_frequent"] = int(frequent.sum())

    def excl(side_ids, f, ok, live, n_excl, name):
        hit = ok[side_ids] & (f[side_ids] >= n_shared)
        out[f"exclusive_{name}_precision"] = float(hit.mean()) if side_ids.size else None
        out[f"exclusive_{name}_recall"] = (
            len(set(f[side_ids][hit].tolist())) / n_excl if n_excl else None
        )
        # Latents that carry an exclusive feature of this side: how many were called shared?
        carriers = np.flatnonzero(live & ok & (f >= n_shared))
        shared_ids = call.shared_a if name == "a" else call.shared_b
        out[f"exclusive_{name}_called_shared"] = (
            float(np.isin(carriers, shared_ids).mean()) if carriers.size else None
        )

    excl(call.exclusive_a, fa, ok_a, live_a, n_ea, "a")
    excl(call.exclusive_b, fb, ok_b, live_b, n_eb, "b")
    return out


def geometry(
    x: np.ndarray,
    y: np.ndarray,
    mesh,
    *,
    num_permutations: int = 200,
    seed: int = 0,
    metrics: Sequence[str] = compare.DEFAULT_METRICS,
) -> dict:
    """The pipeline's metrics with random-pairing nulls on paired rows (compact form)."""
    x = np.asarray(x, np.float64)
    y = np.asarray(y, np.float64)
    if x.shape[0] < GEOMETRY_MIN_PAIRS:
        return {"n": int(x.shape[0]), "note": f"fewer than {GEOMETRY_MIN_PAIRS} shared pairs"}
    out = {"n": int(x.shape[0]), "metrics": {}, "skipped": {}}
    for metric in metrics:
        try:
            res = similarity.evaluate(
                x, y, (metric,), num_permutations=num_permutations, seed=seed, mesh=mesh
            )["metrics"][metric]
        except checks.InputError as e:
            out["skipped"][metric] = str(e)
            continue
        out["metrics"][metric] = {
            k: res.get(k) for k in ("score", "null_mean", "null_std", "p", "z", "excess")
        }
    return out


def artifact_summary(
    scaling: js.LatentScaling,
    exclusive_a: np.ndarray,
    exclusive_b: np.ndarray,
    w_decs=None,
    truth=None,
    models: tuple = (0, 1),
) -> dict:
    """Minder et al.'s check on the norm-exclusive latents of a model pair.

    ``models``: the pair's model indices (rows of ``scaling``): ``exclusive_a`` are latents
    exclusive to ``models[0]`` (checked in ``models[1]``) and ``exclusive_b`` the reverse.
    With ``w_decs`` (the pair's two decoders) and a known-truth ``truth`` pair, also: how many
    norm-exclusive latents carry a truly SHARED feature in their owner model (decoder cosine
    >= `TRUTH_MIN_COS`), i.e. are real artifacts, and how many of those the check flags.
    """
    out = {"threshold_nu": ARTIFACT_NU}
    ma, mb = models
    for side, (name, ids, other) in enumerate((("a", exclusive_a, mb), ("b", exclusive_b, ma))):
        ne = scaling.nu_error[other, ids]
        nr = scaling.nu_recon[other, ids]
        flag = (np.nan_to_num(ne) >= ARTIFACT_NU) | (np.nan_to_num(nr) >= ARTIFACT_NU)
        entry = {
            "n": int(ids.size),
            "n_flagged": int(flag.sum()),
            "flagged": ids[flag].tolist(),
            "nu_error_median": float(np.nanmedian(ne)) if ids.size else None,
            "nu_recon_median": float(np.nanmedian(nr)) if ids.size else None,
        }
        if truth is not None and w_decs is not None and ids.size:
            feats = truth.features_a if side == 0 else truth.features_b
            n_shared = int(np.sum(np.asarray(truth.true_match) >= 0))
            f, c = _match_truth(np.asarray(w_decs[side])[ids], feats)
            carries_shared = (c >= TRUTH_MIN_COS) & (f < n_shared)
            entry["n_carrying_true_shared"] = int(carries_shared.sum())
            entry["n_flagged_carrying_true_shared"] = int((carries_shared & flag).sum())
        out[f"exclusive_{name}"] = entry
    return out


def r_histogram(r_b: np.ndarray, live: np.ndarray) -> list[int]:
    return np.histogram(np.asarray(r_b)[np.asarray(live, bool)], bins=R_BINS)[0].tolist()


def _pair_truth(truth, a: int, b: int):
    """The known truth of models ``a`` and ``b``: a `ToyPair` (two models) or
    `models.dictionary_pair.PartialSides` (any number)."""
    if truth is None:
        return None
    if isinstance(truth, dictionary_pair.PartialSides):
        return truth.pair(a, b)
    if (a, b) != (0, 1):
        raise checks.InputError(
            f"joint_metrics truth: a two-model ToyPair has no truth for "
            f"models ({a}, {b}); give PartialSides"
        )
    return truth


def _with_pairs(out: dict, pairs: list[dict]) -> dict:
    """Per-pair results under ``pairs``; for two models the pair's numbers also at the top
    level; for more, the top-level ``fraction_shared`` is the mean over pairs."""
    out["pairs"] = pairs
    out.update({k: v for k, v in pairs[0].items() if k != "models"})
    if len(pairs) > 1:
        out["fraction_shared"] = float(np.mean([p["fraction_shared"] for p in pairs]))
        out["top_level_pair"] = pairs[0]["models"]
    return out


def analyze_joint(
    joint: js.JointSAE,
    xs: Sequence[np.ndarray],
    mesh,
    *,
    truth=None,
    num_permutations: int = 200,
    seed: int = 0,
    metrics: Sequence[str] = compare.DEFAULT_METRICS,
) -> dict:
    """Every measurement of one joint model on M models' row-aligned activations.

    Reconstruction per model; sharing, truth, geometry and latent scaling per model pair
    ``(a, b)``, ``a < b`` (``pairs``; the pair's "B" side is model b: ``r = ||d^b|| /
    (||d^a|| + ||d^b||)``). ``truth``: a `models.toy_pair.ToyPair` from `make_partial_pair`
    (two models) or `models.dictionary_pair.PartialSides` (any number), or None.
    """
    cfg = joint.spec.config
    M = joint.spec.n_models
    codes = js.run_codes(joint, xs)
    out = {
        "label": cfg.label(),
        "design": cfg.design,
        "config": cfg.to_dict(),
        "n_models": M,
        "reconstruction": reconstruction(codes, cfg.shared_code),
    }
    lives = [(c > 0).any(0) for c in codes.codes]
    w = [np.asarray(wd, np.float64) for wd in joint.params["W_dec"]]
    norms = joint.decoder_norms()
    # Minder et al.'s check needs one code for every model (crosscoders); a universal SAE's
    # code differs per source model.
    scaling = (
        js.latent_scaling(codes.codes, codes.xns, codes.recons, w) if cfg.shared_code else None
    )
    primary = {
        "crosscoder": "decoder_norm",
        "universal": "decoder_norm",
        "aligned": "activation_same_index",
    }[cfg.design]
    pairs = []
    for a, b in itertools.combinations(range(M), 2):
        truth_ab = _pair_truth(truth, a, b)
        entry: dict = {"models": [a, b]}
        calls = {}
        if cfg.design in ("crosscoder", "universal"):
            r_b = norms[b] / np.maximum(norms[a] + norms[b], 1e-300)
            # With > 2 models, a latent whose decoder lies in other models (the pair's share
            # of its summed norm <= EXCLUSIVE_R) belongs to neither: not counted for the pair.
            present = norms[a] + norms[b] > EXCLUSIVE_R * norms.sum(0)
            live = (lives[a] | lives[b]) & present
            calls["decoder_norm"] = sharing_by_norm(r_b, live)
            entry["r"] = r_b.tolist()
            entry["r_histogram"] = {"bins": R_BINS.tolist(), "counts": r_histogram(r_b, live)}
            if scaling is not None:
                entry["latent_scaling"] = artifact_summary(
                    scaling,
                    calls["decoder_norm"].exclusive_a,
                    calls["decoder_norm"].exclusive_b,
                    [w[a], w[b]],
                    truth_ab,
                    models=(a, b),
                )
        if cfg.design in ("universal", "aligned"):
            for pairing in ("same_index", "best_partner"):
                call, stats = sharing_by_activation(
                    codes.codes[a], codes.codes[b], mesh, pairing=pairing
                )
                calls[call.criterion] = call
                entry[f"activation_{pairing}_stats"] = stats
        entry.update(
            _report_calls(
                calls,
                primary,
                w[a],
                w[b],
                lives[a],
                lives[b],
                truth_ab,
                mesh,
                num_permutations,
                seed,
                metrics,
                (codes.codes[a] > 0).mean(0),
            )
        )
        pairs.append(entry)
    return _with_pairs(out, pairs)


def analyze_independent(
    saes: Sequence[sae_lib.SAE],
    xs: Sequence[np.ndarray],
    mesh,
    *,
    truth=None,
    num_permutations: int = 200,
    seed: int = 0,
    metrics: Sequence[str] = compare.DEFAULT_METRICS,
) -> dict:
    """The same numbers for M independently trained SAEs (best-partner pairing per pair)."""
    if len(saes) != len(xs) or len(saes) < 2:
        raise checks.InputError(
            f"analyze_independent: {len(saes)} SAEs for {len(xs)} models' "
            "activations (need one per model, >= 2)"
        )
    z = [np.asarray(s.encode(np.asarray(x, np.float32)), np.float64) for s, x in zip(saes, xs)]
    xns = [np.asarray(x, np.float64) * s.config.input_scale for s, x in zip(saes, xs)]
    recons = [
        np.asarray(s.decode(zz.astype(np.float32)), np.float64) * s.config.input_scale
        for s, zz in zip(saes, z)
    ]
    codes = js.JointCodes(xns=xns, codes=z, recons=recons, cross_fvu=None)
    out = {
        "label": "independent",
        "design": "independent",
        "n_models": len(saes),
        "reconstruction": reconstruction(codes, False),
    }
    lives = [(zz > 0).any(0) for zz in z]
    w = [np.asarray(s.W_dec, np.float64) for s in saes]
    pairs = []
    for a, b in itertools.combinations(range(len(saes)), 2):
        entry: dict = {"models": [a, b]}
        calls = {}
        for pairing in ("same_index", "best_partner"):
            call, stats = sharing_by_activation(z[a], z[b], mesh, pairing=pairing)
            calls[call.criterion] = call
            entry[f"activation_{pairing}_stats"] = stats
        entry.update(
            _report_calls(
                calls,
                "activation_best_partner",
                w[a],
                w[b],
                lives[a],
                lives[b],
                _pair_truth(truth, a, b),
                mesh,
                num_permutations,
                seed,
                metrics,
                (z[a] > 0).mean(0),
            )
        )
        pairs.append(entry)
    return _with_pairs(out, pairs)


def _report_calls(
    calls: dict,
    primary: str,
    w_a,
    w_b,
    live_a,
    live_b,
    truth,
    mesh,
    num_permutations: int,
    seed: int,
    metrics: Sequence[str],
    density_a: np.ndarray,
) -> dict:
    out = {"primary_criterion": primary, "sharing": {}}
    for name, call in calls.items():
        entry = call.summary()
        if truth is not None:
            n_shared = int(np.sum(np.asarray(truth.true_match) >= 0))
            entry["truth"] = truth_scores(
                call,
                w_a,
                w_b,
                truth.features_a,
                truth.features_b,
                n_shared,
                live_a,
                live_b,
                density_a,
            )
        if name == primary:
            entry["geometry"] = geometry(
                w_a[call.shared_a],
                w_b[call.shared_b],
                mesh,
                num_permutations=num_permutations,
                seed=seed,
                metrics=metrics,
            )
        out["sharing"][name] = entry
    out["fraction_shared"] = out["sharing"][primary]["fraction_shared"]
    return out
