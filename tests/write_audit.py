"""Runs ``python -m MODULE ARGS`` under a write audit: every file or folder that this process
creates, opens for writing, renames or removes under ``--workdir`` is recorded (Python audit
hooks, PEP 578) and dumped as JSON to ``$WRITE_AUDIT/process-<id>.json`` at exit.

Used by tests/test_distributed.py through the real launcher::

    PYTHON="python tests/write_audit.py" launch/cpu_multiprocess.sh 2 2 experiments.x ...

to check that only process 0 writes files in the shared workdir.
"""

import atexit
import json
import os
import runpy
import sys

_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC
# event -> positions of the paths it changes (a rename changes both: os.replace raises
# "os.rename" too)
_PATH_EVENTS = {
    "os.mkdir": (0,),
    "os.rename": (0, 1),
    "os.remove": (0,),
    "os.rmdir": (0,),
    "shutil.rmtree": (0,),
    "os.symlink": (1,),
    "os.truncate": (0,),
    "os.link": (1,),
    "shutil.copyfile": (1,),
    "shutil.move": (0, 1),
}


def _flag(argv: list[str], name: str) -> str | None:
    for a in argv:
        if a.startswith(f"--{name}="):
            return a.split("=", 1)[1]
    return None


def main() -> None:
    if len(sys.argv) < 3 or sys.argv[1] != "-m":
        sys.exit("usage: python tests/write_audit.py -m MODULE [ARGS]")
    module, args = sys.argv[2], sys.argv[3:]
    workdir = os.path.abspath(_flag(args, "workdir") or ".")
    out_dir = os.environ["WRITE_AUDIT"]
    pid = _flag(args, "process_id") or "0"
    writes: list[tuple[str, str]] = []

    def inside(path) -> str | None:
        if isinstance(path, int):
            return None
        try:
            p = os.path.abspath(os.fsdecode(path))
        except (TypeError, ValueError):
            return None
        return p if p == workdir or p.startswith(workdir + os.sep) else None

    def hook(event: str, hook_args: tuple) -> None:
        if event == "open":
            path, mode, flags = hook_args
            writing = (
                any(c in mode for c in "wax+")
                if isinstance(mode, str)
                else bool((flags or 0) & _WRITE_FLAGS)
            )
            if writing and (p := inside(path)):
                writes.append((event, p))
        elif event in _PATH_EVENTS:
            for i in _PATH_EVENTS[event]:
                if p := inside(hook_args[i]):
                    writes.append((event, p))

    def dump() -> None:
        with open(os.path.join(out_dir, f"process-{pid}.json"), "w") as f:
            json.dump(writes, f)

    atexit.register(dump)
    sys.addaudithook(hook)
    sys.argv = [module, *args]
    runpy.run_module(module, run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
