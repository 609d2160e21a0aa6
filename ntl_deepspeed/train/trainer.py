"""DeepSpeed ZeRO-3 training of a Hugging Face causal LM with the fused CE+NTL loss."""
from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import dataclass, field
from typing import Dict, List

import torch
import torch.distributed as dist

from ..config import NTLConfig
from ..integrations.deepspeed import (autotp_size, check_autotp_world,
                                      check_deepspeed_for_autotp, install, model_layout,
                                      split_config)
from ..numbers import NumberVocab
from ..numbers.token_sources import read_pieces
from ..metrics import NTLMetrics
from . import checkpoint, sequence_parallel
from .data.sources import build_data
from .activity import Activity
from .divergence import DivergenceGuard
from .evaluation import Evaluator
from .options import TrainOptions
from .outputs import redirect_monitors
from .processes import build_engine, join_process_group, pad_vocab, shared_corpus_tokenizer


def _debug_exit(step: int) -> None:
    """Test hook: NTL_DEBUG_EXIT="rank:step" makes that rank die abruptly at that step."""
    spec = os.environ.get("NTL_DEBUG_EXIT")
    if spec and tuple(map(int, spec.split(":"))) == (dist.get_rank(), step):
        os._exit(3)


def _debug_nan(loss: torch.Tensor, step: int) -> torch.Tensor:
    """Test hook: NTL_DEBUG_NAN_FROM=k makes the loss NaN from step k (0-based) on."""
    spec = os.environ.get("NTL_DEBUG_NAN_FROM")
    return loss * float("nan") if spec and step >= int(spec) else loss


