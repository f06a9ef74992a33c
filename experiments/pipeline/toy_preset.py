"""The embedded default: toy model pairs with known ground truth, SAEs trained on the fly.

Comparisons, all on the same tokens (`experiments.pipeline.references` plans them):

* ``cross``: SAEs of side A against SAEs of side B of the shared-geometry pair
  (`models.dictionary_pair`); N x N with ``--replicates=N``;
* ``control``: A's first SAE against the SAE of a side that shares nothing with A
  (independent codes and dictionary);
* ``ceiling_a`` / ``ceiling_b``: seed-vs-seed on the same side (other seed AND other data
  order): a second SAE when N = 1, all pairs of replicates otherwise;
* ``floor``: A's first SAE against the SAE of a "random-init model" of side B's architecture
  (the same codes through an unrelated random dictionary), same recipe as B's SAE.

Every SAE's seeds come from its role (`experiments.pipeline.saes.role_seeds`); SAEs are
trained with `models.sae_train.train_saes` under ``workdir/saes/<role>`` (checkpointed,
resumable; a finished SAE is loaded, not retrained). With ``--sweep`` every condition gets
its own cross, ceilings and floor.
"""

from __future__ import annotations

import dataclasses
import os

import numpy as np

from engine import streaming
from experiments.pipeline import references, results
from experiments.pipeline import saes as saes_lib
from models import dictionary_pair, sae_train


@dataclasses.dataclass(frozen=True)
class ToySettings:
    seed: int = 0
    n_features: int = 96
    d_a: int = 32
    d_b: int = 32
    n_tokens: int = 20_000
    k_true: float = 3.0
    perturbation: float = 0.15
    d_sae: int = 96
    k: int = 4
    steps: int = 1500
    batch_size: int = 256
    lr: float = 3e-3


HOOKPOINT = "toy"


def recipe(settings: ToySettings) -> sae_train.TrainConfig:
    """The TopK recipe of every toy SAE (the seed is set per role)."""
    return sae_train.TrainConfig(
        d_sae=settings.d_sae, activation="topk", k=settings.k, lr=settings.lr
    )


def _truth(pair) -> dict:
    recoverable = pair.true_match >= 0
    return {
        "features_a": pair.features_a,
        "features_b": pair.features_b,
        "true_match": pair.true_match,
        "recoverable": recoverable,
        "min_cos": 0.9,
    }


def build(
    settings: ToySettings,
    workdir: str,
    mesh,
    progress: bool = False,
    refs: references.RefSettings = references.RefSettings(),  # noqa: B008 (frozen)
    conditions: tuple = (references.Condition(),),
) -> dict:
    """Generates the toy sides, trains their SAEs, returns the comparisons to run.

    Returns ``{"pairs": {...}, "specs": [references.ComparisonSpec], "saes": [records]}``.
    """
    s = settings
    common = dict(
        n_features=s.n_features,
        d_a=s.d_a,
        d_b=s.d_b,
        n_tokens=s.n_tokens,
        k=s.k_true,
        perturbation=s.perturbation,
    )
    shared = dictionary_pair.make_dictionary_pair(s.seed, **common)
    control = dictionary_pair.make_dictionary_pair(s.seed, shared=False, **common)
    floor = dictionary_pair.make_dictionary_pair(s.seed, random_init=True, **common)
    assert np.array_equal(control.acts_a, shared.acts_a) and np.array_equal(
        floor.acts_a, shared.acts_a
    )
    training = references.Training(
        recipe=lambda side, hp, d_in: recipe(s),
        steps=s.steps,
        batch_size=s.batch_size,
        root=os.path.join(workdir, "saes"),
        mesh=mesh,
        user_seed=s.seed,
        progress=progress,
        metadata=lambda side, hp: {"source": f"toy side {side}"},
    )
    planner = references.Planner(refs, training, multi_cell=False)
    side_a = references.SideSpec("a", {HOOKPOINT: shared.acts_a}, description="toy side A")
    side_b = references.SideSpec(
        "b", {HOOKPOINT: shared.acts_b}, description="toy side B (shared geometry)"
    )
    side_c = references.SideSpec(
        "control", {HOOKPOINT: control.acts_b}, description="toy control side (nothing shared)"
    )
    for cond in conditions:
        planner.cell(
            side_a, HOOKPOINT, side_b, HOOKPOINT, cond, floor_acts=lambda side, hp: floor.acts_b
        )
    specs = []
    for spec in planner.specs():
        if spec.kind == "cross":
            spec = dataclasses.replace(
                spec,
                truth=_truth(shared),
                labels=dataclasses.replace(
                    spec.labels,
                    label=spec.label.replace(
                        f"A {HOOKPOINT} vs B {HOOKPOINT}", "A vs B (shared ground truth)"
                    ),
                ),
            )
        elif spec.kind == "floor":
            spec = dataclasses.replace(
                spec, labels=dataclasses.replace(spec.labels, label="A vs random-init model")
            )
        specs.append(spec)
    for cond in conditions:
        a0 = planner.replicates(side_a, HOOKPOINT, cond)[0]
        ctl = planner.single(side_c, HOOKPOINT, cond)
        specs.append(
            references.ComparisonSpec(
                "control" + (f":{cond.label}" if cond.label else ""),
                f"control@{cond.label}",
                a0,
                ctl,
                shared.acts_a,
                control.acts_b,
                results.Labels(
                    kind="control", label="A vs control (nothing shared)", condition=cond.label
                ),
                truth=_truth(control),
            )
        )
    saes_lib.check_distinct_seeds(list(planner.saes.values()))
    return {
        "pairs": {"cross": shared, "control": control, "floor": floor},
        "specs": specs,
        "saes": planner.sae_records(),
    }


def stream_factory(acts_a: np.ndarray, acts_b: np.ndarray, chunk_size: int):
    rows = np.arange(acts_a.shape[0], dtype=np.int32)
    return lambda: streaming.ChunkStream((rows, acts_a, acts_b), chunk_size, name="toy tokens")
