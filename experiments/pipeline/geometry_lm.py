"""Concept geometry on real (local-path) transformers models and their SAEs.

The language-model path of `experiments.feature_geometry` (``configs/feature_geometry_lm.py``).
Per side (model A, model B), through the universality pipeline's machinery:

* model: `models.lm.LanguageModel.load` from a local directory (or the planted / tiny pairs
  built offline in the workdir, `models.planted_lm`, `models.lm_tiny`);
* activations: a live forward pass (`LanguageModel.run`) over the contexts of ``--text`` in the
  side's own tokens, or an activation cache (``--cache_a/--cache_b``,
  `models.activation_cache`; a cache's contexts stand for documents); special tokens are left
  out;
* SAE: loaded (``--sae_a/--sae_b``, any supported format, one SAE or one sub-directory per
  hookpoint: `saes.load_for_hookpoint`, width-checked) or trained here on the corpus
  activations through `references.Planner` / `saes.obtain` (the one train-or-load helper:
  role-derived seeds, resumable, recipe-checked);
* the SAE's codes are streamed once over the corpus: per-feature activation mass on all rows
  and on the topic rows, and the codes of the rows whose token is an item of some concept.

Then, per side: the concept family of each ``--families`` concept (`concept_family`: corpus
and templated prompts), the Engels et al. cosine-graph (and spectral) clusters of the live
decoder rows with the cluster that holds the family, circularity (`engine.circular`) of the
family's decoder rows (top-2 PCs of the family; each feature at its preferred item) and of the
reconstructions, from the family's features only, of the concept tokens' activations (top-2
PCs), with the engine's permutation nulls. Across sides: `engine.circular.compare_geometry` of
the per-item mean reconstructions (RSA of within-family cosines, angular-order agreement, item
permutation nulls), and `engine.group_geometry.group_distance_rsa` of the ``--group_concepts``
groups' decoder rows (Mantel null over group labels). The topic-restricted control repeats the
corpus part on the documents that mention the ``--topic`` keywords, reported beside the full
corpus. The two models may have different tokenizers: items are matched per side by their
strings, and cross-model statistics are per item.
"""

from __future__ import annotations

import dataclasses
import os

import numpy as np
from absl import logging

from experiments.pipeline import concept_family as cf
from experiments.pipeline import concepts
from experiments.pipeline.sides import ModelSide


class GeometryError(Exception):
    """A condition the user must fix (printed as one line)."""


@dataclasses.dataclass
class Side:
    """One model side (`sides.ModelSide`) with its corpus rows and SAE."""

    model_side: ModelSide
    acts: np.ndarray  # [rows, d] corpus activations (special tokens left out)
    tokens: list  # token string per row
    doc_ids: np.ndarray  # [rows] document (context for caches) of each row
    sae: object = None  # saes.SideSAE
    note: str = ""  # where the activations came from, in words

    @property
    def name(self) -> str:
        return self.model_side.name

    @property
    def model(self):
        return self.model_side.model

    @property
    def path(self) -> str:
        return self.model_side.path

    @property
    def hookpoint(self) -> str:
        return self.model_side.hookpoint


# -- sides -----------------------------------------------------------------------------------


def _side_from_model(ms: ModelSide, docs, cfg: dict) -> Side:
    from models import text

    model, hp = ms.model, ms.hookpoint
    contexts = text.make_contexts(
        docs, model.tokenizer, cfg["context_length"], max_contexts=cfg["max_contexts"] or None
    )
    out = model.run(contexts, [hp], batch_size=cfg["lm_batch_size"])
    keep = out.mask & ~out.special  # real, non-special tokens
    doc_rows = np.broadcast_to(contexts.doc_index[:, None], keep.shape)[keep]
    return Side(
        ms,
        np.asarray(out.acts[hp][keep], np.float32),
        _strings(model, out.token_ids[keep]),
        doc_rows,
        note=f"forward passes over {len(contexts)} contexts",
    )


