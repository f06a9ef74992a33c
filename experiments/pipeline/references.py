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
from experiments.pipeline import saes as saes_lib
from models import sae_train

SEPARATION_Z = 2.0
REPLICATE_DATA = ("order", "subset")
SWEEP_NAMES = ("d_sae", "expansion", "k", "l1_coeff", "subset")
TESTS_NOTE = ("one-sided tests of cross < within on the excess over the null; the cross "
              "pairs share SAEs, so they are not independent and p-values are descriptive")


@dataclasses.dataclass(frozen=True)
class RefSettings:
    replicates: int = 1
    replicate_data: str = "order"          # "order": other seed + data order; "subset": folds
    ceiling_sides: tuple[str, ...] = ("a", "b")
    floor: bool = True
    floor_at: str = "b"                    # random-init copy of B at hb, or of A at ha
    permutations: int = 2000               # permutation test of cross < within

    def validate(self) -> RefSettings:
        checks.check_positive_int("--replicates", self.replicates)
        if self.replicate_data not in REPLICATE_DATA:
            raise checks.InputError(f"--replicate_data: unknown {self.replicate_data!r}; "
                                    f"expected one of {REPLICATE_DATA}")
        bad = [s for s in self.ceiling_sides if s not in ("a", "b")]
        if bad:
            raise checks.InputError(f"--ceiling_sides: unknown side(s) {bad}; expected a "
                                    "subset of a,b")
        if self.floor_at not in ("a", "b"):
            raise checks.InputError(f"--floor_at: expected 'a' or 'b', got {self.floor_at!r}")
        if self.replicate_data == "subset" and self.replicates < 2:
            raise checks.InputError("--replicate_data=subset needs --replicates >= 2 (one "
                                    "fold per replicate)")
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
            return dataclasses.replace(recipe, d_sae=int(self.value),
                                       k=min(recipe.k, int(self.value)))
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
        raise checks.InputError(f"--sweep={text!r}: expected NAME=v1,v2,... with NAME one of "
                                f"{SWEEP_NAMES}")
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

    name: str                                         # "a" or "b"
    acts: Mapping[str, np.ndarray]                    # hookpoint -> [rows, d]
    loaded: Mapping[str, tuple[str, object]] | None = None          # hp -> (path, SAE)
    loaded_ceiling: Mapping[str, tuple[str, object]] | None = None  # hp -> (path, SAE)
    description: str = ""


@dataclasses.dataclass
class Spec:
    """One comparison to run (the presets turn it into `compare.run_comparison`)."""

    name: str
    kind: str                 # cross | ceiling | floor | control
    group: str                # cell key (+ condition)
    sae_a: saes_lib.SideSAE
    sae_b: saes_lib.SideSAE
    acts_a: np.ndarray
    acts_b: np.ndarray
    label: str
    labels: dict = dataclasses.field(default_factory=dict)
    truth: dict | None = None


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


def cell_key(ha: str, hb: str) -> str:
    return f"A.{ha}~B.{hb}"


