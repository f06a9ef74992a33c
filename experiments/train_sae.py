"""Train SAEs (one or a sweep) on synthetic ground-truth data or an in-memory .npy array.

Every combination of ``--activation x --d_sae (or --d_sae_mult) x {--k | --l1_coeff |
--l0_coeff} x --seeds`` is one SAE; SAEs that differ only in seed / k / coefficient run
together in ONE jitted program (models/sae_train.py), widths and activations as separate
programs under this one command. Rerunning the same command resumes (or says "nothing to do");
other settings in the same
workdir are refused before any work (`experiments/common.py`).

Ground-truth sweep (Sharkey et al. data: 512 true features in 128 dims, ~5 active; widths
0.5x..4x, k around the truth, two seeds)::

    python -m experiments.train_sae --workdir=runs/sae_gt --source=synthetic \\
        --n_true=512 --d=128 --k_true=5 --d_sae_mult=0.5,1,2,4 --k=3,5,8 --seeds=0,1 \\
        --steps=1500 --batch_size=1024 --lr=0.01 --dead_tokens=20000

ReLU-L1 sweep on the same data::

    python -m experiments.train_sae --workdir=runs/sae_gt_relu --source=synthetic \\
        --activation=relu --d_sae_mult=1,2 --l1_coeff=0.3,1,3 --seeds=0,1 --steps=1500 \\
        --lr=0.003

Any activations saved as a 2-D .npy array (rows = tokens)::

    python -m experiments.train_sae --workdir=runs/sae_npy --source=npy --npy_path=acts.npy \\
        --d_sae=4096 --k=32 --steps=5000

Held-out metrics use ``min(--eval_rows, --eval_frac * rows)`` rows of the .npy that training
never sees; fewer than ``MIN_EVAL_ROWS`` (32) is refused, unless ``--eval_on_train`` asks for
metrics on training rows (``results.json`` then says ``"eval_rows_held_out": false``). A file
that is not a plain 2-D numeric .npy (garbage, text, .npz, pickled, truncated) is refused in
one line.

Outputs: ``config.json``; ``metrics.jsonl`` (every program's training log: MSE, FVU, L0,
dead fraction, mean/max feature density, per SAE under ``sae<i>/``; one ``group`` field per
line); ``g<i>_*/`` (each program's checkpoints and own metrics.jsonl); ``saes/<label>/``
(native format, models/sae_io_native.py, with a SAELens copy and its held-out log10
densities in ``saes/<label>/saelens/``; the input scale is folded into the copy's weights,
since SAELens does not apply it at inference); ``results.json`` (held-out metrics per SAE, MMCS
and splitting statistics against the true dictionary for synthetic data, fraction of features
matched one-to-one at decoder cosine >= ``--match_threshold`` between seeds); ``plots/``
(log10 feature-density histograms; MMCS / L0 / FVU against width for a synthetic sweep).
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import os

from absl import logging

from experiments import common
from experiments.configs import train_sae as CONFIG  # noqa: N812  (the config module)

# Fewest held-out .npy rows for the evaluation metrics (fvu, l0, densities); with fewer the run
# is refused unless --eval_on_train (metrics never silently fall back to training rows).
MIN_EVAL_ROWS = 32


def _floats(values) -> list[float]:
    return [float(v) for v in values]


def _ints(values) -> list[int]:
    return [int(v) for v in values]


def build_configs(*, activations, widths, ks, l1s, l0s, seeds, base: dict) -> list:
    """The cartesian product of the sweep as `TrainConfig`s (seed varies fastest)."""
    from models import sae_train

    out = []
    for act, width in itertools.product(activations, widths):
        if act in ("topk", "batchtopk"):
            knobs = [{"k": k} for k in ks]
        elif act == "relu":
            knobs = [{"l1_coeff": c} for c in l1s]
        else:
            knobs = [{"l0_coeff": c} for c in l0s]
        for knob in knobs:
            for seed in seeds:
                out.append(
                    sae_train.TrainConfig(
                        d_sae=int(width), activation=act, seed=seed, **knob, **base
                    ).validate()
                )
    return out


# -- evaluation -------------------------------------------------------------------------------


def evaluate(sae, x, batch_size: int = 4096) -> dict:
    """Held-out MSE (normalised space), FVU, L0, dead fraction, densities of one SAE."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    @jax.jit
    def chunk(xb):
        f = sae.encode(xb)
        xh = sae.decode(f)
        s = sae.config.input_scale
        return (
            jnp.sum(((xb - xh) * s) ** 2),
            jnp.sum(f > 0, axis=0),
            jnp.sum(xb, 0),
            jnp.sum(xb.astype(jnp.float32) ** 2, 0),
        )

    sq, counts, sums, sumsq = 0.0, np.zeros(sae.config.d_sae), 0.0, 0.0
    for lo in range(0, x.shape[0], batch_size):
        a, c, s1, s2 = jax.device_get(chunk(jnp.asarray(x[lo : lo + batch_size])))
        sq += float(a)
        counts = counts + c
        sums = sums + np.asarray(s1, np.float64)
        sumsq = sumsq + np.asarray(s2, np.float64)
    n = x.shape[0]
    var = float(np.sum(sumsq - sums**2 / n)) * sae.config.input_scale**2
    density = counts / n
    return {
        "mse": sq / (n * x.shape[1]),
        "fvu": sq / max(var, 1e-30),
        "l0": float(np.sum(counts) / n),
        "dead_frac": float(np.mean(counts == 0)),
        "density_mean": float(np.mean(density)),
        "density_max": float(np.max(density)),
        "density": density,
    }


