"""Shared plumbing for absl entry points: settings checks, run fingerprint, workdir, logging.

Every experiment is ``python -m experiments.<name> --workdir=DIR [flags]`` and writes
``DIR/config.json``, ``DIR/fingerprint.json``, ``DIR/metrics.jsonl``, ``DIR/results.json``,
``DIR/plots/*.png`` and ``DIR/checkpoints/``.

What happens when an entry point starts (`entry`), in order, before any model is loaded or
data generated:

1. flags are parsed; a malformed or unknown flag is one line on stderr, exit 2;
2. every setting is checked against the experiment's declarative `Rule`s (ranges, choices,
   existing paths, cross-flag constraints such as k <= d_sae) and the workdir (not a file,
   writable); all problems are reported in one line on stderr, exit 2;
3. the run's fingerprint is computed: every flag value except `EXCLUDED` (settings that do
   not change results), the identity of the data files the experiment names (full-content
   hashes of text files, SAE and model directories, activation-cache metadata) and the code
   version (package version and a hash of the ``engine/``, ``models/``, ``experiments/``
   sources);
4. against ``DIR/fingerprint.json``: a different fingerprint is refused in one line naming
   the differing keys (use a new workdir, or ``--overwrite`` to clear the old run); the same
   fingerprint with a finished run prints ``nothing to do: results from <time>`` and exits
   0; otherwise the run resumes (killed runs continue from their checkpoints).

User errors raised later (`USER_ERRORS` and the experiment's own) are one line on stderr,
exit 2, no traceback.

Usage in an experiment module::

    from experiments import common
    FLAGS = flags.FLAGS
    common.define_common_flags()
    RULES = (common.Num(("steps",), lo=1), common.Choice(("metrics",), METRICS))

    def body(run, flags_):
        ...
        run.write_results({...})

    if __name__ == "__main__":
        common.entry("myexp", body, RULES, data=lambda f: {"text": f.text})
"""

from __future__ import annotations

import dataclasses
import json
import logging as pylogging
import math
import os
import shutil
import sys
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

from absl import app, flags, logging

from engine import fingerprint as fp_lib
from engine import metrics_io

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Settings that do not change a run's results, left out of its fingerprint (a rerun that
# differs only in these resumes):
EXCLUDED = {
    "workdir": "the run directory itself",
    "overwrite": "what to do with an old run, not how to compute",
    "dry_run": "checks only",
    "progress": "progress bars",
    "log_every": "metrics.jsonl frequency (the train loop's randomness is fold_in(step))",
    "checkpoint_every": "checkpoint frequency (resume is exact)",
    "num_cpu_devices": "device count (sharded primitives are device-independent)",
    "mesh_data": "mesh shape (device-independent results)",
    "mesh_feature": "mesh shape (device-independent results)",
    "distributed": "multi-host start-up",
}


class ConfigError(ValueError):
    """A setting is wrong (one line naming the flag and what was expected)."""


class NothingToDo(Exception):
    """The workdir already holds this run's finished results."""


def define_common_flags() -> None:
    """Flags every experiment shares (defined once per process)."""
    if "workdir" in flags.FLAGS:
        return
    flags.DEFINE_string("workdir", None, "Run directory (created; rerun to resume).")
    flags.DEFINE_bool("overwrite", False, "Clear a workdir holding a run with other settings "
                      "(or an older run without a fingerprint) and start over.")
    flags.DEFINE_integer("num_cpu_devices", 0,
                         "Simulate this many CPU devices (0: leave JAX's default). Must be set "
                         "before JAX starts, so it is applied in common.start().")
    flags.DEFINE_integer("mesh_data", -1, "Size of the mesh data axis (-1: all devices).")
    flags.DEFINE_integer("mesh_feature", 1, "Size of the mesh feature axis.")
    flags.DEFINE_bool("distributed", False, "Call jax.distributed.initialize() (multi-host).")
    flags.DEFINE_string("coordinator_address", None, "--distributed: host:port of process 0 "
                        "(default: auto-detected on SLURM / TPU pods / Open MPI).")
    flags.DEFINE_integer("num_processes", None, "--distributed: number of processes.")
    flags.DEFINE_integer("process_id", None, "--distributed: this process's index.")
    flags.DEFINE_string("cpu_collectives", "gloo", "--distributed on CPU hosts: collectives "
                        "implementation across processes (gloo | mpi | none).")
    flags.DEFINE_bool("progress", True, "Show progress bars.")
    flags.DEFINE_bool("dry_run", False, "Check the settings and the workdir, say what a run "
                      "would do (new / resume / refused / nothing to do), and exit.")


