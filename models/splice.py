"""SAEs spliced into a transformers language model: CE loss recovered, KL and delta loss.

The standard faithfulness check of an SAE (SAELens evals, Bloom et al. 2024; SAEBench, Karvonen
et al. 2025, arXiv:2503.09532): run the model with the hookpoint's activation replaced by

* nothing (``clean``),
* the SAE reconstruction ``x_hat = decode(encode(x))`` (``sae``),
* zeros (``zero`` ablation),
* the mean of the hookpoint's activation over the corpus (``mean`` ablation; streamed in a
  first pass over the same contexts),

and compare the losses of the predicted tokens:

    CE loss recovered = (CE_ablation - CE_sae) / (CE_ablation - CE_clean)
    delta loss        = CE_sae - CE_clean
    KL                = mean over predicted positions of KL(p_clean || p_sae)
    KL score          = (KL_ablation - KL_sae) / KL_ablation          (SAEBench "kl_div_score")

with CE the mean next-token (causal) or masked-token (masked LM) cross-entropy in nats over
the counted positions, ablation = zero (SAELens' default; also reported with the mean). An
identity SAE gives CE recovered 1 and KL 0; a zero SAE gives CE recovered 0 against zero
ablation. The reconstruction's fraction of variance explained at the hookpoint
(``1 - sum ||x - x_hat||^2 / sum ||x - mean||^2``) is reported beside them.

Which positions count (documented rule, `prepare_batch`):

* The SAE (or ablation) is substituted at real, non-special positions only: padding is never
  read, and special tokens (BOS/CLS/SEP...) keep their clean activation, as SAELens'
  ``exclude_special_tokens_from_reconstruction`` does (a BOS activation is an outlier SAEs are
  usually not trained on). ``splice_special=True`` substitutes there too.
* Causal models: position t predicts token t+1; it counts when both t and t+1 are real,
  non-special tokens.
* Masked models (BERT family): BERT's rule (Devlin et al. 2019, arXiv:1810.04805): each real,
  non-special token is chosen with probability ``mask_rate`` (0.15); a chosen token is replaced
  by the mask token with probability 0.8, by a uniformly random non-special token with 0.1, and
  kept with 0.1; the loss is the masked-token CE at chosen positions. The draw is seeded by
  ``(seed, index of the first context of the batch)``, so a resumed or repeated run masks the
  same tokens. The mask token is the tokenizer's ``mask_token_id`` (its UNK when it has none, as
  in the tiny masked models of `models.lm_tiny`).

Streaming: every token position of the corpus is one row (`token_stream`); the per-token
quantities computed by the torch forward (losses, KLs, reconstruction errors; attributions in
`models.importance`) are reduced on the JAX device mesh by the engine's accumulators
(`engine.accumulators.Sums` through `engine.accumulators.accumulate`: rows split over the
``data`` axis, merged across devices, compensated sums across chunks), and the running state
and stream position are checkpointed with orbax every ``save_every`` batches; a rerun with the
same ``checkpoint_dir`` resumes there.

The model must have its LM head: load it with `load_with_head` (``AutoModelForCausalLM`` or
``AutoModelForMaskedLM``); hookpoints are those of `models.lm` (``resid_pre.L``,
``resid_post.L``, ``attn_out.L``, ``mlp_out.L``). torch lives here, never in ``engine/``.

Example::

    from models import splice, sae_io_native, text
    lm = splice.load_with_head("path/to/model")
    sae = sae_io_native.load_sae("path/to/sae")
    ctx = text.make_contexts(text.sample_documents(), lm.tokenizer, 64, max_contexts=128)
    m = splice.splice_metrics(lm, sae, "resid_post.1", ctx)
    print(m.ce_loss_recovered, m.kl_div, m.delta_loss)
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

import numpy as np
from numpy.typing import ArrayLike, DTypeLike

from engine import checks
from engine import fingerprint as fp_lib
from models import lm as lm_lib
from models import sae as sae_lib

if TYPE_CHECKING:
    import torch
    from jax.sharding import Mesh

    from engine import streaming
    from engine.accumulators import Accumulator
    from models import text

POOR_CE_RECOVERED = 0.5  # below this an SAE is a poor stand-in for the model (see `warning`)
ILL_CONDITIONED_GAP = 0.05  # nats: CE_zero - CE_clean below this makes CE recovered noise/noise


# --------------------------------------------------------------------------------------------
# Loading a model with its head
# --------------------------------------------------------------------------------------------


def load_with_head(
    path: str, *, dtype: str = "float32", device: str | None = None
) -> lm_lib.LanguageModel:
    """A local model directory loaded WITH its LM head (causal, or masked for encoders).

    `models.lm.LanguageModel.load` loads the base model only; the losses here need the head.
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForMaskedLM

    if not os.path.isdir(path):
        raise checks.InputError(
            f"model {path!r}: no such local directory (spliced metrics never download weights)"
        )
    cfg = AutoConfig.from_pretrained(path, local_files_only=True)
    encoder = str(getattr(cfg, "model_type", "")) in lm_lib.ENCODER_MODEL_TYPES
    cls = AutoModelForMaskedLM if encoder else AutoModelForCausalLM
    try:
        with lm_lib.quiet_transformers():
            model, info = cls.from_pretrained(
                path,
                dtype=lm_lib._torch_dtype(dtype),
                local_files_only=True,
                output_loading_info=True,
            )
    except (OSError, ValueError) as e:
        raise checks.InputError(
            f"model {path!r}: could not load it with an LM head ({str(e).splitlines()[0]})"
        ) from None
    # A base-model checkpoint would get a randomly initialised head: every loss meaningless.
    base = getattr(model, "base_model_prefix", "") + "."
    missing = [k for k in info.get("missing_keys", []) if not k.startswith(base)]
    if missing:
        raise checks.InputError(
            f"model {path!r}: the checkpoint has no LM-head weights "
            f"({', '.join(sorted(missing)[:3])} missing); spliced losses "
            "need the model with its head"
        )
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError):
        tok = None
    return wrap(model, tok, name=os.path.abspath(path), device=device)


