"""Reference points, replicates and condition sweeps of the universality pipeline.

Both presets describe their sides (activations per hookpoint, loaded SAEs if any) and let a
`Planner` decide which SAEs exist and which comparisons run. For every cell (hookpoint of A,
hookpoint of B) and every sweep condition:

* ``cross``: each of A's N replicate SAEs against each of B's N (``--replicates=N``; N^2
  comparisons, one when N = 1);
* ``ceiling``: seed-vs-seed on the same side and hookpoint: all pairs among a side's
  replicates when N >= 2; when N = 1 a second SAE of the same recipe (for a loaded, published
  SAE: the same architecture, width and sparsity, `saes.matching_config`, trained here, or a
  second published seed given by the user). Sides A and B both get one by default
  (``ceiling_sides``);
* ``floor``: A's first replicate against an SAE of the same architecture and width as the SAE
  it stands in for, trained on a randomly initialised copy of the model (B at B's hookpoint
  by default; A at A's hookpoint for the "classic trio").

Every SAE has its own seeds (`saes.role_seeds`). Replicates differ in seed and data order, or
train on disjoint folds of the rows (``replicate_data="subset"``).

`summarise` turns the finished comparisons into per-cell reference points. The "fraction of
the way" from floor to ceiling is only given when ceiling minus floor exceeds
`SEPARATION_Z` times their combined spread (the two nulls' standard deviations and, with
replicates, the ceiling's seed-to-seed spread); otherwise it is reported as not separated,
since a ratio of two noise-level differences is meaningless (e.g. -24 % or 372 % on null
data). With replicates, the cross-model scores form a distribution that is compared with the
within-side (seed) distribution: mean, standard deviation, a one-sided Mann-Whitney U test
(Mann & Whitney 1947) and a one-sided permutation test of the difference of means, both of
``cross < within`` on the excess over the null. The N^2 cross pairs share SAEs, so they are
not independent: the p-values are descriptive (exchangeability is assumed), which the results
state.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from collections.abc import Callable, Mapping, Sequence

import numpy as np

from engine import checks
from experiments.pipeline import results
from experiments.pipeline import saes as saes_lib
from models import sae_train

SEPARATION_Z = 2.0
REPLICATE_DATA = ("order", "subset")
SWEEP_NAMES = ("d_sae", "expansion", "k", "l1_coeff", "subset")
TESTS_NOTE = (
    "one-sided tests of cross < within on the excess over the null; the cross "
    "pairs share SAEs, so they are not independent and p-values are descriptive"
)


@dataclasses.dataclass(frozen=True)
class RefSettings:
    replicates: int = 1
    replicate_data: str = "order"  # "order": other seed + data order; "subset": folds
    ceiling_sides: tuple[str, ...] = ("a", "b")
    floor: bool = True
    floor_at: str = "b"  # random-init copy of B at hb, or of A at ha
    permutations: int = 2000  # permutation test of cross < within

    def validate(self) -> RefSettings:
        checks.check_positive_int("--replicates", self.replicates)
        if self.replicate_data not in REPLICATE_DATA:
            raise checks.InputError(
                f"--replicate_data: unknown {self.replicate_data!r}; "
                f"expected one of {REPLICATE_DATA}"
            )
        bad = [s for s in self.ceiling_sides if s not in ("a", "b")]
        if bad:
            raise checks.InputError(
                f"--ceiling_sides: unknown side(s) {bad}; expected a subset of a,b"
            )
        if self.floor_at not in ("a", "b"):
            raise checks.InputError(f"--floor_at: expected 'a' or 'b', got {self.floor_at!r}")
        if self.replicate_data == "subset" and self.replicates < 2:
            raise checks.InputError(
                "--replicate_data=subset needs --replicates >= 2 (one fold per replicate)"
            )
        return self


@dataclasses.dataclass(frozen=True)
class Condition:
    """One point of a conditions sweep; the empty condition is the run's own settings."""

    name: str = ""
    value: float = 0.0

    @property
    def label(self) -> str:
        return f"{self.name}={self.value:g}" if self.name else ""

    def apply(self, recipe: sae_train.TrainConfig, d_in: int) -> sae_train.TrainConfig:
        if self.name == "d_sae":
            return dataclasses.replace(
                recipe, d_sae=int(self.value), k=min(recipe.k, int(self.value))
            )
        if self.name == "expansion":
            d_sae = int(self.value * d_in)
            return dataclasses.replace(recipe, d_sae=d_sae, k=min(recipe.k, d_sae))
        if self.name == "k":
            return dataclasses.replace(recipe, k=int(self.value))
        if self.name == "l1_coeff":
            return dataclasses.replace(recipe, activation="relu", l1_coeff=float(self.value))
        return recipe

    @property
    def subset(self) -> float | None:
        return float(self.value) if self.name == "subset" else None