class Planner:
    """Obtains each SAE of the run once (by role) and emits the comparisons of each cell."""

    def __init__(self, settings: RefSettings, training: Training, *, multi_cell: bool):
        self.settings = settings.validate()
        self.training = training
        self.multi_cell = multi_cell
        self.saes: dict[str, saes_lib.SideSAE] = {}
        self._specs: dict[str, Spec] = {}

    # -- SAEs ---------------------------------------------------------------------------------
    def _obtain(self, role: saes_lib.Role, acts, recipe=None, loaded=None, subset=None,
                fold=None, note="") -> saes_lib.SideSAE:
        if role.key not in self.saes:
            t = self.training
            path, sae = loaded if loaded else (None, None)
            self.saes[role.key] = saes_lib.obtain(
                role, acts, user_seed=t.user_seed, recipe=recipe, loaded=path,
                loaded_sae=sae, steps=t.steps, batch_size=t.batch_size, root=t.root,
                mesh=t.mesh, progress=t.progress,
                metadata=t.metadata(role.side, role.hookpoint), subset=subset, fold=fold,
                note=note)
        return self.saes[role.key]

    def _recipe(self, side: str, hp: str, d_in: int, cond: Condition):
        return cond.apply(self.training.recipe(side, hp, d_in), d_in)

    def replicates(self, side: SideSpec, hp: str, cond: Condition) -> list[saes_lib.SideSAE]:
        """Side ``side``'s N replicate SAEs at ``hp`` under ``cond``."""
        acts = side.acts[hp]
        n = self.settings.replicates
        if side.loaded and hp in side.loaded:
            if n > 1 or cond.name:
                raise checks.InputError(f"side {side.name.upper()} uses loaded SAEs: "
                                        "--replicates > 1 and --sweep need SAEs trained here")
            return [self._obtain(saes_lib.Role(side.name, hp, "main", 0, cond.label), acts,
                                 loaded=side.loaded[hp])]
        recipe = self._recipe(side.name, hp, acts.shape[1], cond)
        out = []
        for r in range(n):
            fold = (r, n) if self.settings.replicate_data == "subset" else None
            out.append(self._obtain(saes_lib.Role(side.name, hp, "main", r, cond.label), acts,
                                    recipe, subset=cond.subset, fold=fold))
        return out

    def single(self, side: SideSpec, hp: str, cond: Condition) -> saes_lib.SideSAE:
        """One SAE of ``side`` at ``hp`` (e.g. the toy control), trained with the run's recipe."""
        acts = side.acts[hp]
        return self._obtain(saes_lib.Role(side.name, hp, "main", 0, cond.label), acts,
                            self._recipe(side.name, hp, acts.shape[1], cond),
                            subset=cond.subset)

    def ceiling_extra(self, side: SideSpec, hp: str, cond: Condition,
                      mains: Sequence[saes_lib.SideSAE]) -> list[saes_lib.SideSAE]:
        """The second SAE of a seed-vs-seed ceiling when there is one replicate only."""
        if len(mains) >= 2 or side.name not in self.settings.ceiling_sides:
            return []
        role = saes_lib.Role(side.name, hp, "ceiling", 0, cond.label)
        acts = side.acts[hp]
        if side.loaded_ceiling and hp in side.loaded_ceiling:
            return [self._obtain(role, acts, loaded=side.loaded_ceiling[hp],
                                 note="second published seed")]
        main = mains[0]
        if main.recipe is None:      # loaded: the same architecture, width and sparsity
            recipe = saes_lib.matching_config(main.sae, self.training.recipe(
                side.name, hp, acts.shape[1]), acts[:4096])
            note = ("trained here to match a loaded SAE (same architecture, width, sparsity); "
                    "its training budget is this run's, so the ceiling is a lower bound on "
                    "the published SAE's seed-to-seed agreement")
        else:
            recipe = sae_train.TrainConfig(**main.recipe["config"])
            note = ""
        return [self._obtain(role, acts, recipe, subset=cond.subset, note=note)]

    def floor(self, random_side: str, hp: str, acts: np.ndarray, like: saes_lib.SideSAE,
              cond: Condition) -> saes_lib.SideSAE:
        """SAE of a random-init model, same architecture and width as the SAE ``like``."""
        if like.recipe is not None:
            recipe = sae_train.TrainConfig(**like.recipe["config"])
        else:
            recipe = saes_lib.matching_config(like.sae, self.training.recipe(
                random_side, hp, acts.shape[1]), acts[:4096])
        return self._obtain(saes_lib.Role(random_side, hp, "floor", 0, cond.label), acts,
                            recipe, subset=cond.subset)

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

    def _add(self, spec: Spec) -> None:
        self._specs.setdefault(spec.name, spec)

    def cell(self, side_a: SideSpec, ha: str, side_b: SideSpec, hb: str,
             cond: Condition = Condition(),
             floor_acts: Callable[[str, str], np.ndarray] | None = None) -> str:
        """Adds the comparisons of cell (ha, hb) under ``cond``; returns the cell's group."""
        group = cell_key(ha, hb) + (f"@{cond.label}" if cond.label else "")
        a = self.replicates(side_a, ha, cond)
        b = self.replicates(side_b, hb, cond)
        common = {"hookpoint_a": ha, "hookpoint_b": hb, "cell": cell_key(ha, hb),
                  "condition": cond.label}
        for i, sa in enumerate(a):
            for j, sb in enumerate(b):
                self._add(Spec(self._name("cross", cell_key(ha, hb), (i, j), cond), "cross",
                               group, sa, sb, side_a.acts[ha], side_b.acts[hb],
                               f"A {ha} vs B {hb}" + (f", replicates {i},{j}"
                                                       if len(a) * len(b) > 1 else ""),
                               {**common, "replicates": [i, j]}))
        for side, hp, mains in ((side_a, ha, a), (side_b, hb, b)):
            pool = list(mains) + self.ceiling_extra(side, hp, cond, mains)
            if side.name not in self.settings.ceiling_sides:
                continue
            for i, j in itertools.combinations(range(len(pool)), 2):
                self._add(Spec(
                    self._name(f"ceiling_{side.name}", f"{side.name.upper()}.{hp}", (i, j),
                               cond), "ceiling", f"{side.name}:{hp}@{cond.label}",
                    pool[i], pool[j], side.acts[hp], side.acts[hp],
                    f"{side.name.upper()} {hp} vs {side.name.upper()} {hp}, other SAE seed and "
                    "data order", {"side": side.name, "hookpoint": hp,
                                   "condition": cond.label, "replicates": [i, j]}))
        if self.settings.floor and floor_acts is not None:
            at_b = self.settings.floor_at == "b"
            hp, like = (hb, b[0]) if at_b else (ha, a[0])
            rside = ("b" if at_b else "a") + "~random"
            xr = floor_acts("b" if at_b else "a", hp)
            fl = self.floor(rside, hp, xr, like, cond)
            where = cell_key(ha, hb) if at_b else f"A.{ha}"
            self._add(Spec(self._name("floor", where, None, cond), "floor",
                           f"floor:{where}@{cond.label}", a[0], fl, side_a.acts[ha], xr,
                           f"A {ha} vs random-init {'B' if at_b else 'A'} {hp}",
                           {**common, "random_init": "b" if at_b else "a",
                            "hookpoint_random": hp}))
        return group

    def specs(self) -> list[Spec]:
        saes_lib.check_distinct_seeds(list(self.saes.values()))
        return list(self._specs.values())

    def sae_records(self) -> list[dict]:
        return [s.record() for s in self.saes.values()]


