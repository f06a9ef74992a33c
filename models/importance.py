"""Per-feature importance of an SAE inside a transformers language model (three scores).

1. **Direct logit effect** (`direct_logit_effect`): each feature's decoder direction read out
   directly by the unembedding, skipping every later block (direct logit attribution, e.g.
   Elhage et al. 2021 "A Mathematical Framework for Transformer Circuits")::

       DLE[i] = W_U  diag(g) C (W_dec[i] / input_scale) / sigma        ([vocab])

   The final norm is treated as linear with its scale frozen: ``g`` is its effective weight
   (LayerNorm / Llama RMSNorm ``weight``, Gemma ``1 + weight``), ``C`` centres the vector for a
   LayerNorm (identity for RMSNorm), and ``sigma`` is the norm's denominator
   (``sqrt(var + eps)`` / ``sqrt(mean(x^2) + eps)``) averaged over the corpus's predicted
   positions (measured in `feature_importance`). Approximations: the norm's scale is really
   per position and depends on the feature itself; later blocks and Gemma 2's logit
   soft-capping are ignored. Summaries per feature: the norm of the vocab-centred row (softmax
   ignores a constant shift) and the top promoted / suppressed tokens. Masked-LM heads
   (BERT's dense + GELU + LayerNorm transform) are not linear and are refused.

2. **Attribution** (attribution patching: Nanda 2023; Syed et al. 2023, arXiv:2310.10348;
   Marks et al. 2024 "Sparse Feature Circuits", arXiv:2403.19647): the SAE is spliced in with
   its error term, ``x = decode(f) + stopgrad(x - decode(f))``, so the forward is the clean one,
   and ``attr_i(t) = f_i(t) * dM / df_i(t)`` with ``M`` the sum over the batch's counted positions
   of the log-probability of the correct next (or masked) token: one backward per batch.
   Positive attribution = the feature helps predict the right token. Accumulated per feature
   over the corpus: sum of ``|attr|``, signed sum, activation sum and firing count; and per
   *predicted-token class* (the ``n_classes`` most frequent text tokens of the corpus): the sum
   of ``|attr_i(t)|`` over positions t whose target is that token (the feature's own position;
   its effect on later predictions is credited to the position where it fires). This is the
   "fires high on important logits" measure the comparison's both-fire table reads.

3. **Exact ablation on a sample**: for ``n_ablate`` features (a seeded sample of those firing
   in the first batch), the change of ``M`` when the feature's contribution
   ``f_i(t) W_dec[i]`` is removed at every spliced position, over the first
   ``ablate_contexts`` contexts, beside the linear estimate ``-sum_t attr_i(t)`` over the same
   positions (a first-order Taylor expansion of the same change). Their agreement checks (2).

Positions (which are spliced, which predictions count, masked-LM masking) follow
`models.splice` exactly. Streaming: one row per token position, reduced on the device mesh by
the engine's accumulators (`engine.accumulators.Sums`, float32 with compensated sums across
chunks) with orbax checkpoints of the running state (`splice.streamed`).
Per-feature arrays are saved with `FeatureImportance.save` (``.npz``).

Example::

    from models import importance, splice
    lm = splice.load_with_head("path/to/model")
    imp = importance.feature_importance(lm, sae, "resid_post.1", contexts)
    dle = importance.direct_logit_effect(lm, sae, imp.norm_scale)
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np

from engine import checks
from models import lm as lm_lib
from models import sae as sae_lib
from models import splice

if TYPE_CHECKING:
    import torch
    from jax.sharding import Mesh

    from models import text

_FINAL_NORM_NAMES = ("final_layer_norm", "ln_f", "norm", "final_layernorm", "final_norm")


# --------------------------------------------------------------------------------------------
# The final norm as a frozen-scale linear map
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class FinalNorm:
    """The final norm of a causal LM, with what its linearisation needs.

    Attributes:
      module: the torch module.
      centred: True for LayerNorm (subtracts the mean), False for RMSNorm.
      weight: effective per-channel gain ``g`` (float64 numpy).
      eps: the norm's epsilon.
    """

    module: Any
    centred: bool
    weight: np.ndarray
    eps: float

    def denominator(self, h: torch.Tensor) -> torch.Tensor:
        """Per-position ``sigma`` of inputs ``h [..., d]`` (torch)."""
        h = h.double()
        if self.centred:
            return (h.var(-1, unbiased=False) + self.eps).sqrt()
        return ((h**2).mean(-1) + self.eps).sqrt()


def final_norm(lm: lm_lib.LanguageModel) -> FinalNorm:
    """Finds the final norm of a causal LM (``ln_f``, ``final_layer_norm``, ``norm``)."""
    import torch

    if lm.is_encoder:
        raise checks.InputError(
            f"model {lm.name}: direct logit effect needs a causal LM with a "
            "final norm and a linear unembedding; a masked-LM head "
            "(dense + GELU + LayerNorm) is not linear"
        )
    base = lm.model.base_model
    for name in _FINAL_NORM_NAMES:
        mod = getattr(base, name, None)
        if mod is None:
            continue
        w = mod.weight.detach().double().cpu().numpy()
        if isinstance(mod, torch.nn.LayerNorm):
            return FinalNorm(mod, True, w, float(mod.eps))
        eps = float(getattr(mod, "eps", getattr(mod, "variance_epsilon", 1e-6)))
        # Gemma's RMSNorm scales by (1 + weight); Llama's by weight.
        gemma = type(mod).__name__.lower().startswith("gemma")
        return FinalNorm(mod, False, (1.0 + w) if gemma else w, eps)
    raise checks.InputError(
        f"model {lm.name}: no final norm found (looked for "
        f"{_FINAL_NORM_NAMES} on {type(base).__name__})"
    )


def unembedding(lm: lm_lib.LanguageModel) -> np.ndarray:
    """``W_U [vocab, d_model]`` (float64), the LM head's weight."""
    return lm.model.get_output_embeddings().weight.detach().double().cpu().numpy()