def parse_sweep(text: str | None) -> list[Condition]:
    """``"k=4,8,16"`` -> three conditions; None / "" -> the run's own settings only."""
    if not text:
        return [Condition()]
    name, sep, values = str(text).partition("=")
    name = name.strip()
    if not sep or name not in SWEEP_NAMES:
        raise checks.InputError(
            f"--sweep={text!r}: expected NAME=v1,v2,... with NAME one of {SWEEP_NAMES}"
        )
    out = []
    for v in values.split(","):
        try:
            x = float(v)
        except ValueError:
            raise checks.InputError(f"--sweep={text!r}: {v!r} is not a number") from None
        if not (math.isfinite(x) and x > 0):
            raise checks.InputError(f"--sweep={text!r}: values must be > 0, got {v!r}")
        if name == "subset" and x > 1:
            raise checks.InputError(f"--sweep={text!r}: subset fractions must be in (0, 1]")
        if name in ("d_sae", "k") and x != int(x):
            raise checks.InputError(f"--sweep={text!r}: {name} values must be integers")
        out.append(Condition(name, x))
    if len({c.value for c in out}) != len(out):
        raise checks.InputError(f"--sweep={text!r}: repeated values")
    return out


@dataclasses.dataclass
class SideSpec:
    """One side of a comparison: activations per hookpoint and, optionally, loaded SAEs."""

    name: str  # "a" or "b"
    acts: Mapping[str, np.ndarray]  # hookpoint -> [rows, d]
    loaded: Mapping[str, tuple[str, object]] | None = None  # hp -> (path, SAE)
    loaded_ceiling: Mapping[str, tuple[str, object]] | None = None  # hp -> (path, SAE)
    description: str = ""


@dataclasses.dataclass(frozen=True)
class ComparisonSpec:
    """What to compare: two SAEs, the rows each reads, and the labels of the result.

    The planner (and the toy preset's control) emit these; `run_specs` runs each once through
    `compare.run_comparison`, which returns the matching `results.ComparisonResult`.
    ``truth``: the toy's ground truth (`compare.truth_scores`), or None.
    """

    name: str
    group: str  # cell key (+ condition)
    sae_a: saes_lib.SideSAE
    sae_b: saes_lib.SideSAE
    acts_a: np.ndarray
    acts_b: np.ndarray
    labels: results.Labels  # kind (cross | ceiling | floor | control), label, cell, ...
    truth: dict | None = None

    @property
    def kind(self) -> str:
        return self.labels.kind

    @property
    def label(self) -> str:
        return self.labels.label


@dataclasses.dataclass(frozen=True)
class Training:
    """How SAEs are trained here (shared by every role)."""

    recipe: Callable[[str, str, int], sae_train.TrainConfig]  # (side, hookpoint, d_in)
    steps: int
    batch_size: int
    root: str
    mesh: object
    user_seed: int
    progress: bool = False
    metadata: Callable[[str, str], dict] = lambda side, hp: {}
    # Train every SAE through an activation source with a bounded shuffle buffer (what a
    # cache-streamed run must do; in memory too, so that both modes train the same SAEs).
    source_training: bool = False
    shuffle_buffer: int = 1 << 16


