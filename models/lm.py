"""transformers language models as activation sources: explicit hookpoints, one early-stopped pass.

Any transformers model that runs as a stack of blocks works: causal LMs (GPT-2, GPT-NeoX /
Pythia, Llama / Gemma families, ...) and encoders (BERT family). Only the base model is loaded
(`transformers.AutoModel`, no LM head). torch lives in `models/` only; outputs are numpy.

Hookpoints (docs/references.md "Layers and hookpoints"), ``L`` counts blocks from 0:

* ``resid_pre.L``: input of block L = HF ``hidden_states[L]``; SAELens
  ``blocks.L.hook_resid_pre``; sparsify ``layers.{L-1}`` (none for L = 0).
* ``resid_post.L``: output of block L = HF ``hidden_states[L+1]`` (except the last block, see
  below); SAELens ``blocks.L.hook_resid_post``; sparsify ``layers.L``.
* ``attn_out.L``: the attention sub-layer's output, before the residual add; SAELens
  ``blocks.L.hook_attn_out``; sparsify ``layers.L.self_attn``.
* ``mlp_out.L``: the MLP sub-layer's output, before the residual add; SAELens
  ``blocks.L.hook_mlp_out``; sparsify ``layers.L.mlp``.

`parse_hookpoint` accepts all these spellings (and negative L, counted from the end).

HF ``output_hidden_states`` returns ``n_layers + 1`` tensors and is off by one against the
SAELens / sparsify names: ``blocks.L.hook_resid_post`` == sparsify ``layers.L`` ==
``hidden_states[L + 1]`` == our ``resid_post.L``. One more trap: for the LAST block HF replaces
``hidden_states[n_layers]`` by the FINAL-NORMED output (GPT-2 ``ln_f``, NeoX
``final_layer_norm``, Llama ``norm``), so ``resid_post.{n-1}`` is captured by a forward hook on
the block, never read from ``hidden_states``.

Sub-layer outputs: the module that produces what is added to the residual stream. Pre-norm
models (GPT-2 ``attn``/``mlp``, NeoX ``attention``/``mlp``, Llama ``self_attn``/``mlp``) give
``resid_post = resid_pre + attn_out + mlp_out`` (also with NeoX's parallel residual). Gemma 2/3
"sandwich" norms: the outputs of ``post_attention_layernorm`` / ``post_feedforward_layernorm``.
Post-norm BERT-family blocks: ``attention.output.dense`` / ``output.dense`` (before the
residual add and LayerNorm).

Efficiency: one batched pass under ``torch.inference_mode`` captures every requested hookpoint
with forward hooks, and the pass stops (an exception raised from the hook) right after the
deepest one, so later blocks cost nothing. Padding is masked (``attention_mask``) and returned
as ``mask``; special tokens (BOS/EOS/PAD/CLS/SEP...) are flagged in ``special`` so filters can
drop them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import re
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
from numpy.typing import ArrayLike

from engine import checks

if TYPE_CHECKING:
    import torch

    from models import text as text_lib

KINDS = ("resid_pre", "attn_out", "mlp_out", "resid_post")  # in execution order within a block
STORAGE_DTYPES = ("float32", "float16", "bfloat16")
ENCODER_MODEL_TYPES = frozenset(
    {
        "bert",
        "roberta",
        "xlm-roberta",
        "distilbert",
        "albert",
        "electra",
        "camembert",
        "deberta",
        "deberta-v2",
        "mpnet",
        "modernbert",
    }
)

_ATTN_NAMES = ("self_attn", "attn", "attention", "self_attention")
_MLP_NAMES = ("mlp", "feed_forward", "ffn", "block_sparse_moe")


# --------------------------------------------------------------------------------------------
# Hookpoints
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, order=True)
class Hookpoint:
    """One named activation site: ``kind`` in `KINDS` at block ``layer`` (0-based)."""

    layer: int
    kind: str

    @property
    def name(self) -> str:
        return f"{self.kind}.{self.layer}"

    @property
    def stage(self) -> int:
        return KINDS.index(self.kind)

    @property
    def saelens_name(self) -> str:
        """TransformerLens / SAELens hook name (``blocks.L.hook_resid_post`` ...)."""
        return f"blocks.{self.layer}.hook_{self.kind}"

    @property
    def sparsify_name(self) -> str:
        """EleutherAI sparsify hookpoint (``layers.L`` = block output)."""
        if self.kind == "resid_post":
            return f"layers.{self.layer}"
        if self.kind == "resid_pre":
            if self.layer == 0:
                raise checks.InputError(
                    "resid_pre.0 (the embedding output) has no sparsify layers.L name"
                )
            return f"layers.{self.layer - 1}"
        return f"layers.{self.layer}.{'self_attn' if self.kind == 'attn_out' else 'mlp'}"

    def __str__(self) -> str:
        return self.name


_PATTERNS = [
    (re.compile(r"^(resid_pre|resid_post|attn_out|mlp_out)\.(-?\d+)$"), None),
    (re.compile(r"^blocks\.(-?\d+)\.hook_(resid_pre|resid_post|attn_out|mlp_out)$"), "saelens"),
    (
        re.compile(r"^(?:model\.)?(?:layers|h|gpt_neox\.layers|transformer\.h)\.(-?\d+)$"),
        "resid_post",
    ),
    (re.compile(r"^(?:model\.)?layers\.(-?\d+)\.(self_attn|attention|attn)$"), "attn_out"),
    (re.compile(r"^(?:model\.)?layers\.(-?\d+)\.mlp$"), "mlp_out"),
]


def parse_hookpoint(name: str | Hookpoint, n_layers: int | None = None) -> Hookpoint:
    """Parses our names, SAELens ``blocks.L.hook_*`` and sparsify ``layers.L[.mlp|.self_attn]``.

    Negative layers count from the end when ``n_layers`` is given. Raises `InputError` on an
    unknown name or a layer outside ``[0, n_layers)``.
    """
    if isinstance(name, Hookpoint):
        hp = name
    else:
        hp = None
        for pattern, how in _PATTERNS:
            m = pattern.match(str(name).strip())
            if not m:
                continue
            if how is None:
                hp = Hookpoint(int(m.group(2)), m.group(1))
            elif how == "saelens":
                hp = Hookpoint(int(m.group(1)), m.group(2))
            else:
                hp = Hookpoint(int(m.group(1)), how)
            break
        if hp is None:
            raise checks.InputError(
                f"hookpoint {name!r}: unknown name; expected resid_pre.L, resid_post.L, "
                "attn_out.L, mlp_out.L (or SAELens blocks.L.hook_resid_post, sparsify layers.L)"
            )
    if n_layers is not None:
        layer = hp.layer + n_layers if hp.layer < 0 else hp.layer
        if not 0 <= layer < n_layers:
            raise checks.InputError(
                f"hookpoint {name!s}: layer {hp.layer} outside the model's "
                f"{n_layers} blocks (0..{n_layers - 1})"
            )
        hp = Hookpoint(layer, hp.kind)
    elif hp.layer < 0:
        raise checks.InputError(f"hookpoint {name!s}: a negative layer needs the model's depth")
    return hp


# --------------------------------------------------------------------------------------------
# Module discovery
# --------------------------------------------------------------------------------------------


def _text_config(config):
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def find_blocks(model: torch.nn.Module, n_layers: int) -> tuple[str, torch.nn.ModuleList]:
    """The `torch.nn.ModuleList` of the model's ``n_layers`` blocks (first one in module order).

    Generic over architectures: ``transformer.h`` (GPT-2), ``gpt_neox.layers``, ``layers``
    (Llama/Gemma base models), ``encoder.layer`` (BERT) all are the first ModuleList of that
    length.
    """
    import torch

    for name, module in model.named_modules():
        if isinstance(module, torch.nn.ModuleList) and len(module) == n_layers:
            return name, module
    raise checks.InputError(
        f"model {type(model).__name__}: found no list of {n_layers} blocks; "
        "this architecture is not supported"
    )


def _child(module, names: Sequence[str]):
    for n in names:
        sub = getattr(module, n, None)
        if sub is not None:
            return n, sub
    return None, None


def sublayer_module(block: torch.nn.Module, kind: str) -> tuple[str, torch.nn.Module]:
    """The module whose output is the attention / MLP contribution (module docstring)."""
    # Post-norm BERT family: attention.output = LayerNorm(dense(x) + input); take dense.
    bert_like = (
        hasattr(block, "attention")
        and hasattr(block, "intermediate")
        and hasattr(getattr(block, "output", None), "dense")
    )
    if bert_like:
        path = "attention.output.dense" if kind == "attn_out" else "output.dense"
        return path, block.get_submodule(path)
    if hasattr(block, "post_feedforward_layernorm"):  # Gemma 2/3 sandwich norms
        name = "post_attention_layernorm" if kind == "attn_out" else "post_feedforward_layernorm"
        return name, getattr(block, name)
    name, sub = _child(block, _ATTN_NAMES if kind == "attn_out" else _MLP_NAMES)
    if sub is None:
        raise checks.InputError(
            f"block {type(block).__name__}: no {kind} sub-module found "
            f"(looked for {_ATTN_NAMES if kind == 'attn_out' else _MLP_NAMES})"
        )
    return name, sub


def _first_tensor(out):
    if isinstance(out, (tuple, list)):
        out = out[0]
    if hasattr(out, "last_hidden_state"):
        out = out.last_hidden_state
    return out


@contextlib.contextmanager
def quiet_transformers() -> Iterator[None]:
    """Silences transformers' load reports and progress bars for a moment (then restores).

    Loading a base model from a checkpoint with a head reports the head's weights as
    "unexpected"; that is the intended use here, not a problem worth a screenful.
    """
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()


class _StopForward(Exception):
    """Raised from a hook once every requested hookpoint has been captured."""


# --------------------------------------------------------------------------------------------
# The model wrapper
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass
class LMActivations:
    """Activations of one batch of contexts.

    Attributes:
      acts: hookpoint name -> ``[batch, seq, d]`` numpy array (``out_dtype``).
      token_ids: ``[batch, seq]`` int32.
      mask: ``[batch, seq]`` bool, False on padding.
      special: ``[batch, seq]`` bool, True on special tokens (BOS/EOS/PAD/CLS/SEP...).
    """

    acts: dict[str, np.ndarray]
    token_ids: np.ndarray
    mask: np.ndarray
    special: np.ndarray


def _torch_dtype(name: str):
    import torch

    table = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
    if name not in table:
        raise checks.InputError(f"dtype: expected one of {STORAGE_DTYPES}, got {name!r}")
    return table[name]


def torch_to_numpy(t: torch.Tensor, dtype: str = "float32") -> np.ndarray:
    """A torch tensor as a numpy array of ``dtype`` (bfloat16 -> `ml_dtypes.bfloat16`)."""
    import torch

    t = t.detach().to(_torch_dtype(dtype))
    if dtype == "bfloat16":
        import ml_dtypes

        return t.contiguous().view(torch.int16).cpu().numpy().view(ml_dtypes.bfloat16)
    return t.cpu().numpy()


class LanguageModel:
    """A transformers base model with a tokenizer, run at explicit hookpoints.

    Build it with `load` (a local directory or, when the hub is reachable, a hub name) or
    from an already constructed model.

    Args:
      model: a transformers ``PreTrainedModel`` (base model preferred; heads are ignored).
      tokenizer: its tokenizer (None: only token-id input).
      name: what to record as the model's name (cache metadata).
      revision: hub revision, when known.
      device: torch device (default: cuda when available, else cpu).
    """

    def __init__(
        self,
        model,
        tokenizer=None,
        *,
        name: str | None = None,
        revision: str | None = None,
        device: str | None = None,
    ):
        import torch

        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.model = model.to(self.device).eval()
        self.tokenizer = tokenizer
        self.config = _text_config(model.config)
        self.name = name or str(getattr(model.config, "_name_or_path", "") or type(model).__name__)
        self.revision = revision or getattr(model.config, "_commit_hash", None)
        self.n_layers = int(self.config.num_hidden_layers)
        self.d_model = int(self.config.hidden_size)
        self.model_type = str(getattr(self.config, "model_type", ""))
        self.is_encoder = self.model_type in ENCODER_MODEL_TYPES
        self.blocks_path, self.blocks = find_blocks(self.model, self.n_layers)
        self.dtype = str(next(self.model.parameters()).dtype).replace("torch.", "")
        self._special_ids = None
        if tokenizer is not None:
            from models import text

            self._special_ids = np.asarray(text.special_token_ids(tokenizer), np.int64)

    # -- loading ----------------------------------------------------------------------------

    @classmethod
    def load(
        cls,
        name_or_path: str,
        *,
        revision: str | None = None,
        dtype: str = "float32",
        device: str | None = None,
        tokenizer: Any = None,
        trust_remote_code: bool = False,
    ) -> LanguageModel:
        """Loads the base model and tokenizer from a local directory or a hub name.

        A local directory never touches the network. ``dtype`` is the compute dtype
        (float32 | float16 | bfloat16). ``tokenizer``: a tokenizer or a path to load one from
        (default: the model's own).
        """
        from transformers import AutoModel, AutoTokenizer

        local = os.path.isdir(name_or_path)
        if not local and (os.path.isabs(name_or_path) or name_or_path.startswith((".", "~"))):
            raise checks.InputError(f"model {name_or_path!r}: no such local directory")
        kw = dict(revision=revision, local_files_only=local, trust_remote_code=trust_remote_code)
        try:
            with quiet_transformers():
                model = AutoModel.from_pretrained(name_or_path, dtype=_torch_dtype(dtype), **kw)
        except OSError as e:
            first = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise checks.InputError(
                f"model {name_or_path!r}: could not load ({first}); give a "
                "local model directory or a reachable hub name"
            ) from None
        if tokenizer is None or isinstance(tokenizer, str):
            tok_src = tokenizer or name_or_path
            try:
                tokenizer = AutoTokenizer.from_pretrained(
                    tok_src,
                    revision=None if tokenizer else revision,
                    local_files_only=os.path.isdir(tok_src),
                )
            except (OSError, ValueError) as e:
                if tokenizer:
                    raise checks.InputError(
                        f"tokenizer {tok_src!r}: could not load ({str(e).splitlines()[0]})"
                    ) from None
                tokenizer = None  # token ids only
        name = os.path.abspath(name_or_path) if local else name_or_path
        return cls(model, tokenizer, name=name, revision=revision, device=device)

    # -- description ------------------------------------------------------------------------

    def hookpoints(self, kinds: Sequence[str] = KINDS) -> list[str]:
        """Every hookpoint name of this model (for the given kinds), in depth order."""
        return [
            Hookpoint(layer, k).name for layer in range(self.n_layers) for k in KINDS if k in kinds
        ]

    def parse(self, hookpoints: str | Sequence[str]) -> list[Hookpoint]:
        """Normalised, de-duplicated hookpoints (input order kept); raises on bad names."""
        names = [hookpoints] if isinstance(hookpoints, (str, Hookpoint)) else list(hookpoints)
        if not names:
            raise checks.InputError("hookpoints: none given")
        out: list[Hookpoint] = []
        for n in names:
            hp = parse_hookpoint(n, self.n_layers)
            if hp not in out:
                out.append(hp)
        for hp in out:
            if hp.kind in ("attn_out", "mlp_out"):
                sublayer_module(self.blocks[hp.layer], hp.kind)  # raises if not exposed
        return out

    def describe(self) -> dict:
        """JSON-able facts recorded in cache metadata."""
        from models import text

        return {
            "name": self.name,
            "revision": self.revision,
            "model_type": self.model_type,
            "class": type(self.model).__name__,
            "n_layers": self.n_layers,
            "d_model": self.d_model,
            "dtype": self.dtype,
            "is_encoder": self.is_encoder,
            "blocks": self.blocks_path,
            "tokenizer": (
                text.tokenizer_fingerprint(self.tokenizer) if self.tokenizer is not None else None
            ),
        }

    def special_mask(self, token_ids: np.ndarray) -> np.ndarray:
        """True where a token id is a special token of the tokenizer (False if none known)."""
        if self._special_ids is None:
            return np.zeros(np.shape(token_ids), bool)
        return np.isin(token_ids, self._special_ids)

    # -- forward ----------------------------------------------------------------------------

    @contextlib.contextmanager
    def _hooks(self, hps: list[Hookpoint], store: dict, stop: bool):
        deepest = max(hps, key=lambda h: (h.layer, h.stage))
        last_layer = deepest.layer
        # Stop before block `last_layer` runs when only its input is wanted, else after it.
        stop_pre = all(h.kind == "resid_pre" for h in hps if h.layer == last_layer)
        handles = []

        def capture(name):
            def hook(module, args, out):
                store[name] = _first_tensor(out)

            return hook

        def capture_pre(name, stop_here):
            def hook(module, args, kwargs):
                x = args[0] if args else kwargs.get("hidden_states")
                store[name] = x
                if stop_here:
                    raise _StopForward

            return hook

        def stop_after(module, args, out):
            raise _StopForward

        try:
            for h in hps:
                block = self.blocks[h.layer]
                if h.kind == "resid_pre":
                    handles.append(
                        block.register_forward_pre_hook(
                            capture_pre(h.name, stop and stop_pre and h.layer == last_layer),
                            with_kwargs=True,
                        )
                    )
                elif h.kind == "resid_post":
                    handles.append(block.register_forward_hook(capture(h.name)))
                else:
                    _, module = sublayer_module(block, h.kind)
                    handles.append(module.register_forward_hook(capture(h.name)))
            if stop and not stop_pre:
                # Registered last, so it runs after the capture hooks of the same block.
                handles.append(self.blocks[last_layer].register_forward_hook(stop_after))
            yield
        finally:
            for handle in handles:
                handle.remove()

    def forward_batch(
        self,
        token_ids: ArrayLike,
        hookpoints: str | Sequence[str],
        *,
        attention_mask: ArrayLike | None = None,
        out_dtype: str = "float32",
        stop_early: bool = True,
    ) -> LMActivations:
        """Runs one batch and returns every requested hookpoint (numpy).

        Args:
          token_ids: ``[batch, seq]`` integer ids.
          hookpoints: names (see `parse_hookpoint`).
          attention_mask: ``[batch, seq]`` 1 = real token (default all ones).
          out_dtype: float32 | float16 | bfloat16 of the returned arrays.
          stop_early: stop the forward after the deepest hookpoint (default); False runs the
            whole model (same values; for tests and benchmarks).
        """
        import torch

        hps = self.parse(hookpoints)
        if out_dtype not in STORAGE_DTYPES:
            raise checks.InputError(
                f"out_dtype: expected one of {STORAGE_DTYPES}, got {out_dtype!r}"
            )
        ids = np.asarray(token_ids)
        checks.check_rank("token_ids", ids, 2)
        if not np.issubdtype(ids.dtype, np.integer):
            raise checks.InputError(f"token_ids: expected integer ids, got dtype {ids.dtype}")
        vocab = int(getattr(self.config, "vocab_size", 0) or 0)
        if vocab and ids.size and (ids.min() < 0 or ids.max() >= vocab):
            raise checks.InputError(
                f"token_ids: ids must lie in [0, {vocab}) (the model's "
                f"vocabulary), got range [{ids.min()}, {ids.max()}]"
            )
        mask = (
            np.ones(ids.shape, bool)
            if attention_mask is None
            else np.asarray(attention_mask).astype(bool)
        )
        checks.check_shape("attention_mask", mask, ids.shape)
        max_pos = getattr(self.config, "max_position_embeddings", None)
        if max_pos and ids.shape[1] > max_pos:
            raise checks.InputError(
                f"token_ids: sequence length {ids.shape[1]} exceeds the "
                f"model's max_position_embeddings={max_pos}"
            )
        store: dict[str, Any] = {}
        t_ids = torch.as_tensor(ids, dtype=torch.long, device=self.device)
        t_mask = torch.as_tensor(mask, dtype=torch.long, device=self.device)
        with torch.inference_mode(), self._hooks(hps, store, stop_early):
            try:
                self.model(input_ids=t_ids, attention_mask=t_mask, use_cache=False)
            except _StopForward:
                pass
        missing = [h.name for h in hps if h.name not in store]
        if missing:
            raise RuntimeError(
                f"hookpoints {missing} were not reached by the forward pass of "
                f"{type(self.model).__name__}"
            )
        acts = {h.name: torch_to_numpy(store[h.name], out_dtype) for h in hps}
        return LMActivations(
            acts=acts, token_ids=ids.astype(np.int32), mask=mask, special=self.special_mask(ids)
        )

    def iter_activations(
        self,
        contexts: text_lib.Contexts | ArrayLike,
        hookpoints: str | Sequence[str],
        *,
        batch_size: int = 8,
        out_dtype: str = "float32",
    ) -> Iterator[LMActivations]:
        """Batches over contexts (`models.text.Contexts` or an ``[n, seq]`` id array)."""
        from models import text

        ctxs = (
            contexts
            if isinstance(contexts, text.Contexts)
            else (text.Contexts.from_array(contexts))
        )
        bs = checks.check_positive_int("batch_size", batch_size)
        for lo in range(0, len(ctxs), bs):
            part = ctxs[lo : lo + bs]
            yield self.forward_batch(
                part.token_ids, hookpoints, attention_mask=part.mask, out_dtype=out_dtype
            )

    def run(
        self,
        contexts: text_lib.Contexts | ArrayLike,
        hookpoints: str | Sequence[str],
        *,
        batch_size: int = 8,
        out_dtype: str = "float32",
    ) -> LMActivations:
        """All activations of ``contexts`` in memory (small inputs; use a cache for large)."""
        parts = list(
            self.iter_activations(contexts, hookpoints, batch_size=batch_size, out_dtype=out_dtype)
        )
        return LMActivations(
            acts={k: np.concatenate([p.acts[k] for p in parts]) for k in parts[0].acts},
            token_ids=np.concatenate([p.token_ids for p in parts]),
            mask=np.concatenate([p.mask for p in parts]),
            special=np.concatenate([p.special for p in parts]),
        )

    def encode(self, texts: Sequence[str], max_length: int) -> tuple[np.ndarray, np.ndarray]:
        """Tokenises raw texts with the model's special tokens, right-padded to ``max_length``.

        Returns ``(token_ids [n, max_length], mask)``; longer texts are truncated.
        """
        if self.tokenizer is None:
            raise checks.InputError(f"model {self.name}: no tokenizer loaded")
        from models import text

        enc = self.tokenizer(
            list(texts), add_special_tokens=True, truncation=True, max_length=max_length
        )["input_ids"]
        ids = np.full((len(enc), max_length), text.pad_id(self.tokenizer), np.int32)
        mask = np.zeros((len(enc), max_length), bool)
        for i, row in enumerate(enc):
            ids[i, : len(row)] = row
            mask[i, : len(row)] = True
        return ids, mask


# --------------------------------------------------------------------------------------------
# Random-init copies (the "random-init floor" of DESIGN.md)
# --------------------------------------------------------------------------------------------


def random_init_copy(
    source: LanguageModel | str, seed: int, out_dir: str | None = None, *, device: str | None = None
) -> LanguageModel:
    """The same architecture with freshly initialised weights (the random-init floor).

    Uses the architecture's own initialiser (``AutoModel.from_config`` under
    ``torch.manual_seed(seed)``), so the copy has the scale of an untrained model of that
    family. With ``out_dir`` the copy and the tokenizer are saved there so that harvest and
    other processes can load it as a local directory.
    """
    import torch
    from transformers import AutoModel

    src = source if isinstance(source, LanguageModel) else LanguageModel.load(source, device="cpu")
    torch.manual_seed(int(seed))
    dtype = next(src.model.parameters()).dtype
    model = AutoModel.from_config(src.model.config, dtype=dtype)
    name = f"{src.name} (random init, seed {seed})"
    if out_dir is not None:
        os.makedirs(out_dir, exist_ok=True)
        with quiet_transformers():
            model.save_pretrained(out_dir)
        if src.tokenizer is not None:
            src.tokenizer.save_pretrained(out_dir)
        with open(os.path.join(out_dir, "random_init.json"), "w", encoding="utf-8") as f:
            import json

            json.dump({"source": src.name, "seed": int(seed)}, f)
    return LanguageModel(model, src.tokenizer, name=name, device=device)
