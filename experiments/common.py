"""Shared plumbing for absl entry points: settings checks, run fingerprint, workdir, logging.

Every experiment is ``python -m experiments.<name> --workdir=DIR [flags]`` and writes
``DIR/config.json``, ``DIR/fingerprint.json``, ``DIR/metrics.jsonl``, ``DIR/results.json``,
``DIR/plots/*.png`` and ``DIR/checkpoints/``.

What happens when an entry point starts (`entry`), in order, before any model is loaded or
data generated:

1. the config is loaded (``--config=FILE``, default the experiment's config module), one flag
   per field is defined with the config's value as default, and the command line is parsed;
   a malformed or unknown flag is one line on stderr, exit 2;
2. every resolved setting is checked against the experiment's declarative `Rule`s (ranges,
   choices, existing paths, cross-flag constraints such as k <= d_sae) and the workdir (not a
   file, writable); all problems are reported in one line on stderr, exit 2;
3. the run's fingerprint is computed from the resolved config: every value except `EXCLUDED`
   (settings that do not change results), the identity of the data files the experiment
   names (full-content hashes of text files, SAE and model directories, activation-cache
   metadata) and the code version (package version and a hash of the ``engine/``,
   ``models/``, ``experiments/`` sources);
4. against ``DIR/fingerprint.json``: a different fingerprint is refused in one line naming
   the differing keys (use a new workdir, or ``--overwrite`` to clear the old run); the same
   fingerprint with a finished run prints ``nothing to do: results from <time>`` and exits
   0; otherwise the run resumes (killed runs continue from their checkpoints).

User errors raised later (`USER_ERRORS` and the experiment's own) are one line on stderr,
exit 2, no traceback.

Usage: an experiment's settings are a config module ``experiments/configs/<name>.py``
(``FIELDS``, ``RULES``, ``get_config()``; see `entry` and the "Configs as data" section)::

    # experiments/configs/myexp.py
    FIELDS = (common.Field("steps", 100, "Training steps."),
              common.Field("metrics", ("cka",), "Metrics (list)."))
    RULES = (common.Num(("steps",), lo=1), common.Choice(("metrics",), METRICS))

    def get_config():
        '''python -m experiments.myexp --workdir=runs/myexp'''
        return common.config_dict(FIELDS)

    # experiments/myexp.py
    from experiments.configs import myexp as CONFIG

    def body(run, settings):      # settings: a frozen dataclass, never the flags
        ...
        run.write_results({...})

    if __name__ == "__main__":
        common.entry("myexp", body, CONFIG, data=lambda s: {"text": s.text})
"""

from __future__ import annotations

import dataclasses
import logging as pylogging
import math
import os
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
    "config": "the config file's name (its resolved values are fingerprinted)",
}


class ConfigError(ValueError):
    """A setting is wrong (one line naming the flag and what was expected)."""


class NothingToDo(Exception):
    """The workdir already holds this run's finished results."""


@dataclasses.dataclass(frozen=True)
class Field:
    """One setting of an experiment's config (`experiments/configs/`): its name (also the
    command-line flag ``--name``), its default (whose type is the flag's type: bool, int,
    float, str, or a list of str), its ``--help`` text, ``type`` when the default is None,
    ``choices`` for a string with a fixed set of values (checked like a `Choice` rule and
    listed in ``--help``), and ``flag=False`` for a setting only a config file may set (what
    a preset file selects, e.g. ``preset``)."""

    name: str
    default: Any
    help: str
    type: type | None = None
    choices: tuple[str, ...] = ()
    flag: bool = True


