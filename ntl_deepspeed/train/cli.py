"""``ntl-pretrain``: pretrain a causal LM with DeepSpeed ZeRO-3 and CE + lambda*NTL.

    deepspeed --num_gpus 2 -m ntl_deepspeed.train.cli --deepspeed_config configs/zero3_cpu_tiny.json \
        --model configs/model/llama_tiny.json

The ds_config's ``"ntl"`` section configures the number token loss (``NTLConfig``). Layouts:
data parallel only (full-vocab logits), or DeepSpeed AutoTP with ``"tensor_parallel":
{"autotp_size": N, "vocab_parallel_lm_head": true}`` (vocab-sharded logits).
"""
from __future__ import annotations

import argparse
import os
import sys
import traceback

from ..device import configure



def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--deepspeed_config", required=True)
    ap.add_argument("--model", required=True, help="model config JSON (transformers LlamaConfig)")
    ap.add_argument("--tokenizer", default=None,
                    help="tokenizer (.model / tokenizer.json / dir); default: train one on the corpus")
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--seq-len", type=int, default=64)
    ap.add_argument("--corpus-sentences", type=int, default=20000)
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--output-dir", default=os.path.join("runs", "pretrain"),
                    help="where metrics, checkpoints and plots go")
    ap.add_argument("--save-every", type=int, default=0, help="checkpoint every N steps (0: end)")
    ap.add_argument("--resume", action="store_true", help="continue from output-dir/checkpoints")
    ap.add_argument("--ntl-weight", type=float, default=None, help="override ntl.weight")
    ap.add_argument("--plain-ce", action="store_true",
                    help="keep the model's own CE loss (no NTL): the baseline to compare with")
    ap.add_argument("--mpi", action="store_true", help="discover ranks from MPI (mpirun)")
    ap.add_argument("--local_rank", type=int, default=-1, help="set by the deepspeed launcher")
    ap.add_argument("--no-plot", action="store_true")
    ap.add_argument("--no-save", action="store_true", help="skip the final checkpoint")
    return ap.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    configure()  # cuda/nccl or cpu/gloo, before DeepSpeed is imported
    import torch

    from .trainer import Trainer, exit_worker

    torch.manual_seed(args.seed)
    try:
        trainer = Trainer.from_args(args)
        trainer.train()
    except BaseException:
        # a failed worker must exit: gloo/ZeRO threads can otherwise keep it alive forever
        traceback.print_exc()
        exit_worker(1)
    exit_worker(0)


if __name__ == "__main__":
    main()