def linear_readout(lm: lm_lib.LanguageModel, norm_scale: float) -> np.ndarray:
    """``R [d_model, vocab]`` with ``logits ~ v @ R`` for a residual direction ``v``.

    ``R = C diag(g) W_U^T / sigma`` (module docstring); float64.
    """
    fn = final_norm(lm)
    if not (np.isfinite(norm_scale) and norm_scale > 0):
        raise checks.InputError(f"norm_scale: expected a positive number, got {norm_scale}")
    d = lm.d_model
    centre = np.eye(d) - (np.full((d, d), 1.0 / d) if fn.centred else 0.0)
    return (centre * fn.weight[None, :]) @ unembedding(lm).T / float(norm_scale)


@dataclasses.dataclass(frozen=True)
class DirectLogitEffect:
    """Per-feature summaries of ``DLE = W_dec R`` (``[d_sae, vocab]``, never stored whole).

    Attributes:
      norm: ``[d_sae]`` L2 norm of each vocab-centred row.
      promoted / promoted_values: ``[d_sae, top_n]`` token ids (values) with the largest effect.
      suppressed / suppressed_values: ``[d_sae, top_n]`` the most negative.
      norm_scale: the frozen final-norm scale used.
    """

    norm: np.ndarray
    promoted: np.ndarray
    promoted_values: np.ndarray
    suppressed: np.ndarray
    suppressed_values: np.ndarray
    norm_scale: float

    def save(self, path: str) -> None:
        """Every field in one ``.npz`` (no pickles)."""
        import os

        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        np.savez(
            path, **{f.name: np.asarray(getattr(self, f.name)) for f in dataclasses.fields(self)}
        )

    @classmethod
    def load(cls, path: str) -> DirectLogitEffect:
        with np.load(path, allow_pickle=False) as z:
            kw = {f.name: z[f.name] for f in dataclasses.fields(cls)}
        kw["norm_scale"] = float(kw["norm_scale"])
        return cls(**kw)


def dle_rows(
    lm: lm_lib.LanguageModel,
    sae: sae_lib.SAE,
    norm_scale: float,
    features: np.ndarray | None = None,
) -> np.ndarray:
    """The full DLE rows ``[len(features), vocab]`` (float64) of some features."""
    w = np.asarray(sae.W_dec, np.float64) / float(sae.config.input_scale)
    w = w if features is None else w[np.asarray(features)]
    return w @ linear_readout(lm, norm_scale)