def _side_from_cache(ms: ModelSide, cache_path: str) -> Side:
    from models import activation_cache

    cache = activation_cache.ActivationCache(cache_path)
    (hp_name,) = cache.check_hookpoints([ms.hookpoint])
    ids, acts = cache.read(hp_name)
    ids = np.asarray(ids)
    mask = np.asarray(cache.mask())
    doc_rows = np.repeat(np.arange(mask.shape[0]), mask.sum(1))
    keep = ~ms.model.special_mask(ids)
    return Side(
        dataclasses.replace(ms, hookpoints=(hp_name,), source="cache"),
        np.asarray(acts, np.float32)[keep],
        _strings(ms.model, ids[keep]),
        doc_rows[keep],
        note=f"activation cache {cache_path}",
    )


def _strings(model, ids: np.ndarray) -> list:
    uniq, inv = np.unique(ids, return_inverse=True)
    strings = model.tokenizer.convert_ids_to_tokens(uniq.tolist())
    return [str(strings[i]) for i in inv]


def build_sides(run, cfg: dict) -> list[Side]:
    """Both sides with their SAEs (loaded or trained through the pipeline's planner)."""
    from experiments.pipeline import features, references, saes, sides
    from models import sae_train
    from models import text as text_lib

    caches = [cfg["cache_a"], cfg["cache_b"]]
    if cfg["text"] == "planted" and "planted" not in (cfg["model_a"], cfg["model_b"]):
        raise GeometryError("--text=planted needs --model_a or --model_b = planted")
    model_sides, paths = sides.open_pair(
        run,
        cfg["model_a"],
        cfg["model_b"],
        seed=cfg["seed"],
        hookpoints=([cfg["hookpoint_a"]], [cfg["hookpoint_b"] or cfg["hookpoint_a"]]),
        sources=tuple("cache" if c else "live" for c in caches),
        tokenizer_for="the concepts",
        planted=cfg["lm_planted"],
        shared=cfg["lm_shared"],
    )
    text = paths.corpus if cfg["text"] == "planted" else cfg["text"]
    docs = None
    out = []
    for ms, cache in zip(model_sides, caches):
        if cache:
            side = _side_from_cache(ms, cache)
        else:
            if docs is None:
                docs = list(
                    text_lib.read_documents(text, max_documents=cfg["max_documents"] or None)
                )
            side = _side_from_model(ms, docs, cfg)
        out.append(side)
        logging.info(
            "side %s: %s at %s, %d rows (%s)",
            side.name,
            side.path,
            side.hookpoint,
            len(side.tokens),
            side.note,
        )

    def recipe(side, hp, d_in):
        d_sae = cfg["sae_width"] or cfg["sae_expansion"] * d_in
        return sae_train.TrainConfig(
            d_sae=d_sae,
            activation="topk",
            k=min(cfg["sae_k"], d_sae),
            lr=cfg["sae_lr"],
            dead_tokens=cfg["sae_dead_tokens"],
        )

    training = references.Training(
        recipe=recipe,
        steps=cfg["sae_steps"],
        batch_size=cfg["sae_batch"],
        root=run.path("saes"),
        mesh=run.mesh,
        user_seed=cfg["seed"],
        progress=cfg["progress"],
        metadata=lambda side, hp: {"model": getattr(paths, side[0]), "hookpoint": hp},
    )
    planner = references.Planner(
        references.RefSettings(ceiling_sides=(), floor=False), training, multi_cell=False
    )
    for side, given in zip(out, (cfg["sae_a"], cfg["sae_b"])):
        loaded = None
        if given:
            sae = saes.load_for_hookpoint(given, side.hookpoint, 1)
            features.check_widths(
                sae,
                side.acts.shape[1],
                f"SAE of model {side.name.upper()} at {side.hookpoint} ({given})",
            )
            loaded = {side.hookpoint: (given, sae)}
        spec = references.SideSpec(
            side.name, {side.hookpoint: side.acts}, loaded=loaded, description=side.path
        )
        side.sae = planner.replicates(spec, side.hookpoint, references.Condition())[0]
    planner.specs()  # refuses SAEs of one run that share a seed
    return out