def cell_key(ha: str, hb: str) -> str:
    return f"A.{ha}~B.{hb}"


class Planner:
    """Obtains each SAE of the run once (by role) and emits the comparisons of each cell."""

    def __init__(self, settings: RefSettings, training: Training, *, multi_cell: bool):
        self.settings = settings.validate()
        self.training = training
        self.multi_cell = multi_cell
        self.saes: dict[str, saes_lib.SideSAE] = {}
        self._specs: dict[str, ComparisonSpec] = {}

    # -- SAEs ---------------------------------------------------------------------------------
    def _obtain(
        self, role: saes_lib.Role, acts, recipe=None, loaded=None, subset=None, fold=None, note=""
    ) -> saes_lib.SideSAE:
        if role.key not in self.saes:
            t = self.training
            path, sae = loaded if loaded else (None, None)
            self.saes[role.key] = saes_lib.obtain(
                role,
                acts,
                user_seed=t.user_seed,
                recipe=recipe,
                loaded=path,
                loaded_sae=sae,
                steps=t.steps,
                batch_size=t.batch_size,
                root=t.root,
                mesh=t.mesh,
                progress=t.progress,
                metadata=t.metadata(role.side, role.hookpoint),
                subset=subset,
                fold=fold,
                note=note,
                as_source=t.source_training,
                shuffle_buffer=t.shuffle_buffer,
            )
        return self.saes[role.key]

    def _recipe(self, side: str, hp: str, d_in: int, cond: Condition):
        return cond.apply(self.training.recipe(side, hp, d_in), d_in)

    def replicates(self, side: SideSpec, hp: str, cond: Condition) -> list[saes_lib.SideSAE]:
        """Side ``side``'s N replicate SAEs at ``hp`` under ``cond``."""
        acts = side.acts[hp]
        n = self.settings.replicates
        if side.loaded and hp in side.loaded:
            if n > 1 or cond.name:
                raise checks.InputError(
                    f"side {side.name.upper()} uses loaded SAEs: "
                    "--replicates > 1 and --sweep need SAEs trained here"
                )
            return [
                self._obtain(
                    saes_lib.Role(side.name, hp, "main", 0, cond.label),
                    acts,
                    loaded=side.loaded[hp],
                )
            ]
        recipe = self._recipe(side.name, hp, acts.shape[1], cond)
        out = []
        for r in range(n):
            fold = (r, n) if self.settings.replicate_data == "subset" else None
            out.append(
                self._obtain(
                    saes_lib.Role(side.name, hp, "main", r, cond.label),
                    acts,
                    recipe,
                    subset=cond.subset,
                    fold=fold,
                )
            )
        return out

    def single(self, side: SideSpec, hp: str, cond: Condition) -> saes_lib.SideSAE:
        """One SAE of ``side`` at ``hp`` (e.g. the toy control), trained with the run's recipe."""
        acts = side.acts[hp]
        return self._obtain(
            saes_lib.Role(side.name, hp, "main", 0, cond.label),
            acts,
            self._recipe(side.name, hp, acts.shape[1], cond),
            subset=cond.subset,
        )

    def ceiling_extra(
        self, side: SideSpec, hp: str, cond: Condition, mains: Sequence[saes_lib.SideSAE]
    ) -> list[saes_lib.SideSAE]:
        """The second SAE of a seed-vs-seed ceiling when there is one replicate only."""
        if len(mains) >= 2 or side.name not in self.settings.ceiling_sides:
            return []
        role = saes_lib.Role(side.name, hp, "ceiling", 0, cond.label)
        acts = side.acts[hp]
        if side.loaded_ceiling and hp in side.loaded_ceiling:
            return [
                self._obtain(
                    role, acts, loaded=side.loaded_ceiling[hp], note="second published seed"
                )
            ]
        main = mains[0]
        if main.recipe is None:  # loaded: the same architecture, width and sparsity
            recipe = saes_lib.matching_config(
                main.sae, self.training.recipe(side.name, hp, acts.shape[1]), acts[:4096]
            )
            note = (
                "trained here to match a loaded SAE (same architecture, width, sparsity); "
                "its training budget is this run's, so the ceiling is a lower bound on "
                "the published SAE's seed-to-seed agreement"
            )
        else:
            recipe = sae_train.TrainConfig(**main.recipe["config"])
            note = ""
        return [self._obtain(role, acts, recipe, subset=cond.subset, note=note)]

    def floor(
        self, random_side: str, hp: str, acts: np.ndarray, like: saes_lib.SideSAE, cond: Condition
    ) -> saes_lib.SideSAE:
        """SAE of a random-init model, same architecture and width as the SAE ``like``."""
        if like.recipe is not None:
            recipe = sae_train.TrainConfig(**like.recipe["config"])
        else:
            recipe = saes_lib.matching_config(
                like.sae, self.training.recipe(random_side, hp, acts.shape[1]), acts[:4096]
            )
        return self._obtain(
            saes_lib.Role(random_side, hp, "floor", 0, cond.label), acts, recipe, subset=cond.subset
        )

    # -- comparisons -------------------------------------------------------------------------
    def _name(self, kind: str, where: str, reps: tuple[int, int] | None, cond: Condition):
        parts = [kind]
        if self.multi_cell and where:
            parts.append(where)
        if reps is not None and self.settings.replicates > 1:
            parts.append(f"r{reps[0]}-r{reps[1]}")
        if cond.label:
            parts.append(cond.label)
        return ":".join(parts)

    def _add(self, spec: ComparisonSpec) -> None:
        self._specs.setdefault(spec.name, spec)

    def cell(
        self,
        side_a: SideSpec,
        ha: str,
        side_b: SideSpec,
        hb: str,
        cond: Condition = Condition(),
        floor_acts: Callable[[str, str], np.ndarray] | None = None,
    ) -> str:
        """Adds the comparisons of cell (ha, hb) under ``cond``; returns the cell's group."""
        group = cell_key(ha, hb) + (f"@{cond.label}" if cond.label else "")
        a = self.replicates(side_a, ha, cond)
        b = self.replicates(side_b, hb, cond)
        where_ab = {
            "hookpoint_a": ha,
            "hookpoint_b": hb,
            "cell": cell_key(ha, hb),
            "condition": cond.label,
        }
        for i, sa in enumerate(a):
            for j, sb in enumerate(b):
                self._add(
                    ComparisonSpec(
                        self._name("cross", cell_key(ha, hb), (i, j), cond),
                        group,
                        sa,
                        sb,
                        side_a.acts[ha],
                        side_b.acts[hb],
                        results.Labels(
                            kind="cross",
                            label=f"A {ha} vs B {hb}"
                            + (f", replicates {i},{j}" if len(a) * len(b) > 1 else ""),
                            replicates=(i, j),
                            **where_ab,
                        ),
                    )
                )
        for side, hp, mains in ((side_a, ha, a), (side_b, hb, b)):
            pool = list(mains) + self.ceiling_extra(side, hp, cond, mains)
            if side.name not in self.settings.ceiling_sides:
                continue
            s_up = side.name.upper()
            for i, j in itertools.combinations(range(len(pool)), 2):
                self._add(
                    ComparisonSpec(
                        self._name(f"ceiling_{side.name}", f"{s_up}.{hp}", (i, j), cond),
                        f"{side.name}:{hp}@{cond.label}",
                        pool[i],
                        pool[j],
                        side.acts[hp],
                        side.acts[hp],
                        results.Labels(
                            kind="ceiling",
                            label=f"{s_up} {hp} vs {s_up} {hp}, other SAE seed and data order",
                            side=side.name,
                            hookpoint=hp,
                            condition=cond.label,
                            replicates=(i, j),
                        ),
                    )
                )
        if self.settings.floor and floor_acts is not None:
            at_b = self.settings.floor_at == "b"
            hp, like = (hb, b[0]) if at_b else (ha, a[0])
            rside = ("b" if at_b else "a") + "~random"
            xr = floor_acts("b" if at_b else "a", hp)
            fl = self.floor(rside, hp, xr, like, cond)
            where = cell_key(ha, hb) if at_b else f"A.{ha}"
            self._add(
                ComparisonSpec(
                    self._name("floor", where, None, cond),
                    f"floor:{where}@{cond.label}",
                    a[0],
                    fl,
                    side_a.acts[ha],
                    xr,
                    results.Labels(
                        kind="floor",
                        label=f"A {ha} vs random-init {'B' if at_b else 'A'} {hp}",
                        random_init="b" if at_b else "a",
                        hookpoint_random=hp,
                        **where_ab,
                    ),
                )
            )
        return group

    def specs(self) -> list[ComparisonSpec]:
        saes_lib.check_distinct_seeds(list(self.saes.values()))
        return list(self._specs.values())

    def sae_records(self) -> list[dict]:
        return [s.record() for s in self.saes.values()]