def unit_rows(w):
    import numpy as np

    w = np.asarray(w, np.float64)
    return w / np.maximum(np.linalg.norm(w, axis=1, keepdims=True), 1e-12)


def ground_truth_scores(
    true_atoms, w_dec, alive=None, split_cos: float = 0.5, recovered_cos: float = 0.9
) -> dict:
    """MMCS (Sharkey et al. 2022) and splitting statistics of a learned dictionary.

    Returns:
      mmcs: mean over true atoms of the best cosine to a learned atom.
      recovered_frac: true atoms with a learned atom at cosine >= ``recovered_cos``.
      learned_match_mean: mean over learned atoms of their best cosine to a true atom.
      latents_per_true: mean number of live learned atoms (``alive``, default all) whose
        best true atom is a given recovered atom, at cosine >= ``split_cos`` (1 = no
        splitting; > 1 = splitting or duplicates as d_sae grows past n_true).
    """
    import numpy as np

    t, l = unit_rows(true_atoms), unit_rows(w_dec)
    cos = l @ t.T  # [learned, true]
    best_true = cos.max(axis=0)
    owner = cos.argmax(axis=1)
    alive = np.ones(l.shape[0], bool) if alive is None else np.asarray(alive, bool)
    close = (cos.max(axis=1) >= split_cos) & alive
    per_true = np.bincount(owner[close], minlength=t.shape[0])
    rec = best_true >= recovered_cos
    return {
        "mmcs": float(best_true.mean()),
        "recovered_frac": float(rec.mean()),
        "learned_match_mean": float(cos.max(axis=1).mean()),
        "latents_per_true": float(per_true[rec].mean()) if rec.any() else 0.0,
    }


def seed_match_fraction(w_a, w_b, threshold: float) -> dict:
    """Fraction of features matched one-to-one (Hungarian on decoder cosine) at >= threshold.

    Uses `scipy.optimize.linear_sum_assignment` on the full cosine matrix (Paulo & Belrose
    2025 report 30-53 % on real models); the fraction is over the smaller dictionary.
    """
    import numpy as np
    from scipy.optimize import linear_sum_assignment

    cos = unit_rows(w_a) @ unit_rows(w_b).T
    rows, cols = linear_sum_assignment(cos, maximize=True)
    matched = cos[rows, cols]
    n = min(cos.shape)
    return {
        "matched_frac": float(np.sum(matched >= threshold) / n),
        "mean_assigned_cos": float(matched.mean()),
        "threshold": threshold,
    }


# -- plots ------------------------------------------------------------------------------------