# ---------------------------------------------------------------------------------------------
# Declarative settings checks. A rule sees the flag values as a dict and returns the problems
# it finds (one short phrase each, naming the flag); `validate` joins them into one line.
# ---------------------------------------------------------------------------------------------


def _items(value) -> list:
    return list(value) if isinstance(value, (list, tuple)) else [value]


@dataclasses.dataclass(frozen=True)
class Num:
    """Each value of ``names`` (scalars or list flags of numbers) lies in [lo, hi].

    ``lo_open`` / ``hi_open`` exclude the bound; ``allow`` lists sentinel values accepted
    outside the range (e.g. -1 for "off"); ``integer`` requires whole numbers.
    """

    names: tuple[str, ...]
    lo: float | None = None
    hi: float | None = None
    lo_open: bool = False
    hi_open: bool = False
    allow: tuple = ()
    integer: bool = False
    what: str = ""

    def expected(self) -> str:
        parts = []
        if self.lo is not None:
            parts.append(f"{'>' if self.lo_open else '>='} {self.lo:g}")
        if self.hi is not None:
            parts.append(f"{'<' if self.hi_open else '<='} {self.hi:g}")
        s = ("an integer " if self.integer else "a number ") + " and ".join(parts)
        if self.allow:
            s += " (or " + ", ".join(f"{a:g}" for a in self.allow) + ")"
        return s + (f" ({self.what})" if self.what else "")

    def problems(self, values: Mapping[str, Any]) -> list[str]:
        out = []
        for name in self.names:
            if values.get(name) is None:
                continue
            for raw in _items(values[name]):
                try:
                    v = float(raw)
                except (TypeError, ValueError):
                    out.append(f"--{name}: expected {self.expected()}, got {raw!r}")
                    continue
                if v in self.allow:
                    continue
                bad = (math.isnan(v) or (self.integer and not float(v).is_integer())
                       or (self.lo is not None and (v <= self.lo if self.lo_open else v < self.lo))
                       or (self.hi is not None and (v >= self.hi if self.hi_open else v > self.hi)))
                if bad:
                    out.append(f"--{name}: expected {self.expected()}, got {raw!r}")
        return out


@dataclasses.dataclass(frozen=True)
class Choice:
    """Each value of ``names`` (scalars, lists, or comma-separated strings) is one of
    ``choices`` (a tuple, or a zero-argument callable returning one: evaluated lazily so that
    registries living in JAX modules are imported only after parsing)."""

    names: tuple[str, ...]
    choices: tuple | Callable[[], Sequence[str]]
    split_commas: bool = False
    nonempty: bool = False

    def problems(self, values: Mapping[str, Any]) -> list[str]:
        choices = tuple(self.choices() if callable(self.choices) else self.choices)
        out = []
        for name in self.names:
            value = values.get(name)
            if value is None:
                continue
            items = _items(value)
            if self.split_commas and isinstance(value, str):
                items = [s.strip() for s in value.split(",") if s.strip()]
            if self.nonempty and not items:
                out.append(f"--{name}: expected at least one of {', '.join(map(str, choices))}")
            bad = [v for v in items if v not in choices]
            if bad:
                out.append(f"--{name}: unknown {', '.join(map(repr, bad))}; expected one of "
                           f"{', '.join(map(str, choices))}")
        return out