def run_specs(
    specs: Sequence[ComparisonSpec],
    run,
    cfg,
    cache,
    token_text,
    *,
    chunk_size: int,
    progress: bool,
    pages_for: Callable[[ComparisonSpec], object] | None = None,
    pool_for: Callable[[str], Callable] | None = None,
    **extra,
) -> list[results.ComparisonResult]:
    """Runs every planned comparison once through `compare.run_comparison` (the one runner
    loop); each result carries its spec's labels plus its SAE roles and seeds.

    ``pages_for(spec)``: the `feature_pages.PageSource` of that comparison (which unembedding
    each side's feature pages use); ``pool_for(role_side)``: maps a model's own-token rows to
    the comparison's rows (aligned units when the two tokenizers differ; SAEs are trained on
    own tokens); ``chunk_size``: rows per streamed chunk; ``progress``: progress bars;
    ``extra``: further `run_comparison` keywords."""
    from engine import fingerprint as fp_lib
    from engine import streaming
    from experiments.pipeline import compare
    from models.activation_cache import CachedActs

    comps = []
    digests: dict[int, tuple] = {}  # id -> (array kept alive, digest)
    for spec in specs:
        xa, xb = spec.acts_a, spec.acts_b
        if isinstance(xa, CachedActs) or isinstance(xb, CachedActs):
            # Activations left on disk: the pass reads both caches chunk by chunk.
            comps.append(
                _run_cached(
                    spec,
                    xa,
                    xb,
                    run,
                    chunk_size,
                    progress,
                    cfg,
                    cache,
                    token_text,
                    pages_for,
                    extra,
                )
            )
            continue
        if pool_for is not None:
            xa = pool_for(spec.sae_a.role.side)(xa)
            xb = pool_for(spec.sae_b.role.side)(xb)
        rows = np.arange(xa.shape[0], dtype=np.int32)
        # Each array is hashed once however many comparisons read it (a grid reuses sides).
        for x in (xa, xb):
            if id(x) not in digests:
                digests[id(x)] = (x, fp_lib.digest(x))
        data_key = fp_lib.digest(digests[id(xa)][1], digests[id(xb)][1])
        factory = lambda xa=xa, xb=xb, r=rows: streaming.ChunkStream(
            (r, xa, xb), chunk_size, name="tokens"
        )
        labels = dataclasses.replace(
            spec.labels,
            saes=(spec.sae_a.role.key, spec.sae_b.role.key),
            seeds=(spec.sae_a.seed, spec.sae_b.seed),
        )
        comps.append(
            compare.run_comparison(
                spec.name,
                factory,
                spec.sae_a.sae,
                spec.sae_b.sae,
                token_text,
                run.mesh,
                cfg,
                cache,
                ckpt_root=run.path("checkpoints"),
                truth=spec.truth,
                progress=progress,
                labels=labels,
                data_key=data_key,
                **({"pages": pages_for(spec)} if pages_for else {}),
                **extra,
            )
        )
    return comps


