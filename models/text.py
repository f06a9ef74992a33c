"""Text for activation harvesting: documents, fixed-length token contexts, tokenizer checks.

Documents come from local files or the shipped sample (no network needed):

* ``.txt`` (optionally ``.gz``): the whole file is one document (``txt_split="file"``), or
  each blank-line separated paragraph is one (``"paragraph"``), or each line (``"line"``);
* ``.jsonl`` (optionally ``.gz``): one JSON object per line, text under ``text_field``;
* a directory: every ``.txt`` / ``.jsonl`` file in it, sorted by name;
* ``"sample"``: `SAMPLE_PATH`, about 450 KB of public-domain English (King James Version:
  Genesis, Ruth, Esther, Ecclesiastes, Mark, John), one chapter per paragraph, extracted from
  Debian's ``bible-kjv-text`` package (the KJV text is in the public domain);
* ``"hf:NAME[:CONFIG][@SPLIT]"``: a Hugging Face ``datasets`` dataset, only when ``datasets``
  is installed (it is optional; the hub must be reachable or the dataset cached).

Contexts (`make_contexts`) never span two documents (DESIGN.md "Data flow": two models must
see exactly the same tokens, and a context that straddles unrelated documents teaches an SAE
nothing about either). Each document is tokenised without special tokens, cut into pieces of
``context_length - #special`` tokens, and each piece gets the tokenizer's own special tokens
(``special_tokens="auto"``: Llama/Gemma-style tokenizers add BOS, BERT-style ones add
[CLS] ... [SEP], GPT-2/Pythia-style ones add nothing), or BOS only (``"bos"``, the SAELens
habit for GPT-2), or none (``"none"``). A final piece shorter than a context is dropped unless
``pad_tail=True`` (then padded with the pad token and masked out) or ``pack=True`` (short
pieces -- whole short documents such as line-per-record text -- are packed together,
EOS-separated, so no text is lost; only those packed contexts span documents).
Several corpora mix in a set ratio with `interleave_documents` / `read_mixture`.

Two models compared token by token must tokenise the text identically
(`check_same_tokenizer` refuses anything else with a clear error); models with different
tokenizers are paired through the text instead (`models.alignment`).
"""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import io
import json
import os
import zlib
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any, TypeAlias

import numpy as np
from numpy.typing import ArrayLike

from engine import checks

SAMPLE_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "kjv_sample.txt")
TXT_SPLITS = ("file", "paragraph", "line")
SPECIAL_MODES = ("auto", "bos", "none")
# A transformers tokenizer (`PreTrainedTokenizerBase`, or one built by `build_word_tokenizer`);
# models/ imports transformers only where it is used, so the alias stays Any for the checker.
Tokenizer: TypeAlias = Any


class TokenizerMismatchError(checks.InputError):
    """Two models' tokenizers do not produce the same token ids for the same text."""


# --------------------------------------------------------------------------------------------
# Documents
# --------------------------------------------------------------------------------------------


def _open_text(path: str) -> io.TextIOBase:
    if path.endswith(".gz"):
        return io.TextIOWrapper(gzip.open(path, "rb"), encoding="utf-8")
    return open(path, encoding="utf-8")


def _text_lines(path: str) -> Iterator[str]:
    """Lines of a UTF-8 text file (optionally gzipped), with one-line errors for a file that
    is not text: invalid UTF-8 or NUL bytes (a binary file: .npy, image, archive, ...), or a
    damaged / non-gzip ``.gz``."""
    try:
        with _open_text(path) as f:
            for lineno, line in enumerate(f, 1):
                if "\x00" in line:
                    raise checks.InputError(
                        f"text file {path!r}: NUL byte on line {lineno}: a "
                        "binary file, not text; expected UTF-8 "
                        ".txt/.jsonl"
                    )
                yield line
    except UnicodeDecodeError:
        raise checks.InputError(
            f"text file {path!r}: not UTF-8 text (a binary file?); expected UTF-8 .txt/.jsonl"
        ) from None
    except (gzip.BadGzipFile, EOFError, zlib.error) as e:
        raise checks.InputError(
            f"text file {path!r}: not a valid gzip file "
            f"({type(e).__name__}); expected gzipped UTF-8 text"
        ) from None


