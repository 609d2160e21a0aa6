"""``ntl-pretrain``: pretrain a causal LM with DeepSpeed ZeRO-3 and CE + lambda*NTL.

    deepspeed --num_gpus 2 --module ntl_deepspeed.train.cli --deepspeed_config configs/zero3_cpu_tiny.json \
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

from .device import configure
from .options import TrainOptions

# of every collective and of the rendezvous: long enough for a checkpoint save or an evaluation
# (every rank takes part in both), short enough that a stalled rank or a missing node is noticed
DEFAULT_DIST_TIMEOUT = 600.0


def _checked(convert, ok, what: str):
    """An argparse ``type``: ``convert(text)``, refused unless ``ok(value)`` (``what`` says why)."""
    def parse(text: str):
        value = convert(text)
        if not ok(value):
            raise argparse.ArgumentTypeError(f"must be {what}, got {text}")
        return value

    parse.__name__ = convert.__name__  # argparse names it in "invalid int value"
    return parse


_fraction = _checked(float, lambda v: 0.0 <= v < 1.0, "in [0, 1)")
_non_negative = _checked(int, lambda v: v >= 0, ">= 0")
_positive = _checked(int, lambda v: v > 0, "> 0")


def _seconds(text: str) -> float:
    value = float(text)
    if not 0.0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"must be a positive number of seconds, got {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--deepspeed_config", required=True,
                    help="DeepSpeed config JSON; its \"ntl\" section configures NTL")
    ap.add_argument("--model", required=True,
                    help='model config JSON: a transformers config with "model_type" (llama, '
                         "qwen2, mistral, gpt2, ...; default llama); vocab_size comes from the "
                         "tokenizer")
    ap.add_argument("--tokenizer", default=None,
                    help="tokenizer (.model / tokenizer.json / dir); default: a sentencepiece "
                         "model trained on the embedded corpus")
    ap.add_argument("--steps", type=_non_negative, default=200, help="optimizer steps")
    ap.add_argument("--seq-len", type=_positive, default=64,
                    help="tokens per sequence (blocks of seq-len + 1 tokens)")
    ap.add_argument("--sequence-parallel", type=_positive, default=None, metavar="N",
                    help="DeepSpeed Ulysses sequence parallelism: N ranks share each sequence; "
                         "unset: the ds_config's \"sequence_parallel_size\", else 1")

    data = ap.add_argument_group("data")
    data.add_argument("--data", nargs="+", default=None, metavar="PATH",
                      help="training text: .txt files (one document per non-blank line), "
                           ".jsonl files (a \"text\" field per line), .gz of either, or "
                           "directories of them (recursive, sorted); documents are assigned to "
                           "DP ranks round robin and streamed; none: the embedded corpus")
    data.add_argument("--corpus-sentences", type=int, default=20000,
                      help="size of the embedded corpus (without --data)")
    data.add_argument("--seed", type=int, default=1234,
                      help="seed of the embedded corpus and of the model initialisation")

    val = ap.add_argument_group("validation")
    held = val.add_mutually_exclusive_group()
    held.add_argument("--eval-fraction", type=_fraction, default=0.0,
                      help="hold out this share of the documents (of --data, or of the embedded "
                           "corpus) by a hash of the document index: never trained on")
    held.add_argument("--eval-data", nargs="+", default=None, metavar="PATH",
                      help="held-out text (same formats as --data)")
    val.add_argument("--eval-split", choices=("problems", "sentences"), default="problems",
                     help="embedded corpus: hold out arithmetic problems (operation and operand "
                          "pair, in every wording) or whole sentences")
    val.add_argument("--eval-every", type=_non_negative, default=0,
                     help="evaluate every N steps (0: only at the end; a final evaluation always "
                          "runs when there is held-out data)")
    val.add_argument("--eval-batches", type=_non_negative, default=10,
                     help="held-out micro-batches per DP rank in each evaluation")
    val.add_argument("--generate-eval", type=_non_negative, default=0, metavar="N",
                     help="after training, greedy-decode N arithmetic prompts (held-out problems "
                          "with --eval-split problems) and write generation.json")

    out = ap.add_argument_group("output")
    out.add_argument("--output-dir", default=os.path.join("runs", "pretrain"),
                     help="everything the run writes: metrics.jsonl, run_info.json, curves.png, "
                          "generation.json, checkpoints/, the DeepSpeed monitor's csv / "
                          "tensorboard output")
    out.add_argument("--save-every", type=int, default=0, help="checkpoint every N steps (0: end)")
    out.add_argument("--resume", action="store_true",
                     help="continue from output-dir/checkpoints (steps and data position)")
    out.add_argument("--no-plot", action="store_true", help="skip curves.png")
    out.add_argument("--no-save", action="store_true", help="skip the final checkpoint")

    loss = ap.add_argument_group("loss")
    loss.add_argument("--ntl-weight", type=float, default=None,
                      help="override ntl.weight of the ds_config")
    loss.add_argument("--plain-ce", action="store_true",
                      help="keep the model's own CE loss (no NTL): the baseline to compare with")

    safety = ap.add_argument_group("reliability (docs/reliability.md)")
    safety.add_argument("--keep-checkpoints", type=_non_negative, default=3, metavar="K",
                        help="keep the K newest complete checkpoints, delete older ones (0: all)")
    safety.add_argument("--allow-config-change", action="store_true",
                        help="--resume even if the checkpoint's loss options, batch, seq-len, "
                             "model, tokenizer or data differ (the differences are printed)")
    safety.add_argument("--max-nonfinite-steps", type=_non_negative, default=3, metavar="N",
                        help="stop (exit 1, naming the last good checkpoint) after N "
                             "consecutive steps with a non-finite loss (0: never)")
    safety.add_argument("--dist-timeout", type=_seconds, default=DEFAULT_DIST_TIMEOUT,
                        metavar="SECONDS",
                        help="timeout of every collective and of the start-up rendezvous "
                             f"(default {DEFAULT_DIST_TIMEOUT:g} s; torch's own is 30 min): a "
                             "stalled rank, or a node that never starts, fails the run after "
                             "this long; each rank says what it waits for after "
                             "min(60 s, timeout / 3) without progress")

    launch = ap.add_argument_group("launch")
    launch.add_argument("--mpi", action="store_true", help="discover ranks from MPI (mpirun)")
    launch.add_argument("--local_rank", type=int, default=-1, help="set by the deepspeed launcher")
    return ap


def parse_args(argv=None) -> TrainOptions:
    """The command line as :class:`~.options.TrainOptions` (parsed once)."""
    return TrainOptions.from_namespace(build_parser().parse_args(argv))


def require_train_extra(plot: bool = True) -> None:
    """The application's own dependencies (the ``[train]`` extra), named before any rank starts
    work: the library itself does not need them."""
    import importlib.util

    wanted = ("tqdm", "matplotlib") if plot else ("tqdm",)
    missing = [m for m in wanted if importlib.util.find_spec(m) is None]
    if missing:
        raise SystemExit(f"ntl-pretrain needs {' and '.join(missing)}: "
                         "pip install 'ntl-deepspeed[train]'")


def main(argv=None):
    from .watchdog import watch_launcher

    watch_launcher()  # never outlive the launcher (parent-death signal + watchdog thread)
    args = parse_args(argv)
    require_train_extra(plot=not args.no_plot)
    configure()  # cuda/nccl or cpu/gloo, before DeepSpeed is imported
    import torch

    from .processes import exit_worker
    from .trainer import Trainer

    torch.manual_seed(args.seed)
    try:
        trainer = Trainer.from_args(args)
        trainer.train()
    except BaseException as e:
        # a failed worker must exit: gloo/ZeRO threads can otherwise keep it alive forever
        from .checkpoint import CheckpointError
        from .divergence import TrainingDiverged

        if isinstance(e, (CheckpointError, TrainingDiverged)):  # expected: one clear line
            print(f"error: {e}", file=sys.stderr, flush=True)
        else:
            traceback.print_exc()
        exit_worker(1)
    exit_worker(0)


if __name__ == "__main__":
    main()