def plot_density_histograms(path: str, labels, densities) -> None:
    """One small log10 feature-density histogram per SAE (dead features in the -10 bin)."""
    import math

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    n = len(labels)
    cols = min(4, n)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(
        rows, cols, figsize=(3.2 * cols, 2.4 * rows), squeeze=False, sharex=True
    )
    bins = np.linspace(-10.25, 0.25, 43)
    for ax, label, d in zip(axes.flat, labels, densities):
        d = np.asarray(d)
        ax.hist(np.log10(d + 1e-10), bins=bins, color="tab:blue")
        ax.set_title(f"{label}\ndead {np.mean(d == 0):.1%}", fontsize=7)
        ax.tick_params(labelsize=7)
    for ax in axes.flat[n:]:
        ax.axis("off")
    for ax in axes[-1]:
        ax.set_xlabel("log10 density (-10 = dead)", fontsize=7)
    fig.suptitle("Feature density on held-out rows", fontsize=9)
    fig.tight_layout()
    common.save_figure(fig, path, dpi=110)


def plot_sweep(path: str, rows: list[dict], n_true: int, pairs: list[dict] = ()) -> None:
    """MMCS, recovered fraction, latents-per-true, L0, FVU and the seed-vs-seed matched
    fraction against width, one line per (activation, k / coefficient), mean over seeds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    series: dict = {}
    by_label = {r["label"]: r for r in rows}
    for r in rows:
        series.setdefault(r["knob"], {}).setdefault(r["d_sae"], []).append(dict(r))
    for p in pairs:  # the pair's matched fraction, attached to its first SAE's point
        a = by_label[p["a"]]
        for r in series[a["knob"]][a["d_sae"]]:
            if r["label"] == p["a"]:
                r["seed_matched"] = p["matched_frac"]
    panels = [
        ("mmcs", "MMCS"),
        ("recovered_frac", "true atoms recovered (cos >= 0.9)"),
        ("latents_per_true", "live latents per recovered atom"),
        ("l0", "L0"),
        ("fvu", "FVU (held out)"),
    ]
    if pairs:
        panels.append(("seed_matched", "seed vs seed: matched 1-1 at cos >= 0.7"))
    fig, axes = plt.subplots(2, 3, figsize=(13, 7))
    axes = list(axes.flat)
    for ax, (key, title) in zip(axes, panels):
        for knob, by_width in sorted(series.items()):
            widths = [w for w in sorted(by_width) if any(key in r for r in by_width[w])]
            mult = [w / n_true for w in widths]
            vals = [np.mean([r[key] for r in by_width[w] if key in r]) for w in widths]
            ax.plot(mult, vals, marker="o", label=knob)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("d_sae / n_true")
        ax.set_title(title, fontsize=9)
    for ax in axes[len(panels) :]:
        ax.axis("off")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    common.save_figure(fig, path, dpi=120)


# -- the run ----------------------------------------------------------------------------------


def knob_label(cfg) -> str:
    if cfg.uses_k:
        return f"{cfg.activation} k={cfg.k}"
    if cfg.activation == "relu":
        return f"relu l1={cfg.l1_coeff:g}"
    return f"jumprelu l0={cfg.l0_coeff:g}"


def _streamed_source(o: dict):
    """``(source, eval rows, d_in, provenance)`` for --source=cache | lm.

    The first ``eval_rows`` rows (at most ``eval_frac`` of the data) are held out for
    evaluation and read into memory; the rest is streamed to the trainer through its bounded
    shuffle buffer (models/sae_train.py `source_stream`).
    """
    import numpy as np

    from models import activation_source as asrc

    if o["source"] == "cache":
        from models import activation_cache

        if not o.get("cache_path"):
            raise SystemExit("--cache_path is required with --source=cache")
        cache = activation_cache.ActivationCache(o["cache_path"])
        hp = o.get("hookpoint") or cache.hookpoints[0]
        full = cache.source(hp, exclude_special=o.get("exclude_special", False))
        n = full.num_rows
        n_eval = min(o["eval_rows"], int(o["eval_frac"] * n))
        eval_x = (
            full.read_rows(0, max(n_eval, 1))[1] if n_eval else full.read_rows(0, min(n, 4096))[1]
        )
        train = asrc.RowRange(full, n_eval, n) if n_eval else full
        meta = {
            "kind": "cache",
            "path": os.path.abspath(o["cache_path"]),
            "hookpoint": hp,
            "model": cache.model,
            "text": cache.metadata.get("text"),
            "exclude_special": bool(o.get("exclude_special", False)),
            "special_ids": cache.metadata.get("special_ids"),
            "train_rows": train.num_rows,
            "eval_rows": int(n_eval),
        }
        return train, np.asarray(eval_x, np.float32), full.widths[0], meta
    from models import lm as lm_lib
    from models import text as text_lib

    if not (o.get("model_path") and o.get("hookpoint")):
        raise SystemExit("--model_path and --hookpoint are required with --source=lm")
    with lm_lib.quiet_transformers():
        model = lm_lib.LanguageModel.load(o["model_path"])
    weights = [float(w) for w in o.get("lm_text_weights") or []] or None
    docs = text_lib.read_mixture(
        list(o["lm_text"]), weights, txt_split=o.get("lm_txt_split", "line")
    )
    pack = bool(o.get("lm_pack", True))
    contexts = text_lib.make_contexts(
        docs,
        model.tokenizer,
        o["lm_context_length"],
        max_contexts=o["lm_max_contexts"],
        pack=pack,
        pad_tail=not pack,
    )
    n_ctx = len(contexts)
    n_eval_ctx = max(1, min(n_ctx // 10, -(-o["eval_rows"] // o["lm_context_length"])))
    kw = dict(batch_size=o["lm_forward_batch"], exclude_special=o.get("exclude_special", False))
    held = asrc.LMSource(model, contexts[:n_eval_ctx], o["hookpoint"], **kw)
    train = asrc.LMSource(model, contexts[n_eval_ctx:], o["hookpoint"], **kw)
    eval_x = np.concatenate([b[1] for b in held.open_at(0)]).astype(np.float32)
    meta = {
        "kind": "lm",
        "model": model.describe(),
        "hookpoint": train.hookpoints[0],
        "text": {
            "sources": text_lib.describe_source(list(o["lm_text"])),
            "weights": weights,
            "txt_split": o.get("lm_txt_split", "line"),
            "pack": pack,
        },
        "contexts": n_ctx,
        "context_length": o["lm_context_length"],
        "eval_contexts": n_eval_ctx,
        "exclude_special": bool(o.get("exclude_special", False)),
        "train_rows": train.num_rows,
        "eval_rows": int(eval_x.shape[0]),
    }
    return train, eval_x, train.widths[0], meta


def run_train_sae(run: common.Run, opts: dict) -> dict:
    """The experiment's logic (importable for tests); returns the results dict."""
    import jax
    import numpy as np

    from engine import metrics_io
    from models import sae_train, synthetic

    o = dict(opts)
    dictionary = None
    held_out = True  # synthetic: fresh rows from the generator
    if o["source"] == "synthetic":
        dictionary = synthetic.make_dictionary(
            jax.random.PRNGKey(o["dict_seed"]),
            o["n_true"],
            o["d"],
            k=o["k_true"],
            correlation=o["correlation"],
            n_blocks=o["n_blocks"],
        )
        gen_key = jax.random.PRNGKey(o["data_seed"])
        batch = o["batch_size"]
        draw = jax.jit(
            lambda s: synthetic.dictionary_data(jax.random.fold_in(gen_key, s), dictionary, batch)[
                0
            ]
        )
        acts = lambda step: np.asarray(draw(step))  # noqa: E731
        eval_key = jax.random.fold_in(jax.random.PRNGKey(o["data_seed"]), 2**30)
        eval_x = np.asarray(synthetic.dictionary_data(eval_key, dictionary, o["eval_rows"])[0])
        d_in, unit = o["d"], o["n_true"]
    elif o["source"] in ("cache", "lm"):
        acts, eval_x, d_in, source_meta = _streamed_source(o)
        held_out = True  # evaluation rows are a held-out row range / contexts
        unit = d_in
    else:
        if not o.get("npy_path"):
            raise common.ConfigError("--npy_path is required with --source=npy")
        from engine import checks
        from models import activation_cache

        # One-line errors for a missing, garbage, pickled or truncated file; never unpickles.
        data = activation_cache.load_npy(o["npy_path"], "--npy_path")
        if data.ndim != 2 or not (
            np.issubdtype(data.dtype, np.floating) or np.issubdtype(data.dtype, np.integer)
        ):
            raise checks.InputError(
                f"--npy_path {o['npy_path']}: expected a 2-D numeric "
                f"array [rows, d_in], got shape {data.shape} {data.dtype}"
            )
        data = np.asarray(data, np.float32)
        n_eval = min(o["eval_rows"], int(o["eval_frac"] * data.shape[0]))
        perm = np.random.default_rng(o["data_seed"]).permutation(len(data))
        held_out = n_eval >= MIN_EVAL_ROWS
        if held_out:
            eval_x = data[np.sort(perm[:n_eval])]
            acts = data[np.sort(perm[n_eval:])]
        elif o.get("eval_on_train"):
            # The explicit choice: metrics on training rows, reported as such.
            logging.warning(
                "--eval_on_train: %d held-out rows are too few; metrics are "
                "measured on training rows (optimistic)",
                n_eval,
            )
            eval_x = data[: min(len(data), 4096)]
            acts = data
        else:
            raise checks.InputError(
                f"--npy_path {o['npy_path']}: {data.shape[0]} rows leave {n_eval} held-out rows "
                f"(--eval_frac={o['eval_frac']}, --eval_rows={o['eval_rows']}); held-out metrics "
                f"need at least {MIN_EVAL_ROWS}: raise --eval_frac or give more rows, or pass "
                "--eval_on_train to measure on training rows (reported as such)"
            )
        d_in = unit = int(data.shape[-1])
    widths = _ints(o["d_sae"]) + [int(round(float(m) * unit)) for m in o["d_sae_mult"]]
    if not widths:  # neither --d_sae nor --d_sae_mult: one width, 1 x the unit
        widths = [unit]
    base = dict(
        lr=o["lr"],
        lr_decay_frac=o["lr_decay_frac"],
        dead_tokens=o["dead_tokens"],
        lr_warmup_steps=o.get("lr_warmup_steps", 0),
        lr_decay=o.get("lr_decay", "linear"),
        k_aux=None if o["k_aux"] < 0 else o["k_aux"],
        decode=o["decode"],
        b_dec_init=o["b_dec_init"],
    )
    configs = build_configs(
        activations=o["activation"],
        widths=widths,
        ks=_ints(o["k"]),
        l1s=_floats(o["l1_coeff"]),
        l0s=_floats(o["l0_coeff"]),
        seeds=_ints(o["seeds"]),
        base=base,
    )
    logging.info("%d SAE(s) in %d program(s)", len(configs), len(sae_train.group_configs(configs)))
    meta = {
        "source": o["source"],
        "data": o.get("npy_path") or f"sharkey n_true={o['n_true']} d={o['d']} k={o['k_true']}",
    }
    epochs = o.get("epochs") or 0.0
    if o["source"] in ("cache", "lm"):
        meta["data"] = json.dumps(source_meta, sort_keys=True)
        # What was actually used, next to the flags in config.json.
        metrics_io.write_json(run.path("data.json"), source_meta)
    saes = sae_train.train_saes(
        acts,
        configs,
        steps=None if epochs > 0 else o["steps"],
        epochs=epochs if epochs > 0 else None,
        shuffle_buffer=o.get("shuffle_buffer", 1 << 16),
        shuffle_block=o.get("shuffle_block", 1024),
        batch_size=o["batch_size"],
        mesh=run.mesh,
        workdir=run.workdir,
        data_seed=o["data_seed"],
        log_every=o["log_every"],
        checkpoint_every=o["checkpoint_every"],
        progress=o["progress"],
        metadata=meta,
    )
    # One metrics.jsonl for the whole command: every program's lines, tagged with its group.
    lines = []
    for g, members in enumerate(sae_train.group_configs(configs)):
        name = sae_train.group_name(g, [configs[i] for i in members])
        for r in metrics_io.read_jsonl(run.path(name, "metrics.jsonl")):
            lines.append({"group": name, **r})
    if jax.process_index() == 0:
        metrics_io.write_text(run.metrics_path, "".join(json.dumps(r) + "\n" for r in lines))

    labels = sae_train.unique_labels(configs)
    rows, densities = [], []
    for label, cfg, sae in zip(labels, configs, saes):
        ev = evaluate(sae, eval_x)
        densities.append(ev.pop("density"))
        row = {
            "label": label,
            "activation": cfg.activation,
            "d_sae": cfg.d_sae,
            "k": cfg.k if cfg.uses_k else None,
            "l1_coeff": cfg.l1_coeff,
            "l0_coeff": cfg.l0_coeff,
            "seed": cfg.seed,
            "knob": knob_label(cfg),
            "input_scale": sae.config.input_scale,
            **ev,
        }
        if dictionary is not None:
            row.update(
                ground_truth_scores(
                    np.asarray(dictionary.atoms), np.asarray(sae.W_dec), alive=densities[-1] > 0
                )
            )
        rows.append(row)
    # Seed-vs-seed: same config but the seed.
    pairs = []
    by_key: dict = {}
    for i, cfg in enumerate(configs):
        by_key.setdefault(dataclasses.replace(cfg, seed=0), []).append(i)
    for members in by_key.values():
        for i, j in itertools.combinations(members, 2):
            m = seed_match_fraction(saes[i].W_dec, saes[j].W_dec, o["match_threshold"])
            pairs.append({"a": labels[i], "b": labels[j], **m})
    results = {
        "saes": rows,
        "seed_pairs": pairs,
        "n_eval_rows": int(eval_x.shape[0]),
        "eval_rows_held_out": bool(held_out),
        "d_in": d_in,
    }
    if pairs:
        results["seed_matched_frac_mean"] = float(np.mean([p["matched_frac"] for p in pairs]))
    if jax.process_index() != 0:  # multi-process: only process 0 writes files and plots
        return results
    # The SAELens copies get the held-out log10 densities (SAELens's sparsity.safetensors).
    from models.formats import saelens

    for label, sae, dens in zip(labels, saes, densities):
        saelens.save_saelens(
            run.path("saes", label, sae_train.SAELENS_DIR), sae, sparsity=np.log10(dens + 1e-10)
        )
    plot_density_histograms(os.path.join(run.plots_dir, "feature_density.png"), labels, densities)
    if dictionary is not None and len({r["d_sae"] for r in rows}) > 1:
        plot_sweep(os.path.join(run.plots_dir, "ground_truth_sweep.png"), rows, o["n_true"], pairs)
    run.write_results(results)
    return results


