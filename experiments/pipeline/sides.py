"""Model sides of the pipelines: model specs resolved to local paths and loaded once.

A model spec (``--model_a`` / ``--model_b``) is a local transformers directory or the name of
a pair built offline under the workdir: ``tiny`` (`models.lm_tiny`, two tiny random models of
one tokenizer, under ``WORKDIR/tiny_models``) or ``planted`` (`models.planted_lm`, weekday and
month circles planted in a tiny pair, under ``WORKDIR/planted_models``; its corpus stands in
for ``--text=planted``). Nothing is downloaded at run time: a spec that is neither a special
name nor a local directory is refused in one line naming the flag.

`resolve` turns both specs into paths, `load` loads both models (the same directory on both
sides is loaded once: ``--trio``, same-model grids), and `open_pair` does both and returns
two `ModelSide` values. Universality (`lm_preset`), semantic subspaces (`subspace_runner`)
and feature geometry (`geometry_lm`) build their models here; the joint-SAE experiment reads
only tokenizers (`tokenizer`). SAEs of a side are trained or loaded through `saes.obtain`.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from typing import Any, Literal

from engine import checks

SPECIAL = ("tiny", "planted")
Source = Literal["live", "cache", "arrays"]


@dataclasses.dataclass(frozen=True)
class Paths:
    """Both sides' local model directories (and the planted pair's corpus when built)."""

    a: str
    b: str
    corpus: str | None = None  # text of the planted pair, when a side is planted

    def __iter__(self):
        return iter((self.a, self.b))


@dataclasses.dataclass
class ModelSide:
    """One side of a comparison: a loaded model, where it came from and its hookpoints."""

    name: str  # "a" or "b"
    path: str  # local model directory
    model: Any  # models.lm.LanguageModel
    hookpoints: tuple[str, ...] = ()  # canonical names (`LanguageModel.parse`)
    source: Source = "live"  # activations: live forward passes, activation caches, arrays

    @property
    def hookpoint(self) -> str:
        """The side's one hookpoint (sides with a single hookpoint)."""
        (hp,) = self.hookpoints
        return hp


def check_local(flag: str, path: str) -> None:
    """Refuses a model spec that is not a local directory (one line naming the flag)."""
    if not os.path.isdir(path):
        raise checks.InputError(
            f"{flag}={path}: no such local model directory (nothing is downloaded at run time)"
        )


def resolve(
    run,
    model_a: str,
    model_b: str,
    *,
    seed: int,
    tiny_train_steps: int = 0,
    planted: bool = True,
    shared: bool = True,
) -> Paths:
    """Local directories of both specs; ``tiny`` / ``planted`` pairs are built (or found) in
    the workdir with seeds ``seed``, ``seed + 1`` (tiny) or ``seed`` (planted)."""
    from models import lm_tiny, planted_lm

    paths = [model_a, model_b]
    # A bad local path is refused before a tiny / planted pair is built for the other side.
    for flag, spec in zip(("--model_a", "--model_b"), paths):
        if spec not in SPECIAL:
            check_local(flag, spec)
    corpus = None
    if "tiny" in paths:
        tiny = lm_tiny.make_tiny_model_pair(
            run.path("tiny_models"), seeds=(seed, seed + 1), train_steps=tiny_train_steps
        )
        paths = [{"tiny": p}.get(s, s) for s, p in zip(paths, (tiny.path_a, tiny.path_b))]
    if "planted" in paths:
        pair = planted_lm.make_planted_lm_pair(
            run.path("planted_models"), planted=planted, shared=shared, seed=seed
        )
        paths = [{"planted": p}.get(s, s) for s, p in zip(paths, (pair.path_a, pair.path_b))]
        corpus = pair.corpus
    return Paths(paths[0], paths[1], corpus)


def load(paths: Paths, *, tokenizer_for: str | None = None) -> tuple[Any, Any]:
    """Both models, the same directory loaded once. With ``tokenizer_for`` (what token
    strings define, e.g. "the concepts") a model without a tokenizer is refused."""
    from models import lm

    with lm.quiet_transformers():
        model_a = lm.LanguageModel.load(paths.a)
        model_b = model_a if paths.b == paths.a else lm.LanguageModel.load(paths.b)
    if tokenizer_for:
        for m, p in ((model_a, paths.a), (model_b, paths.b)):
            if m.tokenizer is None:
                raise checks.InputError(
                    f"model {p}: no tokenizer (token strings define {tokenizer_for})"
                )
    return model_a, model_b


def open_pair(
    run,
    model_a: str,
    model_b: str,
    *,
    seed: int,
    hookpoints: tuple[Sequence[str], Sequence[str]] = ((), ()),
    sources: tuple[Source, Source] = ("live", "live"),
    tokenizer_for: str | None = None,
    tiny_train_steps: int = 0,
    planted: bool = True,
    shared: bool = True,
) -> tuple[list[ModelSide], Paths]:
    """`resolve` then `load`: both sides with their hookpoints parsed to canonical names."""
    paths = resolve(
        run,
        model_a,
        model_b,
        seed=seed,
        tiny_train_steps=tiny_train_steps,
        planted=planted,
        shared=shared,
    )
    models = load(paths, tokenizer_for=tokenizer_for)
    sides = [
        ModelSide(name, path, m, tuple(h.name for h in m.parse(list(hps))) if hps else (), src)
        for name, path, m, hps, src in zip("ab", paths, models, hookpoints, sources)
    ]
    return sides, paths


def tokenizer(flag: str, path: str):
    """The tokenizer of a local model directory alone (no weights loaded)."""
    from models import lm

    check_local(flag, path)
    try:
        from transformers import AutoTokenizer

        with lm.quiet_transformers():
            return AutoTokenizer.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError) as e:
        raise checks.InputError(
            f"{flag}={path}: no tokenizer could be loaded ({str(e).splitlines()[0]})"
        ) from None