def direct_logit_effect(
    lm: lm_lib.LanguageModel,
    sae: sae_lib.SAE,
    norm_scale: float,
    *,
    top_n: int = 10,
    block: int = 1024,
) -> DirectLogitEffect:
    """Norm and top promoted / suppressed tokens of every feature's DLE, in feature blocks."""
    checks.check_positive_int("top_n", top_n)
    if sae.config.d_in != lm.d_model:
        raise checks.InputError(
            f"SAE d_in={sae.config.d_in} does not match the model's width {lm.d_model}"
        )
    readout = linear_readout(lm, norm_scale)
    vocab = readout.shape[1]
    n = min(top_n, vocab)
    w = np.asarray(sae.W_dec, np.float64) / float(sae.config.input_scale)
    parts = {k: [] for k in ("norm", "p", "pv", "s", "sv")}
    for lo in range(0, w.shape[0], block):
        rows = w[lo : lo + block] @ readout
        centred = rows - rows.mean(1, keepdims=True)
        parts["norm"].append(np.linalg.norm(centred, axis=1))
        top = np.argsort(-rows, axis=1)[:, :n]
        bot = np.argsort(rows, axis=1)[:, :n]
        parts["p"].append(top)
        parts["pv"].append(np.take_along_axis(rows, top, 1))
        parts["s"].append(bot)
        parts["sv"].append(np.take_along_axis(rows, bot, 1))
    cat = {k: np.concatenate(v) for k, v in parts.items()}
    return DirectLogitEffect(
        cat["norm"],
        cat["p"].astype(np.int64),
        cat["pv"],
        cat["s"].astype(np.int64),
        cat["sv"],
        float(norm_scale),
    )


# --------------------------------------------------------------------------------------------
# Attribution and exact ablation
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ImportanceConfig:
    """Settings of `feature_importance`.

    Attributes:
      splice: positions, batching and masking (`models.splice.SpliceConfig`).
      n_classes: predicted-token classes for the per-class attribution (most frequent real,
        non-special tokens of the corpus).
      n_ablate: features in the exact-ablation sample (0: none).
      ablate_contexts: contexts (from the start) over which the sample is ablated.
      seed: seed of the sample.
    """

    splice: splice.SpliceConfig = splice.SpliceConfig()
    n_classes: int = 64
    n_ablate: int = 16
    ablate_contexts: int = 32
    seed: int = 0


