"""SAEs of the pipeline: every SAE has a role, its own seeds, and is trained here or loaded.

A `Role` names what an SAE is for in a run: its side (``a``, ``b``, or a random-init copy
``a~random`` / ``b~random``), hookpoint, kind (``main``, ``ceiling``, ``floor``), replicate
index and sweep condition. `role_seeds` derives the SAE's initialisation seed AND its data
order from a stable hash of the role mixed with the user's ``--seed``, so no two SAEs of one
run share either; two SAEs compared with each other then never start from the same point
nor see the same batches (a shared seed alone made an adjacent-layer pair score above the
seed-vs-seed ceiling on a real model, with feature i paired with feature i). `obtain` is the
one train-or-load helper of the presets: it loads a published SAE, or trains one (checkpointed,
resumable; a finished SAE whose recorded recipe matches is loaded, not retrained), and returns
a `SideSAE` that records its role, seeds and source for results.json.

`matching_config` gives the training recipe of "the same architecture, width and sparsity" as
a loaded SAE, used for its trained-here ceiling and for the random-init floor.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from collections.abc import Sequence

import numpy as np

from engine import checks, metrics_io
from engine import mesh as mesh_lib
from models import formats, sae_io_native, sae_train
from models import sae as sae_lib
from models.activation_cache import CachedActs

KINDS = ("main", "ceiling", "floor")
_SEED_MOD = 2**31 - 1  # seeds stay positive int32 (PRNGKey, numpy Generator)


@dataclasses.dataclass(frozen=True)
class Role:
    """What one SAE is for in a run (hashed into its seeds; see `role_seeds`)."""

    side: str  # "a", "b", "a~random", "b~random", "control", ...
    hookpoint: str  # "resid_post.3"; "toy" for the toy preset
    kind: str = "main"  # one of KINDS
    replicate: int = 0
    condition: str = ""  # sweep condition label ("k=8"); "" outside sweeps

    def __post_init__(self):
        if self.kind not in KINDS:
            raise checks.InputError(f"Role.kind: unknown {self.kind!r}; expected one of {KINDS}")

    @property
    def key(self) -> str:
        """Short unique name, also the SAE's directory under ``workdir/saes``."""
        parts = [self.side.replace("~", "_"), self.hookpoint, f"{self.kind}{self.replicate}"]
        if self.condition:
            parts.append(self.condition.replace("=", "_"))
        return "/".join(parts)


def role_seeds(user_seed: int, role: Role) -> tuple[int, int]:
    """(init seed, data seed) of the SAE playing ``role`` in a run with ``--seed=user_seed``.

    Each is the first 8 bytes of SHA-256 of the role tuple and the user seed, reduced modulo
    2^31 - 1: stable across processes and Python versions (no ``hash()``), distinct for
    distinct roles (a collision in one run is refused by `check_distinct_seeds`), and the two
    streams of one SAE differ from each other as well.
    """
    out = []
    for stream in ("init", "data"):
        payload = json.dumps(
            [
                stream,
                int(user_seed),
                role.side,
                role.hookpoint,
                role.kind,
                int(role.replicate),
                role.condition,
            ]
        )
        digest = hashlib.sha256(payload.encode()).digest()
        out.append(int.from_bytes(digest[:8], "little") % _SEED_MOD)
    return out[0], out[1]


@dataclasses.dataclass
class SideSAE:
    """One SAE of a run with its role, seeds and where it came from."""

    role: Role
    sae: sae_lib.SAE
    source: str  # "trained here" or the loaded path
    seed: int | None  # None for a loaded SAE (its seed is the publisher's)
    data_seed: int | None
    recipe: dict | None = None  # training recipe when trained here
    note: str = ""

    def record(self) -> dict:
        """JSON-ready description for results.json."""
        return {
            "role": dataclasses.asdict(self.role),
            "key": self.role.key,
            "source": self.source,
            "seed": self.seed,
            "data_seed": self.data_seed,
            "d_in": int(self.sae.config.d_in),
            "d_sae": int(self.sae.config.d_sae),
            "activation": self.sae.config.activation,
            "k": int(self.sae.config.k),
            **({"recipe": self.recipe} if self.recipe else {}),
            **({"note": self.note} if self.note else {}),
        }


def check_distinct_seeds(saes: Sequence[SideSAE]) -> None:
    """Refuses a run in which two SAEs trained here share an init seed or a data seed."""
    seen: dict[tuple[str, int], str] = {}
    for s in saes:
        for stream, value in (("init", s.seed), ("data", s.data_seed)):
            if value is None:
                continue
            other = seen.setdefault((stream, value), s.role.key)
            if other != s.role.key:
                raise checks.InputError(
                    f"SAEs {other} and {s.role.key} share the {stream} "
                    f"seed {value}; every SAE needs its own"
                )