# Settings every experiment shares (flags of every entry point, fields of its settings value).
COMMON_FIELDS = (
    Field("workdir", None, "Run directory (created; rerun to resume).", type=str),
    Field(
        "overwrite",
        False,
        "Clear a workdir holding a run with other settings (or an "
        "older run without a fingerprint) and start over.",
    ),
    Field(
        "num_cpu_devices",
        0,
        "Simulate this many CPU devices (0: leave JAX's default). "
        "Must be set before JAX starts, so it is applied in common.start().",
    ),
    Field("mesh_data", -1, "Size of the mesh data axis (-1: all devices)."),
    Field("mesh_feature", 1, "Size of the mesh feature axis."),
    Field("distributed", False, "Call jax.distributed.initialize() (multi-host)."),
    Field(
        "coordinator_address",
        None,
        "--distributed: host:port of process 0 (default: "
        "auto-detected on SLURM / TPU pods / Open MPI).",
        type=str,
    ),
    Field("num_processes", None, "--distributed: number of processes.", type=int),
    Field("process_id", None, "--distributed: this process's index.", type=int),
    Field(
        "cpu_collectives",
        "gloo",
        "--distributed on CPU hosts: collectives implementation across processes.",
        choices=("gloo", "mpi", "none"),
    ),
    Field("progress", True, "Show progress bars."),
    Field(
        "dry_run",
        False,
        "Check the settings and the workdir, say what a run would do (new "
        "/ resume / refused / nothing to do), and exit.",
    ),
)


def text_fields(text_help: str) -> tuple[Field, ...]:
    """``--text`` and how its files split into documents (``models.text.read_documents``'s
    options), one definition for every experiment that reads text itself."""
    return (
        Field("text", ("sample",), text_help),
        Field("text_field", "text", "JSON field of the text in .jsonl files (and datasets)."),
        Field(
            "txt_split",
            "file",
            "How a .txt file splits into documents ('line': one record per line).",
            choices=("file", "paragraph", "line"),
        ),
    )


def define_fields(
    fields: Iterable[Field],
    values: Mapping[str, Any] | None = None,
    flag_values: flags.FlagValues = flags.FLAGS,
    module_name: str | None = None,
) -> None:
    """Defines one absl flag per field (``flag=True``), with the default taken from
    ``values`` (the chosen config) when given, else from the field. Fields already defined
    in ``flag_values`` are left alone (the common ones are shared)."""
    values = values or {}
    for f in fields:
        if not f.flag or f.name in flag_values:
            continue
        default = values.get(f.name, f.default)
        kind = f.type or type(f.default)
        help_ = f.help + (f" One of: {', '.join(f.choices)}." if f.choices else "")
        kw = {"flag_values": flag_values, "module_name": module_name}
        if isinstance(f.default, (list, tuple)):
            flags.DEFINE_list(f.name, [str(v) for v in default], help_, **kw)
        elif kind is bool:
            flags.DEFINE_bool(f.name, default, help_, **kw)
        elif kind is int:
            flags.DEFINE_integer(f.name, default, help_, **kw)
        elif kind is float:
            flags.DEFINE_float(f.name, default, help_, **kw)
        elif kind is str:
            flags.DEFINE_string(f.name, default, help_, **kw)
        else:
            raise TypeError(f"field {f.name}: unsupported type {kind.__name__}")


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
                bad = (
                    math.isnan(v)
                    or (self.integer and not float(v).is_integer())
                    or (self.lo is not None and (v <= self.lo if self.lo_open else v < self.lo))
                    or (self.hi is not None and (v >= self.hi if self.hi_open else v > self.hi))
                )
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
                out.append(
                    f"--{name}: unknown {', '.join(map(repr, bad))}; expected one of "
                    f"{', '.join(map(str, choices))}"
                )
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
                ok = {"file": os.path.isfile, "dir": os.path.isdir, "any": os.path.exists}[
                    self.kind
                ](v)
                if not ok:
                    kind = {"file": "file", "dir": "directory", "any": "file or directory"}
                    reason = "no such " + kind[self.kind]
                    if os.path.exists(v):
                        reason = f"not a {kind[self.kind]}"
                    out.append(f"--{name}={v}: {reason}" + (f" ({self.what})" if self.what else ""))
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
            return []  # a malformed value is reported by its own Num / Choice rule
        return [] if fine else [self.message.format(**values)]


