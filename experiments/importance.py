"""Faithfulness and per-feature importance of one SAE at one hookpoint of a language model.

Writes ``results.json`` (spliced metrics: CE loss recovered vs zero and mean ablation, KL,
delta loss, FVU; importance: the exact-ablation check of the attribution, agreement of the
three scores, the most important features with their direct-logit tokens), ``features.json``
(every feature: attribution |mean| and signed, activation mean, firing density, direct-logit
norm, top promoted / suppressed tokens, the predicted tokens it is most important for),
``importance.npz`` (the raw per-feature sums, `models.importance.FeatureImportance`) and plots
(attribution vs exact ablation, importance distribution, attribution vs direct logit effect).
Formulas and conventions: models/splice.py and models/importance.py.

Offline default (a tiny GPT-NeoX-style model trained briefly on the shipped sample, and a
TopK SAE trained here on its ``resid_post.0``)::

    python -m experiments.importance --workdir=runs/importance/tiny

A masked model (BERT family; masked-token loss, BERT's 15 % 80/10/10 rule)::

    python -m experiments.importance --workdir=runs/importance/tiny_bert --tiny_arch=bert

A real model and SAE (local directories; any SAE format `models.formats.load_sae` reads)::

    python -m experiments.importance --workdir=runs/importance/pythia --model=/models/pythia-70m \\
        --hookpoint=resid_post.3 --sae=/saes/pythia-70m/layers.3 --text=/data/text.jsonl \\
        --max_contexts=512 --context_length=128

Rerunning with the same workdir resumes (orbax checkpoints of the running sums).
"""

from __future__ import annotations

import dataclasses
import os

import numpy as np

from experiments import common
from experiments.configs import importance as CONFIG  # noqa: N812  (the config module)


@dataclasses.dataclass(frozen=True)
class Settings:
    """Everything one run needs, typed (built from the resolved config; the defaults equal
    experiments/configs/importance.py's, a test checks)."""

    model: str = "tiny"
    tiny_arch: str = "gpt_neox"
    tiny_train_steps: int = 300
    hookpoint: str = "resid_post.0"
    sae: str = "train"
    text: str = "sample"
    context_length: int = 64
    max_contexts: int = 128
    batch_size: int = 8
    sae_expansion: int = 4
    sae_k: int = 8
    sae_steps: int = 600
    n_classes: int = 64
    n_ablate: int = 16
    ablate_contexts: int = 32
    top_n: int = 10
    seed: int = 0
    progress: bool = True


class UserError(ValueError):
    pass


def _model_path(s: Settings, workdir: str) -> str:
    from experiments.pipeline import sides
    from models import lm_tiny

    if s.model != "tiny":
        sides.check_local("--model", s.model)
        return s.model
    pair = lm_tiny.make_tiny_model_pair(
        os.path.join(workdir, "tiny_models"),
        arch=s.tiny_arch,
        seeds=(s.seed, s.seed + 1),
        train_steps=s.tiny_train_steps,
    )
    return pair.path_a


def _sae(s: Settings, lm, contexts, workdir: str, mesh):
    from experiments.pipeline import saes as saes_lib
    from models import formats, sae_train

    if s.sae != "train":
        if not os.path.exists(s.sae):
            raise UserError(f"--sae={s.sae}: no such SAE directory")
        return formats.load_sae(s.sae)
    hp = lm.parse(s.hookpoint)[0].name
    out = lm.run(contexts, [hp], batch_size=s.batch_size)
    # trained on the positions it will be spliced into (real, non-special tokens)
    keep = (out.mask & ~out.special).reshape(-1)
    acts = out.acts[hp].reshape(-1, lm.d_model)[keep].astype(np.float32)
    d_sae = s.sae_expansion * lm.d_model
    cfg = sae_train.TrainConfig(
        d_sae=d_sae, activation="topk", k=min(s.sae_k, d_sae), lr=1e-3, seed=s.seed
    )
    return saes_lib.train_or_load(
        acts,
        cfg,
        steps=s.sae_steps,
        batch_size=512,
        data_seed=s.seed,
        directory=os.path.join(workdir, "sae", hp),
        mesh=mesh,
        progress=s.progress,
        metadata={"model": lm.name, "hookpoint": hp},
    )


