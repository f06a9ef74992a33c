"""The persistent compilation cache: a second process loads what the first compiled."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from engine import compile_cache

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

PROBE = r"""
import json, sys
from engine import compile_cache
import jax, jax.numpy as jnp
hits = []
jax.monitoring.register_event_listener(
    lambda name, **kw: hits.append(name) if name == "/jax/compilation_cache/cache_hits" else None)
d = compile_cache.enable(sys.argv[1])
f = jax.jit(lambda x: jnp.sin(x) @ x.T + 1.0)
y = float(f(jnp.ones((8, 8))).sum())
print(json.dumps({"dir": d, "hits": len(hits), "y": y}))
"""


def _probe(directory: str) -> dict:
    env = {**os.environ, "PYTHONPATH": ROOT, "JAX_PLATFORMS": "cpu"}
    env.pop("XLA_FLAGS", None)
    out = subprocess.run(
        [sys.executable, "-c", PROBE, directory],
        capture_output=True,
        text=True,
        env=env,
        check=True,
        cwd=ROOT,
    ).stdout
    return json.loads(out.strip().splitlines()[-1])


def test_second_process_loads_the_compiled_program(tmp_path):
    d = str(tmp_path / "jaxcache")
    first = _probe(d)
    assert first["dir"] == d and first["hits"] == 0
    assert any(os.scandir(d)), "the first process wrote no cache entry"
    second = _probe(d)
    assert second["hits"] >= 1
    # sin(1) * 8 + 1 per entry, 64 entries: the cached program computes the same thing.
    import math

    assert abs(second["y"] - 64 * (8 * math.sin(1.0) + 1.0)) < 1e-3
    assert second["y"] == first["y"]


def test_directory_resolution(monkeypatch, tmp_path):
    monkeypatch.setenv(compile_cache.ENV, "off")
    assert compile_cache.cache_dir() is None
    monkeypatch.setenv(compile_cache.ENV, str(tmp_path))
    assert compile_cache.cache_dir() == str(tmp_path)
    assert compile_cache.cache_dir(str(tmp_path / "x")) == str(tmp_path / "x")
    monkeypatch.delenv(compile_cache.ENV)
    monkeypatch.delenv("JAX_COMPILATION_CACHE_DIR", raising=False)
    assert compile_cache.cache_dir() == os.path.expanduser(compile_cache.DEFAULT_DIR)