@dataclasses.dataclass(frozen=True)
class Probe:
    """A check done by a function of the project that raises a one-line error on bad input
    (``fn(values)``, e.g. resolving concept-group names): the error's text is the problem."""

    names: tuple[str, ...]
    fn: Callable[[Mapping[str, Any]], Any]
    after_others = True  # runs only when the simple rules found nothing (no duplicates)

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
                    lm.parse_hookpoint(hp, n_layers=1 << 30)  # any depth for now
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
# Configs as data. An experiment's settings are a config module ``experiments/configs/<name>.py``
# holding ``FIELDS`` (one `Field` per setting: default, type, help), ``RULES`` (the checks
# next to them) and ``get_config()`` (a ``ml_collections.ConfigDict``); presets are more
# config files building on it (``--config=experiments/configs/<name>_<preset>.py``). The entry
# point defines one flag per field from the CHOSEN config's values at start-up (no module
# defines flags at import time, so all experiments import together), resolves config +
# command-line overrides, validates, fingerprints the resolved values, and hands the body a
# frozen settings value (`settings_value`), never the flags.
# ---------------------------------------------------------------------------------------------


def field_rules(fields: Iterable[Field]) -> tuple:
    """The `Choice` rules of fields declared with ``choices``."""
    return tuple(Choice((f.name,), f.choices) for f in fields if f.choices)


def config_dict(fields: Iterable[Field]):
    """A ``ml_collections.ConfigDict`` with every field at its default (None defaults are
    typed placeholders, so a config file assigning them is type-checked)."""
    import ml_collections
    from ml_collections import config_dict as cd

    c = ml_collections.ConfigDict()
    for f in fields:
        if f.default is None:
            setattr(c, f.name, cd.placeholder(f.type or str))
        else:
            setattr(c, f.name, list(f.default) if isinstance(f.default, tuple) else f.default)
    return c


def rules_of(config_module) -> tuple:
    """Every check of an experiment: common rules, field choices, the config module's RULES."""
    return (
        tuple(COMMON_RULES)
        + field_rules(COMMON_FIELDS)
        + field_rules(config_module.FIELDS)
        + tuple(getattr(config_module, "RULES", ()))
    )


def config_arg(argv: Sequence[str]) -> str | None:
    """The ``--config`` value in a command line (read before the flags exist: the chosen
    config file gives the flags their defaults)."""
    for i, a in enumerate(argv[1:], 1):
        if a.startswith("--config="):
            return a.split("=", 1)[1]
        if a == "--config" and i + 1 < len(argv):
            return argv[i + 1]
    return None


def load_config(config_module, path: str | None = None):
    """``config_module.get_config()``, or ``get_config()`` of the config file at ``path``
    (relative to the working directory or the project root), checked to have exactly the
    experiment's fields.

    Raises:
      ConfigError: no such file, no get_config, or other fields (a config of another
        experiment).
    """
    if not path:
        cfg = config_module.get_config()
        where = config_module.__name__
    else:
        full = path if os.path.isfile(path) else os.path.join(ROOT, path)
        if not os.path.isfile(full):
            raise ConfigError(
                f"--config={path}: no such file (expected a config file such as "
                f"experiments/configs/<experiment>_<preset>.py)"
            )
        import importlib.util

        stem = os.path.splitext(os.path.basename(full))[0]
        spec = importlib.util.spec_from_file_location(f"_experiment_config_{stem}", full)
        module = importlib.util.module_from_spec(spec)
        try:
            spec.loader.exec_module(module)
        except SyntaxError as e:
            raise ConfigError(
                f"--config={path}: not valid Python ({e.msg}, line {e.lineno})"
            ) from None
        if not callable(getattr(module, "get_config", None)):
            raise ConfigError(f"--config={path}: defines no get_config()")
        try:
            cfg = module.get_config()
        except (TypeError, ValueError, KeyError, AttributeError) as e:
            # ConfigDict refuses a value of another type than the field's default.
            raise ConfigError(
                f"--config={path}: get_config() failed: {' '.join(str(e).split())}"
            ) from None
        where = f"--config={path}"
    names = [f.name for f in config_module.FIELDS]
    keys = list(cfg.keys())
    unknown = [k for k in keys if k not in names]
    missing = [k for k in names if k not in keys]
    if unknown or missing:
        raise ConfigError(
            f"{where}: not a config of this experiment ({config_module.__name__}): "
            + "; ".join(
                filter(
                    None,
                    [
                        unknown and f"unknown fields {unknown}",
                        missing and f"missing fields {missing}",
                    ],
                )
            )
        )
    return cfg