@dataclass
class Trainer:
    """One training run: built once, fully, by :meth:`from_args`; then :meth:`train`."""

    args: TrainOptions
    engine: object
    ds_config: dict
    ntl: NTLConfig
    vocab: NumberVocab
    dp_group: object
    dp_rank: int              # which data replica this rank reads (the SP group's under SP)
    dp_size: int
    tp_size: int
    hf_ds_config: object      # keeps HF's zero.Init config alive
    metrics: NTLMetrics
    data: object              # training batches (data/sources.py)
    tokenizer: str
    activity: Activity        # what this rank is doing, said when it makes no progress
    slicer: object = None     # sequence parallelism: this rank's slice of each micro-batch
    evaluator: object = None  # held-out evaluation (evaluation.py); needs the trainer
    history: List[Dict[str, float]] = field(default_factory=list)
    start_step: int = 0
    generation: dict = None   # --generate-eval result (rank 0)
    started_at: float = field(default_factory=time.time)
    last_checkpoint: str = None  # the newest complete checkpoint (saved or resumed from)

    # ------------------------------------------------------------------ setup
    @classmethod
    def from_args(cls, args: TrainOptions) -> "Trainer":
        ds_config, ntl = split_config(args.deepspeed_config)
        if args.ntl_weight is not None:
            ntl = ntl.replace(weight=args.ntl_weight)
        check_deepspeed_for_autotp(ds_config)
        ds_config = redirect_monitors(ds_config, args.output_dir)  # all output in --output-dir
        sp_size = sequence_parallel.sequence_parallel_size(args, ds_config)
        if sp_size > 1:
            ds_config = {**ds_config, "sequence_parallel_size": sp_size}
        timeout = args.dist_timeout
        activity = Activity(timeout)
        join_process_group(args.mpi, timeout, activity)
        check_autotp_world(ds_config)
        sequence_parallel.check_arguments(args, sp_size, args.seq_len, dist.get_world_size(),
                                          autotp_size(ds_config))
        tokenizer = args.tokenizer or shared_corpus_tokenizer(args.seed)
        pieces, tokenizer_size = read_pieces(tokenizer)  # read once: size, then numbers
        vocab_size = pad_vocab(tokenizer_size, 8 * autotp_size(ds_config))
        vocab = NumberVocab(pieces, mode=ntl.mode, vocab_size=vocab_size,
                            tokenizer_size=tokenizer_size)
        engine, hf_ds_config, mpu = build_engine(args.model, vocab_size, ds_config, sp_size,
                                                 args.seq_len)
        layout = model_layout(engine.module)
        tp_size = autotp_size(ds_config)
        if tp_size > 1 and layout.tp_group is None:
            raise RuntimeError("AutoTP did not make lm_head vocab-parallel: set "
                               '"tensor_parallel": {"vocab_parallel_lm_head": true}')
        metrics = NTLMetrics(engine.device)
        if not args.plain_ce:  # --plain-ce: the model's own loss (the baseline to compare with)
            install(engine, config=ntl, vocab=vocab, on_output=metrics)
        slicer = sequence_parallel.SequenceSlicer.from_mpu(mpu)
        if slicer is None:
            dp_rank, dp_size = dist.get_rank(layout.dp_group), dist.get_world_size(layout.dp_group)
        else:  # the ranks of an SP group read the same blocks
            dp_rank, dp_size = sequence_parallel.data_replica(sp_size)
        data, eval_batches = build_data(args, tokenizer, dp_rank, dp_size,
                                        engine.train_micro_batch_size_per_gpu(), ntl.ignore_index)
        trainer = cls(args=args, engine=engine, ds_config=ds_config, ntl=ntl, vocab=vocab,
                      dp_group=layout.dp_group, dp_rank=dp_rank, dp_size=dp_size, tp_size=tp_size,
                      hf_ds_config=hf_ds_config, metrics=metrics, data=data, tokenizer=tokenizer,
                      activity=activity, slicer=slicer)
        trainer.evaluator = Evaluator(trainer, eval_batches, args.eval_every)
        if args.resume:
            trainer.load()
        elif dist.get_rank() == 0 and os.path.exists(trainer.metrics_path()):
            os.remove(trainer.metrics_path())  # a fresh run starts a fresh log
        return trainer

    def metrics_path(self) -> str:
        return os.path.join(self.args.output_dir, "metrics.jsonl")

    # ------------------------------------------------------------------ data
    def batch(self, micro_step: int) -> torch.Tensor:
        """This DP rank's micro-batch number ``micro_step``: deterministic, identical on its TP
        ranks."""
        return self.data.batch(micro_step)

    # ------------------------------------------------------------------ loop
    def train(self) -> None:
        from tqdm import tqdm

        rank0 = dist.get_rank() == 0
        steps = self.args.steps
        bar = tqdm(total=steps, initial=self.start_step, disable=not rank0, desc="pretrain",
                   dynamic_ncols=True, file=sys.stdout)
        gas = self.engine.gradient_accumulation_steps()
        guard = DivergenceGuard(self.args.max_nonfinite_steps)
        for step in range(self.start_step, steps):  # one optimizer step = gas micro-batches
            self.activity.now(f"in training step {step + 1} (forward, backward, optimizer)")
            t0 = time.perf_counter()
            losses, tokens = [], 0
            for micro in range(gas):
                ids = self.batch(step * gas + micro).to(self.engine.device)
                inputs = dict(input_ids=ids, labels=ids) if self.slicer is None else \
                    self.slicer(ids)
                loss = _debug_nan(self.engine(**inputs).loss, step)
                self.engine.backward(loss)
                self.engine.step()
                losses.append(loss.detach())
                tokens += inputs["input_ids"].numel()
            _debug_exit(step)
            # the one host read of the step: losses and metrics, summed over DP ranks
            row = self.metrics.reduce(self.dp_group, loss=torch.stack(losses).mean(),
                                      tokens=tokens)
            seconds = time.perf_counter() - t0
            row = {"step": step, "step_s": seconds,
                   "loss": row.pop("loss") / dist.get_world_size(self.dp_group),
                   "tokens_per_s": row.pop("tokens") / max(seconds, 1e-9), **row}
            if self.args.plain_ce:
                row["ce"] = row["loss"]  # the model's own loss is the CE
            self.history.append(row)
            self.log(row)
            # the same reduced loss on every rank: all stop together, naming the last good one
            finite = guard.update(step, row["loss"], self.last_checkpoint)
            bar.set_postfix({k: f"{row[k]:.3g}" for k in ("ce", "ntl", "number_mae",
                                                          "tokens_per_s") if k in row})
            bar.update(1)
            if self.evaluator.due(step + 1):
                self.evaluate(step + 1, bar)
            if finite and self.args.save_every and (step + 1) % self.args.save_every == 0:
                self.save(step + 1)  # never a checkpoint of a non-finite step
        self.activity.now("in the final evaluation and checkpoint")
        self.finish_evaluation(steps, bar)
        bar.close()
        final = os.path.join(self.checkpoint_dir(), f"step{steps}")
        if not self.args.no_save and not guard.streak and self.last_checkpoint != final:
            self.save(steps)
        elif guard.streak and rank0:
            print(f"warning: the last step's loss is not finite: no final checkpoint (last good: "
                  f"{self.last_checkpoint})", flush=True)
        self.write_run_info()
        if rank0:
            self.summary()
        self.activity.now(None)

    def write_run_info(self) -> None:
        """Parameters and peak resident memory per rank (max and sum over ranks)."""
        import resource

        rss = torch.tensor([resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0] * 2,
                           device=self.engine.device)  # nccl reduces device tensors only
        dist.all_reduce(rss[:1], op=dist.ReduceOp.MAX)
        dist.all_reduce(rss[1:], op=dist.ReduceOp.SUM)
        params = sum(getattr(p, "ds_numel", p.numel()) for p in self.engine.module.parameters())
        if dist.get_rank() == 0:
            info = {"parameters": params, "world_size": dist.get_world_size(),
                    "tp_size": self.tp_size,
                    "sp_size": self.slicer.size if self.slicer is not None else 1,
                    "peak_rss_mb_max_rank": rss[0].item(),
                    "peak_rss_mb_sum": rss[1].item()}
            with open(os.path.join(self.args.output_dir, "run_info.json"), "w") as f:
                json.dump(info, f, indent=2)

    def log(self, row: Dict[str, float], tag: str = "Train") -> None:
        """A metrics row to DeepSpeed's monitor (``{tag}/ntl/...``) and metrics.jsonl."""
        step = row["step"] + 1
        if self.engine.monitor.enabled:
            self.engine.monitor.write_events([(f"{tag}/ntl/{k}", v, step) for k, v in row.items()
                                              if k not in ("step", "split")])
        if dist.get_rank() == 0:
            os.makedirs(self.args.output_dir, exist_ok=True)
            with open(self.metrics_path(), "a") as f:
                f.write(json.dumps(row) + "\n")

    # ------------------------------------------------------------------ checkpoints
    def checkpoint_dir(self) -> str:
        return os.path.join(self.args.output_dir, "checkpoints")

    def run_config(self) -> dict:
        """The setup a checkpoint must be resumed with (checkpoint.run_config)."""
        return checkpoint.run_config(self.engine, self.args, self.ntl, self.tokenizer)

    def save(self, step: int) -> None:
        """Atomic: committed (manifest, rename, ``latest``) only once every rank has written
        and flushed its files; keeps the newest ``--keep-checkpoints`` (train/checkpoint/)."""
        self.activity.now(f"saving the step-{step} checkpoint")
        self.last_checkpoint = checkpoint.save(
            self.engine, self.checkpoint_dir(), step, {"step": step, **self.data_state()},
            self.run_config(), keep=self.args.keep_checkpoints,
            log=self._log_rank0)

    def load(self) -> None:
        """The checkpoint ``latest`` names if complete, else the newest complete one; verified
        files only, ``weights_only`` loads, the same setup unless --allow-config-change."""
        self.last_checkpoint, state = checkpoint.resume(
            self.engine, self.checkpoint_dir(), self.run_config(),
            allow_change=self.args.allow_config_change, log=self._log_rank0)
        self.start_step = int(state["step"])
        self.restore_data(state)

    @staticmethod
    def _log_rank0(message: str) -> None:
        if dist.get_rank() == 0:
            print(message, flush=True)

    # ------------------------------------------------------------------ end
    def summary(self) -> None:
        from .outputs import files_written
        from .report import eval_summary, plot_curves, summary_table

        print(summary_table(self.history), flush=True)
        evals = self.evaluator.history if self.evaluator else []
        if evals or self.generation:
            print(eval_summary(evals, self.generation), flush=True)
        if not self.args.no_plot and self.history:
            path = plot_curves(self.history, os.path.join(self.args.output_dir, "curves.png"),
                               evals)
            print(f"curves: {path}", flush=True)
        files = files_written(self.args.output_dir, self.started_at)
        print(f"files written under {self.args.output_dir}:\n" +
              "\n".join(f"  {f}" for f in files), flush=True)

    # ------------------------------------------------------------------ validation
    def evaluate(self, steps_done: int, bar=None) -> None:
        from .evaluation import eval_line

        self.activity.now(f"evaluating after step {steps_done}")
        row = self.evaluator.run(steps_done)
        if row is not None and bar is not None and dist.get_rank() == 0:
            bar.write(eval_line(row))

    def finish_evaluation(self, steps: int, bar=None) -> None:
        """The final evaluation (unless the last step was just evaluated) and --generate-eval."""
        done = self.evaluator.history
        if self.evaluator.enabled and not (done and done[-1]["step"] == steps - 1):
            self.evaluate(steps, bar)
        if self.args.generate_eval:
            from .generation import generate_eval

            self.generation = generate_eval(self, self.args.generate_eval, os.path.join(
                self.args.output_dir, "generation.json"))

    # ------------------------------------------------------------------ data position
    def data_state(self) -> dict:
        """Every DP rank's data position (streamed --data), for the checkpoint's client_state
        (written by one rank): gathered from all ranks."""
        state = self.data.state()
        if state is None:  # the embedded corpus: a function of the step
            return {}
        everything = [None] * dist.get_world_size()
        dist.all_gather_object(everything, (self.dp_rank, self.dp_size, state))
        return {"data_position": {r: s for r, _, s in everything},
                "data_dp_size": self.dp_size}

    def restore_data(self, client_state: dict) -> None:
        positions = client_state.get("data_position")
        if positions is not None and client_state.get("data_dp_size") != self.dp_size:
            raise ValueError(f"--resume: the checkpoint was written with "
                             f"{client_state.get('data_dp_size')} data-parallel ranks, this run "
                             f"has {self.dp_size}: the data positions do not carry over")
        gas = self.engine.gradient_accumulation_steps()
        self.data.restore(None if positions is None else positions.get(self.dp_rank),
                          self.start_step * gas)
