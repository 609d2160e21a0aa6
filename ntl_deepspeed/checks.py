"""Input checks shared by every loss path: clear errors before any math or collective.

Shape and dtype checks are free (no data is read). Checks of values (label ids in range,
loss weights finite and >= 0) read data: with ``host=True`` they run on the host and name the
bad value (one synchronisation each); otherwise they are device-side asserts
(``torch._assert_async``) that never stall the host -- on CPU they raise at once, on CUDA at
the next synchronisation.
"""
from __future__ import annotations

from typing import Optional

import torch

from .config import REDUCTIONS


def _fail_if(bad: torch.Tensor, message: str, host: bool, detail=None) -> None:
    if host:
        if bool(bad.any()):
            raise ValueError(detail() if detail is not None else message)
    else:
        torch._assert_async(~bad.any(), message)


def check_label_dtype(labels) -> None:
    if not torch.is_tensor(labels):
        raise TypeError(f"labels must be a tensor of token ids, got {type(labels).__name__}")
    if labels.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"labels must be int64 (or int32) token ids, got {labels.dtype}")


def bad_labels(labels: torch.Tensor, vocab_size: int, ignore_index: int) -> torch.Tensor:
    """Where a label is neither a vocabulary id nor ``ignore_index`` (device op)."""
    return (labels != ignore_index) & ((labels < 0) | (labels >= vocab_size))


def bad_loss_weights(loss_weights: torch.Tensor) -> torch.Tensor:
    return (loss_weights < 0) | ~torch.isfinite(loss_weights)


def check_labels(labels: torch.Tensor, vocab_size: int, ignore_index: int,
                 host: bool = True) -> None:
    check_label_dtype(labels)
    bad = bad_labels(labels, vocab_size, ignore_index)

    def named():
        first = int(labels[bad].reshape(-1)[0])
        return (f"label id {first} is outside the vocabulary [0, {vocab_size}) and is not "
                f"ignore_index={ignore_index} ({int(bad.sum())} such labels)")

    _fail_if(bad, f"a label id is outside the vocabulary [0, {vocab_size}) and is not "
                  f"ignore_index={ignore_index} (ntl.check_inputs names it)", host, named)


def check_loss_weights_shape(loss_weights: Optional[torch.Tensor], labels: torch.Tensor) -> None:
    if loss_weights is not None and loss_weights.shape != labels.shape:
        raise ValueError(f"loss_weights {tuple(loss_weights.shape)} must have the labels' "
                         f"shape {tuple(labels.shape)}")


def check_loss_weights(loss_weights: Optional[torch.Tensor], labels: torch.Tensor,
                       host: bool = True) -> None:
    if loss_weights is None:
        return
    check_loss_weights_shape(loss_weights, labels)
    _fail_if(bad_loss_weights(loss_weights), "loss_weights must be finite and >= 0", host)


def check_reduction(reduction: str) -> None:
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction={reduction!r}: expected one of {REDUCTIONS}")


def check_logits(logits: torch.Tensor, labels: torch.Tensor) -> None:
    if not torch.is_floating_point(logits):
        raise TypeError(f"logits must be a floating-point tensor, got {logits.dtype}")
    if logits.dim() < 1 or logits.shape[:-1] != labels.shape:
        raise ValueError(f"logits {tuple(logits.shape)} and labels {tuple(labels.shape)} do not "
                         "match: expected logits [..., vocab] and labels [...]")


def check_head(hidden: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
               labels: torch.Tensor) -> None:
    if not torch.is_floating_point(hidden):
        raise TypeError(f"hidden must be a floating-point tensor, got {hidden.dtype}")
    if hidden.shape[:-1] != labels.shape:
        raise ValueError(f"hidden {tuple(hidden.shape)} and labels {tuple(labels.shape)} do not "
                         "match: expected hidden [..., H] and labels [...]")
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[-1]:
        raise ValueError(f"weight {tuple(weight.shape)} must be [V_local, {hidden.shape[-1]}]")
    if bias is not None and bias.shape != weight.shape[:1]:
        raise ValueError(f"bias {tuple(bias.shape)} must be [{weight.shape[0]}]")


def check_vocab_argument(vocab, what: str = "shard", shard_ok: bool = True) -> None:
    """A NumberVocab (or a VocabShard where ``shard_ok``), not the things users pass by mistake:
    a token list or a tokenizer (path) -- with the call that builds the right object."""
    from .numbers import NumberVocab, VocabShard  # numbers imports this module's siblings

    allowed = (NumberVocab, VocabShard) if shard_ok else (NumberVocab,)
    if isinstance(vocab, allowed):
        return
    expected = " or ".join(t.__name__ for t in allowed)
    if isinstance(vocab, (list, tuple)):
        fix = "build one with NumberVocab.from_tokens(tokens, mode=...)"
    elif isinstance(vocab, (str, bytes)) or hasattr(vocab, "__fspath__") \
            or hasattr(vocab, "get_vocab") or hasattr(vocab, "encode"):
        fix = "build one with NumberVocab.from_tokenizer(tokenizer_or_path, mode=...)"
    else:
        fix = "build one with NumberVocab.from_tokenizer(...) or NumberVocab.from_tokens(...)"
    raise TypeError(f"{what} must be a {expected}, got {type(vocab).__name__}: {fix}")


def check_gemm_dtype(gemm_dtype) -> None:
    if gemm_dtype is not None and not (isinstance(gemm_dtype, torch.dtype)
                                       and gemm_dtype.is_floating_point):
        raise TypeError(f"gemm_dtype={gemm_dtype!r}: expected None or a floating-point "
                        "torch.dtype (torch.float32, torch.bfloat16, torch.float16)")


def check_config_fits_vocab(config, vocab) -> None:
    """Options that need a certain kind of number vocabulary."""
    if config.enabled and config.kind == "number_level" and vocab.mode != "digits":
        raise ValueError(f"kind='number_level' assembles numbers from digit tokens: it needs a "
                         f"NumberVocab in mode 'digits', got mode {vocab.mode!r} (whose tokens "
                         f"such as '12' are whole numbers); use kind 'was'/'mse'/'l1'/'huber' "
                         "with it, or build the vocab with mode='digits'")


def check_number_range(config, vocab, dtype: torch.dtype) -> None:
    """The op's arithmetic must hold these number values: float32 inside, the gradient in
    ``dtype`` (host arithmetic on the vocab's table, cached: no sync)."""
    if config.enabled and config.active_weight != 0:
        vocab.check_representable(dtype, config.kind, config.weight, config.reweigh,
                                  config.squash_factor)