def default_values(config_module, cfg=None) -> dict:
    """Common defaults and the config's values (``get_config()`` unless ``cfg`` is given),
    as the dict the rules and the fingerprint see."""
    cfg = load_config(config_module) if cfg is None else cfg
    values = {f.name: f.default for f in COMMON_FIELDS}
    values.update({f.name: _plain(cfg[f.name]) for f in config_module.FIELDS})
    return values


def _plain(value):
    return list(value) if isinstance(value, (list, tuple)) else value


def resolve(config_module, cfg, flag_values: flags.FlagValues = flags.FLAGS) -> dict:
    """The resolved settings: the config's values, overridden by the command line, plus the
    common flags (``config`` names the file used; it is not fingerprinted, its values are)."""
    values = {f.name: flag_values[f.name].value for f in COMMON_FIELDS}
    for f in config_module.FIELDS:
        values[f.name] = _plain(flag_values[f.name].value if f.flag else cfg[f.name])
    values["config"] = flag_values["config"].value if "config" in flag_values else None
    return values


def settings_value(name: str, values: Mapping[str, Any], fields: Iterable[Field] = ()):
    """A frozen dataclass instance with one attribute per setting (lists become tuples):
    what library code receives. A misspelt or renamed setting is an AttributeError, and the
    value cannot be changed under the run (its fingerprint was computed from it)."""
    types = {
        f.name: (tuple if isinstance(f.default, (list, tuple)) else f.type or type(f.default))
        for f in tuple(COMMON_FIELDS) + tuple(fields)
    }
    cls = dataclasses.make_dataclass(
        "".join(p.title() for p in name.split("_")) + "Settings",
        [(k, types.get(k, Any)) for k in values],
        frozen=True,
    )
    return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in values.items()})


# ---------------------------------------------------------------------------------------------
# Run fingerprint.
# ---------------------------------------------------------------------------------------------


def code_version() -> dict:
    """Package version and a hash of the project's sources (what computed the results)."""
    try:
        from importlib import metadata

        version = metadata.version("sae-universality")
    except Exception:  # not installed (run from a checkout)
        version = "checkout"
    return {
        "version": version,
        "source": fp_lib.source_hash(
            [os.path.join(ROOT, d) for d in ("engine", "models", "experiments")],
            suffixes=(".py", ".txt"),
        ),
    }  # .txt: the shipped text sample


def make_fingerprint(
    settings: Mapping[str, Any],
    data: Mapping[str, str | None] | None = None,
    exclude: Iterable[str] = (),
    previous: Mapping[str, Any] | None = None,
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
                str(path), stat_cache=(prev_data.get(name) or {}).get("stat")
            )
    return {
        "settings": metrics_io.to_jsonable({k: v for k, v in settings.items() if k not in skip}),
        "data": ident,
        "code": code_version(),
    }


