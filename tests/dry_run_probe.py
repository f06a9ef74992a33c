"""Helper process for tests/test_cli.py: runs many documented command lines, each exactly as
``python -m experiments.<module> <args>`` would, in a forked child of this process.

Why fork: every documented command imports JAX, NumPy and absl (several seconds per fresh
Python on a shared 2-core machine). This process imports them once; each command then runs
in its own forked child, with its own flag registry, ``sys.argv`` and stdout/stderr file
descriptors, through `runpy.run_module(..., run_name="__main__")` -- the code path of
``python -m``. The experiment modules themselves are NOT imported here (running one as
``__main__`` after importing it would warn on stderr), so each child defines its flags fresh.

Usage: ``python tests/dry_run_probe.py`` with a JSON list of ``[module, [args...]]`` on
stdin; prints a JSON list of ``{"returncode", "stdout", "stderr"}``, one per command.
"""

import json
import os
import runpy
import sys
import tempfile
import traceback

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# Imported once, shared by every child (no JAX backend is started here: forking is safe).
import flax  # noqa: E402, F401
import jax  # noqa: E402, F401
import ml_collections  # noqa: E402, F401
import numpy  # noqa: E402, F401
import optax  # noqa: E402, F401
from absl import app, flags, logging  # noqa: E402, F401

from experiments import common  # noqa: E402, F401


def run_one(module: str, args: list[str], out_path: str, err_path: str) -> int:
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:  # child: the command, with its own stdout / stderr
        code = 1
        try:
            with open(out_path, "wb") as out, open(err_path, "wb") as err:
                os.dup2(out.fileno(), 1)
                os.dup2(err.fileno(), 2)
            sys.argv = [module, *args]
            try:
                runpy.run_module(f"experiments.{module}", run_name="__main__", alter_sys=True)
                code = 0
            except SystemExit as e:
                code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
                if e.code is not None and not isinstance(e.code, int):
                    print(e.code, file=sys.stderr)
            except BaseException:  # noqa: BLE001  (reported like an uncaught exception)
                traceback.print_exc()
                code = 1
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


def main() -> None:
    commands = json.load(sys.stdin)
    results = []
    with tempfile.TemporaryDirectory(prefix="dry_run_probe_") as tmp:
        out_path, err_path = os.path.join(tmp, "out"), os.path.join(tmp, "err")
        for module, args in commands:
            rc = run_one(module, args, out_path, err_path)
            with open(out_path, encoding="utf-8", errors="replace") as f:
                stdout = f.read()
            with open(err_path, encoding="utf-8", errors="replace") as f:
                stderr = f.read()
            results.append({"returncode": rc, "stdout": stdout, "stderr": stderr})
    json.dump(results, sys.stdout)


if __name__ == "__main__":
    main()
