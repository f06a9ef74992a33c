"""SAEs of the pipeline: train on the fly (checkpointed, resumable) or load from any format."""

from __future__ import annotations

import os


from models import formats, sae_io_native, sae_train


def train_or_load(acts, cfg: sae_train.TrainConfig, *, steps: int | None,
                  batch_size: int, data_seed: int, directory: str, mesh,
                  progress: bool = False, metadata: dict | None = None,
                  epochs: float | None = None, column: int = 1,
                  shuffle_buffer: int = 1 << 16):
    """Trains one SAE on ``acts`` under ``directory`` (resumes), or loads the finished one.

    ``acts`` is an in-memory ``[rows, d]`` array or an activation source (e.g.
    ``ActivationCache.source(hookpoint)``), which is streamed through a bounded shuffle
    buffer of ``shuffle_buffer`` rows (``column`` picks its activation array) and never
    loaded into memory (`models.sae_train.source_stream`).
    """
    done = os.path.join(directory, "final")
    if os.path.exists(os.path.join(done, "sae_config.json")):
        return sae_io_native.load_sae(done)
    rows = sae_train.rows_per_epoch(acts)
    if rows is not None:
        batch_size = min(batch_size, rows - rows % mesh.shape["data"])
    sae = sae_train.train_saes(acts, cfg, steps=steps, epochs=epochs, batch_size=batch_size,
                               mesh=mesh, workdir=directory, data_seed=data_seed,
                               progress=progress, metadata=metadata, save=False,
                               column=column, shuffle_buffer=shuffle_buffer)[0]
    sae_io_native.save_sae(done, sae)   # multi-process: orbax-coordinated
    return sae


def load_for_hookpoint(root: str, hookpoint: str, n_hookpoints: int):
    """Loads the SAE of ``hookpoint`` from ``root``.

    ``root`` is either one SAE (any format `models.formats.load_sae` detects; allowed when a
    single hookpoint is requested) or a directory with one sub-directory per hookpoint, named
    by the hookpoint (``resid_post.3``) or its SAELens / sparsify names
    (``blocks.3.hook_resid_post``, ``layers.3``).
    """
    from models import lm
    hp = lm.parse_hookpoint(hookpoint)
    for name in (hp.name, hp.saelens_name, hp.sparsify_name):
        path = os.path.join(root, name)
        if os.path.isdir(path):
            return formats.load_sae(path)
    if n_hookpoints == 1 and os.path.exists(root):
        return formats.load_sae(root)
    raise FileNotFoundError(f"no SAE for hookpoint {hp.name} under {root}: expected a "
                            f"sub-directory named {hp.name}, {hp.saelens_name} or "
                            f"{hp.sparsify_name}")