def _comparable(fp: Mapping[str, Any]) -> dict:
    return {
        "settings": fp.get("settings", {}),
        "code": fp.get("code", {}),
        "data": {k: fp_lib.comparable(v) for k, v in fp.get("data", {}).items()},
    }


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
    if metrics_io.exists(path):
        try:
            old = metrics_io.read_json(path)
        except (OSError, ValueError):
            old = {"settings": {"<unreadable fingerprint.json>": True}}
    elif metrics_io.exists(os.path.join(workdir, "config.json")):
        old = {"settings": {"<no fingerprint: run made by an older version>": True}}
    if old is None:
        return "new"
    changes = fp_lib.diff(_comparable(old), _comparable(fingerprint))
    if changes:
        if not overwrite:
            what = (
                "made by other code (the sources changed since)"
                if all(k.startswith("code.") for k, _, _ in changes)
                else "with other settings"
            )
            raise ConfigError(
                f"--workdir={workdir} holds a run {what}: "
                f"{fp_lib.describe_diff(changes, 'recorded', 'now')}; use a new --workdir, "
                "or --overwrite to clear the old run"
            )
        clear_workdir(workdir)
        return "overwritten"
    if old.get("finished") and metrics_io.exists(os.path.join(workdir, "results.json")):
        if overwrite:
            clear_workdir(workdir)
            return "overwritten"
        raise NothingToDo(
            f"nothing to do: results from {old['finished']} in "
            f"{os.path.join(workdir, 'results.json')}"
        )
    return "resume"


def clear_workdir(workdir: str) -> None:
    """Removes everything in a run directory (outputs, checkpoints, caches under it)."""
    for p in metrics_io.epath_of(workdir).iterdir():
        if p.is_dir() and not os.path.islink(os.fspath(p)):  # a link is removed, not followed
            p.rmtree()
        else:
            p.unlink()


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
    flags.DEFINE_integer(
        "threads", 2, "Thread budget for XLA, BLAS and torch (both sides; recorded in the JSON)."
    )
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
        if metrics_io._primary():  # several processes: process 0 alone writes
            metrics_io.makedirs(path)
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
        if not metrics_io.exists(path):
            return
        rec = metrics_io.read_json(path)
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


class _ProjectOnly(pylogging.Filter):
    """The log file keeps the project's own messages and every warning; INFO chatter of
    libraries (orbax, etils, jax) is dropped."""

    def filter(self, record: pylogging.LogRecord) -> bool:
        if record.levelno >= pylogging.WARNING:
            return True
        return os.path.abspath(record.pathname).startswith(_PROJECT_DIRS)


# The project's packages (also right when installed into site-packages, next to orbax).
_PROJECT_DIRS = tuple(os.path.join(ROOT, d) + os.sep for d in ("engine", "models", "experiments"))


def _claim_workdir(
    workdir: str,
    values: dict,
    data: Mapping[str, str | None] | None,
    exclude: Iterable[str],
    overwrite: bool,
) -> str:
    """Process 0: checks the workdir against this run's fingerprint and records it."""
    previous = None
    try:
        previous = metrics_io.read_json(os.path.join(workdir, FINGERPRINT))
    except (OSError, ValueError):
        pass
    fingerprint = make_fingerprint(values, data, exclude, previous)
    metrics_io.makedirs(workdir)
    state = check_workdir(workdir, fingerprint, overwrite)
    fingerprint["created"] = (previous or {}).get("created") if state == "resume" else None
    fingerprint["created"] = fingerprint["created"] or time.strftime(
        "%Y-%m-%d %H:%M:%S UTC", time.gmtime()
    )
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

        code = next(
            i
            for i, o in enumerate(_OUTCOMES)
            if o == outcome or (isinstance(o, type) and isinstance(outcome, o))
        )
        code = int(multihost_utils.broadcast_one_to_all(np.int32(code)))
        if jax.process_index() != 0:
            kind = _OUTCOMES[code]
            outcome = (
                kind(f"process 0 stopped the run ({kind.__name__}; its output says why)")
                if isinstance(kind, type)
                else kind
            )
    if isinstance(outcome, BaseException):
        raise outcome
    return outcome


