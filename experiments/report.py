"""Rebuild the HTML report (the paired-feature browser) of an existing universality workdir.

The universality pipeline writes ``DIR/report/index.html`` at the end of every run; this
rewrites it from what the run left in ``DIR`` (``results.json``, ``plots/``, ``features/``),
e.g. after the report code changed::

    python -m experiments.report --workdir=runs/universality/toy

Open ``DIR/report/index.html`` in a browser (no server needed). See
`experiments.pipeline.html_report` for what the page shows and the data layout.
"""

from __future__ import annotations

import sys

from absl import app, flags

FLAGS = flags.FLAGS


def define_flags() -> None:
    """This tool's flags, defined when it runs (not at import: every experiments module
    imports together; ``--workdir`` and ``--out`` are also names of other entry points)."""
    flags.DEFINE_string("workdir", None, "Workdir of a finished universality run.")
    flags.DEFINE_string("out", None, "Report folder (default: WORKDIR/report).")
    flags.DEFINE_bool("dry_run", False, "Check the workdir and say where the report would go.")


def main(argv):
    del argv
    from experiments.pipeline import html_report

    if not FLAGS.workdir:
        print("report: --workdir is required (a universality run directory)", file=sys.stderr)
        sys.exit(2)
    if FLAGS.dry_run:
        import os

        if not os.path.isdir(FLAGS.workdir):
            print(f"report: --workdir={FLAGS.workdir}: no such directory", file=sys.stderr)
            sys.exit(2)
        if not os.path.isfile(os.path.join(FLAGS.workdir, "results.json")):
            print(
                f"report: {FLAGS.workdir}: no results.json (expected a finished universality run)",
                file=sys.stderr,
            )
            sys.exit(2)
        out = FLAGS.out or os.path.join(FLAGS.workdir, "report")
        print(f"dry run: settings OK; would write {os.path.join(out, 'index.html')}")
        return
    try:
        path = html_report.write_report(FLAGS.workdir, FLAGS.out)
    except html_report.ReportError as e:
        print(f"report: {e}", file=sys.stderr)
        sys.exit(2)
    print(f"report: {path}")


if __name__ == "__main__":
    define_flags()
    app.run(main)