def _run_cached(
    spec: ComparisonSpec,
    xa,
    xb,
    run,
    chunk_size: int,
    progress: bool,
    cfg,
    cache,
    token_text,
    pages_for,
    extra: dict,
):
    """One comparison whose two sides are `CachedActs` (streaming mode of the LM preset)."""
    from engine import fingerprint as fp_lib
    from experiments.pipeline import compare, features
    from models.activation_cache import CachedActs

    if not (isinstance(xa, CachedActs) and isinstance(xb, CachedActs)):
        raise checks.InputError(
            f"comparison {spec.name}: one side is in memory and the other "
            "on disk; stream both or neither"
        )
    if xa.exclude_special != xb.exclude_special:
        raise checks.InputError(
            f"comparison {spec.name}: the two sides select different "
            "rows (special tokens excluded on one side only)"
        )

    def factory():
        return features.cache_pair_stream(
            xa.cache,
            xa.hookpoint,
            xb.cache,
            xb.hookpoint,
            chunk_size,
            exclude_special=xa.exclude_special,
        )

    return compare.run_comparison(
        spec.name,
        factory,
        spec.sae_a.sae,
        spec.sae_b.sae,
        token_text,
        run.mesh,
        cfg,
        cache,
        ckpt_root=run.path("checkpoints"),
        truth=spec.truth,
        progress=progress,
        labels=dataclasses.replace(
            spec.labels,
            saes=(spec.sae_a.role.key, spec.sae_b.role.key),
            seeds=(spec.sae_a.seed, spec.sae_b.seed),
        ),
        data_key=fp_lib.digest(xa.key(), xb.key()),
        **({"pages": pages_for(spec)} if pages_for else {}),
        **extra,
    )


