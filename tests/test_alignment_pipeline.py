"""The universality pipeline on two tiny models with different tokenizers (aligned units)."""

import json
import os

import pytest

from tests.test_universality import LM, by_name, one_line_error, universality

FAST = (
    "--num_permutations=8",
    "--sae_steps=20",
    "--max_contexts=12",
    "--context_length=32",
    "--sae_expansion=2",
    "--sae_k=4",
    "--sae_batch_size=64",
    "--metrics=cka,svcca",
    "--hookpoints_a=resid_post.1",
    "--hookpoints_b=resid_post.1",
    "--chunk_size=128",
)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    from models import tiny_tokenizers

    root = tmp_path_factory.mktemp("models")
    return (
        tiny_tokenizers.make_tiny_model(
            str(root / "bpe"), "bpe", arch="gpt_neox", seed=0, vocab_size=300
        ),
        tiny_tokenizers.make_tiny_model(
            str(root / "uni"), "unigram", arch="llama", seed=1, vocab_size=300
        ),
    )


@pytest.mark.slow
@pytest.mark.parametrize("alignment", ["auto", "words"])
def test_different_tokenizers_run_on_aligned_units(models, tmp_path, alignment):
    from models import alignment as al
    from models import text

    proc = universality(
        tmp_path,
        LM,
        f"--model_a={models[0]}",
        f"--model_b={models[1]}",
        f"--alignment={alignment}",
        "--alignment_pooling=" + ("mean" if alignment == "words" else "last"),
        *FAST,
        # the reference comparisons and the spliced metrics on aligned units run in [auto];
        # [words] checks the unit itself (its cross comparison), not the same steps again
        *(
            ("--ceiling_sides=", "--norandom_init_floor", "--nosplice_eval")
            if alignment == "words"
            else ()
        ),
    )
    with open(tmp_path / "results.json") as f:
        results = json.load(f)
    unit = "shared_boundaries" if alignment == "auto" else "words"
    assert results["alignment"]["unit"] == unit
    rep = results["alignment"]["report"]
    assert rep["units"] > 100 and rep["fraction_text_covered"] > (
        0.9 if unit == "shared_boundaries" else 0.5
    )
    assert f"alignment {unit}" in proc.stdout
    comps = by_name(results)
    # One cell: the planner names its comparisons by kind (experiments/pipeline/references.py).
    assert {"cross", "ceiling_a", "ceiling_b", "floor"} <= set(comps) or (
        unit == "words" and set(comps) == {"cross"}
    )
    cross = comps["cross"]
    assert cross["tokens"] == rep["units"]  # the feature pass ran on aligned units
    assert cross["n_pairs"] > 0
    # top-activating "tokens" are text spans of the corpus (B read the same text as A)
    doc = text.sample_documents(1)[0]
    spans = [t for p in cross["top_pairs"] for t in p["tokens_a"] + p["tokens_b"]]
    assert spans and all(s in doc for s in spans)
    if unit == "words":
        assert all(s.isalnum() or not any(c.isalnum() for c in s) for s in spans)
    table = json.loads((tmp_path / "features" / "cross.json").read_text())
    row = table["b"][0]
    assert {"density_per_unit", "density_own_token", "mean_own_token"} <= set(row)
    assert row["top_context"] is None or "[[" in row["top_context"]
    assert cross["feature_density"]["a"]["mean_density_own_token"] > 0
    # the alignment is stored beside the run in .npy + json, and reloads
    stored = al.Alignment.load(str(tmp_path / "alignment" / unit))
    assert len(stored) == rep["units"]
    assert all(f.endswith((".npy", ".json")) for f in os.listdir(tmp_path / "alignment" / unit))


def test_tokens_alignment_with_different_tokenizers_is_refused(models, tmp_path):
    proc = universality(
        tmp_path,
        LM,
        f"--model_a={models[0]}",
        f"--model_b={models[1]}",
        "--alignment=tokens",
        *FAST,
        check=False,
    )
    assert "tokenizers differ" in one_line_error(proc)


def test_alignment_pooling_flag_choices_match_the_library():
    """The --alignment_pooling choices (in the config module, read by --help without JAX) are
    the library's poolings (config modules define no flags: imported in-process)."""
    from experiments.configs import universality as config
    from models import alignment

    field = {f.name: f for f in config.FIELDS}["alignment_pooling"]
    assert tuple(field.choices) == tuple(alignment.POOLINGS)
    assert field.default in alignment.POOLINGS