# -- codes -----------------------------------------------------------------------------------


@dataclasses.dataclass
class Codes:
    """What the analysis needs of an SAE's codes on one side's corpus (one streamed pass)."""

    W: np.ndarray  # [F, d] decoder rows (float64)
    total: np.ndarray  # [F] activation mass over all rows
    total_topic: np.ndarray  # [F] over the topic rows
    live: np.ndarray  # [F] bool: fired on the corpus
    rows: np.ndarray  # [n] indices of the kept (item) rows
    codes: np.ndarray  # [n, F] their codes (float32)


def encode(sae, acts: np.ndarray, chunk: int = 4096) -> np.ndarray:
    import jax.numpy as jnp

    return np.concatenate(
        [
            np.asarray(sae.encode(jnp.asarray(acts[i : i + chunk])), np.float32)
            for i in range(0, max(1, acts.shape[0]), chunk)
        ]
    )


def stream_codes(
    sae, acts: np.ndarray, keep_rows: np.ndarray, topic: np.ndarray, chunk: int
) -> Codes:
    """One pass: mass per feature (all rows, topic rows), live features, item rows' codes."""
    import jax.numpy as jnp

    F = int(sae.config.d_sae)
    total, total_topic = np.zeros(F), np.zeros(F)
    live = np.zeros(F, bool)
    kept = []
    keep = np.zeros(acts.shape[0], bool)
    keep[keep_rows] = True
    for lo in range(0, acts.shape[0], chunk):
        c = np.asarray(sae.encode(jnp.asarray(acts[lo : lo + chunk])), np.float32)
        total += c.sum(0, dtype=np.float64)
        total_topic += c[topic[lo : lo + chunk]].sum(0, dtype=np.float64)
        live |= (c > 0).any(0)
        kept.append(c[keep[lo : lo + chunk]])
    W = np.asarray(sae.W_dec, np.float64)
    return Codes(
        W,
        total,
        total_topic,
        live,
        np.flatnonzero(keep),
        np.concatenate(kept) if kept else np.zeros((0, F), np.float32),
    )


def template_rows(model, hp: str, sae, concept: cf.Concept, cfg: dict):
    """Codes of every token of the concept's templated prompts, and each token's item (-1)."""
    from models import text

    tok = model.tokenizer
    prefix, _ = text.special_template(tok)
    texts, pos, items = [], [], []
    for template in cf.TEMPLATES[concept.name]:
        head = template.split("{}")[0]
        for i, item in enumerate(concept.items):
            word = item.capitalize()
            texts.append(template.format(word))
            n = len(tok(head + word, add_special_tokens=False)["input_ids"])
            pos.append(len(prefix) + n - 1)
            items.append(i)
    L = max(8, max(len(tok(t)["input_ids"]) for t in texts) + 1)
    ids, mask = model.encode(texts, L)
    out = model.run(
        text.Contexts(ids, mask, np.arange(len(texts))), [hp], batch_size=cfg["lm_batch_size"]
    )
    acts = out.acts[hp]
    real = mask & ~out.special
    label = np.full(ids.shape, -1, np.int64)
    label[np.arange(len(texts)), pos] = items
    strings = tok.convert_ids_to_tokens(ids[np.arange(len(texts)), pos].tolist())
    matched = float(np.mean([concept.item_of(s) == i for s, i in zip(strings, items)]))
    return encode(sae, acts[real].astype(np.float32)), label[real], matched


# -- one side, one concept -------------------------------------------------------------------