def matching_config(
    sae: sae_lib.SAE, template: sae_train.TrainConfig, acts_sample: np.ndarray | None = None
) -> sae_train.TrainConfig:
    """The recipe of an SAE of the same architecture, width and sparsity as ``sae``.

    Activation, ``d_sae`` and ``k`` (topk / batchtopk) come from the SAE; for relu the L1
    coefficient and for jumprelu the L0 coefficient come from the SAE's metadata when it was
    recorded there (``l1_coeff`` / ``l0_coeff``), else from ``template``. JumpReLU thresholds
    are learnt; with ``acts_sample`` the initial threshold is the loaded SAE's median
    threshold converted to the trainer's normalised units (inputs scaled to mean norm
    sqrt(d_in), `models.sae_train`), so that both start at a comparable sparsity.
    """
    c = sae.config
    meta = c.meta
    kw = {"d_sae": int(c.d_sae), "activation": c.activation}
    if c.activation in ("topk", "batchtopk"):
        kw["k"] = int(c.k)
    if c.activation == "relu" and "l1_coeff" in meta:
        kw["l1_coeff"] = float(meta["l1_coeff"])
    if c.activation == "jumprelu":
        if "l0_coeff" in meta:
            kw["l0_coeff"] = float(meta["l0_coeff"])
        if acts_sample is not None and len(acts_sample):
            x = np.asarray(acts_sample, np.float64)
            train_scale = np.sqrt(x.shape[1]) / max(np.linalg.norm(x, axis=1).mean(), 1e-12)
            med = float(
                np.median(np.asarray(sae.threshold, np.float64)) * train_scale / c.input_scale
            )
            if np.isfinite(med) and med > 0:
                kw["jumprelu_init_threshold"] = med
    return dataclasses.replace(template, **kw)


def _subset_rows(
    n: int, fraction: float | None, fold: tuple[int, int] | None, data_seed: int
) -> np.ndarray | None:
    """Training rows of one SAE: a random ``fraction`` of them, or fold i of n disjoint folds
    (the folds come from one permutation shared by the replicates, so they are disjoint)."""
    if fold is not None:
        i, k = fold
        perm = np.random.default_rng(k).permutation(n)
        return np.sort(perm[i::k])
    if fraction is not None and fraction < 1.0:
        keep = max(1, int(round(fraction * n)))
        return np.sort(np.random.default_rng(data_seed).permutation(n)[:keep])
    return None


def obtain(
    role: Role,
    acts: np.ndarray | None,
    *,
    user_seed: int,
    recipe: sae_train.TrainConfig | None = None,
    loaded: str | None = None,
    loaded_sae: sae_lib.SAE | None = None,
    steps: int = 0,
    batch_size: int = 256,
    root: str = "saes",
    mesh=None,
    progress: bool = False,
    metadata: dict | None = None,
    subset: float | None = None,
    fold: tuple[int, int] | None = None,
    note: str = "",
    as_source: bool = False,
    shuffle_buffer: int = 1 << 16,
) -> SideSAE:
    """The one train-or-load helper: the SAE playing ``role``.

    With ``loaded_sae`` (already read from ``loaded``) that SAE is returned as is. Otherwise
    an SAE is trained on ``acts`` (optionally on a ``subset`` fraction of the rows or on one
    ``fold``) with ``recipe`` and the role's seeds (`role_seeds`), under
    ``root/<role.key>``; a finished SAE there whose recorded recipe and seeds match is
    loaded instead of retrained.

    ``acts`` may be a `models.activation_cache.CachedActs` (activations left on disk): the
    SAE is then trained from the cache source through the bounded shuffle buffer of
    ``shuffle_buffer`` rows, subsets and folds read as `RowSubset`s, never loading the cache.
    ``as_source`` trains an in-memory array through the same path (an `ArraySource`), so
    that an in-memory run and a cache-streamed run over the same rows train the same SAEs.
    """
    if loaded_sae is not None:
        return SideSAE(role, loaded_sae, source=str(loaded), seed=None, data_seed=None, note=note)
    if recipe is None or acts is None:
        raise checks.InputError(
            f"SAE {role.key}: neither a loaded SAE nor a recipe and activations to train one"
        )
    seed, data_seed = role_seeds(user_seed, role)
    cfg = dataclasses.replace(recipe, seed=seed)
    rows = _subset_rows(acts.shape[0], subset, fold, data_seed)
    if isinstance(acts, CachedActs) or as_source:
        train_acts = training_source(acts, rows)
        n_rows = train_acts.num_rows
    else:
        train_acts = acts if rows is None else acts[rows]
        n_rows = train_acts.shape[0]
    record = {
        "config": cfg.to_dict(),
        "steps": int(steps),
        "batch_size": int(batch_size),
        "data_seed": int(data_seed),
        "rows": int(n_rows),
        "subset": subset,
        "fold": list(fold) if fold else None,
    }
    if sae_train.is_source(train_acts):
        record["data"] = {"source": _source_kind(train_acts), "shuffle_buffer": shuffle_buffer}
    sae = train_or_load(
        train_acts,
        cfg,
        steps=steps,
        batch_size=batch_size,
        data_seed=data_seed,
        directory=os.path.join(root, role.key),
        mesh=mesh,
        progress=progress,
        metadata={**(metadata or {}), "role": role.key},
        recipe=record,
        shuffle_buffer=shuffle_buffer,
    )
    return SideSAE(
        role, sae, source="trained here", seed=seed, data_seed=data_seed, recipe=record, note=note
    )