@dataclasses.dataclass(frozen=True)
class FeatureImportance:
    """Corpus sums per feature (float64) and what they were measured on.

    Attributes:
      hookpoint: where the SAE sits.
      n_positions: spliced positions (attribution is summed over these).
      n_predictions: counted predictions.
      attr_abs_sum / attr_sum: ``[d_sae]`` sum over positions of ``|attr|`` / ``attr``.
      act_sum: ``[d_sae]`` sum of activations; fire_count: ``[d_sae]`` positions with f > 0.
      class_ids: ``[C]`` token ids of the predicted-token classes.
      class_count: ``[C]`` predictions of each class.
      attr_abs_by_class: ``[d_sae, C]`` sum of ``|attr|`` at positions predicting each class.
      norm_scale: mean final-norm denominator over predictions (nan for masked LMs).
      ablate_features: ``[m]`` the exact-ablation sample.
      ablate_exact / ablate_linear: ``[m]`` change of the summed log-prob when the feature is
        removed (exact) and its linear estimate ``-sum attr``, over the ablation contexts.
      ablate_predictions: predictions counted in the ablation contexts.
    """

    hookpoint: str
    n_positions: int
    n_predictions: int
    attr_abs_sum: np.ndarray
    attr_sum: np.ndarray
    act_sum: np.ndarray
    fire_count: np.ndarray
    class_ids: np.ndarray
    class_count: np.ndarray
    attr_abs_by_class: np.ndarray
    norm_scale: float
    ablate_features: np.ndarray
    ablate_exact: np.ndarray
    ablate_linear: np.ndarray
    ablate_predictions: int

    @property
    def attribution(self) -> np.ndarray:
        """Mean ``|attr|`` per spliced position: the linear importance score."""
        return self.attr_abs_sum / max(self.n_positions, 1)

    @property
    def attribution_signed(self) -> np.ndarray:
        return self.attr_sum / max(self.n_positions, 1)

    def score(self, kind: str) -> np.ndarray:
        """One importance score per feature: ``attribution`` | ``signed`` | ``activation``."""
        if kind == "attribution":
            return self.attribution
        if kind == "signed":
            return self.attribution_signed
        if kind == "activation":
            return self.act_sum / max(self.n_positions, 1)
        raise checks.InputError(
            f"importance score {kind!r}: expected attribution, signed or activation"
        )

    def ablation_agreement(self) -> dict:
        """Pearson and Spearman of exact vs linear ablation effects on the sample."""
        from scipy import stats

        e, lin = self.ablate_exact, self.ablate_linear
        if len(e) < 3 or np.std(e) == 0 or np.std(lin) == 0:
            return {"n": int(len(e)), "pearson": float("nan"), "spearman": float("nan")}
        return {
            "n": int(len(e)),
            "pearson": float(np.corrcoef(e, lin)[0, 1]),
            "spearman": float(stats.spearmanr(e, lin).statistic),
            "mean_abs_exact": float(np.mean(np.abs(e))),
            "mean_abs_error": float(np.mean(np.abs(e - lin))),
        }

    def save(self, path: str) -> None:
        """Every field in one ``.npz`` (numpy arrays and scalars; no pickles)."""
        import os

        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        np.savez(
            path, **{f.name: np.asarray(getattr(self, f.name)) for f in dataclasses.fields(self)}
        )

    @classmethod
    def load(cls, path: str) -> FeatureImportance:
        with np.load(path, allow_pickle=False) as z:
            kw = {}
            for f in dataclasses.fields(cls):
                v = z[f.name]
                kw[f.name] = v.item() if v.ndim == 0 else v
            kw["hookpoint"] = str(kw["hookpoint"])
            return cls(**kw)


def token_classes(contexts: text.Contexts, lm: lm_lib.LanguageModel, n: int) -> np.ndarray:
    """The ``n`` most frequent real, non-special token ids of the corpus (ties: lower id)."""
    ids = np.asarray(contexts.token_ids)[np.asarray(contexts.mask, bool)]
    ids = ids[~lm.special_mask(ids)]
    if ids.size == 0:
        raise checks.InputError("contexts: no real, non-special token")
    vals, counts = np.unique(ids, return_counts=True)
    order = np.lexsort((vals, -counts))
    return vals[order][:n].astype(np.int64)


