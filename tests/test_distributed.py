"""Two processes on localhost (jax.distributed, gloo, 2 CPU devices each) give the same SAE
training, feature pass, null-tested metrics and activation harvest as one process with 4
devices, and the whole `experiments.universality` run gives the same results.json; only
process 0 writes."""

import json
import os
import re
import signal
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
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                os.path.join(REPO, "tests", "distributed_worker.py"),
                str(i),
                "2",
                str(port),
                str(tmp_path),
            ],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            cwd=REPO,
        )
        for i in range(2)
    ]
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
    # harvest: each process ran the model on its own shards (5 shards: 3 + 2); the shared
    # cache equals a plain in-memory forward pass of the same contexts
    from models import lm, text

    model = lm.LanguageModel.load(str(tmp_path / "harvest" / "models" / "model_a"))
    contexts = distributed_worker.harvest_contexts(model.tokenizer)
    want = model.run(contexts, distributed_worker.HOOKS, batch_size=23)
    np.testing.assert_array_equal(got["cache_shards"], [5, 5, 5, 5, 3])
    np.testing.assert_array_equal(got["cache_tokens"], contexts.token_ids)
    np.testing.assert_array_equal(got["cache_mask"], contexts.mask)
    for hook in distributed_worker.HOOKS:
        np.testing.assert_array_equal(got[f"cache_rows_{hook}"], contexts.token_ids[contexts.mask])
        np.testing.assert_allclose(
            got[f"cache_{hook}"], want.acts[hook][contexts.mask], rtol=1e-5, atol=1e-6, err_msg=hook
        )
    # ... and is bit for bit the cache one process harvests (same shards, same batches: the
    # model's forward pass does not depend on which process runs a shard)
    one = distributed_worker.harvest_workload(str(tmp_path / "harvest_one"))
    for key, value in one.items():
        np.testing.assert_array_equal(got[key], value, err_msg=key)
    special = np.isin(contexts.token_ids, text.special_token_ids(model.tokenizer))
    assert int(got["cache_non_special"]) == int((contexts.mask & ~special).sum())
    ref = distributed_worker.workload(
        mesh_lib.make_mesh(devices=jax.devices()[:4]), str(tmp_path / "ref")
    )
    assert bool(got["tiled"]) and bool(ref["tiled"])
    for key, ref_value in ref.items():
        if ref_value.dtype.kind == "f":
            np.testing.assert_allclose(got[key], ref_value, rtol=2e-5, atol=2e-6, err_msg=key)
        else:
            np.testing.assert_array_equal(got[key], ref_value, err_msg=key)


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
    assert not os.path.exists(tmp_path / "gs:")  # no local folder was made


# The whole entry point, small: toy data, SAEs, feature passes, metrics with nulls, floor and
# control comparisons (no ceiling: it would only add two more of the same steps).
UNIVERSALITY = (
    "--toy_n_tokens=2048",
    "--toy_steps=40",
    "--num_permutations=20",
    "--chunk_size=256",
    "--ceiling_sides=",
)
_DIGEST = re.compile(r"\b[0-9a-f]{16}\b")
_NUMBER = re.compile(r"-?\d+(\.\d+)?(e-?\d+)?")


def _assert_same(got, want, path="results", atol=1e-5):
    """Equal JSON trees: numbers to float32-reduction tolerance (also inside strings such as
    notes), everything else exactly."""
    if isinstance(want, dict):
        assert sorted(got) == sorted(want), f"{path}: keys {sorted(got)} != {sorted(want)}"
        # A metric flagged uninformative (e.g. SVCCA on fewer rows than components: score and
        # every null value are 1 up to float32 rounding, null_std ~1e-8) has z, p and the
        # null rank made of rounding noise, which the reduction order changes; its score,
        # null mean and spread are still compared.
        # Its score itself can be ill-conditioned too: PWCCA with about as many pairs as
        # components weights directions inside a tied eigenspace that rounding rotates (a
        # 1e-7 nudge of the input moves it by up to 1.4e-3; WORKSPACE.md "Several
        # processes"), so an uninformative metric's numbers are compared to 5e-3.
        degenerate = want.get("informative") is False
        noise = {"z", "p", "num_null_at_or_above"} if degenerate else set()
        for k in want:
            if k not in noise:
                _assert_same(got[k], want[k], f"{path}/{k}", 5e-3 if degenerate else atol)
    elif isinstance(want, list):
        assert isinstance(got, list) and len(got) == len(want), f"{path}: lengths differ"
        for i, (g, w) in enumerate(zip(got, want)):
            _assert_same(g, w, f"{path}[{i}]", atol)
    elif isinstance(want, bool) or want is None:
        assert got == want, f"{path}: {got!r} != {want!r}"
    elif isinstance(want, (int, float)):
        assert np.isclose(got, want, rtol=1e-4, atol=atol), f"{path}: {got!r} != {want!r}"
    elif isinstance(want, str):
        assert _NUMBER.sub("#", got) == _NUMBER.sub("#", want), f"{path}: {got!r} != {want!r}"
        for g, w in zip(_NUMBER.finditer(got), _NUMBER.finditer(want)):
            assert np.isclose(float(g.group()), float(w.group()), rtol=1e-3, atol=1e-3), (
                f"{path}: {got!r} != {want!r}"
            )
    else:
        assert got == want, f"{path}: {got!r} != {want!r}"


