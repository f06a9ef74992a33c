"""Garbage files are named as such in one line (issue 12): .npy readers (activation caches,
train_sae's --npy_path), text readers (.txt / .jsonl / .gz), and train_sae's held-out rows
never silently falling back to training rows."""

import gzip
import os

import numpy as np
import pytest

from engine import checks
from models import activation_cache, text


def _one_line(e):
    msg = str(e.value)
    assert "\n" not in msg, msg
    return msg


@pytest.fixture
def npy_files(tmp_path):
    good = tmp_path / "good.npy"
    np.save(good, np.ones((10, 4), np.float32))
    data = good.read_bytes()
    files = {
        "garbage": (os.urandom(300), "not a .npy file"),
        "empty": (b"", "empty"),
        "text": (b"hello, this is text\n" * 5, "not a .npy file"),
        "truncated header": (data[:40], "damaged .npy header"),
        "truncated data": (data[:-20], "truncated"),
    }
    out = {}
    for name, (blob, match) in files.items():
        p = tmp_path / f"{name.replace(' ', '_')}.npy"
        p.write_bytes(blob)
        out[name] = (str(p), match)
    pickled = tmp_path / "object.npy"
    np.save(pickled, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    out["object"] = (str(pickled), "object \\(pickled\\)")
    npz = tmp_path / "archive.npy"
    with open(npz, "wb") as f:
        np.savez(f, a=np.ones(3))
    out["npz"] = (str(npz), "npz archive")
    out["missing"] = (str(tmp_path / "nope.npy"), "no such file")
    return str(good), out


def test_load_npy_names_each_kind_of_bad_file(npy_files):
    good, bad = npy_files
    np.testing.assert_array_equal(activation_cache.load_npy(good, "acts"), np.ones((10, 4)))
    for name, (path, match) in bad.items():
        with pytest.raises(checks.InputError, match=match) as e:
            activation_cache.load_npy(path, "acts")
        msg = _one_line(e)
        assert path in msg and msg.startswith("acts"), (name, msg)


def test_train_sae_npy_path_garbage_and_shape(npy_files, tmp_path, mesh1):
    from experiments import common, train_sae

    good, bad = npy_files
    run = common.Run(workdir=str(tmp_path / "run"), mesh=mesh1)

    def opts(**kw):
        o = common.default_values(train_sae.CONFIG)
        o.update(progress=False, source="npy", d_sae=["8"], steps=2, batch_size=16, **kw)
        return o

    for _name, (path, match) in bad.items():
        with pytest.raises(checks.InputError, match=match) as e:
            train_sae.run_train_sae(run, opts(npy_path=path))
        assert "--npy_path" in _one_line(e)
    three_d = tmp_path / "3d.npy"
    np.save(three_d, np.ones((4, 5, 6), np.float32))
    with pytest.raises(checks.InputError, match=r"2-D numeric .*\(4, 5, 6\)"):
        train_sae.run_train_sae(run, opts(npy_path=str(three_d)))
    # Too few rows for held-out metrics: refused (it silently evaluated on training rows) ...
    small = tmp_path / "small.npy"
    np.save(small, np.random.default_rng(0).normal(size=(200, 6)).astype(np.float32))
    with pytest.raises(checks.InputError, match="20 held-out rows .*--eval_on_train") as e:
        train_sae.run_train_sae(run, opts(npy_path=str(small)))
    _one_line(e)
    # ... unless asked for explicitly, and then reported.
    res = train_sae.run_train_sae(run, opts(npy_path=str(small), eval_on_train=True))
    assert res["eval_rows_held_out"] is False and res["n_eval_rows"] == 200


@pytest.mark.parametrize("suffix", [".txt", ".jsonl", ".txt.gz"])
def test_binary_text_files_are_named(tmp_path, suffix):
    blobs = {
        "random bytes": os.urandom(2000),
        "npy": b"\x93NUMPY\x01\x00v\x00{'descr': '<f4'}" + b"\x00" * 64,
        "nul bytes": b"\x00\x00\x00\x00 start\nand more\n",
    }
    for name, blob in blobs.items():
        p = tmp_path / f"{name.replace(' ', '_')}{suffix}"
        p.write_bytes(gzip.compress(blob) if suffix.endswith(".gz") else blob)
        with pytest.raises(checks.InputError, match="binary file") as e:
            list(text.read_documents(str(p), txt_split="line"))
        assert str(p) in _one_line(e), name
    if suffix.endswith(".gz"):
        p = tmp_path / f"not_gzip{suffix}"
        p.write_bytes(b"plain text, not gzip\n")
        with pytest.raises(checks.InputError, match="not a valid gzip file") as e:
            list(text.read_documents(str(p)))
        _one_line(e)


def test_cache_with_garbage_shard_or_metadata_is_named(tmp_path):
    # A damaged metadata file and a shard replaced by garbage: one-line errors.
    meta = tmp_path / "meta.json"
    meta.write_bytes(os.urandom(100) + b"\xff\xfe")
    with pytest.raises(checks.InputError, match="not UTF-8 JSON|not valid JSON") as e:
        activation_cache._read_json(str(meta))
    _one_line(e)
    shard = tmp_path / "00000.npy"
    shard.write_bytes(os.urandom(500))
    with pytest.raises(checks.InputError, match="activation cache file .*not a .npy file"):
        activation_cache._check_npy(str(shard), (2, 3), np.int32)


def test_sae_format_loaders_name_garbage_files(tmp_path):
    """Each SAE file format with its files replaced by random bytes: one line naming the file
    and what it is not (never 'pickled data' for a file that is just garbage)."""
    import json

    from models import formats

    garbage = os.urandom(400)
    cases = []
    sl = tmp_path / "saelens"
    sl.mkdir()
    (sl / "cfg.json").write_bytes(garbage)
    (sl / "sae_weights.safetensors").write_bytes(garbage)
    cases.append((sl, {}, "cfg.json is not valid JSON"))
    sl2 = tmp_path / "saelens2"
    sl2.mkdir()
    (sl2 / "cfg.json").write_text(json.dumps({"architecture": "standard", "d_in": 4, "d_sae": 8}))
    (sl2 / "sae_weights.safetensors").write_bytes(garbage)
    cases.append((sl2, {}, "not a safetensors file"))
    (tmp_path / "params.npz").write_bytes(garbage)
    cases.append((tmp_path / "params.npz", {"format": "gemma_scope"}, "not an .npz archive"))
    (tmp_path / "ae.pt").write_bytes(garbage)
    cases.append((tmp_path / "ae.pt", {"format": "dictionary_learning"}, "torch.load"))
    nat = tmp_path / "native"
    nat.mkdir()
    (nat / "sae_config.json").write_bytes(garbage + b"\xff")
    cases.append((nat, {"format": "native"}, "sae_config.json is not"))
    for path, kw, match in cases:
        with pytest.raises(checks.InputError, match=match) as e:
            formats.load_sae(str(path), **kw)
        assert str(path) in _one_line(e) and "pickled" not in str(e.value)
