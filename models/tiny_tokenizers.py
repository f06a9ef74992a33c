"""Real tokenizers of the three common algorithms, trained offline on the shipped sample.

For tests and the cross-tokenizer known-truth experiment (no network): the same algorithms,
pre-tokenizers, normalisers and special-token conventions as the published families, at toy
vocabulary sizes.

* ``bpe``: byte-level BPE (Radford et al. 2019, GPT-2; also Llama-3 / Pythia): ``ByteLevel``
  pre-tokenizer (spaces attach to the next word as ``Ġ``), no special tokens added
  (``<|endoftext|>`` is BOS/EOS, GPT-2 style).
* ``wordpiece``: WordPiece (Devlin et al. 2019, BERT uncased): BERT normaliser (lower case,
  accents stripped), BERT pre-tokenizer (whitespace and punctuation split), ``##``
  continuation pieces, ``[CLS] ... [SEP]`` around each text.
* ``unigram``: Unigram LM (Kudo 2018, arXiv 1804.10959; SentencePiece as in Llama-2): NFKC,
  ``Metaspace`` (``▁`` for spaces, prepended to the first word), ``<s>`` BOS.
* ``word``: the project's word-level tokenizer (`models.text.build_word_tokenizer`).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from engine import checks

if TYPE_CHECKING:
    import transformers

KINDS = ("bpe", "wordpiece", "unigram", "word")


def build_tokenizer(
    kind: str, vocab_size: int = 500, documents: Iterable[str] | None = None
) -> transformers.PreTrainedTokenizerFast:
    """A `transformers.PreTrainedTokenizerFast` of ``kind`` (one of `KINDS`) trained locally."""
    from tokenizers import (
        Tokenizer,
        decoders,
        models,
        normalizers,
        pre_tokenizers,
        processors,
        trainers,
    )
    from transformers import PreTrainedTokenizerFast

    from models import text

    if kind not in KINDS:
        raise checks.InputError(f"tokenizer kind: expected one of {KINDS}, got {kind!r}")
    docs = text.sample_documents() if documents is None else list(documents)
    vocab_size = checks.check_positive_int("vocab_size", vocab_size)
    if kind == "word":
        return text.build_word_tokenizer(docs, vocab_size=vocab_size, special_tokens="bos")
    if kind == "bpe":
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        tok.train_from_iterator(
            docs,
            trainers.BpeTrainer(
                vocab_size=vocab_size,
                special_tokens=["<|endoftext|>"],
                show_progress=False,
                initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            ),
        )
        return PreTrainedTokenizerFast(
            tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|endoftext|>"
        )
    if kind == "wordpiece":
        specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
        tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
        tok.normalizer = normalizers.BertNormalizer(lowercase=True)
        tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        tok.decoder = decoders.WordPiece()
        tok.train_from_iterator(
            docs,
            trainers.WordPieceTrainer(
                vocab_size=vocab_size, special_tokens=specials, show_progress=False
            ),
        )
        tok.post_processor = processors.TemplateProcessing(
            single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)]
        )
        return PreTrainedTokenizerFast(
            tokenizer_object=tok,
            cls_token="[CLS]",
            sep_token="[SEP]",
            pad_token="[PAD]",
            unk_token="[UNK]",
            mask_token="[MASK]",
        )
    specials = ["<pad>", "<unk>", "<s>", "</s>"]
    tok = Tokenizer(models.Unigram())
    tok.normalizer = normalizers.NFKC()
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    tok.train_from_iterator(
        docs,
        trainers.UnigramTrainer(
            vocab_size=vocab_size, special_tokens=specials, unk_token="<unk>", show_progress=False
        ),
    )
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 2)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
    )


def make_tiny_model(
    out_dir: str,
    kind: str,
    *,
    arch: str = "gpt_neox",
    seed: int = 0,
    vocab_size: int = 500,
    train_steps: int = 0,
    context_length: int = 32,
    **config_kw: Any,
) -> str:
    """A tiny model of ``arch`` on a ``kind`` tokenizer, saved to ``out_dir`` (returned).

    With ``train_steps`` it is trained briefly on the shipped sample in its own tokens
    (`models.lm_tiny.train_tiny_model`). Reuses an existing directory built the same way.
    """
    import json
    import os

    from models import lm as lm_lib
    from models import lm_tiny, text

    recipe = {
        "kind": kind,
        "arch": arch,
        "seed": int(seed),
        "vocab_size": int(vocab_size),
        "train_steps": int(train_steps),
        "context_length": int(context_length),
        "config": {k: v for k, v in sorted(config_kw.items())},
    }
    recipe_path = os.path.join(out_dir, "tiny_recipe.json")
    if os.path.exists(recipe_path):
        with open(recipe_path, encoding="utf-8") as f:
            if json.load(f) == recipe:
                return out_dir
    tok = build_tokenizer(kind, vocab_size)
    model = lm_tiny.build_tiny_model(arch, tok, seed, **config_kw)
    if train_steps:
        ids = text.make_contexts(text.sample_documents(), tok, context_length).token_ids
        lm_tiny.train_tiny_model(
            model,
            ids,
            steps=train_steps,
            seed=seed,
            masked=arch == "bert",
            mask_id=tok.unk_token_id or 0,
        )
    with lm_lib.quiet_transformers():
        model.save_pretrained(out_dir)
    tok.save_pretrained(out_dir)
    with open(recipe_path, "w", encoding="utf-8") as f:
        json.dump(recipe, f)
    return out_dir