@dataclasses.dataclass(frozen=True)
class Path:
    """Each value of ``names`` names an existing file (``kind="file"``), directory
    (``"dir"``) or either (``"any"``), unless it is one of ``special`` or starts with one of
    ``prefixes`` (e.g. "sample", "tiny:", "hf:"). Unset (None / empty) values are skipped."""

    names: tuple[str, ...]
    kind: str = "any"
    special: tuple[str, ...] = ()
    prefixes: tuple[str, ...] = ()
    what: str = ""

    def problems(self, values: Mapping[str, Any]) -> list[str]:
        out = []
        for name in self.names:
            for v in _items(values.get(name)):
                if not v or v in self.special or str(v).startswith(self.prefixes or ("\0",)):
                    continue
                v = str(v)
                ok = {"file": os.path.isfile, "dir": os.path.isdir,
                      "any": os.path.exists}[self.kind](v)
                if not ok:
                    kind = {"file": "file", "dir": "directory", "any": "file or directory"}
                    reason = "no such " + kind[self.kind]
                    if os.path.exists(v):
                        reason = f"not a {kind[self.kind]}"
                    out.append(f"--{name}={v}: {reason}" + (f" ({self.what})" if self.what
                                                              else ""))
        return out


@dataclasses.dataclass(frozen=True)
class Check:
    """A cross-flag constraint: ``ok(values)`` is True when fine; ``message`` is formatted
    with the flag values (``{k}``, ``{d_sae}``...) when it is not."""

    names: tuple[str, ...]
    ok: Callable[[Mapping[str, Any]], bool]
    message: str

    def problems(self, values: Mapping[str, Any]) -> list[str]:
        try:
            fine = self.ok(values)
        except (TypeError, ValueError):
            return []   # a malformed value is reported by its own Num / Choice rule
        return [] if fine else [self.message.format(**values)]


@dataclasses.dataclass(frozen=True)
class Probe:
    """A check done by a function of the project that raises a one-line error on bad input
    (``fn(values)``, e.g. resolving concept-group names): the error's text is the problem."""

    names: tuple[str, ...]
    fn: Callable[[Mapping[str, Any]], Any]
    after_others = True   # runs only when the simple rules found nothing (no duplicates)

    def problems(self, values: Mapping[str, Any]) -> list[str]:
        try:
            self.fn(values)
        except (ValueError, OSError, KeyError) as e:
            return [" ".join(str(e).split())]
        return []


@dataclasses.dataclass(frozen=True)
class Hookpoints:
    """Each value of ``names`` is a hookpoint name `models.lm.parse_hookpoint` accepts (the
    layer is checked against the model's depth once it is loaded)."""

    names: tuple[str, ...]

    def problems(self, values: Mapping[str, Any]) -> list[str]:
        from engine import checks
        from models import lm
        out = []
        for name in self.names:
            for hp in _items(values.get(name)):
                if not hp:
                    continue
                try:
                    lm.parse_hookpoint(hp, n_layers=1 << 30)   # any depth for now
                except checks.InputError as e:
                    out.append(f"--{name}: {e}")
        return out


def workdir_problems(workdir: str | None) -> list[str]:
    """The workdir is given, is not a file, and is (or can be created) writable."""
    if not workdir:
        return ["--workdir is required (the run directory; rerun it to resume)"]
    path = os.path.abspath(workdir)
    if os.path.exists(path) and not os.path.isdir(path):
        return [f"--workdir={workdir}: is a file, expected a directory"]
    probe = path
    while not os.path.exists(probe):
        probe = os.path.dirname(probe)
    if not os.path.isdir(probe):
        return [f"--workdir={workdir}: {probe} is a file, expected a directory"]
    if not os.access(probe, os.W_OK | os.X_OK):
        return [f"--workdir={workdir}: {probe} is not writable"]
    return []