def training_source(acts, rows: np.ndarray | None = None):
    """The activation source an SAE of the pipeline trains from: the cache source of a
    `CachedActs`, or an `ArraySource` over an in-memory ``[rows, d]`` array; restricted to
    the sorted row ids ``rows`` (a subset / fold) when given."""
    from models import activation_source as src_lib

    if isinstance(acts, CachedActs):
        base = acts.source
    else:
        x = np.asarray(acts)
        base = src_lib.ArraySource(np.zeros(x.shape[0], np.int32), x)
    return base if rows is None else src_lib.RowSubset(base, rows)


def _source_kind(source) -> str:
    """``cache`` / ``arrays`` (under any subset): what the SAE's rows were read from."""
    while source.describe().get("kind") == "subset":
        source = source.source
    return str(source.describe().get("kind"))


def train_or_load(
    acts,
    cfg: sae_train.TrainConfig,
    *,
    steps: int | None,
    batch_size: int,
    data_seed: int,
    directory: str,
    mesh,
    progress: bool = False,
    metadata: dict | None = None,
    recipe: dict | None = None,
    epochs: float | None = None,
    column: int = 1,
    shuffle_buffer: int = 1 << 16,
):
    """Trains one SAE on ``acts`` under ``directory`` (resumes), or loads the finished one.

    ``acts`` is an in-memory ``[rows, d]`` array or an activation source (e.g.
    ``ActivationCache.source(hookpoint)``), which is streamed through a bounded shuffle
    buffer of ``shuffle_buffer`` rows (``column`` picks its activation array) and never
    loaded into memory (`models.sae_train.source_stream`). With ``recipe``, a finished SAE is
    reused only when the recipe recorded beside it (``recipe.json``) is equal; otherwise the
    run is refused.
    """
    done = os.path.join(directory, "final")
    recipe_path = os.path.join(directory, "recipe.json")
    # Process 0's answer on every process: training runs collectives, so all processes must
    # take the same branch.
    if mesh_lib.agree(metrics_io.exists(os.path.join(done, "sae_config.json"))):
        if recipe is None or _read_json(recipe_path) == json.loads(json.dumps(recipe)):
            return sae_io_native.load_sae(done)
        raise checks.InputError(
            f"{directory}: holds an SAE trained with another recipe "
            "(seed, data order, width or sparsity); use a new --workdir"
        )
    rows = sae_train.rows_per_epoch(acts)
    if rows is not None:
        batch_size = min(batch_size, rows - rows % mesh.shape["data"])
    sae = sae_train.train_saes(
        acts,
        cfg,
        steps=steps,
        epochs=epochs,
        batch_size=batch_size,
        mesh=mesh,
        workdir=directory,
        data_seed=data_seed,
        progress=progress,
        metadata=metadata,
        save=False,
        column=column,
        shuffle_buffer=shuffle_buffer,
    )[0]
    sae_io_native.save_sae(done, sae)  # multi-process: orbax-coordinated
    if recipe is not None and mesh_lib.is_primary():
        metrics_io.write_text(recipe_path, json.dumps(recipe, indent=1, sort_keys=True))
    return sae


def _read_json(path: str):
    return metrics_io.read_json(path) if metrics_io.exists(path) else None


def load_for_hookpoint(root: str, hookpoint: str, n_hookpoints: int):
    """Loads the SAE of ``hookpoint`` from ``root``.

    ``root`` is either one SAE (any format `models.formats.load_sae` detects; allowed when a
    single hookpoint is requested) or a directory with one sub-directory per hookpoint, named
    by the hookpoint (``resid_post.3``) or its SAELens / sparsify names
    (``blocks.3.hook_resid_post``, ``layers.3``).
    """
    from models import lm

    hp = lm.parse_hookpoint(hookpoint)
    for name in (hp.name, hp.saelens_name, hp.sparsify_name):
        path = os.path.join(root, name)
        if os.path.isdir(path):
            return formats.load_sae(path)
    if n_hookpoints == 1 and os.path.exists(root):
        return formats.load_sae(root)
    raise FileNotFoundError(
        f"no SAE for hookpoint {hp.name} under {root}: expected a "
        f"sub-directory named {hp.name}, {hp.saelens_name} or "
        f"{hp.sparsify_name}"
    )