# -- summaries -------------------------------------------------------------------------------


def mann_whitney_less(x: Sequence[float], y: Sequence[float]) -> float | None:
    """One-sided Mann-Whitney U p-value of ``x`` < ``y`` (exact for small samples)."""
    if len(x) < 1 or len(y) < 1 or len(x) + len(y) < 3:
        return None
    from scipy import stats

    return float(stats.mannwhitneyu(x, y, alternative="less").pvalue)


def permutation_less(
    x: Sequence[float], y: Sequence[float], n_perm: int, seed: int
) -> float | None:
    """One-sided permutation p-value of mean(x) < mean(y): (1 + #{perm diff <= obs}) / (1 +
    runs), all splits enumerated when there are at most ``n_perm`` of them."""
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    if x.size < 1 or y.size < 1 or x.size + y.size < 3:
        return None
    pooled = np.concatenate([x, y])
    obs = x.mean() - y.mean()
    n = pooled.size
    total = math.comb(n, x.size)
    if total <= n_perm:
        diffs = []
        for idx in itertools.combinations(range(n), x.size):
            mask = np.zeros(n, bool)
            mask[list(idx)] = True
            diffs.append(pooled[mask].mean() - pooled[~mask].mean())
        diffs = np.asarray(diffs)
        return float(np.mean(diffs <= obs + 1e-12))
    rng = np.random.default_rng(seed)
    perms = np.argsort(rng.random((n_perm, n)), axis=1)
    d = pooled[perms[:, : x.size]].mean(1) - pooled[perms[:, x.size :]].mean(1)
    return float((1 + np.sum(d <= obs + 1e-12)) / (1 + n_perm))


def separation(
    floor: results.MetricResult, ceiling: Sequence[results.MetricResult], key: str
) -> results.Separation:
    """Ceiling minus floor of ``key`` ("score" or "excess") and their combined spread."""
    c = np.asarray([getattr(m, key) for m in ceiling], np.float64)
    diff = float(c.mean() - getattr(floor, key))
    var = floor.null_std**2 + np.mean([m.null_std**2 for m in ceiling])
    if c.size > 1:
        var += c.var(ddof=1)
    spread = float(np.sqrt(var))
    return results.Separation(diff, spread, diff / spread if spread > 0 else None)