def validate(values: Mapping[str, Any], rules: Iterable) -> None:
    """Raises `ConfigError` with every problem the rules find, in one line."""
    problems = workdir_problems(values.get("workdir"))
    rules = list(rules)
    for rule in rules:
        if not getattr(rule, "after_others", False):
            problems.extend(rule.problems(values))
    for rule in rules:
        if getattr(rule, "after_others", False) and not problems:
            problems.extend(rule.problems(values))
    if problems:
        raise ConfigError("; ".join(problems))


COMMON_RULES = (
    Num(("num_cpu_devices",), lo=0, integer=True),
    Num(("mesh_data",), lo=1, allow=(-1,), integer=True, what="-1: all devices"),
    Num(("mesh_feature",), lo=1, integer=True),
)


# ---------------------------------------------------------------------------------------------
# Run fingerprint.
# ---------------------------------------------------------------------------------------------


def code_version() -> dict:
    """Package version and a hash of the project's sources (what computed the results)."""
    try:
        from importlib import metadata
        version = metadata.version("sae-universality")
    except Exception:   # not installed (run from a checkout)
        version = "checkout"
    return {"version": version, "source": fp_lib.source_hash(
        [os.path.join(ROOT, d) for d in ("engine", "models", "experiments")],
        suffixes=(".py", ".txt"))}   # .txt: the shipped text sample


def make_fingerprint(settings: Mapping[str, Any], data: Mapping[str, str | None] | None = None,
                     exclude: Iterable[str] = (), previous: Mapping[str, Any] | None = None
                     ) -> dict:
    """The fingerprint dict: ``{"settings", "data", "code"}``.

    Args:
      settings: flag values (and any other values the results depend on).
      data: name -> path of a data file or directory the results depend on (None: unused).
      exclude: more keys to leave out besides `EXCLUDED`.
      previous: an earlier fingerprint; its per-file stat caches avoid re-hashing files whose
        size and modification time are unchanged.
    """
    skip = set(EXCLUDED) | set(exclude)
    prev_data = (previous or {}).get("data", {})
    ident = {}
    for name, path in (data or {}).items():
        if path:
            ident[name] = fp_lib.path_identity(
                str(path), stat_cache=(prev_data.get(name) or {}).get("stat"))
    return {"settings": metrics_io.to_jsonable({k: v for k, v in settings.items()
                                                if k not in skip}),
            "data": ident, "code": code_version()}


def _comparable(fp: Mapping[str, Any]) -> dict:
    return {"settings": fp.get("settings", {}), "code": fp.get("code", {}),
            "data": {k: fp_lib.comparable(v) for k, v in fp.get("data", {}).items()}}


FINGERPRINT = "fingerprint.json"


def check_workdir(workdir: str, fingerprint: dict, overwrite: bool) -> str:
    """Compares the workdir's recorded fingerprint with this run's; returns "new",
    "resume" or "overwritten".

    Raises:
      ConfigError: the workdir holds a run with another fingerprint (or an older run without
        one) and ``overwrite`` is False.
      NothingToDo: the same run already finished (its results are there).
    """
    path = os.path.join(workdir, FINGERPRINT)
    old = None
    if os.path.exists(path):
        try:
            with open(path, encoding="utf-8") as f:
                old = json.load(f)
        except (OSError, ValueError):
            old = {"settings": {"<unreadable fingerprint.json>": True}}
    elif os.path.exists(os.path.join(workdir, "config.json")):
        old = {"settings": {"<no fingerprint: run made by an older version>": True}}
    if old is None:
        return "new"
    changes = fp_lib.diff(_comparable(old), _comparable(fingerprint))
    if changes:
        if not overwrite:
            what = ("made by other code (the sources changed since)" if
                    all(k.startswith("code.") for k, _, _ in changes) else "with other settings")
            raise ConfigError(
                f"--workdir={workdir} holds a run {what}: "
                f"{fp_lib.describe_diff(changes, 'recorded', 'now')}; use a new --workdir, "
                "or --overwrite to clear the old run")
        clear_workdir(workdir)
        return "overwritten"
    if old.get("finished") and os.path.exists(os.path.join(workdir, "results.json")):
        if overwrite:
            clear_workdir(workdir)
            return "overwritten"
        raise NothingToDo(f"nothing to do: results from {old['finished']} in "
                          f"{os.path.join(workdir, 'results.json')}")
    return "resume"


