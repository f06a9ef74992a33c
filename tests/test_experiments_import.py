"""Every experiment and benchmark module imports into one process, and every entry point's
settings come from its config module (`experiments/configs/`), not from import-time flags.

Importing several together is what a suite runner or a test that composes them does; a second
``DEFINE_*`` of one flag name raises ``DuplicateFlagError``, and two modules sharing a flag name
with different defaults would make a default depend on import order. Experiments define their
flags at start-up from the chosen config (`experiments.common.entry`); the shared benchmark
flags (``--threads``, ``--repeats``, ``--out``, ``--only``) are defined once in
`experiments.common.define_bench_flags` and each benchmark prefixes its own.
"""

import dataclasses
import importlib
import os
import pkgutil
import re

import pytest
from absl import flags

import experiments
from experiments import common

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _modules(prefix: str = ""):
    return sorted(
        m.name
        for m in pkgutil.iter_modules(experiments.__path__)
        if not m.ispkg and m.name.startswith(prefix)
    )


def _entry_points() -> list[str]:
    """Modules whose ``__main__`` block calls `common.entry` (read from the source)."""
    out = []
    for name in _modules():
        with open(os.path.join(ROOT, "experiments", f"{name}.py"), encoding="utf-8") as f:
            src = f.read()
        if name != "common" and re.search(r'__name__ == "__main__":\n\s+common\.entry\(', src):
            out.append(name)
    return out


CONFIG_FILES = sorted(
    f[:-3]
    for f in os.listdir(os.path.join(ROOT, "experiments", "configs"))
    if f.endswith(".py") and f != "__init__.py"
)


def test_there_are_benchmarks_and_entry_points():
    assert {"bench_sae", "bench_similarity", "bench_representation"} <= set(_modules("bench_"))
    assert {"universality", "train_sae", "harvest", "demo", "joint_sae"} <= set(_entry_points())


def test_all_modules_import_together():
    """Every module of experiments/ (entry points, pipeline, configs, benchmarks) in one
    process; the entry points register no flag at import."""
    before = set(flags.FLAGS)
    for name in _modules():
        importlib.import_module(f"experiments.{name}")
    for sub in ("pipeline", "configs"):
        pkg = importlib.import_module(f"experiments.{sub}")
        for m in pkgutil.iter_modules(pkg.__path__):
            importlib.import_module(f"experiments.{sub}.{m.name}")
    for shared in ("threads", "repeats", "out", "only"):
        assert shared in flags.FLAGS, shared
    by_module = flags.FLAGS.flags_by_module_dict()
    for name in _entry_points():
        mine = [
            f.name
            for m, fl in by_module.items()
            if m.endswith(f"experiments/{name}.py") or m == f"experiments.{name}"
            for f in fl
        ]
        assert not mine, (name, mine)
    new = set(flags.FLAGS) - before
    assert not new & {"seed", "workdir", "sae_k", "metrics", "preset"}, new


def _flagvalues(module, cfg):
    fv = flags.FlagValues()
    common.define_fields(common.COMMON_FIELDS, flag_values=fv)
    flags.DEFINE_string("config", None, "config file", flag_values=fv)
    common.define_fields(module.FIELDS, cfg, flag_values=fv)
    return fv


def _base_of(config_name: str):
    """The experiment config module a config file belongs to (its name, or the longest
    experiment name it starts with)."""
    bases = [
        n
        for n in CONFIG_FILES
        if hasattr(importlib.import_module(f"experiments.configs.{n}"), "FIELDS")
    ]
    names = [n for n in bases if config_name == n or config_name.startswith(n + "_")]
    return importlib.import_module(f"experiments.configs.{max(names, key=len)}")


@pytest.mark.parametrize("entry_point", _entry_points())
def test_entry_point_config_is_complete(entry_point):
    """The config module has a help text per field, its defaults pass every rule, and every
    field is a flag whose default is the config's value and whose override is typed."""
    module = importlib.import_module(f"experiments.{entry_point}")
    config = module.CONFIG
    assert config.__name__ == f"experiments.configs.{entry_point}"
    names = [f.name for f in config.FIELDS]
    assert len(names) == len(set(names)), "a field is declared twice"
    assert not set(names) & {f.name for f in common.COMMON_FIELDS}
    for f in config.FIELDS:
        assert f.help.strip(), f.name
        assert f.default is not None or f.type is not None, f.name
        assert not f.choices or f.default in f.choices, f.name
    values = common.default_values(config)
    values["workdir"] = "/tmp/config_import_test_workdir"
    common.validate(values, common.rules_of(config))
    fv = _flagvalues(config, common.load_config(config))
    fv(["prog"])
    assert common.resolve(config, common.load_config(config), fv) == {
        **values,
        "workdir": None,
        "config": None,
    }
    help_text = fv.module_help(fv.find_module_defining_flag("workdir"))
    for f in config.FIELDS:
        if f.flag:
            assert f"--{f.name}" in help_text or f"--[no]{f.name}" in help_text, f.name


