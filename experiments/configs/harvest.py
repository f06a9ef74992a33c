"""Settings of experiments/harvest.py: harvest a language model's activations at chosen
hookpoints into an on-disk cache.

Every field is a flag of ``python -m experiments.harvest`` (``--name=value``
overrides the config's value); ``RULES`` are checked on the resolved settings before any work.
"""

from __future__ import annotations

import os

from experiments import common
from experiments.common import Field as F

FIELDS = (
    F(
        "model",
        "tiny:gpt_neox",
        "Local model directory, hub name, or tiny:ARCH (a tiny random "
        "model of gpt_neox | gpt2 | llama | bert | gemma2 built in WORKDIR/tiny_model).",
    ),
    F("revision", None, "Hub revision of --model.", type=str),
    F("tokenizer", None, "Tokenizer directory/name (default: the model's).", type=str),
    F(
        "hookpoints",
        ("resid_post.0",),
        "Hookpoints: resid_pre.L | resid_post.L | attn_out.L | "
        "mlp_out.L (also SAELens blocks.L.hook_resid_post or sparsify layers.L; negative L from "
        "end).",
    ),
    *common.text_fields(
        "Text: .txt/.jsonl files or folders, 'sample' (shipped KJV sample), "
        "or hf:NAME[:CONFIG][@SPLIT] when `datasets` is installed."
    ),
    F("context_length", 128, "Tokens per context (special tokens included)."),
    F(
        "special_tokens",
        "auto",
        "Special tokens per context: the tokenizer's own, BOS only, or none.",
        choices=("auto", "bos", "none"),
    ),
    F("pad_tail", False, "Keep each document's short last piece (padded, masked)."),
    F(
        "pack",
        False,
        "Pack documents (and last pieces) shorter than a context together, "
        "EOS-separated, instead of dropping them.",
    ),
    F(
        "text_weights",
        (),
        "With several --text corpora: interleave them in this ratio (by documents), e.g. 0.7,0.3.",
    ),
    F("max_tokens", 0, "Stop after about this many tokens (0: all the text)."),
    F("batch_size", 8, "Contexts per forward pass."),
    F("dtype", "float32", "Storage dtype.", choices=("float32", "float16", "bfloat16")),
    F(
        "model_dtype",
        "float32",
        "Compute dtype of the model.",
        choices=("float32", "float16", "bfloat16"),
    ),
    F("device", None, "torch device (default: cuda if available, else cpu).", type=str),
    F("shard_contexts", 0, "Contexts per shard (0: about 128 MiB per hookpoint and shard)."),
    F("cache_dir", None, "Cache directory (default WORKDIR/cache).", type=str),
    F("seed", 0, "Seed of the tiny model (tiny:ARCH only)."),
    F(
        "record_spans",
        True,
        "Also write token_spans.npy beside the cache: the document and "
        "character span of every position (models/alignment.py), needed to pair caches of models "
        "with different tokenizers. Holds the documents in memory while it runs; turn off for "
        "corpora larger than RAM.",
    ),
)


def is_local(name: str) -> bool:
    """A model name that is a local path (else a hub name)."""
    return name.startswith(("/", "./", "../", "~")) or os.path.isdir(name)


RULES = (
    common.Hookpoints(("hookpoints",)),
    common.Check(
        ("hookpoints",),
        lambda v: bool(v["hookpoints"]),
        "--hookpoints: expected at least one hookpoint",
    ),
    common.Num(("context_length",), lo=2, integer=True),
    common.Num(("batch_size",), lo=1, integer=True),
    common.Num(("max_tokens", "shard_contexts", "seed"), lo=0, integer=True),
    common.Check(
        ("model",),
        lambda v: (
            not v["model"].startswith("tiny:")
            or v["model"].split(":", 1)[1] in ("gpt_neox", "gpt2", "llama", "bert", "gemma2")
        ),
        "--model={model}: tiny:ARCH takes ARCH in gpt_neox, gpt2, llama, bert, gemma2",
    ),
    common.Check(
        ("model",),
        lambda v: (
            v["model"].startswith("tiny:")
            or not is_local(v["model"])
            or os.path.isdir(os.path.expanduser(v["model"]))
        ),
        "--model={model}: no such local model directory",
    ),
    common.Check(("text",), lambda v: bool(v["text"]), "--text: expected at least one source"),
    common.Path(("text",), kind="any", special=("sample",), prefixes=("hf:",)),
    common.Check(
        ("cache_dir",),
        lambda v: not v["cache_dir"] or not os.path.isfile(v["cache_dir"]),
        "--cache_dir={cache_dir}: is a file, expected a directory",
    ),
)


def get_config():
    """The defaults::

    python -m experiments.harvest --workdir=/tmp/harvest_demo --model=tiny:gpt_neox
    """
    return common.config_dict(FIELDS)
