"""Shared plumbing for absl entry points: workdir, config dump, logging, device set-up.

Every experiment is ``python -m experiments.<name> --workdir=DIR [flags]`` and writes
``DIR/config.json``, ``DIR/metrics.jsonl``, ``DIR/results.json``, ``DIR/plots/*.png`` and
``DIR/checkpoints/``. Rerunning with the same workdir resumes.

Usage in an experiment module::

    from experiments import common
    FLAGS = flags.FLAGS
    common.define_common_flags()

    def main(argv):
        run = common.start(FLAGS)        # JAX is configured here, before first use
        ...
        run.write_results({...})

    if __name__ == "__main__":
        app.run(main)
"""

from __future__ import annotations

import dataclasses
import json
import logging as pylogging
import os
import sys
from typing import Any

from absl import flags, logging

from engine import metrics_io


def define_common_flags() -> None:
    """Flags every experiment shares (defined once per process)."""
    if "workdir" in flags.FLAGS:
        return
    flags.DEFINE_string("workdir", None, "Run directory (created; rerun to resume).")
    flags.DEFINE_integer("num_cpu_devices", 0,
                         "Simulate this many CPU devices (0: leave JAX's default). Must be set "
                         "before JAX starts, so it is applied in common.start().")
    flags.DEFINE_integer("mesh_data", -1, "Size of the mesh data axis (-1: all devices).")
    flags.DEFINE_integer("mesh_feature", 1, "Size of the mesh feature axis.")
    flags.DEFINE_bool("distributed", False, "Call jax.distributed.initialize() (multi-host).")
    flags.DEFINE_string("coordinator_address", None, "--distributed: host:port of process 0 "
                        "(default: auto-detected on SLURM / TPU pods / Open MPI).")
    flags.DEFINE_integer("num_processes", None, "--distributed: number of processes.")
    flags.DEFINE_integer("process_id", None, "--distributed: this process's index.")
    flags.DEFINE_string("cpu_collectives", "gloo", "--distributed on CPU hosts: collectives "
                        "implementation across processes (gloo | mpi | none).")
    flags.DEFINE_bool("progress", True, "Show progress bars.")


@dataclasses.dataclass
class Run:
    """Paths of one run and helpers to write its outputs."""

    workdir: str
    mesh: Any

    @property
    def plots_dir(self) -> str:
        path = os.path.join(self.workdir, "plots")
        os.makedirs(path, exist_ok=True)
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


def configure_jax(num_cpu_devices: int = 0) -> None:
    """Applies device-count settings; must run before JAX initialises its backends."""
    import jax
    if num_cpu_devices:
        jax.config.update("jax_num_cpu_devices", int(num_cpu_devices))


def flag_values(flag_values: flags.FlagValues, module_names: tuple[str, ...] = ()) -> dict:
    """The flags defined by the calling experiment module and the common ones, as a dict."""
    out = {}
    for module, fl in flag_values.flags_by_module_dict().items():
        if module.startswith(("absl", "jax", "tensorflow")):
            continue
        if module_names and not any(module.endswith(m) for m in module_names):
            continue
        for f in fl:
            out[f.name] = f.value
    return out


def start(flag_values_: flags.FlagValues, config: dict | None = None) -> Run:
    """Creates the workdir, configures JAX and logging, dumps config.json, builds the mesh."""
    if not flag_values_.workdir:
        raise SystemExit("--workdir is required (the run directory; rerun it to resume)")
    workdir = metrics_io.resolve_dir(flag_values_.workdir)   # gs:// passes through
    if not metrics_io.is_remote(workdir):
        os.makedirs(workdir, exist_ok=True)
    configure_jax(flag_values_.num_cpu_devices)
    from engine import mesh as mesh_lib  # after configure_jax: it imports jax
    if flag_values_.distributed and flag_values_.cpu_collectives != "none":
        import jax
        # Cross-process collectives between CPU devices need an implementation (GPUs and
        # TPUs bring their own; the setting is ignored there).
        jax.config.update("jax_cpu_collectives_implementation", flag_values_.cpu_collectives)
    mesh_lib.maybe_initialize_distributed(
        flag_values_.distributed, coordinator_address=flag_values_.coordinator_address,
        num_processes=flag_values_.num_processes, process_id=flag_values_.process_id)
    if mesh_lib.is_primary() and not metrics_io.is_remote(workdir):
        # Only process 0 writes the log file; the others log to stderr.
        logging.get_absl_handler().use_absl_log_file("log", workdir)
    logging.set_stderrthreshold("warning")
    pylogging.getLogger("absl").setLevel(pylogging.INFO)
    cfg = dict(flag_values(flag_values_))
    if config:
        cfg.update(config)
    cfg["argv"] = sys.argv
    metrics_io.write_json(os.path.join(workdir, "config.json"), cfg)
    mesh = mesh_lib.make_mesh(flag_values_.mesh_data, flag_values_.mesh_feature)
    logging.info("workdir %s, mesh %s", workdir, dict(mesh.shape))
    return Run(workdir=workdir, mesh=mesh)


def load_json(path: str) -> Any:
    with open(path, encoding="utf-8") as f:
        return json.load(f)