def run(s: Settings, workdir: str, mesh) -> dict:
    """The whole experiment; returns the results dict (also written to ``workdir``)."""
    from engine import metrics_io
    from models import importance as imp_lib
    from models import splice
    from models import text as text_lib

    path = _model_path(s, workdir)
    lm = splice.load_with_head(path)
    if lm.tokenizer is None:
        raise UserError(f"--model={path}: no tokenizer found beside the model")
    hp = lm.parse(s.hookpoint)[0].name
    docs = text_lib.read_documents(s.text)
    contexts = text_lib.make_contexts(
        docs, lm.tokenizer, s.context_length, max_contexts=s.max_contexts
    )
    sae = _sae(s, lm, contexts, workdir, mesh)
    if sae.config.d_in != lm.d_model:
        raise UserError(f"--sae: d_in={sae.config.d_in} does not match {hp}'s width {lm.d_model}")
    scfg = splice.SpliceConfig(batch_size=s.batch_size, seed=s.seed)
    ck = os.path.join(workdir, "checkpoints")
    metrics = splice.splice_metrics(
        lm,
        sae,
        hp,
        contexts,
        scfg,
        checkpoint_dir=os.path.join(ck, "splice"),
        mesh=mesh,
        progress=s.progress,
    )
    icfg = imp_lib.ImportanceConfig(
        splice=scfg,
        n_classes=s.n_classes,
        n_ablate=s.n_ablate,
        ablate_contexts=s.ablate_contexts,
        seed=s.seed,
    )
    imp = imp_lib.feature_importance(
        lm,
        sae,
        hp,
        contexts,
        icfg,
        checkpoint_dir=os.path.join(ck, "importance"),
        mesh=mesh,
        progress=s.progress,
    )
    imp.save(os.path.join(workdir, "importance.npz"))
    dle = None
    if not lm.is_encoder and np.isfinite(imp.norm_scale):
        dle = imp_lib.direct_logit_effect(lm, sae, imp.norm_scale, top_n=s.top_n)
    tok = lm.tokenizer
    words = lambda ids: tok.convert_ids_to_tokens([int(i) for i in ids])  # noqa: E731
    density = imp.fire_count / max(imp.n_positions, 1)
    attribution = imp.attribution
    top_classes = np.argsort(-imp.attr_abs_by_class, axis=1)[:, :3]
    features = []
    for f in range(sae.config.d_sae):
        row = {
            "feature": f,
            "attribution": float(attribution[f]),
            "attribution_signed": float(imp.attribution_signed[f]),
            "activation_mean": float(imp.act_sum[f] / max(imp.n_positions, 1)),
            "density": float(density[f]),
            "important_for": words(imp.class_ids[top_classes[f]])
            if imp.attr_abs_by_class[f].max() > 0
            else [],
        }
        if dle is not None:
            row.update(
                dle_norm=float(dle.norm[f]),
                promoted=words(dle.promoted[f]),
                suppressed=words(dle.suppressed[f]),
            )
        features.append(row)
    order = np.argsort(-attribution, kind="stable")
    from scipy import stats

    alive = density > 0
    agreement = {}
    if alive.sum() >= 3:
        agreement["attribution_vs_activation_spearman"] = float(
            stats.spearmanr(attribution[alive], imp.act_sum[alive]).statistic
        )
        if dle is not None:
            agreement["attribution_vs_dle_norm_spearman"] = float(
                stats.spearmanr(attribution[alive], dle.norm[alive]).statistic
            )
    results = {
        "model": lm.name,
        "hookpoint": hp,
        "objective": metrics.objective,
        "sae": {
            "source": s.sae,
            "d_in": sae.config.d_in,
            "d_sae": sae.config.d_sae,
            "activation": sae.config.activation,
            "k": sae.config.k,
        },
        "contexts": len(contexts),
        "text": s.text,
        "splice": metrics.to_dict(),
        "warning": metrics.warning(),
        "importance": {
            "n_positions": imp.n_positions,
            "n_predictions": imp.n_predictions,
            "dead_features": int((~alive).sum()),
            "norm_scale": imp.norm_scale,
            "ablation_check": {
                **imp.ablation_agreement(),
                "features": imp.ablate_features.tolist(),
                "exact": imp.ablate_exact.tolist(),
                "linear": imp.ablate_linear.tolist(),
            },
            "score_agreement": agreement,
            "top_features": [features[i] for i in order[:20]],
        },
        "settings": dataclasses.asdict(s),
    }
    metrics_io.write_json(os.path.join(workdir, "features.json"), features)
    metrics_io.write_json(os.path.join(workdir, "results.json"), results)
    _plots(workdir, imp, dle)
    return results