def family_analysis(
    codes: Codes,
    row_items: np.ndarray,
    concept: cf.Concept,
    cfg: dict,
    *,
    total: np.ndarray,
    templates=None,
    clusters=None,
) -> tuple[dict, dict]:
    """Family selection, features per item, clusters and circularity on one side.

    ``row_items`` labels ``codes.rows`` with the concept's items (-1: other); ``total`` is the
    mass over the rows in use (full or topic corpus); ``templates`` = (codes, items, matched).
    """
    from engine import circular, clustering, pca

    m = len(concept.items)
    on = row_items >= 0
    corpus_sel = cf.select(total, codes.codes[on], cfg["family_tau"], cfg["family_min_hits"])
    parts_codes, parts_items = [codes.codes[on]], [row_items[on]]
    out = {"items": list(concept.items), "period": concept.period, "corpus": corpus_sel.summary()}
    members = set(corpus_sel.members.tolist())
    t_members: set = set()
    if templates is not None:
        tc, ti, matched = templates
        t_on = ti >= 0
        t_sel = cf.select(
            tc.sum(0, dtype=np.float64), tc[t_on], cfg["family_tau"], cfg["family_min_hits"]
        )
        out["templates"] = {
            **t_sel.summary(),
            "item_token_matched": matched,
            "prompts": int(t_on.sum()),
        }
        t_members = set(t_sel.members.tolist())
        parts_codes.append(tc[t_on])
        parts_items.append(ti[t_on])
    fam = np.asarray(sorted(members | t_members), np.int64)
    item_codes = np.concatenate(parts_codes).astype(np.float64)
    item_of = np.concatenate(parts_items)
    profile = cf.item_profile(item_codes, item_of, m)
    out["family"] = {
        "members": fam.tolist(),
        "n": int(fam.size),
        "selected_by": {
            int(f): [s for s, S in (("corpus", members), ("templates", t_members)) if int(f) in S]
            for f in fam
        },
        "features_per_item": cf.features_per_item(profile, fam, concept),
        "items_with_rows": int(np.unique(item_of).size),
    }
    out["found"] = bool(fam.size > 0)
    detail = {"family": fam, "profile": profile}
    # Unsupervised alternative: the cosine-graph / spectral cluster that holds the family.
    if clusters is not None and fam.size:
        live_idx, graph, spectral = clusters
        local = {int(f): i for i, f in enumerate(live_idx)}
        fl = np.asarray([local[int(f)] for f in fam if int(f) in local], np.int64)
        for key, cl in (("graph", graph), ("spectral", spectral)):
            if cl is None or fl.size == 0:
                continue
            best = clustering.best_cluster_for(cl, fl)
            mem = live_idx[best["members"]]
            out[f"cluster_{key}"] = {
                "cluster": best["cluster"],
                "size": int(mem.size),
                "family_in_cluster": int(best["hits"]),
                "recall": float(best["recall"]),
                "precision": float(best["precision"]),
                "members": mem.tolist(),
            }
    if concept.period is None:
        return out, detail
    # Circularity of the family's decoder rows, each at its preferred item.
    pref = np.argmax(profile[:, fam], axis=0) if fam.size else np.zeros(0, np.int64)
    out["decoder_circularity"] = None
    if fam.size >= 3 and np.unique(pref).size >= 3:
        circ, _ = circular.decoder_circularity(
            codes.W[fam], pref, concept.period, num_permutations=cfg["n_null"], seed=cfg["seed"]
        )
        out["decoder_circularity"] = circ.to_json()
        detail["circ"] = circ
    # Circularity of the reconstructions (family features only) of the items' activations.
    out["reconstruction_circularity"] = None
    if fam.size and np.unique(item_of).size >= 3:
        recon = item_codes[:, fam] @ codes.W[fam]
        fired = np.abs(recon).sum(1) > 0
        if np.unique(item_of[fired]).size >= 3 and fired.sum() >= 3:
            p = pca.pca(recon[fired], 2, name="family reconstructions")
            rc = circular.circularity(
                p.project(recon[fired]),
                item_of[fired],
                concept.period,
                num_permutations=cfg["n_null"],
                seed=cfg["seed"] + 7,
            )
            rc.plane_fraction = float(p.explained_variance_ratio.sum())
            out["reconstruction_circularity"] = rc.to_json()
            detail["rcirc"] = rc
    # Per-item mean reconstruction: the item's vector for the cross-model comparison.
    vecs = np.full((m, codes.W.shape[1]), np.nan)
    if fam.size:
        for i in range(m):
            sel = item_of == i
            if sel.any():
                v = item_codes[sel][:, fam].mean(0) @ codes.W[fam]
                if np.linalg.norm(v) > 0:
                    vecs[i] = v
    detail["item_vectors"] = vecs
    return out, detail


