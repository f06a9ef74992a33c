"""A fake ``gs://`` object store for tests, offline: ``gs://BUCKET/KEY`` is ``ROOT/BUCKET/KEY``.

Two layers are redirected, the only two through which a run may reach a remote workdir:

- `etils.epath` (the run-directory file API, `engine.metrics_io`, and orbax's folder handling):
  every backend call on a ``gs://`` path is made on the local path under ``ROOT`` instead
  (`etils.epath.testing.mock_epath`);
- orbax's TensorStore key-value spec (checkpoint and SAE arrays): a ``gs://`` directory gets the
  local ``file`` driver under ``ROOT`` instead of the network ``gcs`` driver (and orbax's bucket
  layout query, google-cloud-storage, answers "flat bucket").

Anything that bypasses them (``open("gs://...")``, ``os.makedirs``, ``np.save``, absl log files)
either fails or creates a local folder literally named ``gs:`` in the working directory, which the
tests check for.

In-process: ``with fake_gcs(root): ...``. A whole entry point::

    python tests/fake_gcs.py ROOT -m experiments.universality --workdir=gs://bucket/run ...
"""

from __future__ import annotations

import contextlib
import os
import runpy
import sys
from collections.abc import Iterator
from unittest import mock

PREFIX = "gs://"


@contextlib.contextmanager
def fake_gcs(root: str) -> Iterator[None]:
    from etils.epath import testing

    root = os.path.abspath(root)
    os.makedirs(root, exist_ok=True)

    def local(path) -> str:
        p = os.fspath(path)
        return os.path.join(root, p[len(PREFIX) :]) if p.startswith(PREFIX) else p

    def remote(path: str, like) -> str:
        """A local result path back in the caller's ``gs://`` form."""
        if not os.fspath(like).startswith(PREFIX) or not path.startswith(root + os.sep):
            return path
        return PREFIX + path[len(root) + 1 :]

    def one(orig, path, *args, **kw):
        return orig(local(path), *args, **kw)

    def two(orig, path, dst, *args, **kw):
        return orig(local(path), local(dst), *args, **kw)

    def glob(orig, pattern):
        return [remote(p, pattern) for p in orig(local(pattern))]

    def walk(orig, top, **kw):
        for r, dirs, files in orig(local(top), **kw):
            yield remote(r, top), dirs, files

    from orbax.checkpoint._src.path import gcs_utils
    from orbax.checkpoint._src.serialization import tensorstore_utils as ts_utils

    build = ts_utils.build_kvstore_tspec

    def build_kvstore_tspec(directory, *args, **kw):
        return build(local(directory), *args, **kw)

    with (
        testing.mock_epath(
            open=one,
            exists=one,
            isdir=one,
            listdir=one,
            makedirs=one,
            mkdir=one,
            remove=one,
            rmtree=one,
            stat=one,
            rename=two,
            replace=two,
            copy=two,
            glob=glob,
            walk=walk,
        ),
        mock.patch.object(ts_utils, "build_kvstore_tspec", build_kvstore_tspec),
        # a bucket-layout query (google-cloud-storage, network): a plain bucket here
        mock.patch.object(gcs_utils, "is_hierarchical_namespace_enabled", lambda path: False),
    ):
        yield


def main() -> None:
    if len(sys.argv) < 4 or sys.argv[2] != "-m":
        sys.exit("usage: python tests/fake_gcs.py ROOT -m MODULE [ARGS]")
    root, module, args = sys.argv[1], sys.argv[3], sys.argv[4:]
    sys.argv = [module, *args]
    with fake_gcs(root):
        runpy.run_module(module, run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
