"""experiments/pipeline/sides.py: model specs to paths, one load per directory, the one-line
refusals (no such local directory, no tokenizer)."""

import os
import types

import pytest

from engine import checks
from experiments.pipeline import sides


class _Run:
    """The part of `common.Run` that sides uses: paths under the workdir."""

    def __init__(self, workdir):
        self.workdir = str(workdir)

    def path(self, *parts):
        return os.path.join(self.workdir, *parts)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    run = _Run(tmp_path_factory.mktemp("sides"))
    paths = sides.resolve(run, "tiny", "tiny", seed=3)
    return run, paths


def test_tiny_resolves_to_two_distinct_local_models(built):
    run, paths = built
    assert paths.a != paths.b and paths.corpus is None
    for p in paths:
        assert os.path.isdir(p) and p.startswith(run.path("tiny_models"))
    # The same seeds give the same directories (a rerun finds them).
    again = sides.resolve(run, "tiny", paths.b, seed=3)
    assert (again.a, again.b) == (paths.a, paths.b)


def test_missing_directory_is_refused_naming_the_flag(built, tmp_path):
    run, paths = built
    missing = str(tmp_path / "nope")
    with pytest.raises(checks.InputError) as e:
        sides.resolve(run, paths.a, missing, seed=3)
    assert str(e.value) == (
        f"--model_b={missing}: no such local model directory (nothing is downloaded at run time)"
    )
    with pytest.raises(checks.InputError, match="^--model_a="):
        sides.resolve(run, missing, paths.b, seed=3)
    # Refused before the other side's tiny pair is built (no expensive work first).
    fresh = _Run(tmp_path / "fresh")
    with pytest.raises(checks.InputError, match="^--model_b="):
        sides.resolve(fresh, "tiny", missing, seed=3)
    assert not os.path.exists(fresh.path("tiny_models"))


def test_same_directory_is_loaded_once_and_hookpoints_are_canonical(built):
    run, paths = built
    (a, b), _ = sides.open_pair(
        run,
        paths.a,
        paths.a,
        seed=3,
        hookpoints=(["blocks.1.hook_resid_post"], ["resid_post.0"]),
        sources=("live", "cache"),
    )
    assert a.model is b.model and a.path == b.path == paths.a
    assert (a.name, a.hookpoint, a.source) == ("a", "resid_post.1", "live")
    assert (b.name, b.hookpoints, b.source) == ("b", ("resid_post.0",), "cache")
    (c, d), _ = sides.open_pair(run, paths.a, paths.b, seed=3)
    assert c.model is not d.model and d.hookpoints == ()


def test_model_without_tokenizer_is_refused_when_tokens_matter(tmp_path, monkeypatch):
    from models import lm

    loads = []

    def fake_load(path, **kw):
        loads.append(path)
        return types.SimpleNamespace(tokenizer=None)  # a model read as token ids only

    monkeypatch.setattr(lm.LanguageModel, "load", staticmethod(fake_load))
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    model, _ = sides.load(sides.Paths(a, b))  # token ids alone need no tokenizer
    assert model.tokenizer is None and loads == [a, b]
    with pytest.raises(checks.InputError, match=f"^model {a}: no tokenizer .*the concepts"):
        sides.load(sides.Paths(a, a), tokenizer_for="the concepts")
    assert loads == [a, b, a]  # the same directory on both sides: one load
    with pytest.raises(checks.InputError, match="--model_a=.*no such local model directory"):
        sides.tokenizer("--model_a", str(tmp_path / "absent"))
