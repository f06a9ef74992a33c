"""Tiny transformers models built locally from configs (tests, demos, the pipeline's default).

Nothing here touches the network: the tokenizer is a word-level one trained on the shipped
sample (`models.text.build_word_tokenizer`), models are built from configs with random weights
(optionally trained for a few hundred steps on the sample so that they have learned something)
and saved with ``save_pretrained`` so any process can load them with `LanguageModel.load`.

`make_tiny_model_pair` builds the "tiny random transformers model pair" that the universality
pipeline's layer-grid test uses: two models of the same architecture and tokenizer that differ
only in their initialisation seed (and, when trained, in data order).
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import TYPE_CHECKING, Any

import numpy as np

from engine import checks
from models import lm as lm_lib
from models.text import Tokenizer

if TYPE_CHECKING:
    import transformers

ARCHS = ("gpt_neox", "gpt2", "llama", "bert", "gemma2")


def tiny_config(
    arch: str,
    vocab_size: int,
    *,
    d_model: int = 32,
    n_layers: int = 2,
    n_heads: int = 4,
    d_mlp: int | None = None,
    max_len: int = 128,
    bos_token_id: int = 2,
    eos_token_id: int = 3,
    pad_token_id: int = 0,
) -> transformers.PretrainedConfig:
    """A transformers config of ``arch`` (one of `ARCHS`) at toy size."""
    from transformers import BertConfig, Gemma2Config, GPT2Config, GPTNeoXConfig, LlamaConfig

    d_mlp = d_mlp or 4 * d_model
    special = dict(bos_token_id=bos_token_id, eos_token_id=eos_token_id, pad_token_id=pad_token_id)
    if arch == "gpt_neox":
        return GPTNeoXConfig(
            vocab_size=vocab_size,
            hidden_size=d_model,
            num_hidden_layers=n_layers,
            num_attention_heads=n_heads,
            intermediate_size=d_mlp,
            max_position_embeddings=max_len,
            rotary_pct=0.25,
            use_parallel_residual=True,
            **special,
        )
    if arch == "gpt2":
        return GPT2Config(
            vocab_size=vocab_size,
            n_embd=d_model,
            n_layer=n_layers,
            n_head=n_heads,
            n_inner=d_mlp,
            n_positions=max_len,
            **special,
        )
    if arch == "llama":
        return LlamaConfig(
            vocab_size=vocab_size,
            hidden_size=d_model,
            num_hidden_layers=n_layers,
            num_attention_heads=n_heads,
            num_key_value_heads=max(1, n_heads // 2),
            intermediate_size=d_mlp,
            max_position_embeddings=max_len,
            **special,
        )
    if arch == "gemma2":
        return Gemma2Config(
            vocab_size=vocab_size,
            hidden_size=d_model,
            num_hidden_layers=n_layers,
            num_attention_heads=n_heads,
            num_key_value_heads=max(1, n_heads // 2),
            head_dim=d_model // n_heads,
            intermediate_size=d_mlp,
            max_position_embeddings=max_len,
            sliding_window=max_len,
            **special,
        )
    if arch == "bert":
        return BertConfig(
            vocab_size=vocab_size,
            hidden_size=d_model,
            num_hidden_layers=n_layers,
            num_attention_heads=n_heads,
            intermediate_size=d_mlp,
            max_position_embeddings=max_len,
            pad_token_id=pad_token_id,
        )
    raise checks.InputError(f"arch: expected one of {ARCHS}, got {arch!r}")


def build_tiny_model(
    arch: str, tokenizer: Tokenizer, seed: int, **config_kw: Any
) -> transformers.PreTrainedModel:
    """A randomly initialised model with an LM head (causal; masked LM for BERT)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForMaskedLM

    cfg = tiny_config(arch, len(tokenizer.get_vocab()), **config_kw)
    torch.manual_seed(int(seed))
    cls = AutoModelForMaskedLM if arch == "bert" else AutoModelForCausalLM
    return cls.from_config(cfg).eval()