def _fraction(cross: float, floor: float, sep: results.Separation) -> results.Fraction:
    if sep.ceiling_minus_floor > SEPARATION_Z * sep.spread and sep.ceiling_minus_floor > 1e-12:
        return results.Fraction((cross - floor) / sep.ceiling_minus_floor, None, sep)
    return results.Fraction(
        None,
        f"ceiling and floor not separated: difference "
        f"{sep.ceiling_minus_floor:.3g} <= {SEPARATION_Z:g} x spread "
        f"{sep.spread:.3g}",
        sep,
    )


def _mean(values: Sequence[float]) -> float:
    return float(np.mean(values))


def group_summary(
    cross: Sequence[results.ComparisonResult],
    ceil_a: Sequence[results.ComparisonResult],
    ceil_b: Sequence[results.ComparisonResult],
    floor: results.ComparisonResult | None,
    *,
    permutations: int,
    seed: int,
) -> dict[str, results.ReferencePoint]:
    """Per-metric reference points of one cell (see the module docstring)."""
    metrics: list[str] = []
    for comp in cross:
        metrics.extend(m for m in comp.metrics if m not in metrics)
    out = {}
    for metric in metrics:
        xs = [c.metrics[metric] for c in cross if metric in c.metrics]
        ca = [c.metrics[metric] for c in ceil_a if metric in c.metrics]
        cb = [c.metrics[metric] for c in ceil_b if metric in c.metrics]
        fl = floor.metrics[metric] if floor is not None and metric in floor.metrics else None
        within = ca + cb
        # A saturated comparison (too few pairs for the kept dimensions) says nothing: no
        # fraction of the way is computed from it (see `engine.cca`, "informative").
        informative = all(m.informative for m in xs + within + ([fl] if fl else []))
        e = dict(
            cross=_mean([m.score for m in xs]),
            cross_excess=_mean([m.excess for m in xs]),
            cross_distribution=results.Distribution.of([m.excess for m in xs]),
            informative=informative,
        )
        if within:
            e.update(
                ceiling=_mean([m.score for m in within]),
                ceiling_excess=_mean([m.excess for m in within]),
                within_distribution=results.Distribution.of([m.excess for m in within]),
            )
            for side, vals in (("a", ca), ("b", cb)):
                if vals:
                    e[f"ceiling_{side}"] = _mean([m.score for m in vals])
                    e[f"ceiling_{side}_excess"] = _mean([m.excess for m in vals])
        if fl:
            e.update(floor=float(fl.score), floor_excess=float(fl.excess))
        if within and fl:
            for key, field in (("score", "fraction"), ("excess", "fraction_excess")):
                if not informative:
                    e[field] = results.Fraction(
                        None, "uninformative comparison (n/d too small): no fraction"
                    )
                    continue
                cross_v = e["cross" if key == "score" else "cross_excess"]
                floor_v = e["floor" if key == "score" else "floor_excess"]
                e[field] = _fraction(cross_v, floor_v, separation(fl, within, key))
        if len(xs) >= 2 and within:
            x = [m.excess for m in xs]
            w = [m.excess for m in within]
            e["test"] = results.CrossWithinTest(
                mann_whitney_p=mann_whitney_less(x, w),
                permutation_p=permutation_less(x, w, permutations, seed),
                note=TESTS_NOTE,
            )
        out[metric] = results.ReferencePoint(**e)
    return out


