"""Benchmark entry points can be imported into one process (no clashing absl flags).

Importing several together is what a suite runner or a test that composes them does; a second
``DEFINE_*`` of one flag name raises ``DuplicateFlagError``, and two modules sharing a flag name
with different defaults would make a default depend on import order. The shared benchmark
flags (``--threads``, ``--repeats``, ``--out``, ``--only``) are defined once in
`experiments.common.define_bench_flags`; each benchmark prefixes its own.
"""

import importlib
import pkgutil

import pytest

import experiments


def _modules(prefix: str):
    return sorted(m.name for m in pkgutil.iter_modules(experiments.__path__)
                  if not m.ispkg and m.name.startswith(prefix))


def test_there_are_benchmarks():
    names = _modules("bench_")
    assert {"bench_sae", "bench_similarity", "bench_representation"} <= set(names), names


def test_all_benchmarks_import_together():
    from absl import flags
    for name in _modules("bench_"):
        importlib.import_module(f"experiments.{name}")
    for shared in ("threads", "repeats", "out", "only"):
        assert shared in flags.FLAGS, shared


def test_bench_sections_rejects_unknown():
    from absl import flags

    from experiments import common
    common.define_bench_flags()
    flags.FLAGS(["prog", "--only=nope"])
    try:
        with pytest.raises(SystemExit, match="unknown section"):
            common.bench_sections(("a", "b"))
        flags.FLAGS.only = []
        assert common.bench_sections(("a", "b")) == ["a", "b"]
    finally:
        flags.FLAGS.unparse_flags()