def _files(root) -> set:
    """Result files of a workdir; orbax's folders (checkpoints, saved SAE arrays: their file
    names are content hashes and per-process) and the log file left out."""
    out = set()
    for d, _, names in os.walk(root):
        rel = os.path.relpath(d, root)
        parts = rel.split(os.sep)
        if "checkpoints" in parts or "params" in parts or any("orbax" in p for p in parts):
            continue
        # step-cache names carry a digest of the SAE weights, which float reduction order
        # changes in the last bits: compare the names without it
        out |= {
            _DIGEST.sub("#", os.path.normpath(os.path.join(rel, n)))
            for n in names
            if not n.startswith("log")
        }
    return out


def _run_two_and_one(tmp_path, args, *, mp_env=None, mp_timeout, one_timeout) -> None:
    """``experiments.universality ARGS`` as 2 processes x 2 CPU devices (gloo, through
    `launch/cpu_multiprocess.sh`) into tmp_path/mp and as 1 process x 4 devices into
    tmp_path/one; both must exit 0."""
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env["PYTHONPATH"] = REPO
    env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")
    # its own process group: a timeout takes the launcher and both processes down
    mp = subprocess.Popen(
        [
            os.path.join(REPO, "launch", "cpu_multiprocess.sh"),
            "2",
            "2",
            "experiments.universality",
            f"--workdir={tmp_path / 'mp'}",
            *args,
        ],
        env={**env, **(mp_env or {})},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        cwd=REPO,
        start_new_session=True,
    )
    try:
        out, _ = mp.communicate(timeout=mp_timeout)
    except subprocess.TimeoutExpired:
        os.killpg(mp.pid, signal.SIGKILL)
        raise
    assert mp.returncode == 0, out[-4000:]
    one = subprocess.run(
        [
            sys.executable,
            "-m",
            "experiments.universality",
            f"--workdir={tmp_path / 'one'}",
            "--num_cpu_devices=4",
            *args,
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=one_timeout,
        cwd=REPO,
    )
    assert one.returncode == 0, one.stdout[-3000:] + one.stderr[-3000:]


@pytest.mark.slow
def test_universality_two_processes_equal_one(tmp_path):
    """`launch/cpu_multiprocess.sh 2 2 experiments.universality` (2 processes x 2 CPU devices,
    gloo) writes the results.json of a 1-process run on 4 devices, and process 1 writes no
    file (only orbax's own per-process checkpoint metadata, inside orbax's folders)."""
    audit = tmp_path / "audit"
    audit.mkdir()
    _run_two_and_one(
        tmp_path,
        UNIVERSALITY,
        mp_env={
            "WRITE_AUDIT": str(audit),
            "PYTHON": f"{sys.executable} {os.path.join(REPO, 'tests', 'write_audit.py')}",
        },
        mp_timeout=2400,
        one_timeout=1800,
    )
    got = json.load(open(tmp_path / "mp" / "results.json"))
    want = json.load(open(tmp_path / "one" / "results.json"))
    assert {c["kind"] for c in want["comparisons"]} >= {"cross", "floor"}
    assert all(c["metrics"] for c in want["comparisons"] if c["kind"] == "cross")
    _assert_same(got, want)
    assert _files(tmp_path / "mp") == _files(tmp_path / "one")
    # who wrote what: process 0 the results, process 1 nothing outside orbax's folders
    wrote0 = {p for _, p in json.load(open(audit / "process-0.json"))}
    wrote1 = [p for _, p in json.load(open(audit / "process-1.json"))]
    assert str(tmp_path / "mp" / "results.json") in wrote0
    assert [p for p in wrote1 if ".orbax-checkpoint-tmp" not in p] == []


# The language-model preset streamed (--lm_activations=stream): each process harvests its
# shards of the text into the shared caches, SAEs train from the caches, the feature pass
# streams them. One tiny cell, no reference points (the in-memory path and the floor are
# covered above and in tests/test_lm_stream.py).
LM_STREAM = (
    "--config=experiments/configs/universality_lm.py",
    "--hookpoints_a=resid_post.0",
    "--hookpoints_b=resid_post.1",
    "--max_contexts=8",
    "--context_length=32",
    "--sae_steps=20",
    "--sae_batch_size=64",
    "--num_permutations=10",
    "--metrics=svcca,cka",
    "--ceiling_sides=",
    "--norandom_init_floor",
    "--lm_activations=stream",
    "--noprogress",
)


@pytest.mark.slow
def test_lm_stream_two_processes_equal_one(tmp_path):
    _run_two_and_one(tmp_path, LM_STREAM, mp_timeout=1200, one_timeout=900)
    # the workdirs differ: paths inside them (the tiny models built there) are compared without
    got, want = (
        json.loads(open(tmp_path / w / "results.json").read().replace(str(tmp_path / w), "WD"))
        for w in ("mp", "one")
    )
    assert got["activation_mode"]["mode"] == want["activation_mode"]["mode"] == "stream"
    assert {s["recipe"]["data"]["source"] for s in got["saes"]} == {"cache"}
    assert [c["kind"] for c in want["comparisons"]] == ["cross"]
    assert want["comparisons"][0]["metrics"]
    _assert_same(got, want)
    # the shared caches hold the same tokens and activations as the one-process caches
    from models import activation_cache

    for side in ("a", "b"):
        cm = activation_cache.ActivationCache(str(tmp_path / "mp" / "activations" / side))
        c1 = activation_cache.ActivationCache(str(tmp_path / "one" / "activations" / side))
        np.testing.assert_array_equal(cm.token_ids(), c1.token_ids())
        assert cm.metadata["token_count"] == c1.metadata["token_count"]