def _plots(workdir: str, imp, dle) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = os.path.join(workdir, "plots")
    os.makedirs(out, exist_ok=True)
    if len(imp.ablate_exact):
        fig, ax = plt.subplots(figsize=(4.5, 4))
        ax.scatter(imp.ablate_linear, imp.ablate_exact, s=12)
        lo = min(imp.ablate_linear.min(), imp.ablate_exact.min())
        hi = max(imp.ablate_linear.max(), imp.ablate_exact.max())
        ax.plot([lo, hi], [lo, hi], "k--", lw=0.8)
        ax.set_xlabel("linear estimate  -sum attr  (nats)")
        ax.set_ylabel("exact ablation effect  (nats)")
        ax.set_title("attribution vs exact feature ablation")
        fig.tight_layout()
        common.save_figure(fig, os.path.join(out, "ablation_vs_attribution.png"), dpi=110)
    attr = imp.attribution[imp.attribution > 0]
    if attr.size:
        fig, ax = plt.subplots(figsize=(5, 3.5))
        ax.hist(np.log10(attr), bins=40)
        ax.set_xlabel("log10 mean |attribution| per token")
        ax.set_ylabel("features")
        fig.tight_layout()
        common.save_figure(fig, os.path.join(out, "importance_hist.png"), dpi=110)
    if dle is not None:
        fig, ax = plt.subplots(figsize=(4.5, 4))
        ax.scatter(dle.norm, imp.attribution, s=6, alpha=0.6)
        ax.set_xlabel("direct logit effect norm")
        ax.set_ylabel("mean |attribution|")
        ax.set_yscale("symlog", linthresh=1e-6)
        fig.tight_layout()
        common.save_figure(fig, os.path.join(out, "attribution_vs_dle.png"), dpi=110)


def body(run_, settings) -> None:
    """The experiment behind `common.entry` (settings checked, workdir fingerprinted)."""
    s = Settings(**{f.name: getattr(settings, f.name) for f in dataclasses.fields(Settings)})
    results = run(s, run_.workdir, run_.mesh)
    m = results["splice"]
    print(
        f"{results['model']} {results['hookpoint']} ({m['objective']}, {m['n_positions']} "
        f"predictions): CE clean {m['ce_clean']:.4f}  SAE {m['ce_sae']:.4f}  zero "
        f"{m['ce_zero']:.4f}  mean {m['ce_mean']:.4f}"
    )
    print(
        f"CE loss recovered {m['ce_loss_recovered']:.3f} (zero) / "
        f"{m['ce_loss_recovered_mean']:.3f} (mean); delta loss {m['delta_loss']:.4f}; "
        f"KL {m['kl_div']:.4f}; FVU {m['fvu']:.3f}"
    )
    if results["warning"]:
        print(results["warning"])
    chk = results["importance"]["ablation_check"]
    print(
        f"attribution vs exact ablation on {chk['n']} features: pearson "
        f"{chk['pearson']:.3f}, spearman {chk['spearman']:.3f}"
    )
    for row in results["importance"]["top_features"][:5]:
        extra = f" promotes {row['promoted'][:3]}" if "promoted" in row else ""
        print(
            f"  feature {row['feature']}: attribution {row['attribution']:.3g}, important "
            f"for {row['important_for']}{extra}"
        )
    print(f"results: {os.path.join(run_.workdir, 'results.json')}")


def _data(settings) -> dict:
    """Data whose identity enters the run fingerprint."""
    return {
        "model": None if settings.model == "tiny" else settings.model,
        "sae": None if settings.sae == "train" else settings.sae,
        "text": None if settings.text == "sample" else settings.text,
    }


if __name__ == "__main__":
    common.entry("importance", body, CONFIG, data=_data, errors=lambda: (UserError,))
