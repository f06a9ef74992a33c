"""experiments/joint_sae.py on caches of two models with different tokenizers: rows pair
through aligned units (experiments/pipeline/aligned.py)."""

import json
import os
import types

import numpy as np
import pytest

from tests.test_joint_sae_experiment import TINY, _check_results, _run

HP = "resid_post.0"


@pytest.fixture(scope="module")
def caches(tmp_path_factory):
    from models import activation_cache, lm, lm_tiny, text, tiny_tokenizers
    from models import alignment as al

    root = tmp_path_factory.mktemp("joint_aligned")
    docs = [d[:500] for d in text.sample_documents(3)]
    text_path = str(root / "docs.jsonl")
    with open(text_path, "w", encoding="utf-8") as f:
        for d in docs:
            f.write(json.dumps({"text": d}) + "\n")
    models = {
        "a": tiny_tokenizers.make_tiny_model(str(root / "m_bpe"), "bpe", seed=0, vocab_size=300),
        "b": tiny_tokenizers.make_tiny_model(
            str(root / "m_wp"), "wordpiece", arch="bert", seed=1, vocab_size=300
        ),
    }
    # the floor: a random-init copy of B's architecture (other seed) on B's own tokenizer
    # (the tokenizer is copied, not retrained: retraining need not give the same ids)
    from transformers import AutoTokenizer

    with lm.quiet_transformers():
        tok_b = AutoTokenizer.from_pretrained(models["b"], local_files_only=True)
        floor = lm_tiny.build_tiny_model("bert", tok_b, 7)
        floor.save_pretrained(str(root / "m_wp_floor"))
    tok_b.save_pretrained(str(root / "m_wp_floor"))
    models["floor"] = str(root / "m_wp_floor")
    paths = {}
    for name, mpath in models.items():
        with lm.quiet_transformers():
            model = lm.LanguageModel.load(mpath, device="cpu")
        ctx = text.make_contexts(docs, model.tokenizer, 32)
        cache = activation_cache.harvest(
            model,
            ctx,
            [HP],
            str(root / f"cache_{name}"),
            text_info={"special_tokens": "auto", "pad_tail": False},
            progress=False,
        )
        al.save_token_spans(cache.path, al.corpus_tokens(docs, model.tokenizer, ctx), docs)
        paths[name] = cache.path
    return root, text_path, models, paths


def _grid_mean_reference(cache, ptr, rows) -> np.ndarray:
    """float64 mean over each unit's grid positions, from the cache's rows placed on its grid."""
    _ids, acts = cache.read(HP)
    mask = cache.mask().reshape(-1)
    grid = np.zeros((mask.size, acts.shape[1]), np.float64)
    grid[mask] = acts
    return np.stack([grid[rows[ptr[u] : ptr[u + 1]]].mean(0) for u in range(len(ptr) - 1)])


@pytest.mark.slow
def test_caches_with_different_tokenizers_pair_through_aligned_units(caches, tmp_path):
    from experiments import joint_sae
    from models import activation_cache

    root, text_path, models, paths = caches
    cache_flags = [
        "--source=caches",
        f"--cache_a={paths['a']}",
        f"--cache_b={paths['b']}",
        f"--floor_cache_b={paths['floor']}",
        f"--hookpoint_a={HP}",
        f"--hookpoint_b={HP}",
    ]
    # different tokenizers without the text / models: one-line error before any training
    proc = _run([f"--workdir={tmp_path / 'bad'}", *cache_flags, "--progress=false"])
    assert proc.returncode == 2
    err = proc.stderr.strip().splitlines()
    assert "different tokenizers" in err[-1] and "--text" in err[-1], err

    # the unit rows equal a float64 pooling of each cache's own-token rows
    settings = types.SimpleNamespace(
        source="caches",
        n_models=2,
        cache_a=paths["a"],
        cache_b=paths["b"],
        floor_cache_b=paths["floor"],
        hookpoint_a=HP,
        hookpoint_b=HP,
        max_rows=10**6,
        alignment="auto",
        alignment_pooling="mean",
        alignment_dir=None,
        model_a=models["a"],
        model_b=models["b"],
        text=text_path,
    )
    run = types.SimpleNamespace(path=lambda *p: os.path.join(str(tmp_path / "inproc"), *p))
    real, floor, data = joint_sae.load_pairs(settings, run)
    al_ = data["alignment"]
    assert al_["unit"] == "shared_boundaries" and al_["pooling"] == "mean"
    n = al_["report"]["units"]
    assert n > 50 and al_["rows_used"] == n and real.xs[0].shape[0] == n
    from models import alignment as al

    align = al.Alignment.load(run.path("alignment", "shared_boundaries"))
    ca, cb, cf = (activation_cache.ActivationCache(paths[k]) for k in ("a", "b", "floor"))
    np.testing.assert_allclose(
        real.xs[0], _grid_mean_reference(ca, align.ptr_a, align.rows_a), rtol=1e-5, atol=1e-6
    )
    np.testing.assert_allclose(
        real.xs[1], _grid_mean_reference(cb, align.ptr_b, align.rows_b), rtol=1e-5, atol=1e-6
    )
    np.testing.assert_array_equal(floor.xs[0], real.xs[0])
    np.testing.assert_allclose(
        floor.xs[1], _grid_mean_reference(cf, align.ptr_b, align.rows_b), rtol=1e-5, atol=1e-6
    )
    assert not np.allclose(floor.xs[1], real.xs[1])  # the floor is another network

    # the experiment end to end on aligned units
    wd = str(tmp_path / "lm")
    proc = _run(
        [
            f"--workdir={wd}",
            *cache_flags,
            f"--model_a={models['a']}",
            f"--model_b={models['b']}",
            f"--text={text_path}",
            "--alignment_pooling=mean",
            "--designs=crosscoder_topk,independent",
            *TINY,
        ]
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "alignment shared_boundaries (mean)" in proc.stdout
    res = _check_results(wd, {"crosscoder", "independent"})
    rep = res["data"]["alignment"]
    assert rep["unit"] == "shared_boundaries" and rep["report"]["units"] == n
    assert "dropped_units" in rep["report"] and rep["rows_used"] == n
