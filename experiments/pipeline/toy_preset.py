"""The embedded default: toy model pairs with known ground truth, SAEs trained on the fly.

Four comparisons, all on the same tokens and all against SAE A0 (trained on side A):

* ``cross``: SAE of side B of the shared-geometry pair (`models.dictionary_pair`);
* ``control``: SAE of a side that shares nothing with A (independent codes and dictionary);
* ``ceiling``: a second SAE of side A with another seed AND another data order;
* ``floor``: SAE of a "random-init model" of side B's architecture (the same codes through an
  unrelated random dictionary).

SAEs are trained with `models.sae_train.train_saes` under ``workdir/saes/`` (checkpointed,
resumable; a finished SAE is loaded, not retrained).
"""

from __future__ import annotations

import dataclasses
import os

import numpy as np

from engine import streaming
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


@dataclasses.dataclass
class ToySide:
    name: str
    acts: np.ndarray


def _train_one(acts: np.ndarray, settings: ToySettings, seed: int, data_seed: int,
               directory: str, mesh, progress: bool, description: dict):
    """Trains (or resumes / loads) one TopK SAE on ``acts``."""
    cfg = sae_train.TrainConfig(d_sae=settings.d_sae, activation="topk", k=settings.k,
                                lr=settings.lr, seed=seed)
    return saes_lib.train_or_load(acts, cfg, steps=settings.steps,
                                  batch_size=settings.batch_size, data_seed=data_seed,
                                  directory=directory, mesh=mesh, progress=progress,
                                  metadata=description)


def build(settings: ToySettings, workdir: str, mesh, progress: bool = False) -> dict:
    """Generates the toy sides, trains their SAEs, returns everything the comparisons need."""
    s = settings
    common = dict(n_features=s.n_features, d_a=s.d_a, d_b=s.d_b, n_tokens=s.n_tokens,
                  k=s.k_true, perturbation=s.perturbation)
    shared = dictionary_pair.make_dictionary_pair(s.seed, **common)
    control = dictionary_pair.make_dictionary_pair(s.seed, shared=False, **common)
    floor = dictionary_pair.make_dictionary_pair(s.seed, random_init=True, **common)
    assert np.array_equal(control.acts_a, shared.acts_a) and np.array_equal(floor.acts_a,
                                                                            shared.acts_a)
    root = os.path.join(workdir, "saes")
    train = lambda acts, name, seed, data_seed, desc: _train_one(  # noqa: E731
        acts, s, seed, data_seed, os.path.join(root, name), mesh, progress,
        {"source": desc, "side": name})
    saes = {
        "a0": train(shared.acts_a, "a0", s.seed, s.seed, "toy side A"),
        "a1": train(shared.acts_a, "a1", s.seed + 1, s.seed + 1, "toy side A (ceiling)"),
        "b": train(shared.acts_b, "b", s.seed, s.seed, "toy side B (shared geometry)"),
        "control": train(control.acts_b, "control", s.seed, s.seed, "toy control side"),
        "floor": train(floor.acts_b, "floor", s.seed, s.seed, "toy random-init side"),
    }
    return {"pairs": {"cross": shared, "control": control, "floor": floor}, "saes": saes}


def comparisons(built: dict) -> list[dict]:
    """Specs of the four comparisons: name, kind, activations, SAEs, ground truth."""
    shared = built["pairs"]["cross"]
    saes = built["saes"]

    def truth(pair):
        recoverable = pair.true_match >= 0
        return {"features_a": pair.features_a, "features_b": pair.features_b,
                "true_match": pair.true_match, "recoverable": recoverable, "min_cos": 0.9}

    return [
        {"name": "cross", "kind": "cross", "acts_a": shared.acts_a, "acts_b": shared.acts_b,
         "sae_a": saes["a0"], "sae_b": saes["b"], "truth": truth(shared),
         "label": "A vs B (shared ground truth)"},
        {"name": "control", "kind": "control", "acts_a": shared.acts_a,
         "acts_b": built["pairs"]["control"].acts_b, "sae_a": saes["a0"],
         "sae_b": saes["control"], "truth": truth(built["pairs"]["control"]),
         "label": "A vs control (nothing shared)"},
        {"name": "ceiling", "kind": "ceiling", "acts_a": shared.acts_a, "acts_b": shared.acts_a,
         "sae_a": saes["a0"], "sae_b": saes["a1"], "truth": None,
         "label": "A vs A, other SAE seed and data order"},
        {"name": "floor", "kind": "floor", "acts_a": shared.acts_a,
         "acts_b": built["pairs"]["floor"].acts_b, "sae_a": saes["a0"], "sae_b": saes["floor"],
         "truth": None, "label": "A vs random-init model"},
    ]


def stream_factory(acts_a: np.ndarray, acts_b: np.ndarray, chunk_size: int):
    rows = np.arange(acts_a.shape[0], dtype=np.int32)
    return lambda: streaming.ChunkStream((rows, acts_a, acts_b), chunk_size, name="toy tokens")
