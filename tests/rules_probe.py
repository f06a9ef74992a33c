"""Helper process for tests/test_cli.py: validates many settings of ONE experiment in-process.

An experiment's settings are its config module's defaults (``experiments/configs/<name>.py``,
the module's ``CONFIG``) checked by `experiments.common.rules_of` (one process per experiment
keeps the timing of each table independent). Usage:
``python tests/rules_probe.py experiments.universality`` with a JSON list of cases on stdin
(``{"set": {flag: value}, "workdir": ...}``; an empty ``set``: the defaults); prints a JSON
list with, per case, the one-line message of `experiments.common.validate` (or null when the
settings pass) and the seconds it took.
"""

import importlib
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from experiments import common  # noqa: E402


def main() -> None:
    module = importlib.import_module(sys.argv[1])
    cases = json.load(sys.stdin)
    defaults = common.default_values(module.CONFIG)
    rules = common.rules_of(module.CONFIG)
    out = []
    for case in cases:
        values = dict(defaults)
        values["workdir"] = case.get("workdir", "/tmp/rules_probe_workdir")
        for name, value in (case.get("set") or {}).items():
            assert name in values, f"{sys.argv[1]} has no flag --{name}"
            values[name] = value
        t0 = time.perf_counter()
        try:
            common.validate(values, rules)
            message = None
        except common.ConfigError as e:
            message = str(e)
        out.append({"message": message, "seconds": time.perf_counter() - t0})
    json.dump(out, sys.stdout)


if __name__ == "__main__":
    main()