def run_specs(specs: Sequence[Spec], run, cfg, cache, token_text, *, chunk_size: int,
              progress: bool, pages_for: Callable[[Spec], object] | None = None,
              pool_for: Callable[[str], Callable] | None = None, **extra) -> list[dict]:
    """Runs every planned comparison through `compare.run_comparison` (JSON-ready results,
    each labelled with its kind, cell, condition, SAE roles and seeds).

    ``pages_for(spec)``: the `feature_pages.PageSource` of that comparison (which unembedding
    each side's feature pages use); ``pool_for(role_side)``: maps a model's own-token rows to
    the comparison's rows (aligned units when the two tokenizers differ; SAEs are trained on
    own tokens); ``chunk_size``: rows per streamed chunk; ``progress``: progress bars;
    ``extra``: further `run_comparison` keywords."""
    from engine import fingerprint as fp_lib
    from engine import streaming
    from experiments.pipeline import compare

    comps = []
    digests: dict[int, tuple] = {}   # id -> (array kept alive, digest)
    for spec in specs:
        xa, xb = spec.acts_a, spec.acts_b
        if pool_for is not None:
            xa = pool_for(spec.sae_a.role.side)(xa)
            xb = pool_for(spec.sae_b.role.side)(xb)
        rows = np.arange(xa.shape[0], dtype=np.int32)
        # Each array is hashed once however many comparisons read it (a grid reuses sides).
        for x in (xa, xb):
            if id(x) not in digests:
                digests[id(x)] = (x, fp_lib.digest(x))
        data_key = fp_lib.digest(digests[id(xa)][1], digests[id(xb)][1])
        factory = (lambda xa=xa, xb=xb, r=rows: streaming.ChunkStream(
            (r, xa, xb), chunk_size, name="tokens"))
        comps.append(compare.run_comparison(
            spec.name, factory, spec.sae_a.sae, spec.sae_b.sae, token_text, run.mesh, cfg,
            cache, ckpt_root=run.path("checkpoints"), truth=spec.truth,
            progress=progress,
            labels={"kind": spec.kind, "label": spec.label, **spec.labels,
                    "saes": [spec.sae_a.role.key, spec.sae_b.role.key],
                    "seeds": [spec.sae_a.seed, spec.sae_b.seed]},
            data_key=data_key, **({"pages": pages_for(spec)} if pages_for else {}), **extra))
    return comps


# -- summaries -------------------------------------------------------------------------------

def _metric_values(comp: dict) -> dict:
    return comp.get("metrics") or {}