def start(
    values: Mapping[str, Any],
    config: dict | None = None,
    data: Mapping[str, str | None] | None = None,
    exclude: Iterable[str] = (),
) -> Run:
    """Checks the workdir against this run's fingerprint, creates it, configures JAX and
    logging, dumps config.json and fingerprint.json, builds the mesh.

    Args:
      values: the resolved settings (common ones included: workdir, mesh, distributed...).
      config: extra values recorded in config.json and the fingerprint (what was used).
      data: name -> path of data the results depend on (see `make_fingerprint`).
      exclude: more flag names that do not change results.

    Raises:
      ConfigError / NothingToDo: see `check_workdir`.
    """
    settings = values
    # Library INFO lines (JAX's backend probing) must not reach stderr before a one-line
    # refusal: the threshold is set before JAX starts.
    logging.set_stderrthreshold("warning")
    pylogging.getLogger("jax._src.xla_bridge").setLevel(pylogging.WARNING)
    # JAX first: the device count and the multi-process runtime must be set before any JAX
    # call (writing a file asks `jax.process_index()`, which starts the backends).
    configure_jax(settings["num_cpu_devices"])
    from engine import mesh as mesh_lib  # after configure_jax: it imports jax

    if settings["distributed"] and settings["cpu_collectives"] != "none":
        import jax

        # Cross-process collectives between CPU devices need an implementation (GPUs and
        # TPUs bring their own; the setting is ignored there).
        jax.config.update("jax_cpu_collectives_implementation", settings["cpu_collectives"])
    mesh_lib.maybe_initialize_distributed(
        settings["distributed"],
        coordinator_address=settings["coordinator_address"],
        num_processes=settings["num_processes"],
        process_id=settings["process_id"],
    )
    # gs:// and other remote workdirs pass through (every file goes through the run-directory
    # file API, `engine.metrics_io`, and orbax), fingerprint check included.
    remote = metrics_io.is_remote(settings["workdir"])
    values = dict(values)
    values.update(config or {})
    if not remote:
        problems = workdir_problems(settings["workdir"])
        if problems:
            raise ConfigError(problems[0])
    workdir = metrics_io.resolve_dir(settings["workdir"])
    # Process 0 alone reads, checks (and with --overwrite clears) the shared workdir; the
    # others follow its decision, so no two processes race on the same files.
    outcome: BaseException | str = "new"
    if mesh_lib.is_primary():
        try:
            outcome = _claim_workdir(
                workdir, values, data, exclude, bool(settings.get("overwrite", False))
            )
        except (ConfigError, NothingToDo) as e:
            outcome = e
    state = _follow_primary(outcome)
    if mesh_lib.is_primary() and not remote:
        # Only process 0 writes the log file (absl writes local files only: a remote run
        # logs to stderr); the others log to stderr.
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
    mesh = mesh_lib.make_mesh(settings["mesh_data"], settings["mesh_feature"])
    logging.info("workdir %s (%s), mesh %s", workdir, state, dict(mesh.shape))
    if state == "overwritten":
        print(f"--overwrite: cleared the old run in {workdir}", flush=True)
    return Run(workdir=workdir, mesh=mesh)


def dry_run(
    settings: Mapping[str, Any],
    config: dict | None = None,
    data: Mapping[str, str | None] | None = None,
    exclude: Iterable[str] = (),
) -> str:
    """What `start` would do with this workdir, without touching it (one line)."""
    workdir = metrics_io.resolve_dir(settings["workdir"])
    values = dict(settings)
    values.update(config or {})
    fingerprint = make_fingerprint(values, data, exclude)
    if not metrics_io.epath_of(workdir).is_dir():
        return f"dry run: settings OK; would start a new run in {workdir}"
    try:
        state = check_workdir(workdir, fingerprint, overwrite=False)
    except NothingToDo as e:
        return f"dry run: settings OK; {e}"
    except ConfigError as e:
        action = "would clear it (--overwrite)" if settings["overwrite"] else "would refuse"
        return f"dry run: settings OK; {action}: {e}"
    return f"dry run: settings OK; would {'start' if state == 'new' else state} in {workdir}"


