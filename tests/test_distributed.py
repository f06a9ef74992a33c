"""Two processes on localhost (jax.distributed, gloo, 2 CPU devices each) give the same SAE
training and feature pass as one process with 4 devices; only process 0 writes."""

import json
import os
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest

from engine import mesh as mesh_lib

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import distributed_worker  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_equal_one(tmp_path):
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env["PYTHONPATH"] = REPO
    procs = [subprocess.Popen([sys.executable, os.path.join(REPO, "tests",
                                                            "distributed_worker.py"),
                               str(i), "2", str(port), str(tmp_path)], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, cwd=REPO)
             for i in range(2)]
    logs = []
    for p in procs:
        out, _ = p.communicate(timeout=900)
        logs.append(out.decode(errors="replace")[-3000:])
    assert all(p.returncode == 0 for p in procs), "\n----\n".join(logs)
    got = dict(np.load(tmp_path / "result.npz"))
    # only process 0 wrote metrics: one copy of each line
    lines = open(tmp_path / "work" / "sae1" / "g0_topk_F64" / "metrics.jsonl").read()
    # every 4 steps and at each checkpoint (5, 10), once each: no second process wrote
    assert [json.loads(line)["step"] for line in lines.splitlines()] == [4, 5, 8, 10, 12]
    ref = distributed_worker.workload(mesh_lib.make_mesh(devices=jax.devices()[:4]),
                                      str(tmp_path / "ref"))
    assert bool(got["tiled"]) and bool(ref["tiled"])
    for key, want in ref.items():
        if want.dtype.kind == "f":
            np.testing.assert_allclose(got[key], want, rtol=2e-5, atol=2e-6, err_msg=key)
        else:
            np.testing.assert_array_equal(got[key], want, err_msg=key)


def test_remote_workdir_is_passed_through_to_orbax(monkeypatch, tmp_path):
    from engine import checkpoint, metrics_io
    assert metrics_io.resolve_dir("gs://bucket/run") == "gs://bucket/run"
    assert metrics_io.resolve_dir("runs/x") == os.path.abspath("runs/x")
    seen = {}

    class FakeManager:
        def __init__(self, directory, **kw):
            seen["dir"] = directory

    monkeypatch.setattr(checkpoint.ocp, "CheckpointManager", FakeManager)
    monkeypatch.chdir(tmp_path)
    ck = checkpoint.Checkpointer("gs://bucket/run/checkpoints")
    assert seen["dir"] == "gs://bucket/run/checkpoints" == ck.directory
    assert not os.path.exists(tmp_path / "gs:")      # no local folder was made