def _txt_documents(path: str, txt_split: str) -> Iterator[str]:
    lines = _text_lines(path)
    if txt_split == "file":
        text = "".join(lines)
        if text.strip():
            yield text
        return
    if txt_split == "line":
        for line in lines:
            if line.strip():
                yield line.rstrip("\n")
        return
    para: list[str] = []
    for line in lines:
        if line.strip():
            para.append(line.rstrip("\n"))
        elif para:
            yield "\n".join(para)
            para = []
    if para:
        yield "\n".join(para)


def _jsonl_documents(path: str, text_field: str) -> Iterator[str]:
    # The same reader as .txt: binary files are named as such.
    for lineno, line in enumerate(_text_lines(path), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise checks.InputError(
                f"{path}:{lineno}: not valid JSON ({e.msg}); expected one JSON object per line"
            ) from None
        if not isinstance(obj, dict) or text_field not in obj:
            raise checks.InputError(
                f"{path}:{lineno}: expected a JSON object with a "
                f"{text_field!r} field (set text_field)"
            )
        text = obj[text_field]
        if not isinstance(text, str):
            raise checks.InputError(
                f"{path}:{lineno}: field {text_field!r} is {type(text).__name__}, expected a string"
            )
        if text.strip():
            yield text


def _file_kind(path: str) -> str:
    base = path[:-3] if path.endswith(".gz") else path
    for ext in (".txt", ".jsonl"):
        if base.endswith(ext):
            return ext
    raise checks.InputError(
        f"text file {path!r}: unknown extension; expected .txt or .jsonl (optionally .gz)"
    )


TEXT_EXTENSIONS = (".txt", ".jsonl", ".txt.gz", ".jsonl.gz")


def text_files(src: str) -> list[str]:
    """The text files of one local source: the file itself, or a folder's .txt/.jsonl(.gz)
    files (sorted, not recursive).

    Raises:
      InputError: no such path, a folder without text files.
    """
    if os.path.isdir(src):
        files = sorted(os.path.join(src, f) for f in os.listdir(src) if f.endswith(TEXT_EXTENSIONS))
        if not files:
            raise checks.InputError(f"text directory {src!r} holds no .txt/.jsonl files")
        return files
    if os.path.exists(src):
        return [src]
    raise checks.InputError(f"text file {src!r} does not exist")


def _has_text(path: str) -> bool:
    """Whether a text file holds a non-blank line (reads up to the first one)."""
    return any(line.strip() for line in _text_lines(path))


def check_sources(source: str | Sequence[str]) -> None:
    """Cheap checks of text sources before any model work: every local path exists, has a
    known extension (a folder: holds such files) and holds some text.

    Raises:
      InputError: naming the source and what was expected.
    """
    sources = [source] if isinstance(source, str) else list(source)
    if not sources:
        raise checks.InputError("text source: no paths given")
    for src in sources:
        if src == "sample" or src.startswith("hf:"):
            continue
        files = text_files(src)
        for f in files:
            _file_kind(f)
        if not any(_has_text(f) for f in files):
            what = "an empty file" if files == [src] else "a folder of empty text files"
            raise checks.InputError(f"text source {src!r} is {what}; expected some text")


def _hf_documents(spec: str, text_field: str) -> Iterator[str]:
    try:
        import datasets  # optional dependency
    except ImportError:
        raise checks.InputError(
            f"text source {spec!r} needs the optional `datasets` package, "
            "which is not installed; use local .txt/.jsonl files"
        ) from None
    body = spec[3:]
    split = "train"
    if "@" in body:
        body, split = body.rsplit("@", 1)
    name, _, config = body.partition(":")
    ds = datasets.load_dataset(name, config or None, split=split, streaming=True)
    for row in ds:
        text = row.get(text_field)
        if not isinstance(text, str):
            raise checks.InputError(f"dataset {spec!r}: rows need a string {text_field!r} field")
        if text.strip():
            yield text


def read_documents(
    source: str | Sequence[str],
    *,
    text_field: str = "text",
    txt_split: str = "file",
    max_documents: int | None = None,
) -> Iterator[str]:
    """Yields documents (non-empty strings) from files, directories, the sample or a dataset.

    Args:
      source: a path, a list of paths, ``"sample"`` or ``"hf:NAME[:CONFIG][@SPLIT]"`` (see the
        module docstring).
      text_field: the JSON field holding the text (.jsonl and datasets).
      txt_split: how a .txt file splits into documents: ``file`` | ``paragraph`` | ``line``.
        The sample is always split into paragraphs (one chapter each).
      max_documents: stop after this many documents.

    Raises:
      InputError: missing file, unknown extension, bad JSON line, missing/non-string field.
    """
    if txt_split not in TXT_SPLITS:
        raise checks.InputError(f"txt_split: expected one of {TXT_SPLITS}, got {txt_split!r}")
    sources = [source] if isinstance(source, str) else list(source)
    if not sources:
        raise checks.InputError("text source: no paths given")

    def generate() -> Iterator[str]:
        for src in sources:
            if src == "sample":
                yield from _txt_documents(SAMPLE_PATH, "paragraph")
                continue
            if src.startswith("hf:"):
                yield from _hf_documents(src, text_field)
                continue
            for path in text_files(src):
                if _file_kind(path) == ".txt":
                    yield from _txt_documents(path, txt_split)
                else:
                    yield from _jsonl_documents(path, text_field)

    count = 0
    for doc in generate():
        if max_documents is not None and count >= max_documents:
            return
        count += 1
        yield doc


def interleave_documents(
    sources: Sequence[Iterable[str]], weights: Sequence[float]
) -> Iterator[str]:
    """Documents of several corpora interleaved in the ratio ``weights`` (by documents).

    Deterministic smooth weighted round robin: every turn each corpus earns its weight and
    the corpus with the most credit gives the next document (pays the total weight), so any
    prefix of the output holds the corpora within one document of the exact ratio, and the
    same inputs always give the same order (resumable by skipping). Stops when the corpus
    whose turn it is runs out, so the ratio holds to the end.

    Args:
      sources: iterables of documents (e.g. `read_documents` of each corpus).
      weights: positive shares, one per source (normalised here).
    """
    its = [iter(src) for src in sources]
    w = np.asarray([float(x) for x in weights], np.float64)
    if len(its) < 1 or w.shape != (len(its),) or not np.all(np.isfinite(w)) or np.any(w <= 0):
        raise checks.InputError(
            f"interleave weights: expected {len(its)} positive numbers, got {list(weights)}"
        )
    w = w / w.sum()
    credit = np.zeros_like(w)
    while True:
        credit += w
        i = int(np.argmax(credit))  # ties: the first corpus
        credit[i] -= 1.0
        doc = next(its[i], None)
        if doc is None:
            return
        yield doc


def read_mixture(
    sources: Sequence[str | Sequence[str]], weights: Sequence[float] | None, **kwargs: Any
) -> Iterator[str]:
    """`read_documents` of each corpus (a path or a list of paths), interleaved by
    ``weights`` (`interleave_documents`); one corpus or no weights: read in sequence."""
    if not weights or len(sources) == 1:
        return read_documents(
            [p for s in sources for p in ([s] if isinstance(s, str) else list(s))], **kwargs
        )
    if len(weights) != len(sources):
        raise checks.InputError(f"text weights: {len(weights)} weights for {len(sources)} corpora")
    return interleave_documents([read_documents(s, **kwargs) for s in sources], weights)


def sample_documents(max_documents: int | None = None) -> list[str]:
    """The shipped public-domain sample, one document per chapter (113 chapters)."""
    return list(read_documents("sample", max_documents=max_documents))


# --------------------------------------------------------------------------------------------
# Tokenizer helpers
# --------------------------------------------------------------------------------------------


def special_template(tokenizer: Tokenizer, mode: str = "auto") -> tuple[list[int], list[int]]:
    """The special-token ids a tokenizer puts before and after one text (prefix, suffix).

    transformers 5 fast tokenizers no longer expose ``build_inputs_with_special_tokens``, so
    the template is read off by encoding a probe text with and without special tokens.
    """
    if mode not in SPECIAL_MODES:
        raise checks.InputError(f"special_tokens: expected one of {SPECIAL_MODES}, got {mode!r}")
    if mode == "none":
        return [], []
    if mode == "bos":
        if tokenizer.bos_token_id is None:
            raise checks.InputError("special_tokens='bos': the tokenizer has no BOS token")
        return [int(tokenizer.bos_token_id)], []
    probe = "hello world"
    plain = list(tokenizer(probe, add_special_tokens=False)["input_ids"])
    full = list(tokenizer(probe, add_special_tokens=True)["input_ids"])
    for start in range(len(full) - len(plain) + 1):
        if full[start : start + len(plain)] == plain:
            return full[:start], full[start + len(plain) :]
    raise checks.InputError(
        "special_tokens='auto': could not locate the text inside the "
        "tokenizer's output with special tokens; use 'bos' or 'none'"
    )


def special_token_ids(tokenizer: Tokenizer) -> list[int]:
    """Ids of the structural special tokens (BOS/EOS/PAD/CLS/SEP/MASK...), sorted.

    UNK is left out unless it doubles as one of the others (GPT-2's ``<|endoftext|>``): an
    unknown word is text, not structure, and filters that drop special tokens should keep it.
    """
    ids = set(int(i) for i in getattr(tokenizer, "all_special_ids", []) if i is not None)
    structural = set()
    for attr in (
        "bos_token_id",
        "eos_token_id",
        "pad_token_id",
        "cls_token_id",
        "sep_token_id",
        "mask_token_id",
    ):
        value = getattr(tokenizer, attr, None)
        if value is not None:
            structural.add(int(value))
    unk = getattr(tokenizer, "unk_token_id", None)
    if unk is not None and int(unk) not in structural:
        ids.discard(int(unk))
    return sorted(ids | structural)


def pad_id(tokenizer: Tokenizer) -> int:
    """The id used to pad contexts: pad, else EOS, else 0 (padding is masked anyway)."""
    for attr in ("pad_token_id", "eos_token_id"):
        value = getattr(tokenizer, attr, None)
        if value is not None:
            return int(value)
    return 0


def tokenizer_fingerprint(tokenizer: Tokenizer) -> dict:
    """A JSON-able description that identifies how a tokenizer maps text to ids.

    Includes a SHA-256 of the sorted vocabulary, the special-token ids and the auto template;
    equal fingerprints are necessary (not sufficient, see `check_same_tokenizer`) for two
    tokenizers to agree.
    """
    vocab = tokenizer.get_vocab()
    digest = hashlib.sha256(
        json.dumps(sorted(vocab.items()), ensure_ascii=False).encode("utf-8")
    ).hexdigest()
    prefix, suffix = special_template(tokenizer, "auto")
    return {
        "class": type(tokenizer).__name__,
        "name_or_path": str(getattr(tokenizer, "name_or_path", "")),
        "vocab_size": len(vocab),
        "vocab_sha256": digest,
        "special_ids": special_token_ids(tokenizer),
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
        "template": {"prefix": prefix, "suffix": suffix},
    }


_PROBES = (
    "The quick brown fox jumps over the lazy dog.",
    "  Leading spaces, tabs\tand\nnewlines; numbers 1234567 and 3.14159!",
    "Unicode: café naïve – “quotes” 東京 😀",
    "def f(x):\n    return x ** 2  # code",
)


def check_same_tokenizer(
    tokenizer_a: Tokenizer,
    tokenizer_b: Tokenizer,
    texts: Iterable[str] | None = None,
    *,
    names: tuple[str, str] = ("model A", "model B"),
    max_texts: int = 64,
) -> None:
    """Raises `TokenizerMismatchError` unless both tokenizers give the same ids.

    Compares the special-token conventions, the vocabularies, then the ids of a few probe
    strings and of up to ``max_texts`` of ``texts`` (the text actually used; default the
    shipped sample) with and without special tokens. Rows of the two models are
    compared token by token, so any difference is an error naming the first one found (pair
    such models through the text with `models.alignment`).
    """
    na, nb = names
    for attr in ("bos_token_id", "eos_token_id", "pad_token_id"):
        va, vb = getattr(tokenizer_a, attr, None), getattr(tokenizer_b, attr, None)
        if va != vb:
            raise TokenizerMismatchError(
                f"tokenizers differ: {attr} is {va} for {na} but {vb} "
                f"for {nb}; both models must share one tokenizer"
            )
    va, vb = tokenizer_a.get_vocab(), tokenizer_b.get_vocab()
    if len(va) != len(vb):
        raise TokenizerMismatchError(
            f"tokenizers differ: vocabulary of {len(va)} tokens for "
            f"{na} but {len(vb)} for {nb}; both models must share one "
            "tokenizer for token-by-token rows (use an alignment unit)"
        )
    if va != vb:
        tok = next(t for t in sorted(va) if vb.get(t) != va[t])
        raise TokenizerMismatchError(
            f"tokenizers differ: token {tok!r} has id {va[tok]} for {na} but {vb.get(tok)} for {nb}"
        )
    probes = list(_PROBES)
    probes += list(texts)[:max_texts] if texts is not None else sample_documents(max_texts)
    for text in probes:
        for special in (False, True):
            ia = list(tokenizer_a(text, add_special_tokens=special)["input_ids"])
            ib = list(tokenizer_b(text, add_special_tokens=special)["input_ids"])
            if ia != ib:
                i = next(
                    (j for j, (x, y) in enumerate(zip(ia, ib)) if x != y), min(len(ia), len(ib))
                )
                raise TokenizerMismatchError(
                    f"tokenizers differ on {text[:40]!r} (add_special_tokens={special}): "
                    f"{na} gives {ia[max(0, i - 2) : i + 3]} and {nb} gives "
                    f"{ib[max(0, i - 2) : i + 3]} at token {i}; both models must share one "
                    "tokenizer"
                )


# --------------------------------------------------------------------------------------------
# Contexts
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Contexts:
    """Fixed-length token contexts, each inside one document.

    Attributes:
      token_ids: ``[n, context_length]`` int32.
      mask: ``[n, context_length]`` bool, False on padding (only in padded tails).
      doc_index: ``[n]`` int64, index of the source document of each context.
    """

    token_ids: np.ndarray
    mask: np.ndarray
    doc_index: np.ndarray

    def __post_init__(self):
        checks.check_rank("Contexts.token_ids", self.token_ids, 2)
        checks.check_shape("Contexts.mask", self.mask, self.token_ids.shape)
        checks.check_shape("Contexts.doc_index", self.doc_index, self.token_ids.shape[:1])

    def __len__(self) -> int:
        return int(self.token_ids.shape[0])

    @property
    def context_length(self) -> int:
        return int(self.token_ids.shape[1])

    @property
    def num_tokens(self) -> int:
        """Real (unmasked) tokens."""
        return int(self.mask.sum())

    def __getitem__(self, idx) -> Contexts:
        idx = slice(idx, idx + 1) if isinstance(idx, int) else idx
        return Contexts(self.token_ids[idx], self.mask[idx], self.doc_index[idx])

    @staticmethod
    def from_array(token_ids: ArrayLike) -> Contexts:
        """Wraps an ``[n, t]`` id array (no padding, one document per row)."""
        ids = np.asarray(token_ids)
        checks.check_rank("token_ids", ids, 2)
        if not np.issubdtype(ids.dtype, np.integer):
            raise checks.InputError(f"token_ids: expected integer ids, got dtype {ids.dtype}")
        return Contexts(
            ids.astype(np.int32), np.ones(ids.shape, bool), np.arange(ids.shape[0], dtype=np.int64)
        )

    @staticmethod
    def concat(parts: Sequence[Contexts]) -> Contexts:
        return Contexts(
            np.concatenate([p.token_ids for p in parts]),
            np.concatenate([p.mask for p in parts]),
            np.concatenate([p.doc_index for p in parts]),
        )


def iter_contexts(
    documents: Iterable[str],
    tokenizer: Tokenizer,
    context_length: int,
    *,
    special_tokens: str = "auto",
    pad_tail: bool = False,
    pack: bool = False,
    max_contexts: int | None = None,
    block_contexts: int = 1024,
    docs_per_batch: int = 256,
) -> Iterator[Contexts]:
    """Tokenises documents into contexts, yielding blocks of up to ``block_contexts``.

    Memory is bounded by one block plus one batch of documents, so corpora larger than RAM
    stream through. Deterministic: the same documents and tokenizer give the same contexts, so
    a consumer resumes by skipping the contexts it has done.

    Args:
      documents: iterable of strings (e.g. `read_documents`).
      tokenizer: a transformers tokenizer.
      context_length: tokens per context, special tokens included.
      special_tokens: ``auto`` | ``bos`` | ``none`` (module docstring).
      pad_tail: keep each document's short last piece, padded and masked.
      pack: pack pieces shorter than a context (short documents and documents' last
        pieces) together, separated by the tokenizer's EOS token when it has one, instead of
        dropping (or padding) them; full-length pieces stay inside one document. A packed
        context's ``doc_index`` is its first document. The final, partly filled packed
        context is padded and masked.
      max_contexts: stop after this many contexts.
    """
    ctx = checks.check_positive_int("context_length", context_length)
    prefix, suffix = special_template(tokenizer, special_tokens)
    body = ctx - len(prefix) - len(suffix)
    if body < 1:
        raise checks.InputError(
            f"context_length={ctx} leaves no room for text after the "
            f"{len(prefix) + len(suffix)} special token(s)"
        )
    pad = pad_id(tokenizer)
    sep = [] if getattr(tokenizer, "eos_token_id", None) is None else [int(tokenizer.eos_token_id)]
    packed: list[int] = []  # tokens of short pieces waiting to fill a context
    packed_doc = [-1]
    produced = 0
    rows: list[np.ndarray] = []
    masks: list[np.ndarray] = []
    docs: list[int] = []

    def flush() -> Contexts:
        block = Contexts(
            np.stack(rows).astype(np.int32), np.stack(masks), np.asarray(docs, np.int64)
        )
        rows.clear(), masks.clear(), docs.clear()
        return block

    def emit(piece: list[int], doc: int) -> None:
        nonlocal produced
        row = prefix + list(piece) + suffix
        n_real = len(row)
        rows.append(np.asarray(row + [pad] * (ctx - n_real), np.int64))
        masks.append(np.arange(ctx) < n_real)
        docs.append(doc)
        produced += 1

    def done() -> bool:
        return max_contexts is not None and produced >= max_contexts

    doc_id = 0
    batch: list[str] = []
    it = iter(documents)
    exhausted = False
    while not exhausted:
        batch = []
        for doc in it:
            batch.append(doc)
            if len(batch) >= docs_per_batch:
                break
        else:
            exhausted = True
        if not batch:
            break
        # verbose=False: whole documents are longer than the model's window by design
        # (they are cut into contexts next), so the length warning would be noise.
        encoded = tokenizer(batch, add_special_tokens=False, verbose=False)["input_ids"]
        for ids in encoded:
            for lo in range(0, len(ids), body):
                piece = list(ids[lo : lo + body])
                if len(piece) < body and pack:
                    if packed_doc[0] < 0:
                        packed_doc[0] = doc_id
                    packed.extend((sep if packed else []) + piece)
                    while len(packed) >= body:
                        emit(packed[:body], packed_doc[0])
                        del packed[:body]
                        packed_doc[0] = doc_id if packed else -1
                        if done():
                            yield flush()
                            return
                        if len(rows) >= block_contexts:
                            yield flush()
                    break
                if len(piece) < body and not pad_tail:
                    break
                emit(piece, doc_id)
                if done():
                    yield flush()
                    return
                if len(rows) >= block_contexts:
                    yield flush()
            doc_id += 1
    if packed:
        emit(packed, packed_doc[0])
    if rows:
        yield flush()


def make_contexts(
    documents: Iterable[str], tokenizer: Tokenizer, context_length: int, **kwargs: Any
) -> Contexts:
    """All contexts of `iter_contexts` in memory (see there for the arguments)."""
    blocks = list(iter_contexts(documents, tokenizer, context_length, **kwargs))
    if not blocks:
        raise checks.InputError(
            f"no context of {context_length} tokens could be made from the "
            "documents (too short? set pad_tail=True or a shorter "
            "context_length)"
        )
    return Contexts.concat(blocks)


ContextFactory = Callable[[int], Iterator[Contexts]]


def context_factory(contexts: Contexts | np.ndarray | ContextFactory) -> ContextFactory:
    """``open_at(start_context) -> iterator of Contexts`` for in-memory or streamed contexts."""
    if callable(contexts):
        return contexts
    ctxs = contexts if isinstance(contexts, Contexts) else Contexts.from_array(contexts)

    def open_at(start: int, block: int = 256) -> Iterator[Contexts]:
        for lo in range(start, len(ctxs), block):
            yield ctxs[lo : lo + block]

    return open_at


def skip_contexts(blocks: Iterable[Contexts], start: int) -> Iterator[Contexts]:
    """Drops the first ``start`` contexts of a block stream (resume of a streamed source)."""
    seen = 0
    for block in blocks:
        n = len(block)
        if seen + n <= start:
            seen += n
            continue
        yield block[max(0, start - seen) :]
        seen += n


def build_word_tokenizer(
    documents: Iterable[str] | None = None,
    vocab_size: int = 1000,
    *,
    special_tokens: str = "bos",
    lowercase: bool = True,
) -> Tokenizer:
    """A tiny word-level tokenizer trained locally (tests, demos, tiny model pairs; no network).

    Words and punctuation are tokens (``Whitespace`` pre-tokenizer), the ``vocab_size`` most
    frequent are kept, others map to ``<unk>``. Special tokens ``<pad>=0 <unk>=1 <bos>=2
    <eos>=3``. ``special_tokens``: ``bos`` adds BOS like Llama tokenizers, ``cls_sep`` adds
    ``<bos> ... <eos>`` like BERT's [CLS] ... [SEP], ``none`` adds nothing like GPT-2.

    Returns:
      a `transformers.PreTrainedTokenizerFast` (save it with ``save_pretrained``).
    """
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

    docs = sample_documents() if documents is None else list(documents)
    specials = ["<pad>", "<unk>", "<bos>", "<eos>"]
    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    if lowercase:
        tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(
        docs,
        trainers.WordLevelTrainer(
            vocab_size=int(vocab_size), special_tokens=specials, show_progress=False
        ),
    )
    if special_tokens == "bos":
        tok.post_processor = processors.TemplateProcessing(
            single="<bos> $A", special_tokens=[("<bos>", 2)]
        )
    elif special_tokens == "cls_sep":
        tok.post_processor = processors.TemplateProcessing(
            single="<bos> $A <eos>", special_tokens=[("<bos>", 2), ("<eos>", 3)]
        )
    elif special_tokens != "none":
        raise checks.InputError(
            f"special_tokens: expected bos | cls_sep | none, got {special_tokens!r}"
        )
    tok.decoder = decoders.WordPiece()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<bos>",
        eos_token="<eos>",
        pad_token="<pad>",
        unk_token="<unk>",
    )


def describe_source(source: Any) -> Any:
    """A JSON-able description of a text source (recorded in cache metadata)."""
    if isinstance(source, str):
        return os.path.abspath(source) if os.path.exists(source) else source
    return [describe_source(s) for s in source]
