"""Hugging Face ``Trainer`` with CE + lambda*NTL: ``NTLTrainer``, a drop-in subclass.

    trainer = NTLTrainer(model=model, args=TrainingArguments(..., deepspeed="ds_config.json"),
                         train_dataset=..., processing_class=tokenizer)

The ``"ntl"`` section comes from the DeepSpeed config Trainer was given (or ``ntl_config=``).
NTL is installed when training begins -- after Trainer has built the DeepSpeed engine, so an
AutoTP vocab-parallel head gets its TP group and ``vocab_start_index`` -- and CE, NTL, number
accuracy and number MAE (DP-reduced; ``eval_``-prefixed in evaluation) join Trainer's own logs,
so TensorBoard / W&B / CSV reporters receive them.
"""
from __future__ import annotations

import json
from typing import Optional

from transformers import Trainer, TrainerCallback

from ..config import NTLConfig
from ..metrics import NTLMetrics
from ..numbers import NumberVocab
from .deepspeed import install, split_config


def _section_from_args(args) -> Optional[NTLConfig]:
    """The ``"ntl"`` section of the DeepSpeed config in TrainingArguments, if any."""
    ds = getattr(args, "deepspeed", None)
    if ds is None:
        return None
    if isinstance(ds, str):
        with open(ds) as f:
            ds = json.load(f)
    return split_config(ds, source=args.deepspeed if isinstance(args.deepspeed, str) else None
                        )[1] if "ntl" in ds else None


class _InstallAtTrainBegin(TrainerCallback):
    def __init__(self, trainer: "NTLTrainer"):
        self.trainer = trainer

    def on_train_begin(self, args, state, control, **kwargs):
        self.trainer.install_ntl()


class NTLTrainer(Trainer):
    """``transformers.Trainer`` training CE + lambda*NTL (see the module docstring).

    ``ntl_config``: overrides the DeepSpeed config's ``"ntl"`` section (required without
    DeepSpeed). ``ntl_tokenizer`` (default: ``processing_class``) or ``ntl_vocab`` tell which
    tokens are numbers.
    """

    def __init__(self, *args, ntl_config: Optional[NTLConfig] = None, ntl_tokenizer=None,
                 ntl_vocab: Optional[NumberVocab] = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.ntl_config = ntl_config or _section_from_args(self.args)
        if self.ntl_config is None:
            raise ValueError('NTLTrainer needs an "ntl" section in the DeepSpeed config or '
                             "ntl_config=NTLConfig(...)")
        self._ntl_tokenizer = ntl_tokenizer if ntl_tokenizer is not None else \
            self.processing_class
        self._ntl_vocab = ntl_vocab
        self.ntl_loss = None
        device = self.args.device
        self._train_metrics, self._eval_metrics = NTLMetrics(device), NTLMetrics(device)
        self.add_callback(_InstallAtTrainBegin(self))

    def install_ntl(self) -> None:
        """Install on the model as laid out now (idempotent)."""
        if self.ntl_loss is not None:
            return
        model = self.model
        self.ntl_loss = install(model, self._ntl_tokenizer, self.ntl_config,
                                vocab=self._ntl_vocab, on_output=self._record)
        self._dp_group = self.ntl_loss.dp_group

    def _record(self, out) -> None:
        (self._train_metrics if self.model.training else self._eval_metrics)(out)

    def compute_loss(self, model, inputs, return_outputs: bool = False, *args, **kwargs):
        self.install_ntl()  # evaluation without training installs here; under Ulysses SP,
        # install routes Trainer's SP loss through patches/hf_sequence_parallel.py
        return super().compute_loss(model, inputs, return_outputs, *args, **kwargs)

    def log(self, logs, *args, **kwargs):
        """Trainer calls ``log`` on every rank: the metrics' DP all-reduce happens here."""
        evaluating = any(k.startswith("eval_") for k in logs)
        metrics = self._eval_metrics if evaluating else self._train_metrics
        if self.ntl_loss is not None and self.ntl_config.log_metrics:
            prefix = "eval_" if evaluating else ""
            logs.update({prefix + k: round(v, 6)
                         for k, v in metrics.reduce(self._dp_group).items()})
        super().log(logs, *args, **kwargs)