def _clusters(codes: Codes, cfg: dict, mesh):
    from engine import clustering

    live_idx = np.flatnonzero(codes.live & (np.linalg.norm(codes.W, axis=1) > 0))
    if live_idx.size < 3:
        return live_idx, None, None
    W = codes.W[live_idx]
    graph = clustering.cosine_graph_clusters(
        W,
        k=cfg["graph_k"],
        threshold=cfg["graph_threshold"],
        min_size=cfg["min_size"],
        max_size=cfg["max_size"] or None,
        mesh=mesh,
    )
    spectral = None
    if live_idx.size <= cfg["spectral_max_features"]:
        n_spec = cfg["spectral_clusters"] or max(2, live_idx.size // 8)
        if n_spec < live_idx.size:
            spectral = clustering.spectral_clusters(W, n_spec, seed=cfg["seed"], mesh=mesh)
    return live_idx, graph, spectral


# -- both sides ------------------------------------------------------------------------------


def cross_model(det_a: dict, det_b: dict, cfg: dict) -> dict | None:
    from engine import circular

    va, vb = det_a.get("item_vectors"), det_b.get("item_vectors")
    if va is None or vb is None:
        return None
    both = np.flatnonzero(np.isfinite(va).all(1) & np.isfinite(vb).all(1))
    if both.size < 4:
        return {"items_in_both": int(both.size), "note": "fewer than 4 items in both models"}
    g = circular.compare_geometry(
        va[both], vb[both], num_permutations=cfg["n_null"], seed=cfg["seed"]
    )
    return {"items_in_both": int(both.size), **g.to_json()}


def group_features(codes: Codes, tokens_of_rows, groups: dict, cfg: dict, total, families) -> dict:
    """Group name -> its features (selection rule on the corpus; families: the union)."""
    out = {}
    for name, words in groups.items():
        if name in families:
            out[name] = families[name]
            continue
        items = cf.label_rows(tokens_of_rows, cf.group_concept(name, words))
        out[name] = cf.select(
            total, codes.codes[items >= 0], cfg["family_tau"], cfg["family_min_hits"]
        ).members
    return out


def analyse_corpus(
    sides: list[Side],
    codes: list[Codes],
    row_tokens: list,
    cfg: dict,
    families: list[cf.Concept],
    groups: dict,
    templates: list[dict],
    mesh,
    restrict: list[np.ndarray] | None = None,
    with_clusters: bool = True,
) -> tuple[dict, dict]:
    """Everything on one corpus (full, or restricted to ``restrict`` kept-row masks)."""
    from engine import group_geometry

    res: dict = {"families": {}}
    details: dict = {}
    fam_sets: list[dict] = [{}, {}]
    clusters = [(_clusters(c, cfg, mesh) if with_clusters else None) for c in codes]
    for s, side in enumerate(sides):
        res[f"clusters_{side.name}"] = (
            None
            if clusters[s] is None or clusters[s][1] is None
            else {
                "graph": clusters[s][1].summary(),
                "spectral": clusters[s][2].summary() if clusters[s][2] else None,
                "live": int(clusters[s][0].size),
            }
        )
    for concept in families:
        entry: dict = {}
        dets = []
        for s, (side, c) in enumerate(zip(sides, codes)):
            sel = np.ones(c.rows.size, bool) if restrict is None else restrict[s]
            sub = Codes(c.W, c.total, c.total_topic, c.live, c.rows[sel], c.codes[sel])
            items = cf.label_rows([row_tokens[s][i] for i in np.flatnonzero(sel)], concept)
            total = c.total if restrict is None else c.total_topic
            r, d = family_analysis(
                sub,
                items,
                concept,
                cfg,
                total=total,
                templates=templates[s].get(concept.name) if restrict is None else None,
                clusters=clusters[s],
            )
            entry[f"model_{side.name}"] = r
            dets.append(d)
            fam_sets[s][concept.name] = d["family"]
        entry["cross_model"] = cross_model(dets[0], dets[1], cfg)
        res["families"][concept.name] = entry
        details[concept.name] = dets
    # Group distances between concept groups' features, compared across the two models.
    feats = []
    for s, c in enumerate(codes):
        sel = np.ones(c.rows.size, bool) if restrict is None else restrict[s]
        sub = Codes(c.W, c.total, c.total_topic, c.live, c.rows[sel], c.codes[sel])
        toks = [row_tokens[s][i] for i in np.flatnonzero(sel)]
        feats.append(
            group_features(
                sub, toks, groups, cfg, c.total if restrict is None else c.total_topic, fam_sets[s]
            )
        )
    present = [g for g in groups if feats[0][g].size and feats[1][g].size]
    res["group_features"] = {g: [int(feats[0][g].size), int(feats[1][g].size)] for g in groups}
    res["groups_skipped"] = {
        g: "no feature in model " + ("A" if not feats[0][g].size else "B")
        for g in groups
        if g not in present
    }
    res["group_distances"] = None
    if len(present) >= 3:
        gd = group_geometry.group_distance_rsa(
            {g: codes[0].W[feats[0][g]] for g in present},
            {g: codes[1].W[feats[1][g]] for g in present},
            num_permutations=cfg["n_null"],
            seed=cfg["seed"],
        )
        res["group_distances"] = gd.to_json()
        details["_groups"] = gd
    return res, details


def run_lm(run, cfg: dict) -> dict:
    """The language-model path (module docstring); returns the results dict."""
    from experiments.pipeline import geometry_plots, subspace_runner

    groups = concepts.resolve_groups(cfg["group_concepts"] or None, cfg["concepts_file"])
    families = [cf.make_concept(n, groups) for n in cfg["families"]]
    topic = cf.make_concept(cfg["topic"], groups)
    topic_words = topic.matcher
    if hasattr(run, "plan_stages"):
        run.plan_stages(4 if cfg["plots"] else 3)
    run.stage("activations and SAEs")
    sides = build_sides(run, cfg)
    # Rows kept for the analysis: any concept's, the topic's or a group's token.
    matchers = [topic_words, *(c.matcher for c in families), *groups.values()]
    codes, row_tokens, restrict, templates = [], [], [], []
    run.stage("SAE codes, templated prompts")
    for side in sides:
        keep_rows = np.flatnonzero(cf.matching_rows(side.tokens, matchers))
        topic_mask = subspace_runner.topic_rows(side.doc_ids, side.tokens, topic_words)
        c = stream_codes(side.sae.sae, side.acts, keep_rows, topic_mask, cfg["chunk_size"])
        codes.append(c)
        row_tokens.append([side.tokens[i] for i in c.rows])
        restrict.append(topic_mask[c.rows])
        templates.append(
            {
                f.name: template_rows(side.model, side.hookpoint, side.sae.sae, f, cfg)
                for f in families
                if f.name in cf.TEMPLATES and cfg["templates"]
            }
        )
    run.stage("families, circularity, cross-model comparison")
    full, details = analyse_corpus(
        sides, codes, row_tokens, cfg, families, groups, templates, run.mesh
    )
    topic_res, _ = analyse_corpus(
        sides,
        codes,
        row_tokens,
        cfg,
        families,
        groups,
        templates,
        run.mesh,
        restrict=restrict,
        with_clusters=False,
    )
    topic_res.update(
        {
            "topic": topic.name,
            "tokens_topic": [
                int(np.sum(subspace_runner.topic_rows(s.doc_ids, s.tokens, topic_words)))
                for s in sides
            ],
            "tokens_full": [len(s.tokens) for s in sides],
            "documents_topic": [
                int(
                    np.unique(
                        s.doc_ids[subspace_runner.topic_rows(s.doc_ids, s.tokens, topic_words)]
                    ).size
                )
                for s in sides
            ],
        }
    )
    results = {
        "preset": "lm",
        "sides": {
            s.name: {
                "model": s.path,
                "hookpoint": s.hookpoint,
                "rows": len(s.tokens),
                "activations": s.note,
                "sae": s.sae.record(),
            }
            for s in sides
        },
        "selection_rule": cf.selection_rule(cfg["family_tau"], cfg["family_min_hits"]),
        "templates": {
            f.name: list(cf.TEMPLATES[f.name])
            for f in families
            if f.name in cf.TEMPLATES and cfg["templates"]
        },
        "clustering": {
            "graph_k": cfg["graph_k"],
            "graph_threshold": cfg["graph_threshold"],
            "spectral_max_features": cfg["spectral_max_features"],
        },
        "groups": {g: concepts.describe_group(w) for g, w in groups.items()},
        "full_corpus": full,
        "topic_control": topic_res,
        "alpha": cfg["alpha"],
    }
    results["summary"] = summarise(results, cfg["alpha"])
    _write_metrics(run, results["summary"])
    if cfg["plots"]:
        run.stage("plots")
        for f in families:
            if f.period is not None:
                geometry_plots.plot_lm_circles(
                    os.path.join(run.plots_dir, f"circle_{_slug(f.name)}.png"),
                    f,
                    details[f.name],
                    full["families"][f.name],
                    [s.path for s in sides],
                )
        if "_groups" in details:
            geometry_plots.plot_group_distances(
                os.path.join(run.plots_dir, "group_distances.png"),
                details["_groups"],
                [s.path for s in sides],
            )
    return results


def _write_metrics(run, summary: dict) -> None:
    """One metrics.jsonl line per corpus (full, topic) with the summary's numbers."""
    from engine import metrics_io

    writer = metrics_io.MetricWriter(run.metrics_path)
    writer.truncate_after(-1)
    for step, where in enumerate(("full_corpus", "topic_control")):
        flat = {"corpus": where}
        for name, row in summary[where]["families"].items():
            for key, v in row.items():
                flat[f"{_slug(name)}/{key}"] = v[-1] if isinstance(v, list) else v
        gr = summary[where]["group_rsa"]
        flat["group_rsa_p"] = None if gr is None else gr[1]
        writer.write(step, flat)


def _slug(name: str) -> str:
    return concepts._name_key(name).replace("/", "")


def summarise(results: dict, alpha: float) -> dict:
    """One line of numbers per family: sizes, circularity p, cross-model p, group RSA p."""
    out: dict = {}
    for where in ("full_corpus", "topic_control"):
        r = results[where]
        fams = {}
        for name, e in r["families"].items():
            row = {}
            for s in "ab":
                m = e[f"model_{s}"]
                row[f"family_{s}"] = m["family"]["n"]
                for key in ("decoder_circularity", "reconstruction_circularity"):
                    if m.get(key):
                        row[f"{key}_{s}"] = [m[key]["score"], m[key]["p"]]
            cm = e.get("cross_model") or {}
            if "rsa" in cm:
                row["rsa"] = [cm["rsa"]["observed"], cm["rsa"]["p"]]
                row["ordering"] = [
                    cm["ordering_agreement"]["observed"],
                    cm["ordering_agreement"]["p"],
                ]
            fams[name] = row
        gd = r.get("group_distances")
        out[where] = {
            "families": fams,
            "group_rsa": None
            if not gd
            else [gd["rsa"]["observed"], gd["rsa"]["p"], len(gd["groups"])],
        }
    out["alpha"] = alpha
    return out


def summary_lines(results: dict) -> list[str]:
    lines = []
    for where, s in results["summary"].items():
        if where == "alpha":
            continue
        for name, row in s["families"].items():
            parts = [f"{k}={_fmt(v)}" for k, v in row.items()]
            lines.append(f"{where:<13} {name:<13} " + " ".join(parts))
        lines.append(f"{where:<13} group distances RSA [score, p, groups] = {_fmt(s['group_rsa'])}")
    return lines


def _fmt(v) -> str:
    if isinstance(v, list):
        return "[" + ", ".join(_fmt(x) for x in v) + "]"
    if isinstance(v, float):
        return f"{v:.3g}"
    return str(v)