def summarise(
    comps: Sequence[results.ComparisonResult], *, permutations: int = 2000, seed: int = 0
) -> list[results.CellResult]:
    """Reference points of every cell and condition, in the order cells first appear."""
    cells: dict[tuple[str, str], list[results.ComparisonResult]] = {}
    for c in comps:
        if c.kind == "cross":
            if c.labels.cell is None:
                raise results.ResultsError(
                    f"comparison {c.name!r}: a cross comparison without a cell label"
                )
            cells.setdefault((c.labels.cell, c.labels.condition), []).append(c)
    out = []
    for (cell, cond), cross in cells.items():
        ha, hb = cross[0].labels.hookpoint_a, cross[0].labels.hookpoint_b
        ceil = {
            s: [
                c
                for c in comps
                if c.kind == "ceiling"
                and c.labels.side == s
                and c.labels.hookpoint == h
                and c.labels.condition == cond
            ]
            for s, h in (("a", ha), ("b", hb))
        }
        floors = [
            c
            for c in comps
            if c.kind == "floor"
            and c.labels.condition == cond
            and c.labels.hookpoint_a == ha
            and (c.labels.hookpoint_b == hb or c.labels.random_init == "a")
        ]
        out.append(
            results.CellResult(
                cell=cell,
                condition=cond,
                hookpoint_a=ha,
                hookpoint_b=hb,
                comparisons=results.CellComparisons(
                    cross=tuple(c.name for c in cross),
                    ceiling_a=tuple(c.name for c in ceil["a"]),
                    ceiling_b=tuple(c.name for c in ceil["b"]),
                    floor=tuple(c.name for c in floors[:1]),
                ),
                metrics=group_summary(
                    cross,
                    ceil["a"],
                    ceil["b"],
                    floors[0] if floors else None,
                    permutations=permutations,
                    seed=seed,
                ),
            )
        )
    return out


def sweep_table(cells: Sequence[results.CellResult]) -> list[dict]:
    """One row per (condition, cell, metric) of a conditions sweep (JSON-ready)."""
    rows = []
    for g in cells:
        for metric, e in g.metrics.items():
            rows.append(
                {
                    "condition": g.condition,
                    "cell": g.cell,
                    "metric": metric,
                    "cross_excess": e.cross_excess,
                    "cross_std": e.cross_distribution.std,
                    "ceiling_excess": e.ceiling_excess,
                    "floor_excess": e.floor_excess,
                    "fraction": None if e.fraction_excess is None else e.fraction_excess.value,
                    "p_cross_below_within": None if e.test is None else e.test.mann_whitney_p,
                }
            )
    return rows


def format_table(cells: Sequence[results.CellResult]) -> str:
    """Terminal table of the reference points of every cell (and condition)."""

    def fmt(v: float | None) -> str:
        return "-" if v is None else f"{v:.3f}"

    lines = [
        f"   {'cell':<34}{'metric':<13}{'floor':>8}{'cross':>8}{'±':>7}{'ceiling':>9}"
        f"{'way':>7}{'p(c<w)':>9}"
    ]
    for g in cells:
        where = g.cell + (f" {g.condition}" if g.condition else "")
        for metric, e in g.metrics.items():
            frac = e.fraction_excess
            if not e.informative:
                way = "n/i"
            elif frac is not None and frac.not_separated:
                way = "n/s"
            else:
                way = "-" if frac is None or frac.value is None else f"{frac.value:.0%}"
            p = None if e.test is None else e.test.mann_whitney_p
            lines.append(
                f"   {where:<34}{metric:<13}{fmt(e.floor_excess):>8}"
                f"{e.cross_excess:>8.3f}{fmt(e.cross_distribution.std):>7}"
                f"{fmt(e.ceiling_excess):>9}{way:>7}"
                f"{('-' if p is None else f'{p:.3g}'):>9}"
            )
    lines.append(
        f"   (excess over the null; 'way' = fraction floor -> ceiling, n/s = ceiling and "
        f"floor not separated by {SEPARATION_Z:g}x their spread, n/i = uninformative: "
        "too few pairs for the kept dimensions; p(c<w) = one-sided Mann-Whitney of "
        "cross < within-side replicates)"
    )
    return "\n".join(lines)
