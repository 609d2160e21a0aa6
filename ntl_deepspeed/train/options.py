"""Every ``ntl-pretrain`` option as one typed, immutable object, parsed once.

The parser (:func:`.cli.build_parser`) owns the flags, their defaults, checks and help;
:class:`TrainOptions` is what the rest of the application receives -- no raw ``argparse``
namespace, no ``getattr`` with a restated default. A flag added to the parser without a field
here (or the reverse) fails at the first parse (and in the tests).
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass, fields
from typing import List, Optional


@dataclass(frozen=True)
class TrainOptions:
    # what to train
    deepspeed_config: str
    model: str
    tokenizer: Optional[str]
    steps: int
    seq_len: int
    sequence_parallel: Optional[int]
    # data
    data: Optional[List[str]]
    corpus_sentences: int
    seed: int
    # validation
    eval_fraction: float
    eval_data: Optional[List[str]]
    eval_split: str
    eval_every: int
    eval_batches: int
    generate_eval: int
    # outputs
    output_dir: str
    save_every: int
    resume: bool
    no_plot: bool
    no_save: bool
    # loss
    ntl_weight: Optional[float]
    plain_ce: bool
    # reliability
    keep_checkpoints: int
    allow_config_change: bool
    max_nonfinite_steps: int
    dist_timeout: float
    # launch
    mpi: bool
    local_rank: int

    @classmethod
    def from_namespace(cls, namespace: argparse.Namespace) -> "TrainOptions":
        given, names = vars(namespace), {f.name for f in fields(cls)}
        if set(given) != names:
            raise TypeError(f"TrainOptions and the parser disagree: options without a field "
                            f"{sorted(set(given) - names)}, fields without an option "
                            f"{sorted(names - set(given))}")
        return cls(**given)

    @property
    def held_out_problems(self) -> bool:
        """Whether the embedded corpus' arithmetic problems are split into train / held out."""
        return not self.data and self.eval_split == "problems" and self.eval_fraction > 0
