"""Test set-up: 4 simulated CPU devices (set before JAX starts) and mesh fixtures.

Every sharded primitive is checked on a 1-device mesh and on a 4-device mesh (``mesh1`` /
``mesh4``); both come from the same process, so results can be compared directly.
"""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=4")
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# The experiments' persistent compilation cache (engine/compile_cache.py): one directory per
# test session, so entry points run as subprocesses share compiled programs with each other
# but never with other runs on the machine (~/.cache), and the session leaves nothing behind.
if "SAE_JAX_CACHE_DIR" not in os.environ:
    import atexit
    import shutil
    import tempfile

    _cache = tempfile.mkdtemp(prefix="sae_universality_jaxcache_")
    os.environ["SAE_JAX_CACHE_DIR"] = _cache
    atexit.register(shutil.rmtree, _cache, ignore_errors=True)

import jax  # noqa: E402

jax.config.update("jax_num_cpu_devices", 4)

import numpy as np  # noqa: E402
import pytest  # noqa: E402

from engine import mesh as mesh_lib  # noqa: E402

NUM_DEVICES = 4


@pytest.fixture(scope="session")
def mesh1():
    return mesh_lib.make_mesh(devices=jax.devices()[:1])


@pytest.fixture(scope="session")
def mesh4():
    assert len(jax.devices()) >= NUM_DEVICES, "conftest must run before JAX initialises"
    return mesh_lib.make_mesh(devices=jax.devices()[:NUM_DEVICES])


@pytest.fixture(params=[1, NUM_DEVICES], ids=["1dev", f"{NUM_DEVICES}dev"])
def mesh(request):
    """Parametrised: runs a test once on 1 device and once on 4."""
    return mesh_lib.make_mesh(devices=jax.devices()[: request.param])


@pytest.fixture
def rng():
    return np.random.default_rng(0)


def _measured_slow() -> tuple[frozenset[str], frozenset[tuple[str, str]]]:
    """tests/slow_tests.txt without comments: node ids measured over ~3 s, and
    ``fixture FILE::NAME`` lines (every test of FILE that uses that expensive fixture)."""
    path = os.path.join(os.path.dirname(__file__), "slow_tests.txt")
    with open(path, encoding="utf-8") as f:
        lines = [line.split("#", 1)[0].strip() for line in f]
    ids = frozenset(line for line in lines if line and not line.startswith("fixture "))
    fixtures = frozenset(
        tuple(line.removeprefix("fixture ").strip().split("::", 1))  # type: ignore[misc]
        for line in lines
        if line.startswith("fixture ")
    )
    return ids, fixtures


def pytest_collection_modifyitems(config, items):
    # Measured durations mark the fast subset's exclusions (one list, regenerated from a
    # --durations=0 run) rather than hand-placed decorators that drift as tests change.
    slow, fixtures = _measured_slow()
    for item in items:
        file = item.nodeid.split("::", 1)[0]
        uses = getattr(item, "fixturenames", ())
        if item.nodeid in slow or any(f == file and n in uses for f, n in fixtures):
            item.add_marker(pytest.mark.slow)
