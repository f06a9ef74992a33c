"""Runs that can't lie: damaged checkpoints, reruns of finished correlation blocks, stale
metrics lines, and the run fingerprint (refuse / resume / nothing to do / --overwrite)."""

import glob
import json
import logging
import os
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from engine import checkpoint, fingerprint, metrics_io, streaming, train
from engine import correlation as corr_lib
from experiments import common

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# -- damaged checkpoints ----------------------------------------------------------------------


def _save_two(directory):
    ck = checkpoint.Checkpointer(directory, max_to_keep=5)
    for step in (1, 2):
        ck.save(step, {"w": jnp.arange(300.0) * step}, {"position": 10 * step})
    ck.close()


def _corrupt(step_dir, kind):
    if kind == "truncated_data":
        files = glob.glob(os.path.join(step_dir, "state", "**", "d", "*"), recursive=True)
        assert files
        for f in files:
            with open(f, "r+b") as fh:
                fh.truncate(7)
    elif kind == "empty_manifest":
        for f in glob.glob(os.path.join(step_dir, "state", "**", "manifest.ocdbt"), recursive=True):
            open(f, "w").close()
    elif kind == "missing_meta_item":
        shutil.rmtree(os.path.join(step_dir, "meta"))
    elif kind == "missing_state_item":
        shutil.rmtree(os.path.join(step_dir, "state"))
    elif kind == "garbled_meta":
        with open(os.path.join(step_dir, "meta", "metadata"), "w") as f:
            f.write("{not json")
    elif kind == "garbled_state_metadata":
        with open(os.path.join(step_dir, "state", "_METADATA"), "w") as f:
            f.write("\x00garbage")
    elif kind == "meta_not_a_dict":
        with open(os.path.join(step_dir, "meta", "metadata"), "w") as f:
            f.write("[1, 2, 3]")
    else:
        raise AssertionError(kind)


KINDS = [
    "truncated_data",
    "empty_manifest",
    "missing_meta_item",
    "missing_state_item",
    "garbled_meta",
    "garbled_state_metadata",
    "meta_not_a_dict",
]


@pytest.mark.parametrize("kind", KINDS)
def test_damaged_latest_checkpoint_falls_back_to_newest_intact(tmp_path, caplog, kind):
    d = str(tmp_path / "ck")
    _save_two(d)
    _corrupt(os.path.join(d, "2"), kind)
    ck = checkpoint.Checkpointer(d)
    with caplog.at_level(logging.WARNING):
        step, state, meta = ck.restore({"w": jnp.zeros(300)})
    assert step == 1 and meta == {"position": 10}
    np.testing.assert_array_equal(np.asarray(state["w"]), np.arange(300.0))
    lines = [r.getMessage() for r in caplog.records if "damaged" in r.getMessage()]
    assert len(lines) == 1 and "\n" not in lines[0]
    assert "/2 is damaged" in lines[0] and "falling back to step 1" in lines[0]
    # Set aside (kept for inspection) and out of the way: the step can be saved again.
    assert os.path.isdir(os.path.join(d, "damaged", "2-0"))
    ck.save(2, {"w": jnp.ones(300)}, {"position": 20})
    assert ck.restore({"w": jnp.zeros(300)})[0] == 2
    ck.close()


def test_every_checkpoint_damaged_starts_from_scratch(tmp_path, caplog):
    d = str(tmp_path / "ck")
    _save_two(d)
    _corrupt(os.path.join(d, "2"), "garbled_meta")
    _corrupt(os.path.join(d, "1"), "truncated_data")
    with caplog.at_level(logging.WARNING):
        assert checkpoint.Checkpointer(d).restore({"w": jnp.zeros(300)}) is None
    assert any("starting from scratch" in r.getMessage() for r in caplog.records)


def test_structure_mismatch_is_an_error_not_damage(tmp_path):
    d = str(tmp_path / "ck")
    _save_two(d)
    with pytest.raises(ValueError, match="shape"):
        checkpoint.Checkpointer(d).restore({"w": jnp.zeros(299)})
    assert sorted(os.listdir(d)) == ["1", "2"]  # nothing moved


def _tiny_train(mesh, workdir, steps):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(256, 4)).astype(np.float32)
    y = x @ rng.normal(size=(4, 1)).astype(np.float32)

    def loss_fn(params, batch, key):
        del key
        err = batch[0] @ params["w"] - batch[1]
        return jnp.mean(err**2), {}

    tx = optax.adam(0.05)
    state = train.create_train_state({"w": jnp.zeros((4, 1))}, tx, jax.random.PRNGKey(0))
    stream = streaming.ChunkStream((x, y), 32, repeat=True, shuffle_seed=0)
    return train.train(
        state,
        train.make_train_step(loss_fn, tx, mesh),
        stream,
        train.LoopConfig(
            num_steps=steps, log_every=5, checkpoint_every=10, max_to_keep=3, progress=False
        ),
        workdir=workdir,
        mesh=mesh,
    )


