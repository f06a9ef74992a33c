"""Native SAE format: exact round trip (arrays, config, metadata) and clear errors on bad files."""

import json
import os
import shutil

import numpy as np
import pytest

from engine.checks import InputError
from models import sae as sae_lib
from models import sae_io_native as io


def _sae(activation="jumprelu", k=0, seed=0):
    cfg = sae_lib.SAEConfig(
        6, 10, activation, k=k, input_scale=1.7, apply_b_dec_to_input=False
    ).with_metadata(source="toy", hookpoint="resid_post.3", training={"lr": 1e-3, "seeds": [0, 1]})
    rng = np.random.default_rng(seed)
    return sae_lib.from_arrays(
        cfg,
        rng.normal(size=(6, 10)),
        rng.normal(size=10),
        rng.normal(size=(10, 6)),
        rng.normal(size=6),
        rng.uniform(size=10),
    )


@pytest.mark.parametrize("activation,k", [("jumprelu", 0), ("topk", 3)])
def test_round_trip_is_exact(tmp_path, activation, k):
    sae = _sae(activation, k)
    io.save_sae(str(tmp_path / "s"), sae)
    back = io.load_sae(str(tmp_path / "s"))
    assert back.config == sae.config
    assert back.config.meta["training"] == (("lr", 1e-3), ("seeds", (0, 1)))
    for f in io.FIELDS:
        np.testing.assert_array_equal(np.asarray(getattr(back, f)), np.asarray(getattr(sae, f)))
    x = np.random.default_rng(1).normal(size=(4, 6)).astype(np.float32)
    np.testing.assert_array_equal(np.asarray(back(x)), np.asarray(sae(x)))
    assert io.read_config(str(tmp_path / "s")) == sae.config


def test_save_and_load_several(tmp_path):
    saes = [_sae(seed=s) for s in range(3)]
    io.save_saes(str(tmp_path), saes, names=["a", "b", "c"])
    loaded = io.load_saes(str(tmp_path))
    assert list(loaded) == ["a", "b", "c"]
    np.testing.assert_array_equal(np.asarray(loaded["c"].W_enc), np.asarray(saes[2].W_enc))
    with pytest.raises(InputError, match="distinct names"):
        io.save_saes(str(tmp_path / "x"), saes, names=["a", "a", "b"])


def test_bad_files(tmp_path):
    sae = _sae()
    path = str(tmp_path / "s")
    io.save_sae(path, sae)
    with pytest.raises(InputError, match="exists"):
        io.save_sae(path, sae, overwrite=False)
    with pytest.raises(InputError, match="not a native SAE directory"):
        io.load_sae(str(tmp_path))
    cfg_path = os.path.join(path, io.CONFIG_FILE)
    doc = json.load(open(cfg_path))
    # Unknown format tag.
    json.dump({**doc, "format": "saelens"}, open(cfg_path, "w"))
    with pytest.raises(InputError, match="expected 'sae-universality-native'"):
        io.load_sae(path)
    # Config and arrays disagree (d_sae).
    bad = json.loads(json.dumps(doc))
    bad["config"]["d_sae"] = 11
    json.dump(bad, open(cfg_path, "w"))
    with pytest.raises(InputError, match=r"stored with shape \(6, 10\), config expects \(6, 11\)"):
        io.load_sae(path)
    # Missing config field.
    bad = json.loads(json.dumps(doc))
    del bad["config"]["d_in"]
    json.dump(bad, open(cfg_path, "w"))
    with pytest.raises(InputError, match="missing config field 'd_in'"):
        io.load_sae(path)
    # Truncated JSON.
    open(cfg_path, "w").write(json.dumps(doc)[:20])
    with pytest.raises(InputError, match="not valid JSON"):
        io.load_sae(path)
    # Arrays gone or truncated.
    json.dump(doc, open(cfg_path, "w"))
    shutil.rmtree(os.path.join(path, io.PARAMS_DIR, "d"))
    with pytest.raises(InputError, match="load_sae"):
        io.load_sae(path)
    shutil.rmtree(os.path.join(path, io.PARAMS_DIR))
    with pytest.raises(InputError, match="missing"):
        io.load_sae(path)