def clear_workdir(workdir: str) -> None:
    """Removes everything in a run directory (outputs, checkpoints, caches under it)."""
    for name in os.listdir(workdir):
        p = os.path.join(workdir, name)
        if os.path.isdir(p) and not os.path.islink(p):
            shutil.rmtree(p)
        else:
            os.remove(p)


# ---------------------------------------------------------------------------------------------
# The run.
# ---------------------------------------------------------------------------------------------


def define_bench_flags() -> None:
    """Flags every benchmark shares (defined once, so all bench modules import together).

    ``--threads`` is the thread budget given to both sides (XLA, BLAS, torch) and recorded in
    the JSON; ``--repeats`` the interleaved timed repetitions per side; ``--out`` the JSON path
    (default ``runs/bench/<bench name>.json``, see `bench_out`); ``--only`` the sections to run
    (empty: all of the benchmark's sections).
    """
    if "threads" in flags.FLAGS:
        return
    flags.DEFINE_integer("threads", 2, "Thread budget for XLA, BLAS and torch (both sides; "
                         "recorded in the JSON).")
    flags.DEFINE_integer("repeats", 3, "Timed repetitions per side (interleaved).")
    flags.DEFINE_string("out", None, "JSON output path (default runs/bench/<bench>.json).")
    flags.DEFINE_list("only", [], "Sections to run (default: all of this benchmark's).")


def bench_out(name: str) -> str:
    """``--out`` or the default ``runs/bench/<name>.json``."""
    return flags.FLAGS.out or os.path.join("runs", "bench", f"{name}.json")


def bench_sections(known) -> list[str]:
    """``--only`` checked against the benchmark's ``known`` sections (empty: all of them)."""
    only = list(flags.FLAGS.only) or list(known)
    unknown = [s for s in only if s not in known]
    if unknown:
        raise SystemExit(f"--only: unknown section(s) {unknown}; expected some of {list(known)}")
    return only


@dataclasses.dataclass
class Run:
    """Paths of one run and helpers to write its outputs."""

    workdir: str
    mesh: Any
    stages_total: int = 0
    _stage: int = 0

    @property
    def plots_dir(self) -> str:
        path = os.path.join(self.workdir, "plots")
        if metrics_io._primary():          # several processes: process 0 alone writes
            os.makedirs(path, exist_ok=True)
        return path

    @property
    def checkpoint_dir(self) -> str:
        return os.path.join(self.workdir, "checkpoints")

    @property
    def metrics_path(self) -> str:
        return os.path.join(self.workdir, "metrics.jsonl")

    def path(self, *parts: str) -> str:
        return os.path.join(self.workdir, *parts)

    def write_results(self, results: dict) -> str:
        path = self.path("results.json")
        metrics_io.write_json(path, results)
        logging.info("wrote %s", path)
        return path

    def stage(self, label: str) -> None:
        """Prints ``[k/N] label ...`` on stdout (and logs it): where a long run is."""
        self._stage += 1
        self.stages_total = max(self.stages_total, self._stage)
        line = f"[{self._stage}/{self.stages_total}] {label} ..."
        print(line, flush=True)
        logging.info("%s", line)

    def plan_stages(self, remaining: int) -> None:
        """Sets the stage total once the run knows its plan: ``remaining`` more stages."""
        self.stages_total = self._stage + int(remaining)

    def finish(self) -> None:
        """Marks the run finished in its fingerprint (a rerun then has nothing to do)."""
        path = self.path(FINGERPRINT)
        if not os.path.exists(path):
            return
        with open(path, encoding="utf-8") as f:
            rec = json.load(f)
        rec["finished"] = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
        metrics_io.write_json(path, rec)