def test_train_resumes_from_intact_checkpoint_when_latest_is_damaged(mesh4, tmp_path):
    killed = str(tmp_path / "killed")
    _tiny_train(mesh4, killed, 30)  # checkpoints 10, 20, 30
    _corrupt(os.path.join(killed, "checkpoints", "30"), "truncated_data")
    final = _tiny_train(mesh4, killed, 40)  # falls back to 20, trains to 40
    clean = _tiny_train(mesh4, str(tmp_path / "clean"), 40)
    np.testing.assert_array_equal(np.asarray(final.params["w"]), np.asarray(clean.params["w"]))
    steps = [r["step"] for r in metrics_io.read_jsonl(os.path.join(killed, "metrics.jsonl"))]
    assert steps == [5, 10, 15, 20, 25, 30, 35, 40]  # lines past 20 rewritten once


def test_restart_from_scratch_drops_stale_metrics_lines(mesh1, tmp_path):
    d = str(tmp_path / "run")
    os.makedirs(d)
    with open(os.path.join(d, "metrics.jsonl"), "w") as f:  # a killed run's lines, and a
        for s in (5, 10, 15):  # half-written last line
            f.write(json.dumps({"step": s, "loss": 99.0}) + "\n")
        f.write('{"step": 20, "lo')
    _tiny_train(mesh1, d, 10)  # no checkpoint: starts from scratch
    rows = metrics_io.read_jsonl(os.path.join(d, "metrics.jsonl"))
    assert [r["step"] for r in rows] == [5, 10]
    assert all(r["loss"] != 99.0 for r in rows)


# -- correlation blocks rerun -------------------------------------------------------------------


@pytest.mark.parametrize("tiles", [None, (3, 4)], ids=["one_block", "multi_block"])
def test_correlate_reruns_after_blocks_finished(mesh1, tmp_path, tiles):
    rng = np.random.default_rng(0)
    a = rng.normal(size=(200, 7)).astype(np.float32)
    b = np.concatenate(
        [a[:, :4] * 2 + 0.1 * rng.normal(size=(200, 4)), rng.normal(size=(200, 5))], 1
    ).astype(np.float32)
    kw = dict(chunk_size=40, checkpoint_dir=str(tmp_path / "ck"))
    if tiles:
        kw.update(tile_a=tiles[0], tile_b=tiles[1])
    first = corr_lib.correlate((a, b), 7, 9, mesh1, **kw)
    again = corr_lib.correlate((a, b), 7, 9, mesh1, **kw)  # every block already finished
    np.testing.assert_array_equal(first.a_match, again.a_match)
    np.testing.assert_allclose(first.a_value, again.a_value, rtol=0, atol=1e-7)
    assert again.rows == 200
    # Reference: float64 Pearson correlations.
    ref = np.corrcoef(a.T.astype(np.float64), b.T.astype(np.float64))[:7, 7:]
    np.testing.assert_array_equal(again.a_match, ref.argmax(1))
    if tiles:
        assert len(os.listdir(tmp_path / "ck")) == 3 * 3  # ceil(7/3) x ceil(9/4) blocks


# -- run fingerprint ----------------------------------------------------------------------------


def test_fingerprint_diff_names_keys():
    changes = fingerprint.diff({"a": 1, "n": {"x": 1, "y": 2}}, {"a": 2, "n": {"x": 1}, "z": 0})
    assert [k for k, _, _ in changes] == ["a", "n.y", "z"]
    line = fingerprint.describe_diff(changes)
    assert "a (recorded 1, now 2)" in line and "n.y (recorded 2, now '<absent>')" in line


def test_path_identity_hashes_full_contents_and_reuses_unchanged(tmp_path):
    d = tmp_path / "sae"
    d.mkdir()
    big = np.zeros(1 << 20, np.uint8)
    (d / "w.bin").write_bytes(big.tobytes())
    (d / "cfg.json").write_text("{}")
    first = fingerprint.path_identity(str(d))
    big[-1] = 1  # one byte at the very end: not a sample of rows
    (d / "w.bin").write_bytes(big.tobytes())
    second = fingerprint.path_identity(str(d))
    assert first["hash"] != second["hash"] and first["files"] == 2
    # Unchanged size and mtime: the recorded hash is reused (no re-read).
    st = os.stat(d / "w.bin")
    fake = {
        "w.bin": [st.st_size, st.st_mtime_ns, "recorded"],
        **{k: v for k, v in second["stat"].items() if k != "w.bin"},
    }
    reused = fingerprint.path_identity(str(d), stat_cache=fake)
    assert reused["stat"]["w.bin"][2] == "recorded"


