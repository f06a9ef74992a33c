"""How far results of different process/device layouts are apart (issue 13; WORKSPACE.md,
"Several processes"). Not a test: a report, run from the repository root::

    python tests/layouts_report.py OUT_DIR

It runs `distributed_worker` as 2 processes x 2 CPU devices (gloo, as tests/test_distributed.py
does), then its workload in this process on 1 and on 4 devices and its harvest in one process,
and prints, per output: bit-identical or not, and max |difference| / max |value| between
1 device and 4 devices, 1 device and 2 processes, 4 devices and 2 processes.
"""

import json
import os
import socket
import subprocess
import sys

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
sys.path.insert(0, os.path.join(REPO, "tests"))

import jax  # noqa: E402
import numpy as np  # noqa: E402

jax.config.update("jax_num_cpu_devices", 4)

import distributed_worker as dw  # noqa: E402

from engine import mesh as mesh_lib  # noqa: E402


def _rel(a, b) -> float:
    scale = float(np.max(np.abs(b))) if b.size else 0.0
    return float(np.max(np.abs(a - b))) / scale if scale else float(np.max(np.abs(a - b)))


def main(out: str) -> dict:
    os.makedirs(out, exist_ok=True)
    with socket.socket() as s:
        s.bind(("localhost", 0))
        port = s.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env["PYTHONPATH"] = REPO
    worker = os.path.join(REPO, "tests", "distributed_worker.py")
    procs = [
        subprocess.Popen(
            [sys.executable, worker, str(i), "2", str(port), os.path.join(out, "mp")],
            env=env,
            cwd=REPO,
        )
        for i in range(2)
    ]
    if any(p.wait() != 0 for p in procs):
        raise SystemExit("the 2-process run failed")
    mp = dict(np.load(os.path.join(out, "mp", "result.npz")))
    one = {
        n: dw.workload(mesh_lib.make_mesh(devices=jax.devices()[:n]), os.path.join(out, f"w{n}"))
        for n in (1, 4)
    }
    harvest = dw.harvest_workload(os.path.join(out, "harvest_one"))
    rep: dict = {}
    for k, v in harvest.items():
        rep[k] = {"bit_identical_1proc_2proc": bool(np.array_equal(mp[k], v))}
    for k, v in one[1].items():
        if v.dtype.kind == "f":
            rep[k] = {
                "rel_1dev_4dev": _rel(one[4][k], v),
                "rel_1dev_2proc": _rel(mp[k], v),
                "rel_4dev_2proc": _rel(mp[k], one[4][k]),
            }
        else:
            rep[k] = {
                "bit_identical_1dev_4dev": bool(np.array_equal(one[4][k], v)),
                "bit_identical_1dev_2proc": bool(np.array_equal(mp[k], v)),
            }
    print(json.dumps(rep, indent=1))
    with open(os.path.join(out, "report.json"), "w") as fh:
        json.dump(rep, fh, indent=1)
    return rep


if __name__ == "__main__":
    if len(sys.argv) != 2:
        raise SystemExit("usage: python tests/layouts_report.py OUT_DIR")
    main(sys.argv[1])