def configure_jax(num_cpu_devices: int = 0) -> None:
    """Applies device-count settings; must run before JAX initialises its backends.

    Also turns on JAX's persistent compilation cache (`engine.compile_cache`: each program
    compiled once per shape, reused by later comparisons, grid cells and runs;
    ``SAE_JAX_CACHE_DIR=off`` disables it).
    """
    import jax

    from engine import compile_cache
    if num_cpu_devices:
        jax.config.update("jax_num_cpu_devices", int(num_cpu_devices))
    compile_cache.enable()


def flag_values(flag_values: flags.FlagValues, module_names: tuple[str, ...] = ()) -> dict:
    """The flags defined by the calling experiment module and the common ones, as a dict."""
    out = {}
    for module, fl in flag_values.flags_by_module_dict().items():
        if module.startswith(("absl", "jax", "tensorflow")):
            continue
        if module_names and not any(module.endswith(m) for m in module_names):
            continue
        for f in fl:
            out[f.name] = f.value
    return out


class _ProjectOnly(pylogging.Filter):
    """The log file keeps the project's own messages and every warning; INFO chatter of
    libraries (orbax, etils, jax) is dropped."""

    def filter(self, record: pylogging.LogRecord) -> bool:
        if record.levelno >= pylogging.WARNING:
            return True
        return os.path.abspath(record.pathname).startswith(_PROJECT_DIRS)


# The project's packages (also right when installed into site-packages, next to orbax).
_PROJECT_DIRS = tuple(os.path.join(ROOT, d) + os.sep for d in ("engine", "models", "experiments"))


def _claim_workdir(workdir: str, values: dict, data: Mapping[str, str | None] | None,
                   exclude: Iterable[str], overwrite: bool) -> str:
    """Process 0: checks the workdir against this run's fingerprint and records it."""
    previous = None
    try:
        with open(os.path.join(workdir, FINGERPRINT), encoding="utf-8") as f:
            previous = json.load(f)
    except (OSError, ValueError):
        pass
    fingerprint = make_fingerprint(values, data, exclude, previous)
    os.makedirs(workdir, exist_ok=True)
    state = check_workdir(workdir, fingerprint, overwrite)
    fingerprint["created"] = (previous or {}).get("created") if state == "resume" else None
    fingerprint["created"] = fingerprint["created"] or time.strftime(
        "%Y-%m-%d %H:%M:%S UTC", time.gmtime())
    fingerprint["excluded"] = sorted(set(EXCLUDED) | set(exclude))
    metrics_io.write_json(os.path.join(workdir, FINGERPRINT), fingerprint)
    return state


# What process 0 decided about the workdir, as broadcast to the other processes.
_OUTCOMES: tuple[Any, ...] = ("new", "resume", "overwritten", NothingToDo, ConfigError)


def _follow_primary(outcome: BaseException | str) -> str:
    """The workdir state decided by process 0, on every process (one broadcast when there
    are several); process 0's refusal is raised everywhere so that every process stops."""
    import jax
    if jax.process_count() > 1:
        import numpy as np
        from jax.experimental import multihost_utils
        code = next(i for i, o in enumerate(_OUTCOMES)
                    if o == outcome or (isinstance(o, type) and isinstance(outcome, o)))
        code = int(multihost_utils.broadcast_one_to_all(np.int32(code)))
        if jax.process_index() != 0:
            kind = _OUTCOMES[code]
            outcome = (kind(f"process 0 stopped the run ({kind.__name__}; its output says "
                            "why)") if isinstance(kind, type) else kind)
    if isinstance(outcome, BaseException):
        raise outcome
    return outcome