@pytest.mark.parametrize("config_name", CONFIG_FILES)
def test_config_file_loads_and_its_docstring_runs_it(config_name):
    """Each config file has exactly its experiment's fields, passes the rules, and
    get_config()'s docstring holds the command that runs it."""
    base = _base_of(config_name)
    experiment = base.__name__.rsplit(".", 1)[1]
    path = os.path.join("experiments", "configs", f"{config_name}.py")
    cfg = common.load_config(base, None if base.__name__.endswith(config_name) else path)
    values = common.default_values(base, cfg)
    values["workdir"] = "/tmp/config_import_test_workdir"
    common.validate(values, common.rules_of(base))
    mod = importlib.import_module(f"experiments.configs.{config_name}")
    doc = mod.get_config.__doc__ or ""
    assert f"python -m experiments.{experiment}" in doc, config_name
    if mod is not base:
        assert f"--config={path}" in doc, config_name


def test_overrides_are_typed_and_the_settings_value_is_frozen():
    from experiments.configs import universality as config

    cfg = common.load_config(config)
    fv = _flagvalues(config, cfg)
    fv(["prog", "--metrics=svcca,cka", "--sae_k=8", "--threshold=0.25", "--nofilter_dead"])
    values = common.resolve(config, cfg, fv)
    assert values["metrics"] == ["svcca", "cka"] and values["sae_k"] == 8
    assert values["threshold"] == 0.25 and values["filter_dead"] is False
    s = common.settings_value("universality", values, config.FIELDS)
    assert s.metrics == ("svcca", "cka") and s.sae_k == 8
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.sae_k = 4
    with pytest.raises(AttributeError):
        s.sae_kk  # noqa: B018  (a renamed or misspelt setting fails loudly)
    with pytest.raises(flags.IllegalFlagValueError):
        _flagvalues(config, cfg)(["prog", "--sae_k=abc"])


def test_preset_file_equals_base_plus_its_fields_and_fingerprints_alike():
    """A preset differs from the base config only where it says so, and the fingerprint
    depends on the resolved values, not on which file gave them."""
    from experiments.configs import universality as config

    base = common.default_values(config)
    lm = common.default_values(
        config, common.load_config(config, "experiments/configs/universality_lm.py")
    )
    assert {k for k in base if base[k] != lm[k]} == {"preset"}
    assert lm["preset"] == "lm"
    same = dict(base, preset="lm", config=None)
    assert (
        common.make_fingerprint(same)["settings"]
        == common.make_fingerprint(dict(lm, config="x.py"))["settings"]
    )
    assert common.make_fingerprint(base)["settings"] != common.make_fingerprint(lm)["settings"]


def test_bad_config_files_are_one_line_errors(tmp_path):
    from experiments.configs import universality as config

    wrong_type = tmp_path / "wrong_type.py"
    wrong_type.write_text(
        "from experiments.configs import universality as base\n"
        "def get_config():\n    c = base.get_config()\n"
        "    c.sae_k = 'many'\n    return c\n"
    )
    extra = tmp_path / "extra.py"
    extra.write_text(
        "from experiments.configs import universality as base\n"
        "def get_config():\n    c = base.get_config()\n"
        "    c.sea_k = 3\n    return c\n"
    )
    nothing = tmp_path / "nothing.py"
    nothing.write_text("X = 1\n")
    cases = [
        (wrong_type, "sae_k"),
        (extra, "unknown fields ['sea_k']"),
        (nothing, "defines no get_config()"),
        (tmp_path / "absent.py", "no such file"),
    ]
    for path, expected in cases:
        with pytest.raises(common.ConfigError, match=None) as e:
            common.load_config(config, str(path))
        assert expected in str(e.value) and "\n" not in str(e.value), str(e.value)


def test_bench_sections_rejects_unknown():
    common.define_bench_flags()
    flags.FLAGS(["prog", "--only=nope"])
    try:
        with pytest.raises(SystemExit, match="unknown section"):
            common.bench_sections(("a", "b"))
        flags.FLAGS.only = []
        assert common.bench_sections(("a", "b")) == ["a", "b"]
    finally:
        flags.FLAGS.unparse_flags()


def test_importance_settings_defaults_are_the_config_defaults():
    """experiments/importance.py keeps its typed `Settings` (what `run` takes); its defaults
    must be the config's, or a library caller and the command line would disagree."""
    from experiments import importance

    values = common.default_values(importance.CONFIG)
    s = importance.Settings()
    for f in dataclasses.fields(importance.Settings):
        assert getattr(s, f.name) == values[f.name], f.name
