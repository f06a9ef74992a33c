"""The project's native SAE format: orbax arrays plus a JSON config (the one SAE type of
`models.sae`, stored as it is).

A saved SAE is a directory::

    <dir>/sae_config.json   {"format": "sae-universality-native", "version": 1,
                             "config": {d_in, d_sae, activation, k, apply_b_dec_to_input,
                                        input_scale, metadata: [[key, value], ...]}}
    <dir>/params/           orbax StandardCheckpointer tree {W_enc, b_enc, W_dec, b_dec,
                                                             threshold}

The config is read first, so the restore target (shapes, dtypes) comes from it and a file whose
arrays do not match is refused with a one-line `InputError`. Metadata round-trips exactly
(its frozen tuples are written as JSON lists and frozen again on load). SAELens-format export
lives in ``models/formats/``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence

import jax
import numpy as np
import orbax.checkpoint as ocp

from engine import checks, metrics_io
from models import sae as sae_lib

FORMAT = "sae-universality-native"
VERSION = 1
CONFIG_FILE = "sae_config.json"
PARAMS_DIR = "params"
FIELDS = ("W_enc", "b_enc", "W_dec", "b_dec", "threshold")


def _thaw(v):
    if isinstance(v, (tuple, list)):
        return [_thaw(x) for x in v]
    if isinstance(v, (np.generic,)):
        return v.item()
    return v


def _freeze(v):
    if isinstance(v, list):
        return tuple(_freeze(x) for x in v)
    return v


def config_to_json(config: sae_lib.SAEConfig) -> dict:
    """The JSON form of an `SAEConfig` (metadata as a list of ``[key, value]`` pairs)."""
    return {
        "d_in": config.d_in,
        "d_sae": config.d_sae,
        "activation": config.activation,
        "k": config.k,
        "apply_b_dec_to_input": bool(config.apply_b_dec_to_input),
        "input_scale": float(config.input_scale),
        "metadata": [[str(k), _thaw(v)] for k, v in config.metadata],
    }


def config_from_json(doc: dict, name: str = "sae_config.json") -> sae_lib.SAEConfig:
    """Inverse of `config_to_json`; raises `InputError` on missing or bad fields."""
    try:
        meta = tuple((str(k), _freeze(v)) for k, v in doc.get("metadata", []))
        return sae_lib.SAEConfig(
            d_in=int(doc["d_in"]),
            d_sae=int(doc["d_sae"]),
            activation=str(doc["activation"]),
            k=int(doc.get("k", 0)),
            apply_b_dec_to_input=bool(doc["apply_b_dec_to_input"]),
            input_scale=float(doc.get("input_scale", 1.0)),
            metadata=meta,
        )
    except KeyError as e:
        raise checks.InputError(f"{name}: missing config field {e.args[0]!r}") from None
    except (TypeError, ValueError) as e:
        if isinstance(e, checks.InputError):
            raise
        raise checks.InputError(f"{name}: bad config ({e})") from None


def save_sae(path: str, sae: sae_lib.SAE, overwrite: bool = True) -> str:
    """Saves ``sae`` under directory ``path`` (created); returns the absolute path.

    In a multi-process run every process calls it (orbax coordinates the array write);
    process 0 alone clears the directory and writes the config.
    """
    sae.validate("save_sae")
    path = metrics_io.resolve_dir(path)  # a gs:// path passes through (epath and orbax)
    if metrics_io.exists(path) and not overwrite:
        raise checks.InputError(f"save_sae: {path} exists (pass overwrite=True)")
    if jax.process_index() == 0:
        if metrics_io.exists(path):
            metrics_io.epath_of(path).rmtree()
        metrics_io.makedirs(path)
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(f"save_sae {path}")
    arrays = {f: np.asarray(jax.device_get(getattr(sae, f))) for f in FIELDS}
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(os.path.join(path, PARAMS_DIR), arrays)
        ckptr.wait_until_finished()
    # The config is written last: a directory without it is an interrupted save.
    metrics_io.write_json(
        os.path.join(path, CONFIG_FILE),
        {"format": FORMAT, "version": VERSION, "config": config_to_json(sae.config)},
    )
    return path


def read_config(path: str) -> sae_lib.SAEConfig:
    """Reads only the config of a saved SAE (cheap: no arrays)."""
    cfg_path = os.path.join(path, CONFIG_FILE)
    if not metrics_io.epath_of(cfg_path).is_file():
        raise checks.InputError(
            f"load_sae: {path} is not a native SAE directory (no "
            f"{CONFIG_FILE}; interrupted save or another format)"
        )
    try:
        doc = json.loads(metrics_io.read_text(cfg_path))
    except (OSError, json.JSONDecodeError) as e:
        raise checks.InputError(f"load_sae: {cfg_path} is not valid JSON ({e})") from None
    except UnicodeDecodeError:
        raise checks.InputError(
            f"load_sae: {cfg_path} is not UTF-8 JSON text (a binary "
            "file?); the SAE folder is damaged"
        ) from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise checks.InputError(
            f"load_sae: {cfg_path} has format "
            f"{doc.get('format') if isinstance(doc, dict) else None!r}; "
            f"expected {FORMAT!r}"
        )
    if int(doc.get("version", -1)) > VERSION:
        raise checks.InputError(
            f"load_sae: {cfg_path} has version {doc.get('version')}; this "
            f"code reads up to {VERSION}"
        )
    return config_from_json(doc.get("config", {}), cfg_path)


def load_sae(path: str) -> sae_lib.SAE:
    """Loads an SAE saved by `save_sae`; checks every shape against the config."""
    path = metrics_io.resolve_dir(path)
    config = read_config(path)
    params_dir = os.path.join(path, PARAMS_DIR)
    if not metrics_io.epath_of(params_dir).is_dir():
        raise checks.InputError(f"load_sae: {params_dir} is missing (truncated save)")
    shapes = {
        "W_enc": (config.d_in, config.d_sae),
        "b_enc": (config.d_sae,),
        "W_dec": (config.d_sae, config.d_in),
        "b_dec": (config.d_in,),
        "threshold": (config.d_sae,),
    }
    try:
        with ocp.StandardCheckpointer() as ckptr:
            meta = ckptr.metadata(params_dir)
            tree = getattr(getattr(meta, "item_metadata", meta), "tree", None)
            if tree is None:
                tree = getattr(meta, "item_metadata", meta)
            for field, shape in shapes.items():
                entry = tree.get(field) if hasattr(tree, "get") else None
                if entry is None:
                    raise checks.InputError(f"load_sae: {params_dir} has no array {field!r}")
                stored = tuple(getattr(entry, "shape", ()))
                if stored != shape:
                    raise checks.InputError(
                        f"load_sae: {field} stored with shape {stored}, config expects {shape}"
                    )
            target = {f: jax.ShapeDtypeStruct(s, np.float32) for f, s in shapes.items()}
            restored = ckptr.restore(params_dir, target)
    except checks.InputError:
        raise
    except Exception as e:  # orbax / tensorstore errors on truncated or foreign files
        raise checks.InputError(
            f"load_sae: could not read arrays in {params_dir} "
            f"({type(e).__name__}: {str(e).splitlines()[0][:200]})"
        ) from None
    return sae_lib.from_arrays(
        config, *(np.asarray(restored[f]) for f in FIELDS), name=f"SAE at {path}"
    )


def save_saes(
    directory: str, saes: Sequence[sae_lib.SAE], names: Sequence[str] | None = None
) -> list[str]:
    """Saves several SAEs under ``directory/<name>`` (default names ``sae_000``...)."""
    names = [f"sae_{i:03d}" for i in range(len(saes))] if names is None else list(names)
    if len(names) != len(saes) or len(set(names)) != len(names):
        raise checks.InputError(f"save_saes: need {len(saes)} distinct names, got {names}")
    return [save_sae(os.path.join(directory, n), s) for n, s in zip(names, saes)]


def load_saes(directory: str) -> dict[str, sae_lib.SAE]:
    """Loads every native SAE directly under ``directory`` (name -> SAE), sorted by name."""
    if not os.path.isdir(directory):
        raise checks.InputError(f"load_saes: {directory} is not a directory")
    out = {}
    for name in sorted(os.listdir(directory)):
        if os.path.isfile(os.path.join(directory, name, CONFIG_FILE)):
            out[name] = load_sae(os.path.join(directory, name))
    if not out:
        raise checks.InputError(f"load_saes: no native SAE directories in {directory}")
    return out