def start(flag_values_: flags.FlagValues, config: dict | None = None,
          data: Mapping[str, str | None] | None = None, exclude: Iterable[str] = ()) -> Run:
    """Checks the workdir against this run's fingerprint, creates it, configures JAX and
    logging, dumps config.json and fingerprint.json, builds the mesh.

    Args:
      flag_values_: the parsed flags.
      config: extra values recorded in config.json and the fingerprint (what was used).
      data: name -> path of data the results depend on (see `make_fingerprint`).
      exclude: more flag names that do not change results.

    Raises:
      ConfigError / NothingToDo: see `check_workdir`.
    """
    # JAX first: the device count and the multi-process runtime must be set before any JAX
    # call (writing a file asks `jax.process_index()`, which starts the backends).
    configure_jax(flag_values_.num_cpu_devices)
    from engine import mesh as mesh_lib  # after configure_jax: it imports jax
    if flag_values_.distributed and flag_values_.cpu_collectives != "none":
        import jax
        # Cross-process collectives between CPU devices need an implementation (GPUs and
        # TPUs bring their own; the setting is ignored there).
        jax.config.update("jax_cpu_collectives_implementation", flag_values_.cpu_collectives)
    mesh_lib.maybe_initialize_distributed(
        flag_values_.distributed, coordinator_address=flag_values_.coordinator_address,
        num_processes=flag_values_.num_processes, process_id=flag_values_.process_id)
    remote = metrics_io.is_remote(flag_values_.workdir)
    values = dict(flag_values(flag_values_))
    values.update(config or {})
    if remote:
        # gs:// and other remote workdirs pass through to orbax; the fingerprint files are
        # local-only (a remote rerun is not checked: say so).
        workdir = metrics_io.resolve_dir(flag_values_.workdir)
        state = "remote (fingerprint not checked)"
        logging.warning("workdir %s is remote: the rerun fingerprint check is skipped", workdir)
    else:
        problems = workdir_problems(flag_values_.workdir)
        if problems:
            raise ConfigError(problems[0])
        workdir = os.path.abspath(flag_values_.workdir)
        # Process 0 alone reads, checks (and with --overwrite clears) the shared workdir; the
        # others follow its decision, so no two processes race on the same files.
        outcome: BaseException | str = "new"
        if mesh_lib.is_primary():
            try:
                outcome = _claim_workdir(workdir, values, data, exclude,
                                         bool(getattr(flag_values_, "overwrite", False)))
            except (ConfigError, NothingToDo) as e:
                outcome = e
        state = _follow_primary(outcome)
    if mesh_lib.is_primary() and not remote:
        # Only process 0 writes the log file; the others log to stderr.
        handler = logging.get_absl_handler()
        handler.use_absl_log_file("log", workdir)
        if not any(isinstance(f, _ProjectOnly) for f in handler.filters):
            handler.addFilter(_ProjectOnly())
    logging.set_stderrthreshold("warning")
    pylogging.getLogger("absl").setLevel(pylogging.INFO)
    cfg = dict(values)
    cfg["argv"] = sys.argv
    cfg["workdir_state"] = state
    metrics_io.write_json(os.path.join(workdir, "config.json"), cfg)
    mesh = mesh_lib.make_mesh(flag_values_.mesh_data, flag_values_.mesh_feature)
    logging.info("workdir %s (%s), mesh %s", workdir, state, dict(mesh.shape))
    if state == "overwritten":
        print(f"--overwrite: cleared the old run in {workdir}", flush=True)
    return Run(workdir=workdir, mesh=mesh)


def dry_run(flag_values_: flags.FlagValues, config: dict | None = None,
            data: Mapping[str, str | None] | None = None, exclude: Iterable[str] = ()) -> str:
    """What `start` would do with this workdir, without touching it (one line)."""
    workdir = os.path.abspath(flag_values_.workdir)
    values = dict(flag_values(flag_values_))
    values.update(config or {})
    fingerprint = make_fingerprint(values, data, exclude)
    if not os.path.isdir(workdir):
        return f"dry run: settings OK; would start a new run in {workdir}"
    try:
        state = check_workdir(workdir, fingerprint, overwrite=False)
    except NothingToDo as e:
        return f"dry run: settings OK; {e}"
    except ConfigError as e:
        action = "would clear it (--overwrite)" if flag_values_.overwrite else "would refuse"
        return f"dry run: settings OK; {action}: {e}"
    return f"dry run: settings OK; would {'start' if state == 'new' else state} in {workdir}"