def attribution_batch(
    lm: lm_lib.LanguageModel,
    tsae: splice.TorchSAE,
    hookpoint: str,
    batch: splice.Batch,
    norm_hook: Callable[..., Any] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(f, attr, log_probs)`` for one batch: activations and attributions ``[b, s, d_sae]``
    (zero off the spliced positions) and the counted positions' log-probs (clean forward)."""
    import torch

    _, _, splice_mask, loss_pos, targets = splice._tensors(lm, batch)
    rec: dict[str, Any] = {}

    def repl(x):
        x = x.to(tsae.W_enc.dtype)
        f = tsae.encode(x).detach().requires_grad_(True)
        rec["f"] = f
        x_hat = tsae.decode(f)
        return x_hat + (x - x_hat).detach()

    with torch.enable_grad():
        lp = splice.log_probs(lm, batch, hookpoint, splice.spliced_fn(splice_mask, repl))
        metric = lp.gather(-1, targets[loss_pos][:, None]).sum()
        f = rec["f"]
        if metric.requires_grad:
            (grad,) = torch.autograd.grad(metric, f)
        else:  # nothing counted in this batch
            grad = torch.zeros_like(f)
    keep = splice_mask[..., None].to(f.dtype)
    return f.detach() * keep, (f.detach() * grad) * keep, lp.detach()


def _ablation_sample(lm, tsae, hookpoint, contexts, cfg: ImportanceConfig) -> np.ndarray:
    """Seeded sample of features that fire in the first batch (topped up at random)."""
    import torch

    d_sae = tsae.config.d_sae
    m = min(cfg.n_ablate, d_sae)
    if m == 0:
        return np.zeros((0,), np.int64)
    part = contexts[: cfg.splice.batch_size]
    batch = splice.prepare_batch(lm, part.token_ids, part.mask, cfg=cfg.splice, start=0)
    hp = lm.parse(hookpoint)[0]
    x = lm.forward_batch(batch.input_ids, [hp.name], attention_mask=batch.attention_mask).acts[
        hp.name
    ]
    with torch.inference_mode():
        f = (
            tsae.encode(torch.as_tensor(x[batch.splice], device=lm.device).to(tsae.W_enc.dtype))
            .cpu()
            .numpy()
        )
    rng = np.random.default_rng(cfg.seed)
    firing = np.flatnonzero((f > 0).any(0))
    pick = rng.choice(firing, size=min(m, len(firing)), replace=False)
    rest = np.setdiff1d(np.arange(d_sae), pick)
    if len(pick) < m:
        pick = np.concatenate([pick, rng.choice(rest, size=m - len(pick), replace=False)])
    return np.sort(pick).astype(np.int64)


IMPORTANCE_COLUMNS = (
    "n_positions",
    "n_predictions",
    "norm_sum",
    "norm_count",
    "ablate_predictions",
)


def feature_importance(
    lm: lm_lib.LanguageModel,
    sae: sae_lib.SAE,
    hookpoint: str,
    contexts: text.Contexts,
    cfg: ImportanceConfig = ImportanceConfig(),
    *,
    checkpoint_dir: str | None = None,
    mesh: Mesh | None = None,
    progress: bool = False,
) -> FeatureImportance:
    """Attribution sums (overall and per predicted-token class), the final-norm scale and the
    exact ablation sample, streamed over ``contexts`` (resumable with ``checkpoint_dir``).

    Every token position is one row (activations and attributions ``[d_sae]``, its predicted
    token's class, the per-token ablation changes), reduced on the mesh by
    `engine.accumulators.Sums` (rows split over the ``data`` axis; ``|attr|``, firing
    indicators and the per-class segment sums are formed on the devices).
    """
    import torch

    from engine import accumulators

    contexts = splice.as_contexts(contexts)
    if len(contexts) == 0:
        raise checks.InputError("contexts: empty corpus")
    hp = lm.parse(hookpoint)[0]
    if sae.config.d_in != lm.d_model:
        raise checks.InputError(
            f"SAE d_in={sae.config.d_in} does not match the width "
            f"{lm.d_model} of {hp.name} in {lm.name}"
        )
    d_sae = sae.config.d_sae
    tsae = splice.TorchSAE(sae, lm.device, splice.sae_dtype(lm))
    classes = token_classes(contexts, lm, cfg.n_classes)
    sample = _ablation_sample(lm, tsae, hp.name, contexts, cfg)
    n_cls, m = len(classes), len(sample)
    m_cols = max(m, 1)  # the sums keep one (zero) column when there is no sample
    class_index = np.full(splice.vocab_size(lm), -1, np.int64)
    class_index[classes] = np.arange(n_cls)
    norm = None if lm.is_encoder else final_norm(lm)
    col = {name: i for i, name in enumerate(IMPORTANCE_COLUMNS)}
    ncol = len(IMPORTANCE_COLUMNS)
    # rows: (columns, attr, act, class, ablation) -> on device: (columns, |attr|, attr, act,
    # fires, class, ablation); the class column is -1 where no counted class is predicted.
    acc = accumulators.Sums(
        {
            "columns": (0, None, 0),
            "attr_abs_sum": (1, None, 0),
            "attr_sum": (2, None, 0),
            "act_sum": (3, None, 0),
            "fire_count": (4, None, 0),
            "attr_abs_by_class": (1, 5, n_cls),
            "class_columns": (0, 5, n_cls),
            "ablate": (6, None, 0),
        },
        {
            "columns": (ncol,),
            "attr_abs_sum": (d_sae,),
            "attr_sum": (d_sae,),
            "act_sum": (d_sae,),
            "fire_count": (d_sae,),
            "attr_abs_by_class": (d_sae,),
            "class_columns": (ncol,),
            "ablate": (2 * m_cols,),
        },
    )
    dt = splice.host_dtype(acc)

    def on_device(params, columns, attr, act, cls, ablate):
        import jax.numpy as jnp

        return (columns, jnp.abs(attr), attr, act, (act > 0).astype(act.dtype), cls, ablate)

    key = splice.fingerprint(
        "importance",
        splice.sae_fingerprint(sae),
        hp.name,
        contexts.token_ids,
        contexts.mask,
        dataclasses.astuple(cfg),
    )

    def rows(lo, part):
        batch = splice.prepare_batch(lm, part.token_ids, part.mask, cfg=cfg.splice, start=lo)
        _, _, splice_mask, loss_pos, targets = splice._tensors(lm, batch)
        rec: dict[str, Any] = {}
        handle = None
        if norm is not None:

            def norm_hook(module, args):
                rec["sigma"] = norm.denominator(args[0].detach())[loss_pos]

            handle = norm.module.register_forward_pre_hook(norm_hook)
        try:
            f, attr, lp_clean = attribution_batch(lm, tsae, hp.name, batch)
        finally:
            if handle is not None:
                handle.remove()
        n_rows = batch.loss_pos.size
        counted = batch.loss_pos.reshape(-1)
        columns = np.zeros((n_rows, ncol))
        columns[:, col["n_positions"]] = batch.splice.reshape(-1)
        columns[:, col["n_predictions"]] = counted
        if "sigma" in rec:
            columns[counted, col["norm_sum"]] = rec["sigma"].double().cpu().numpy()
            columns[counted, col["norm_count"]] = 1.0
        cls = np.where(counted, class_index[batch.targets.reshape(-1)], -1).astype(np.int32)
        ablate = np.zeros((n_rows, 2 * m_cols))
        if m and lo < cfg.ablate_contexts:
            tgt = targets[loss_pos][:, None]
            base = lp_clean.gather(-1, tgt)[:, 0].double()
            exact = np.zeros((int(counted.sum()), m))
            for i, j in enumerate(sample):
                direction = tsae.feature_direction(int(j))

                def remove(x, j=int(j), direction=direction):
                    x = x.to(tsae.W_enc.dtype)
                    return x - tsae.encode(x)[..., j : j + 1] * direction

                with torch.inference_mode():
                    lp = splice.log_probs(
                        lm, batch, hp.name, splice.spliced_fn(splice_mask, remove)
                    )
                exact[:, i] = (lp.gather(-1, tgt)[:, 0].double() - base).cpu().numpy()
            ablate[counted, :m] = exact
            ablate[:, m_cols : m_cols + m] = (
                -attr.double()
                .reshape(n_rows, d_sae)[:, torch.as_tensor(sample, device=lm.device)]
                .cpu()
                .numpy()
            )
            columns[:, col["ablate_predictions"]] = counted
        return (
            columns.astype(dt),
            attr.double().reshape(n_rows, d_sae).cpu().numpy().astype(dt),
            f.double().reshape(n_rows, d_sae).cpu().numpy().astype(dt),
            cls,
            ablate.astype(dt),
        )

    s = splice.streamed(
        acc,
        contexts,
        cfg.splice.batch_size,
        rows,
        mesh=mesh,
        checkpoint_dir=checkpoint_dir,
        save_every=cfg.splice.save_every,
        key=key,
        progress=progress,
        transform=on_device,
    )
    c = {name: float(s["columns"][i]) for name, i in col.items()}
    return FeatureImportance(
        hookpoint=hp.name,
        n_positions=int(round(c["n_positions"])),
        n_predictions=int(round(c["n_predictions"])),
        attr_abs_sum=s["attr_abs_sum"],
        attr_sum=s["attr_sum"],
        act_sum=s["act_sum"],
        fire_count=np.round(s["fire_count"]),
        class_ids=classes,
        class_count=np.round(s["class_columns"][:, col["n_predictions"]]),
        attr_abs_by_class=np.ascontiguousarray(s["attr_abs_by_class"].T),
        norm_scale=(c["norm_sum"] / c["norm_count"] if c["norm_count"] > 0 else float("nan")),
        ablate_features=sample,
        ablate_exact=s["ablate"][:m],
        ablate_linear=s["ablate"][m_cols : m_cols + m],
        ablate_predictions=int(round(c["ablate_predictions"])),
    )