def load_json(path: str) -> Any:
    return metrics_io.read_json(path)


def save_figure(fig, path: str, dpi: int = 110) -> str:
    """Writes a matplotlib figure as PNG through the run-directory file API (local folders and
    ``gs://`` alike) and closes it."""
    import io

    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    plt.close(fig)
    if metrics_io._primary():
        metrics_io.write_bytes(path, buf.getvalue())
    return path


# ---------------------------------------------------------------------------------------------
# Entry points.
# ---------------------------------------------------------------------------------------------


def user_errors() -> tuple[type, ...]:
    """Exceptions that mean "the user asked for something wrong": one line, exit 2."""
    from engine import checks

    return (
        ConfigError,
        checks.InputError,
        FileNotFoundError,
        NotADirectoryError,
        IsADirectoryError,
        PermissionError,
    )


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


def entry(
    name: str,
    body: Callable[[Run, Any], Any],
    config_module,
    *,
    data: Callable[[Any], Mapping[str, str | None]] | None = None,
    record: Callable[[Any], dict] | None = None,
    errors: Callable[[], tuple[type, ...]] | None = None,
    exclude: Iterable[str] = (),
) -> None:
    """Runs an experiment: config -> flags -> resolve -> validate -> fingerprint ->
    ``body(run, settings)``.

    The config is ``config_module.get_config()`` or the file named by ``--config``; one flag
    per field is defined with the config's value as default (``--name=value`` overrides it);
    the resolved values are checked by `rules_of` before any work; ``body`` receives them as
    a frozen `settings_value` (never the flags).

    Args:
      name: the experiment's name (prefix of error lines).
      body: the experiment's work; it writes results.json.
      config_module: the experiment's config module (``FIELDS``, ``RULES``, ``get_config``).
      data: settings -> {name: path} of data files whose identity enters the fingerprint.
      record: settings -> extra values recorded in config.json and the fingerprint.
      errors: extra user-error exception types (imported lazily).
      exclude: settings that do not change results (besides `EXCLUDED`).
    """
    try:
        cfg = load_config(config_module, config_arg(sys.argv))
    except ConfigError as e:
        fail(name, e)
    for f in config_module.FIELDS:
        if not f.flag and any(
            a.split("=", 1)[0] in (f"--{f.name}", f"--no{f.name}") for a in sys.argv[1:]
        ):
            fail(
                name,
                f"--{f.name} is set by a config file, not on the command line: "
                f"--config=experiments/configs/{name}_<preset>.py (see "
                "experiments/configs/)",
            )
    main_module = sys.argv[0]  # absl lists the main module's flags in --help
    define_fields(COMMON_FIELDS, module_name=main_module)
    if "config" not in flags.FLAGS:
        flags.DEFINE_string(
            "config",
            None,
            "Config file whose get_config() gives the defaults "
            "of every flag below (a preset, e.g. experiments/configs/"
            f"{name}_<preset>.py; default: experiments/configs/{name}.py).",
            module_name=main_module,
        )
    define_fields(config_module.FIELDS, cfg, module_name=main_module)
    rules = rules_of(config_module)

    def main(argv):
        if len(argv) > 1:
            fail(
                name, f"unexpected positional argument(s) {argv[1:]}; flags look like --name=value"
            )
        kinds = (ConfigError,)
        try:
            values = resolve(config_module, cfg)
            validate(values, rules)
            settings = settings_value(name, values, config_module.FIELDS)
            kinds = user_errors() + (errors() if errors else ())
            extra = record(settings) if record else None
            paths = data(settings) if data else None
            if values["dry_run"]:
                print(dry_run(values, config=extra, data=paths, exclude=exclude))
                return
            run = start(values, config=extra, data=paths, exclude=exclude)
            body(run, settings)
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