def load_json(path: str) -> Any:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


# ---------------------------------------------------------------------------------------------
# Entry points.
# ---------------------------------------------------------------------------------------------


def user_errors() -> tuple[type, ...]:
    """Exceptions that mean "the user asked for something wrong": one line, exit 2."""
    from engine import checks
    return (ConfigError, checks.InputError, FileNotFoundError, NotADirectoryError,
            IsADirectoryError, PermissionError)


def fail(name: str, message: Any) -> None:
    """One line on stderr (``name: message``), exit 2."""
    text = " ".join(str(message).split())
    print(f"{name}: {text}", file=sys.stderr, flush=True)
    sys.exit(2)


def _parse_flags(name: str):
    def parse(argv):
        try:
            return flags.FLAGS(argv)
        except flags.Error as e:
            fail(name, f"{e} (see --help)")
    return parse


def entry(name: str, body: Callable[[Run, flags.FlagValues], Any], rules: Iterable = (), *,
          data: Callable[[flags.FlagValues], Mapping[str, str | None]] | None = None,
          config: Callable[[flags.FlagValues], dict] | None = None,
          errors: Callable[[], tuple[type, ...]] | None = None,
          exclude: Iterable[str] = ()) -> None:
    """Runs an experiment: parse -> validate -> fingerprint -> ``body(run, FLAGS)``.

    Args:
      name: the experiment's name (prefix of error lines).
      body: the experiment's work; it writes results.json.
      rules: declarative settings checks (`Num`, `Choice`, `Path`, `Check`).
      data: flags -> {name: path} of data files whose identity enters the fingerprint.
      config: flags -> extra values recorded in config.json and the fingerprint.
      errors: extra user-error exception types (imported lazily).
      exclude: flags that do not change results (besides `EXCLUDED`).
    """
    rules = tuple(COMMON_RULES) + tuple(rules)

    def main(argv):
        if len(argv) > 1:
            fail(name, f"unexpected positional argument(s) {argv[1:]}; flags look like "
                       "--name=value")
        kinds = (ConfigError,)
        try:
            validate(flag_values(flags.FLAGS), rules)
            kinds = user_errors() + (errors() if errors else ())
            if flags.FLAGS.dry_run:
                print(dry_run(flags.FLAGS, config=config(flags.FLAGS) if config else None,
                              data=data(flags.FLAGS) if data else None, exclude=exclude))
                return
            run = start(flags.FLAGS, config=config(flags.FLAGS) if config else None,
                        data=data(flags.FLAGS) if data else None, exclude=exclude)
            body(run, flags.FLAGS)
            run.finish()
            # Several processes: the others wait here (a collective, no time limit) while
            # process 0 writes plots and reports, instead of in jax.distributed's shutdown
            # barrier, which gives up after a few minutes and aborts every process.
            from engine import mesh as mesh_lib
            mesh_lib.barrier("run finished")
        except NothingToDo as e:
            print(e, flush=True)
            return
        except Exception as e:  # noqa: BLE001  (re-raised unless a user error)
            if isinstance(e, kinds):
                fail(name, e)
            raise
        logging.flush()

    app.run(main, flags_parser=_parse_flags(name))


class lazy_module:  # noqa: N801  (used like a module)
    """A module imported on first attribute access: flag-defining modules use it so that
    ``--help`` and settings checks run before JAX / torch are imported."""

    def __init__(self, name: str):
        self._name = name

    def __getattr__(self, attr: str):
        import importlib
        return getattr(importlib.import_module(self._name), attr)