def body(run, settings):
    opts = {
        k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(settings).items()
    }
    results = run_train_sae(run, opts)
    for r in results["saes"]:
        extra = f" mmcs={r['mmcs']:.4f}" if "mmcs" in r else ""
        logging.info(
            "%s: fvu=%.4f l0=%.2f dead=%.3f%s", r["label"], r["fvu"], r["l0"], r["dead_frac"], extra
        )
    for p in results["seed_pairs"]:
        logging.info(
            "seeds %s vs %s: %.3f matched at cos >= %.2f",
            p["a"],
            p["b"],
            p["matched_frac"],
            p["threshold"],
        )
    print(f"train_sae: {len(results['saes'])} SAE(s); results: {run.path('results.json')}")


if __name__ == "__main__":
    common.entry(
        "train_sae",
        body,
        CONFIG,
        data=lambda f: {
            "npy_path": f.npy_path if f.source == "npy" else None,
            # A cache's identity is its metadata (model, hookpoints, text hash, shards written).
            "cache": (
                os.path.join(f.cache_path, "metadata.json")
                if f.source == "cache" and f.cache_path
                else None
            ),
            "model_path": f.model_path if f.source == "lm" else None,
            **{
                f"text_{i}": t
                for i, t in enumerate(f.lm_text)
                if f.source == "lm" and t != "sample"
            },
        },
        record=lambda f: {"widths_used": CONFIG.widths_of(dataclasses.asdict(f))},
    )