def _fp(**settings):
    return common.make_fingerprint({"workdir": "x", "progress": True, "lr": 0.1, **settings})


def test_check_workdir_states(tmp_path):
    wd = str(tmp_path)
    fp = _fp()
    assert common.check_workdir(wd, fp, overwrite=False) == "new"
    metrics_io.write_json(os.path.join(wd, common.FINGERPRINT), fp)
    # Excluded settings (progress bars, workdir) do not change the fingerprint.
    assert common.check_workdir(wd, _fp(progress=False, workdir="y"), False) == "resume"
    with pytest.raises(
        common.ConfigError,
        match=r"settings.lr \(recorded 0.1, now 0.2\).*"
        r"--overwrite",
    ):
        common.check_workdir(wd, _fp(lr=0.2), False)
    metrics_io.write_json(os.path.join(wd, "results.json"), {})
    metrics_io.write_json(os.path.join(wd, common.FINGERPRINT), {**fp, "finished": "T0"})
    with pytest.raises(common.NothingToDo, match="nothing to do: results from T0"):
        common.check_workdir(wd, fp, False)
    (tmp_path / "checkpoints").mkdir()
    assert common.check_workdir(wd, _fp(lr=0.2), True) == "overwritten"
    assert os.listdir(wd) == []


def test_data_identity_enters_the_fingerprint(tmp_path):
    text = tmp_path / "corpus.txt"
    text.write_text("one two three\n")
    a = common.make_fingerprint({"lr": 1}, data={"text": str(text)})
    text.write_text("one two four\n")
    b = common.make_fingerprint({"lr": 1}, data={"text": str(text)}, previous=a)
    wd = str(tmp_path / "run")
    os.makedirs(wd)
    metrics_io.write_json(os.path.join(wd, common.FINGERPRINT), a)
    with pytest.raises(common.ConfigError, match=r"data\.text\.hash"):
        common.check_workdir(wd, b, False)


def test_older_run_without_fingerprint_is_refused(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(common.ConfigError, match="older version"):
        common.check_workdir(str(tmp_path), _fp(), False)


def _demo(workdir, *flags):
    env = dict(os.environ)
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    env.pop("XLA_FLAGS", None)
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "experiments.demo",
            f"--workdir={workdir}",
            "--num_steps=20",
            "--n_rows=512",
            "--batch_size=64",
            "--log_every=5",
            "--checkpoint_every=10",
            "--noprogress",
            *flags,
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )


def test_demo_rerun_refuse_nothing_to_do_and_overwrite(tmp_path):
    wd = tmp_path / "run"
    first = _demo(wd)
    assert first.returncode == 0, first.stderr[-2000:]
    with open(wd / "results.json") as f:
        results = json.load(f)
    assert results["final_step"] == 20
    # Same settings (log frequency and progress bars excluded): nothing to do.
    again = _demo(wd, "--log_every=2", "--progress")
    assert again.returncode == 0
    assert again.stdout.strip().startswith("nothing to do: results from ")
    # Other settings: refused before any work, one line naming the keys.
    changed = _demo(wd, "--lr=0.02", "--num_steps=30")
    assert changed.returncode == 2 and "Traceback" not in changed.stderr
    line = changed.stderr.strip()
    assert "\n" not in line and "settings.lr (recorded 0.01, now 0.02)" in line
    assert "settings.num_steps (recorded 20, now 30)" in line and "--overwrite" in line
    with open(wd / "results.json") as f:
        assert json.load(f) == results  # untouched
    # --overwrite clears the old run and computes the new one.
    over = _demo(wd, "--lr=0.02", "--num_steps=30", "--overwrite")
    assert over.returncode == 0, over.stderr[-2000:]
    with open(wd / "results.json") as f:
        assert json.load(f)["final_step"] == 30
    with open(wd / "config.json") as f:
        cfg = json.load(f)
    assert cfg["lr"] == 0.02 and cfg["num_steps"] == 30 and cfg["workdir_state"] == "overwritten"
    steps = [r["step"] for r in metrics_io.read_jsonl(str(wd / "metrics.jsonl"))]
    assert steps == sorted(set(steps)) and steps[-1] == 30


def test_log_file_keeps_project_messages_and_warnings_only():
    import orbax.checkpoint as ocp

    def record(path, level):
        return logging.LogRecord("absl", level, path, 1, "m", None, None)

    keep = common._ProjectOnly()
    orbax_file = os.path.join(os.path.dirname(ocp.__file__), "checkpoint_manager.py")
    assert not keep.filter(record(orbax_file, logging.INFO))
    assert keep.filter(record(orbax_file, logging.WARNING))
    assert keep.filter(record(checkpoint.__file__, logging.INFO))
    assert keep.filter(record(common.__file__, logging.INFO))