def _dist(values: Sequence[float]) -> dict:
    v = np.asarray(values, np.float64)
    return {"n": int(v.size), "mean": float(v.mean()) if v.size else None,
            "std": float(v.std(ddof=1)) if v.size > 1 else 0.0 if v.size else None,
            "values": v.tolist()}


def mann_whitney_less(x: Sequence[float], y: Sequence[float]) -> float | None:
    """One-sided Mann-Whitney U p-value of ``x`` < ``y`` (exact for small samples)."""
    if len(x) < 1 or len(y) < 1 or len(x) + len(y) < 3:
        return None
    from scipy import stats
    return float(stats.mannwhitneyu(x, y, alternative="less").pvalue)


def permutation_less(x: Sequence[float], y: Sequence[float], n_perm: int, seed: int
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
    d = pooled[perms[:, :x.size]].mean(1) - pooled[perms[:, x.size:]].mean(1)
    return float((1 + np.sum(d <= obs + 1e-12)) / (1 + n_perm))


def separation(floor: dict, ceiling: list[dict], key: str) -> tuple[float, float]:
    """(ceiling - floor, combined spread) of ``key`` ("score" or "excess")."""
    c = np.asarray([m[key] for m in ceiling], np.float64)
    diff = float(c.mean() - floor[key])
    var = floor["null_std"] ** 2 + np.mean([m["null_std"] ** 2 for m in ceiling])
    if c.size > 1:
        var += c.var(ddof=1)
    return diff, float(np.sqrt(var))


def group_summary(cross: list[dict], ceil_a: list[dict], ceil_b: list[dict],
                  floor: dict | None, *, permutations: int, seed: int) -> dict:
    """Per-metric reference points of one cell (see the module docstring)."""
    metrics = []
    for comp in cross:
        metrics.extend(m for m in _metric_values(comp) if m not in metrics)
    out = {}
    for metric in metrics:
        xs = [_metric_values(c)[metric] for c in cross if metric in _metric_values(c)]
        ca = [_metric_values(c)[metric] for c in ceil_a if metric in _metric_values(c)]
        cb = [_metric_values(c)[metric] for c in ceil_b if metric in _metric_values(c)]
        fl = _metric_values(floor or {}).get(metric)
        within = ca + cb
        e = {"cross": float(np.mean([m["score"] for m in xs])),
             "cross_excess": float(np.mean([m["excess"] for m in xs])),
             "cross_distribution": _dist([m["excess"] for m in xs])}
        if within:
            e["ceiling"] = float(np.mean([m["score"] for m in within]))
            e["ceiling_excess"] = float(np.mean([m["excess"] for m in within]))
            e["within_distribution"] = _dist([m["excess"] for m in within])
            for side, vals in (("a", ca), ("b", cb)):
                if vals:
                    e[f"ceiling_{side}"] = float(np.mean([m["score"] for m in vals]))
                    e[f"ceiling_{side}_excess"] = float(np.mean([m["excess"] for m in vals]))
        if fl:
            e["floor"] = float(fl["score"])
            e["floor_excess"] = float(fl["excess"])
        # A saturated comparison (too few pairs for the kept dimensions) says nothing: no
        # fraction of the way is computed from it (see `engine.cca`, "informative").
        e["informative"] = all(m.get("informative", True) for m in xs + within + [fl or {}])
        for key, suffix in (("score", ""), ("excess", "_excess")):
            name = "fraction_floor_to_ceiling" + suffix
            if not (within and fl):
                continue
            if not e["informative"]:
                e[name] = None
                e[f"{name}_note"] = "uninformative comparison (n/d too small): no fraction"
                continue
            diff, spread = separation(fl, within, key)
            e[f"separation{suffix}"] = {"ceiling_minus_floor": diff, "spread": spread,
                                        "z": diff / spread if spread > 0 else None}
            if diff > SEPARATION_Z * spread and diff > 1e-12:
                e[name] = (e["cross" + suffix] - e["floor" + suffix]) / diff
            else:
                e[name] = None
                e[f"{name}_note"] = (f"ceiling and floor not separated: difference {diff:.3g} "
                                     f"<= {SEPARATION_Z:g} x spread {spread:.3g}")
        if len(xs) >= 2 and within:
            x = [m["excess"] for m in xs]
            w = [m["excess"] for m in within]
            e["test_cross_below_within"] = {
                "mann_whitney_p": mann_whitney_less(x, w),
                "permutation_p": permutation_less(x, w, permutations, seed),
                "note": TESTS_NOTE}
        out[metric] = e
    return out


def summarise(comps: Sequence[dict], *, permutations: int = 2000, seed: int = 0) -> list[dict]:
    """Reference points of every cell and condition, in the order cells first appear."""
    cells: dict[tuple[str, str], dict] = {}
    for c in comps:
        if c.get("kind") == "cross":
            key = (c["cell"], c.get("condition", ""))
            cells.setdefault(key, {"cell": c["cell"], "condition": c.get("condition", ""),
                                   "hookpoint_a": c.get("hookpoint_a"),
                                   "hookpoint_b": c.get("hookpoint_b"), "cross": []})
            cells[key]["cross"].append(c)
    out = []
    for (cell, cond), g in cells.items():
        ha, hb = g["hookpoint_a"], g["hookpoint_b"]
        ceil = {s: [c for c in comps if c.get("kind") == "ceiling" and c.get("side") == s
                    and c.get("hookpoint") == h and c.get("condition", "") == cond]
                for s, h in (("a", ha), ("b", hb))}
        floors = [c for c in comps if c.get("kind") == "floor" and c.get("condition", "") ==
                  cond and c.get("hookpoint_a") == ha and
                  (c.get("hookpoint_b") == hb or c.get("random_init") == "a")]
        out.append({"cell": cell, "condition": cond, "hookpoint_a": ha, "hookpoint_b": hb,
                    "comparisons": {"cross": [c["name"] for c in g["cross"]],
                                    "ceiling_a": [c["name"] for c in ceil["a"]],
                                    "ceiling_b": [c["name"] for c in ceil["b"]],
                                    "floor": [c["name"] for c in floors[:1]]},
                    "metrics": group_summary(g["cross"], ceil["a"], ceil["b"],
                                             floors[0] if floors else None,
                                             permutations=permutations, seed=seed)})
    return out


def sweep_table(cells: Sequence[dict]) -> list[dict]:
    """One row per (condition, cell, metric) of a conditions sweep."""
    rows = []
    for g in cells:
        for metric, e in g["metrics"].items():
            test = e.get("test_cross_below_within", {})
            rows.append({"condition": g["condition"], "cell": g["cell"], "metric": metric,
                         "cross_excess": e["cross_excess"],
                         "cross_std": e["cross_distribution"]["std"],
                         "ceiling_excess": e.get("ceiling_excess"),
                         "floor_excess": e.get("floor_excess"),
                         "fraction": e.get("fraction_floor_to_ceiling_excess"),
                         "p_cross_below_within": test.get("mann_whitney_p")})
    return rows


def format_table(cells: Sequence[dict]) -> str:
    """Terminal table of the reference points of every cell (and condition)."""
    lines = [f"   {'cell':<34}{'metric':<13}{'floor':>8}{'cross':>8}{'±':>7}{'ceiling':>9}"
             f"{'way':>7}{'p(c<w)':>9}"]
    for g in cells:
        where = g["cell"] + (f" {g['condition']}" if g["condition"] else "")
        for metric, e in g["metrics"].items():
            fmt = lambda v: "-" if v is None else f"{v:.3f}"  # noqa: E731
            frac = e.get("fraction_floor_to_ceiling_excess")
            if not e.get("informative", True):
                way = "n/i"
            elif frac is None and "fraction_floor_to_ceiling_excess_note" in e:
                way = "n/s"
            else:
                way = "-" if frac is None else f"{frac:.0%}"
            p = e.get("test_cross_below_within", {}).get("mann_whitney_p")
            lines.append(f"   {where:<34}{metric:<13}{fmt(e.get('floor_excess')):>8}"
                         f"{e['cross_excess']:>8.3f}{fmt(e['cross_distribution']['std']):>7}"
                         f"{fmt(e.get('ceiling_excess')):>9}{way:>7}"
                         f"{('-' if p is None else f'{p:.3g}'):>9}")
    lines.append(f"   (excess over the null; 'way' = fraction floor -> ceiling, n/s = ceiling and "
                 f"floor not separated by {SEPARATION_Z:g}x their spread, n/i = uninformative: "
                 "too few pairs for the kept dimensions; p(c<w) = one-sided Mann-Whitney of "
                 "cross < within-side replicates)")
    return "\n".join(lines)