def train_tiny_model(
    model: transformers.PreTrainedModel,
    token_ids: np.ndarray,
    *,
    steps: int,
    seed: int,
    batch_size: int = 16,
    lr: float = 3e-3,
    masked: bool = False,
    mask_id: int = 1,
) -> list[float]:
    """A few AdamW steps of next-token (or 15 % masked-token) prediction; returns the losses.

    Only meant to give tiny models some learned structure (token statistics, bigrams) so that
    trained-vs-random comparisons in demos are not vacuous.
    """
    import torch

    gen = torch.Generator().manual_seed(int(seed))
    ids = torch.as_tensor(np.asarray(token_ids), dtype=torch.long)
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    model.train()
    losses = []
    for _ in range(int(steps)):
        batch = ids[torch.randint(0, ids.shape[0], (batch_size,), generator=gen)]
        if masked:
            pick = torch.rand(batch.shape, generator=gen) < 0.15
            labels = torch.where(pick, batch, torch.full_like(batch, -100))
            inputs = torch.where(pick, torch.full_like(batch, mask_id), batch)
            loss = model(input_ids=inputs, labels=labels).loss
        else:
            loss = model(input_ids=batch, labels=batch).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    model.eval()
    return losses


def save_tiny_tokenizer(
    out_dir: str, vocab_size: int = 1000, special_tokens: str = "bos"
) -> Tokenizer:
    """Builds the word-level tokenizer on the shipped sample and saves it; returns it."""
    from models import text

    tok = text.build_word_tokenizer(vocab_size=vocab_size, special_tokens=special_tokens)
    os.makedirs(out_dir, exist_ok=True)
    tok.save_pretrained(out_dir)
    return tok


@dataclasses.dataclass(frozen=True)
class TinyPair:
    """Paths of two tiny models sharing one tokenizer (each directory has its own copy)."""

    path_a: str
    path_b: str
    arch: str
    seeds: tuple[int, int]
    train_steps: int


def make_tiny_model_pair(
    out_dir: str,
    *,
    arch: str = "gpt_neox",
    seeds: tuple[int, int] = (0, 1),
    vocab_size: int = 1000,
    train_steps: int = 0,
    context_length: int = 32,
    **config_kw: Any,
) -> TinyPair:
    """Two tiny models of one architecture and tokenizer, different seeds, saved locally.

    ``out_dir/model_a`` and ``out_dir/model_b`` are loadable with `LanguageModel.load`.
    With ``train_steps > 0`` each is trained on the shipped sample (its own seed also sets the
    data order). Rebuilding with the same arguments gives the same weights; an existing pair
    with the same recipe is reused.
    """
    from models import text

    if len(seeds) != 2 or seeds[0] == seeds[1]:
        raise checks.InputError(f"seeds: expected two different seeds, got {seeds!r}")
    recipe = {
        "arch": arch,
        "seeds": list(map(int, seeds)),
        "vocab_size": int(vocab_size),
        "train_steps": int(train_steps),
        "context_length": int(context_length),
        "config": {k: v for k, v in sorted(config_kw.items())},
    }
    recipe_path = os.path.join(out_dir, "pair.json")
    paths = [os.path.join(out_dir, "model_a"), os.path.join(out_dir, "model_b")]
    if os.path.exists(recipe_path):
        with open(recipe_path, encoding="utf-8") as f:
            if json.load(f) == recipe:
                return TinyPair(paths[0], paths[1], arch, tuple(seeds), int(train_steps))
    tok = text.build_word_tokenizer(
        vocab_size=vocab_size, special_tokens="cls_sep" if arch == "bert" else "bos"
    )
    ids = None
    if train_steps:
        ids = text.make_contexts(text.sample_documents(), tok, context_length).token_ids
    for seed, path in zip(seeds, paths):
        model = build_tiny_model(arch, tok, seed, **config_kw)
        if train_steps:
            train_tiny_model(
                model,
                ids,
                steps=train_steps,
                seed=seed,
                masked=arch == "bert",
                mask_id=tok.unk_token_id,
            )
        with lm_lib.quiet_transformers():
            model.save_pretrained(path)
        tok.save_pretrained(path)
    os.makedirs(out_dir, exist_ok=True)
    with open(recipe_path, "w", encoding="utf-8") as f:
        json.dump(recipe, f)
    return TinyPair(paths[0], paths[1], arch, tuple(seeds), int(train_steps))