def wrap(
    model: torch.nn.Module,
    tokenizer: text.Tokenizer,
    *,
    name: str | None = None,
    device: str | None = None,
) -> lm_lib.LanguageModel:
    """A `LanguageModel` around a model with an LM head (checks that it has one)."""
    if getattr(model, "get_output_embeddings", lambda: None)() is None:
        raise checks.InputError(
            f"model {type(model).__name__}: no LM head (load it with "
            "AutoModelForCausalLM / AutoModelForMaskedLM, or `load_with_head`)"
        )
    lm = lm_lib.LanguageModel(model, tokenizer, name=name, device=device)
    lm.model.requires_grad_(False)  # attribution differentiates w.r.t. SAE features only
    return lm


def with_random_head(base: lm_lib.LanguageModel, seed: int) -> lm_lib.LanguageModel:
    """A base model (e.g. the random-init floor copy of `models.lm.random_init_copy`, which
    has no head) inside its architecture's LM-head model.

    The body's weights are ``base``'s, copied exactly; the head is the architecture's own
    initialisation under ``torch.manual_seed(seed)`` (tied to the input embeddings where the
    config ties them), so for a random-init body the result IS a random-init language model
    of that family, and the floor SAE can be spliced into its own model. Its losses are those
    of an untrained model (CE near ``log(vocab)``; zeroing a hookpoint barely moves them), so
    CE recovered is ill-conditioned there: `SpliceMetrics.warning` and the pipeline's summary
    say so, and delta loss and KL are the numbers to read.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForMaskedLM

    cls = AutoModelForMaskedLM if base.is_encoder else AutoModelForCausalLM
    dtype = next(base.model.parameters()).dtype
    torch.manual_seed(int(seed))
    with lm_lib.quiet_transformers():
        model = cls.from_config(base.model.config, dtype=dtype)
    body = getattr(model, model.base_model_prefix)
    result = body.load_state_dict(base.model.state_dict(), strict=False)
    # Every body weight must come from ``base``; only parts the LM head model drops (BERT's
    # pooler) may be left over.
    extra = [k for k in result.unexpected_keys if not k.startswith("pooler.")]
    if result.missing_keys or extra:
        raise checks.InputError(
            f"model {base.name}: its weights do not fit the "
            f"{cls.__name__} body (missing {result.missing_keys[:3]}, "
            f"unexpected {extra[:3]})"
        )
    if getattr(model.config, "tie_word_embeddings", False):
        model.tie_weights()
    model.eval()
    return wrap(
        model, base.tokenizer, name=f"{base.name} (with a random-init LM head)", device=base.device
    )


def sae_dtype(lm: lm_lib.LanguageModel) -> torch.dtype:
    """The SAE's compute dtype: the model's, but float32 for half-precision models (the
    reconstruction is cast back to the model's dtype where it is substituted)."""
    import torch

    dtype = next(lm.model.parameters()).dtype
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def vocab_size(lm: lm_lib.LanguageModel) -> int:
    return int(lm.model.get_output_embeddings().weight.shape[0])


# --------------------------------------------------------------------------------------------
# The SAE in torch
# --------------------------------------------------------------------------------------------


class TorchSAE:
    """`models.sae.SAE`'s inference forward in torch (same formulas, see models/sae.py).

    Args:
      sae: the SAE (JAX arrays; copied to the device).
      device, dtype: torch device and dtype (the model's).
    """

    def __init__(self, sae: sae_lib.SAE, device, dtype):
        import torch

        self.config = sae.config
        p = sae.to_numpy()
        t = lambda a: torch.as_tensor(np.asarray(a, np.float64), device=device).to(dtype)  # noqa
        self.W_enc, self.b_enc = t(p["W_enc"]), t(p["b_enc"])
        self.W_dec, self.b_dec = t(p["W_dec"]), t(p["b_dec"])
        self.threshold = t(p["threshold"])
        self.scale = float(sae.config.input_scale)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        import torch

        cfg = self.config
        xn = x * self.scale
        if cfg.apply_b_dec_to_input:
            xn = xn - self.b_dec
        pre = xn @ self.W_enc + self.b_enc
        if cfg.activation == "relu":
            return torch.relu(pre)
        if cfg.activation == "topk":
            acts = torch.relu(pre)
            vals, idx = acts.topk(cfg.k, dim=-1)
            return torch.zeros_like(acts).scatter(-1, idx, vals)
        return torch.where((pre > self.threshold) & (pre > 0), pre, torch.zeros_like(pre))

    def decode(self, f: torch.Tensor) -> torch.Tensor:
        return (f @ self.W_dec + self.b_dec) / self.scale

    def feature_direction(self, j: int) -> torch.Tensor:
        """What one unit of feature ``j`` adds to the reconstruction (input space)."""
        return self.W_dec[j] / self.scale

    def __call__(self, x):
        return self.decode(self.encode(x))


# --------------------------------------------------------------------------------------------
# Substituting a hookpoint's activation
# --------------------------------------------------------------------------------------------


@contextlib.contextmanager
def patched(lm: lm_lib.LanguageModel, hookpoint: str, fn: Callable) -> Iterator[lm_lib.Hookpoint]:
    """Within the block, the activation ``x`` at ``hookpoint`` is replaced by ``fn(x)``.

    ``resid_pre.L`` patches the input of block L (a forward pre-hook); ``resid_post.L`` the
    block's output (the last block's output is the pre-final-norm residual, see models/lm.py);
    ``attn_out.L`` / ``mlp_out.L`` the sub-layer's output before the residual add.
    """
    import torch

    hp = lm.parse(hookpoint)[0]
    block = lm.blocks[hp.layer]

    def replace(out):
        if isinstance(out, torch.Tensor):
            return fn(out)
        if isinstance(out, tuple):
            return (fn(out[0]),) + tuple(out[1:])
        raise RuntimeError(
            f"hookpoint {hp.name}: cannot patch an output of type {type(out).__name__}"
        )

    if hp.kind == "resid_pre":

        def pre_hook(module, args, kwargs):
            if args:
                return (fn(args[0]),) + tuple(args[1:]), kwargs
            kwargs = dict(kwargs)
            kwargs["hidden_states"] = fn(kwargs["hidden_states"])
            return args, kwargs

        handle = block.register_forward_pre_hook(pre_hook, with_kwargs=True)
    else:
        module = block if hp.kind == "resid_post" else lm_lib.sublayer_module(block, hp.kind)[1]
        handle = module.register_forward_hook(lambda m, a, out: replace(out))
    try:
        yield hp
    finally:
        handle.remove()


# --------------------------------------------------------------------------------------------
# Which positions are substituted and which predictions count
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class SpliceConfig:
    """How the corpus is read (module docstring, "Which positions count").

    Attributes:
      batch_size: contexts per forward.
      mask_rate: masked models: fraction of tokens chosen (BERT: 0.15).
      seed: masked models: seed of the masking draw.
      splice_special: also substitute at special-token positions.
      save_every: checkpoint every this many batches (with a checkpoint directory).
    """

    batch_size: int = 8
    mask_rate: float = 0.15
    seed: int = 0
    splice_special: bool = False
    save_every: int = 25

    def __post_init__(self):
        checks.check_positive_int("SpliceConfig.batch_size", self.batch_size)
        checks.check_positive_int("SpliceConfig.save_every", self.save_every)
        if not 0.0 < self.mask_rate <= 1.0:
            raise checks.InputError(
                f"SpliceConfig.mask_rate: expected (0, 1], got {self.mask_rate}"
            )


@dataclasses.dataclass(frozen=True)
class Batch:
    """One batch ready for the model (numpy).

    Attributes:
      input_ids: ``[b, s]`` ids fed to the model (masked models: after masking).
      attention_mask: ``[b, s]`` bool.
      splice: ``[b, s]`` bool, where the SAE / ablation is substituted.
      loss_pos: ``[b, s]`` bool, positions whose prediction counts.
      targets: ``[b, s]`` int64, the token predicted at each position (0 where not counted).
    """

    input_ids: np.ndarray
    attention_mask: np.ndarray
    splice: np.ndarray
    loss_pos: np.ndarray
    targets: np.ndarray


def mask_token_id(lm: lm_lib.LanguageModel) -> int:
    tok = lm.tokenizer
    for attr in ("mask_token_id", "unk_token_id"):
        value = getattr(tok, attr, None) if tok is not None else None
        if value is not None:
            return int(value)
    raise checks.InputError(
        f"model {lm.name}: a masked LM needs a tokenizer with a mask (or UNK) token"
    )


def prepare_batch(
    lm: lm_lib.LanguageModel,
    token_ids: np.ndarray,
    mask: np.ndarray,
    *,
    cfg: SpliceConfig,
    start: int,
) -> Batch:
    """The documented position rule for one batch; ``start`` = index of its first context."""
    ids = np.asarray(token_ids).astype(np.int64)
    mask = np.asarray(mask, bool)
    special = lm.special_mask(ids)
    real = mask & ~special
    splice = (mask if cfg.splice_special else real).copy()
    if not lm.is_encoder:
        loss_pos = np.zeros_like(real)
        loss_pos[:, :-1] = real[:, :-1] & real[:, 1:]
        targets = np.zeros_like(ids)
        targets[:, :-1] = ids[:, 1:]
        targets = np.where(loss_pos, targets, 0)
        return Batch(ids, mask, splice, loss_pos, targets)
    rng = np.random.default_rng([int(cfg.seed), int(start)])
    pick = real & (rng.random(ids.shape) < cfg.mask_rate)
    how = rng.random(ids.shape)
    vocab = vocab_size(lm)
    specials = np.asarray(lm._special_ids if lm._special_ids is not None else [], np.int64)
    ordinary = np.setdiff1d(np.arange(vocab), specials)
    random_ids = ordinary[rng.integers(0, len(ordinary), ids.shape)]
    inputs = ids.copy()
    inputs[pick & (how < 0.8)] = mask_token_id(lm)
    swap = pick & (how >= 0.8) & (how < 0.9)
    inputs[swap] = random_ids[swap]
    return Batch(inputs, mask, splice, pick, np.where(pick, ids, 0))


def as_contexts(contexts: text.Contexts | np.ndarray) -> text.Contexts:
    from models import text

    return contexts if isinstance(contexts, text.Contexts) else text.Contexts.from_array(contexts)


# --------------------------------------------------------------------------------------------
# Streaming over tokens with the engine's accumulators
# --------------------------------------------------------------------------------------------


def fingerprint(*parts: object) -> str:
    return fp_lib.digest(*parts, size=8)


def sae_fingerprint(sae: sae_lib.SAE) -> str:
    return sae.fingerprint()


def default_mesh() -> Mesh:
    """One device: the torch forward is the cost here, the sums are cheap."""
    import jax

    from engine import mesh as mesh_lib

    return mesh_lib.make_mesh(devices=jax.devices()[:1])


def host_dtype(acc: Any) -> np.dtype:
    """numpy dtype of the rows handed to ``acc``, an engine accumulator with a ``dtype`` (its
    accumulation dtype: no silent cast)."""
    return np.dtype(np.float64) if np.dtype(acc.dtype) == np.float64 else np.dtype(np.float32)


def token_stream(
    contexts: text.Contexts, batch_size: int, rows_fn: Callable, mesh: Mesh, *, name: str
) -> streaming.ChunkStream:
    """A `engine.streaming.ChunkStream` whose rows are the corpus's token positions.

    Row ``r`` is token ``r % seq`` of context ``r // seq`` (every context gives ``seq`` rows,
    padding included: ``rows_fn`` zeroes the rows that count nowhere). ``rows_fn(lo, part)``
    runs the model on the batch of contexts starting at ``lo`` (batches always start at
    multiples of ``batch_size``, so a seeded masking draw is the same on resume) and returns
    row-aligned arrays ``[len(part) * seq, ...]``. Re-opened at any row (a resumed
    `accumulate` seeks mid-batch), the batch holding that row is recomputed and cut.
    """
    from engine import mesh as mesh_lib
    from engine import streaming

    seq = int(np.asarray(contexts.token_ids).shape[1])
    n_data = mesh.shape[mesh_lib.DATA]
    chunk = -(-batch_size * seq // n_data) * n_data

    def open_at(start_row: int):
        first = (start_row // seq) // batch_size * batch_size
        skip = start_row - first * seq
        for lo in range(first, len(contexts), batch_size):
            arrays = tuple(rows_fn(lo, contexts[lo : lo + batch_size]))
            if skip:
                arrays, skip = tuple(a[skip:] for a in arrays), 0
            yield arrays

    return streaming.ChunkStream(open_at, chunk, name=name)


def streamed(
    acc: Accumulator,
    contexts: text.Contexts,
    batch_size: int,
    rows_fn: Callable,
    *,
    mesh: Mesh | None = None,
    checkpoint_dir: str | None,
    save_every: int,
    key: str,
    progress: bool = False,
    transform: Callable | None = None,
) -> dict:
    """``acc.finalize`` of `engine.accumulators.accumulate` over `token_stream` rows.

    The rows of each batch are split over the mesh's ``data`` axis, reduced on the devices
    and merged across them (``acc`` is an engine accumulator, e.g. `accumulators.Sums`).
    With ``checkpoint_dir`` the running state and the stream position are saved (orbax,
    ``checkpoint_dir/state``) every ``save_every`` chunks (a chunk is one batch of contexts)
    and at the end; a later call with the same directory and ``key`` resumes there (a
    different ``key`` is refused in one line: the directory belongs to another run).
    """
    from engine import accumulators, checkpoint

    mesh = default_mesh() if mesh is None else mesh
    ckpt = None
    if checkpoint_dir is not None:
        os.makedirs(checkpoint_dir, exist_ok=True)
        key_path = os.path.join(checkpoint_dir, "key.txt")
        if os.path.exists(key_path):
            with open(key_path, encoding="utf-8") as f:
                saved = f.read().strip()
            if saved != key:
                raise checks.InputError(
                    f"checkpoint {checkpoint_dir}: holds another run "
                    f"(key {saved!r}, expected {key!r}); use a fresh "
                    "directory"
                )
        else:
            with open(key_path, "w", encoding="utf-8") as f:
                f.write(key + "\n")
        ckpt = checkpoint.Checkpointer(os.path.join(checkpoint_dir, "state"))
    stream = token_stream(contexts, batch_size, rows_fn, mesh, name=f"{key} rows")
    try:
        state = accumulators.accumulate(
            acc,
            stream,
            mesh,
            checkpointer=ckpt,
            save_every=save_every,
            progress=progress,
            transform=transform,
        )
    finally:
        if ckpt is not None:
            ckpt.close()
    return acc.finalize(state)


def scatter_rows(
    mask: np.ndarray, values: ArrayLike, width: int | None = None, dtype: DTypeLike = np.float64
) -> np.ndarray:
    """``[mask.size(, width)]`` rows: ``values`` (given in ``mask``'s True order) at the True
    positions of the flattened ``mask``, zeros elsewhere."""
    flat = np.asarray(mask, bool).reshape(-1)
    shape = (flat.size,) if width is None else (flat.size, width)
    out = np.zeros(shape, dtype)
    out[flat] = np.asarray(values, np.float64).reshape((int(flat.sum()),) + shape[1:])
    return out


# --------------------------------------------------------------------------------------------
# Forward passes
# --------------------------------------------------------------------------------------------


def _tensors(lm, batch: Batch):
    import torch

    dev = lm.device
    return (
        torch.as_tensor(batch.input_ids, dtype=torch.long, device=dev),
        torch.as_tensor(batch.attention_mask.astype(np.int64), device=dev),
        torch.as_tensor(batch.splice, device=dev),
        torch.as_tensor(batch.loss_pos, device=dev),
        torch.as_tensor(batch.targets, dtype=torch.long, device=dev),
    )


def log_probs(
    lm: lm_lib.LanguageModel, batch: Batch, hookpoint: str | None = None, fn: Callable | None = None
) -> torch.Tensor:
    """Log-softmax of the logits at the counted positions ``[n, vocab]`` (float64 when the
    model is float64, else float32), with ``fn`` patched in at ``hookpoint`` (or clean)."""
    import torch

    ids, am, _, loss_pos, _ = _tensors(lm, batch)
    ctx = patched(lm, hookpoint, fn) if fn is not None else contextlib.nullcontext()
    with ctx:
        logits = lm.model(input_ids=ids, attention_mask=am, use_cache=False).logits
    logits = logits[loss_pos]
    if logits.dtype not in (torch.float32, torch.float64):
        logits = logits.float()
    return torch.log_softmax(logits, dim=-1)


def spliced_fn(
    splice_mask: torch.Tensor, replacement: Callable
) -> Callable[[torch.Tensor], torch.Tensor]:
    """``fn(x)``: ``replacement(x)`` at the spliced positions, ``x`` elsewhere."""
    import torch

    def fn(x):
        return torch.where(splice_mask[..., None], replacement(x).to(x.dtype), x)

    return fn


def hookpoint_mean(
    lm: lm_lib.LanguageModel,
    hookpoint: str,
    contexts: text.Contexts,
    cfg: SpliceConfig = SpliceConfig(),
    *,
    mesh: Mesh | None = None,
    checkpoint_dir: str | None = None,
    progress: bool = False,
) -> np.ndarray:
    """Mean activation at ``hookpoint`` over the spliced positions of the corpus (float64;
    summed on the mesh with `engine.accumulators.Sums`, resumable with ``checkpoint_dir``)."""
    from engine import accumulators

    contexts = as_contexts(contexts)
    hp = lm.parse(hookpoint)[0]
    acc = accumulators.Sums(
        {"sum": (0, None, 0), "count": (1, None, 0)}, {"sum": (lm.d_model,), "count": ()}
    )
    dt = host_dtype(acc)

    def rows(lo, part):
        batch = prepare_batch(lm, part.token_ids, part.mask, cfg=cfg, start=lo)
        out = lm.forward_batch(batch.input_ids, [hp.name], attention_mask=batch.attention_mask)
        x = out.acts[hp.name].astype(np.float64)
        keep = batch.splice.reshape(-1)
        return (
            scatter_rows(keep, x.reshape(-1, lm.d_model)[keep], lm.d_model, dt),
            keep.astype(dt),
        )

    key = fingerprint(
        "mean",
        hp.name,
        contexts.token_ids,
        contexts.mask,
        cfg.mask_rate,
        cfg.seed,
        cfg.splice_special,
    )
    sums = streamed(
        acc,
        contexts,
        cfg.batch_size,
        rows,
        mesh=mesh,
        checkpoint_dir=checkpoint_dir,
        save_every=cfg.save_every,
        key=key,
        progress=progress,
    )
    if sums["count"] <= 0:
        raise checks.InputError("contexts: no real, non-special token to average over")
    return sums["sum"] / float(sums["count"])


# --------------------------------------------------------------------------------------------
# The spliced metrics
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class SpliceMetrics:
    """Spliced-in metrics of one SAE at one hookpoint (module docstring for formulas).

    CE values are mean nats per counted position; ``kl_*`` mean KL(clean || patched) in nats.
    """

    hookpoint: str
    objective: str  # "next-token" | "masked-token"
    n_positions: int
    n_spliced: int
    ce_clean: float
    ce_sae: float
    ce_zero: float
    ce_mean: float
    kl_sae: float
    kl_zero: float
    kl_mean: float
    fvu: float  # fraction of variance unexplained at the hookpoint

    @property
    def delta_loss(self) -> float:
        return self.ce_sae - self.ce_clean

    @property
    def ce_loss_recovered(self) -> float:
        """Against zero ablation (SAELens ``ce_loss_score``)."""
        return _recovered(self.ce_zero, self.ce_sae, self.ce_clean)

    @property
    def ce_loss_recovered_mean(self) -> float:
        """Against mean ablation."""
        return _recovered(self.ce_mean, self.ce_sae, self.ce_clean)

    @property
    def kl_div(self) -> float:
        return self.kl_sae

    @property
    def kl_div_score(self) -> float:
        """SAEBench ``kl_div_score`` = (KL_zero - KL_sae) / KL_zero."""
        return (self.kl_zero - self.kl_sae) / self.kl_zero if self.kl_zero > 0 else float("nan")

    @property
    def explained_variance(self) -> float:
        return 1.0 - self.fvu

    def warning(self, threshold: float = POOR_CE_RECOVERED) -> str | None:
        """One line when the SAE recovers less than ``threshold`` of the CE loss.

        Also a note when zero ablation barely raises the loss (``CE_zero - CE_clean <
        ILL_CONDITIONED_GAP``): the ratio then divides noise by noise. Below 0.5 the
        reconstruction loses more than half of what the hookpoint contributes to the loss;
        features of such an SAE describe a different computation than the model's, so a
        universality claim built on them is weak.
        """
        gap = self.ce_zero - self.ce_clean
        if gap < ILL_CONDITIONED_GAP:
            return (
                f"note: zeroing {self.hookpoint} changes the loss by only {gap:.4f} nats "
                "(an untrained or barely trained model?): CE loss recovered is "
                "ill-conditioned there, read delta loss and KL instead"
            )
        r = self.ce_loss_recovered
        if np.isfinite(r) and r >= threshold:
            return None
        return (
            f"WARNING: SAE at {self.hookpoint} recovers {r:.2f} of the CE loss (< "
            f"{threshold}); its features are a poor stand-in for the model, so "
            "universality claims built on them are weak"
        )

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d.update(
            delta_loss=self.delta_loss,
            ce_loss_recovered=self.ce_loss_recovered,
            ce_loss_recovered_mean=self.ce_loss_recovered_mean,
            kl_div=self.kl_div,
            kl_div_score=self.kl_div_score,
            explained_variance=self.explained_variance,
        )
        return d


def _recovered(ablate: float, sae: float, clean: float) -> float:
    denom = ablate - clean
    return (ablate - sae) / denom if abs(denom) > 1e-12 else float("nan")


# Per-token columns of the spliced pass. CE of the patched runs is stored as the difference
# to the clean CE (computed per token in float64 before the rows are cast to the
# accumulation dtype), so delta loss and CE recovered are exact relative to their own size:
# an identity SAE gives exactly 0 and 1, whatever the accumulation precision.
SPLICE_COLUMNS = (
    "count",
    "ce_clean",
    "dce_sae",
    "dce_zero",
    "dce_mean",
    "kl_sae",
    "kl_zero",
    "kl_mean",
    "n_spliced",
    "sse",
    "sst",
)


def splice_metrics(
    lm: lm_lib.LanguageModel,
    sae: sae_lib.SAE,
    hookpoint: str,
    contexts: text.Contexts,
    cfg: SpliceConfig = SpliceConfig(),
    *,
    checkpoint_dir: str | None = None,
    mean: np.ndarray | None = None,
    mesh: Mesh | None = None,
    progress: bool = False,
) -> SpliceMetrics:
    """CE clean / SAE / zero / mean ablation, KLs and FVU, streamed over ``contexts``.

    Every token position is one row of per-token losses (`SPLICE_COLUMNS`), summed on the
    mesh with `engine.accumulators.Sums` (rows split over the ``data`` axis).

    Args:
      lm: a model with its LM head (`load_with_head` / `wrap`).
      sae: the SAE of ``hookpoint`` (``d_in`` must equal the hookpoint's width).
      contexts: `models.text.Contexts` or an ``[n, seq]`` id array.
      cfg: batching, masking rule (masked models), special-token rule.
      checkpoint_dir: resumable running sums (orbax; the mean pass under ``mean/``, the
        spliced pass under ``sums/``); None = in memory only.
      mean: the hookpoint's mean activation (default: streamed first with `hookpoint_mean`).
      mesh: device mesh of the sums (default: one device).
      progress: tqdm bars.
    """
    import torch

    from engine import accumulators

    contexts = as_contexts(contexts)
    if len(contexts) == 0:
        raise checks.InputError("contexts: empty corpus")
    hp = lm.parse(hookpoint)[0]
    if sae.config.d_in != lm.d_model:
        raise checks.InputError(
            f"SAE d_in={sae.config.d_in} does not match the width "
            f"{lm.d_model} of {hp.name} in {lm.name}"
        )
    key = fingerprint(
        "splice",
        sae_fingerprint(sae),
        hp.name,
        contexts.token_ids,
        contexts.mask,
        cfg.mask_rate,
        cfg.seed,
        cfg.splice_special,
    )
    sub = (
        (lambda name: None)
        if checkpoint_dir is None
        else (lambda name: os.path.join(checkpoint_dir, name))
    )
    if mean is None:
        mu = hookpoint_mean(
            lm, hp.name, contexts, cfg, mesh=mesh, checkpoint_dir=sub("mean"), progress=progress
        )
    else:
        mu = np.asarray(mean, np.float64)
    checks.check_shape("mean", mu, (lm.d_model,))
    ncol = len(SPLICE_COLUMNS)
    col = {name: i for i, name in enumerate(SPLICE_COLUMNS)}
    acc = accumulators.Sums({"sums": (0, None, 0)}, {"sums": (ncol,)})
    dt = host_dtype(acc)
    tsae = TorchSAE(sae, lm.device, sae_dtype(lm))
    mu_t = torch.as_tensor(mu, device=lm.device).to(tsae.W_enc.dtype)

    def rows(lo, part):
        batch = prepare_batch(lm, part.token_ids, part.mask, cfg=cfg, start=lo)
        _, _, splice, loss_pos, targets = _tensors(lm, batch)
        tgt = targets[loss_pos]
        rec: dict[str, Any] = {}

        def sae_replacement(x):
            x = x.to(tsae.W_enc.dtype)
            x_hat = tsae(x)
            rec["sse"] = ((x - x_hat)[splice].double() ** 2).sum(-1)
            rec["sst"] = ((x - mu_t)[splice].double() ** 2).sum(-1)
            return x_hat

        with torch.inference_mode():
            lp = {"clean": log_probs(lm, batch)}
            for name, repl in (
                ("sae", sae_replacement),
                ("zero", lambda x: torch.zeros_like(x)),
                ("mean", lambda x: mu_t.expand_as(x)),
            ):
                lp[name] = log_probs(lm, batch, hp.name, spliced_fn(splice, repl))
        ce = {name: -v.gather(-1, tgt[:, None])[:, 0].double() for name, v in lp.items()}
        p_clean = lp["clean"].exp()
        counted = np.zeros((int(batch.loss_pos.sum()), ncol))
        counted[:, col["count"]] = 1.0
        counted[:, col["ce_clean"]] = ce["clean"].cpu().numpy()
        for name in ("sae", "zero", "mean"):
            counted[:, col[f"dce_{name}"]] = (ce[name] - ce["clean"]).cpu().numpy()
            counted[:, col[f"kl_{name}"]] = (
                (p_clean * (lp["clean"] - lp[name])).double().sum(-1).cpu().numpy()
            )
        spliced = np.zeros((int(batch.splice.sum()), ncol))
        spliced[:, col["n_spliced"]] = 1.0
        spliced[:, col["sse"]] = rec["sse"].cpu().numpy()
        spliced[:, col["sst"]] = rec["sst"].cpu().numpy()
        out = scatter_rows(batch.loss_pos, counted, ncol) + scatter_rows(
            batch.splice, spliced, ncol
        )
        return (out.astype(dt),)

    s = streamed(
        acc,
        contexts,
        cfg.batch_size,
        rows,
        mesh=mesh,
        checkpoint_dir=sub("sums"),
        save_every=cfg.save_every,
        key=key,
        progress=progress,
    )["sums"]
    sums = {name: float(s[i]) for name, i in col.items()}
    n = sums["count"]
    if n <= 0:
        raise checks.InputError(
            "contexts: no position to predict (too short, or all "
            "special/padding, or no masked token drawn)"
        )
    ce_clean = sums["ce_clean"] / n
    return SpliceMetrics(
        hookpoint=hp.name,
        objective="masked-token" if lm.is_encoder else "next-token",
        n_positions=int(round(n)),
        n_spliced=int(round(sums["n_spliced"])),
        ce_clean=ce_clean,
        ce_sae=ce_clean + sums["dce_sae"] / n,
        ce_zero=ce_clean + sums["dce_zero"] / n,
        ce_mean=ce_clean + sums["dce_mean"] / n,
        kl_sae=sums["kl_sae"] / n,
        kl_zero=sums["kl_zero"] / n,
        kl_mean=sums["kl_mean"] / n,
        fvu=sums["sse"] / sums["sst"] if sums["sst"] > 0 else float("nan"),
    )
