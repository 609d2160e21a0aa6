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
from ..integrations.deepspeed import (autotp_size, check_deepspeed_for_autotp, install,
                                      model_layout, skip_shm_comm_build, split_config)
from ..numbers import NumberVocab
from ..numbers.token_sources import read_pieces
from ..metrics import NTLMetrics


def init_distributed(mpi: bool) -> None:
    import deepspeed

    from ..device import backend

    skip_shm_comm_build()
    deepspeed.init_distributed(dist_backend=backend(), auto_mpi_discovery=mpi)


def shared_corpus_tokenizer(seed: int) -> str:
    """The embedded corpus' sentencepiece model: rank 0 trains it (cached), the others wait."""
    from .data.tokenizer import train_tokenizer

    if dist.get_rank() == 0:
        train_tokenizer(seed=seed)
    dist.barrier()
    return train_tokenizer(seed=seed)


def build_engine(model_config_path: str, vocab_size: int, ds_config: dict):
    """A causal LM from a model config JSON under ZeRO-3's ``zero.Init`` (through
    ``HfDeepSpeedConfig``, which keeps HF's initialisation; keep it alive) and its engine."""
    import deepspeed
    from transformers import AutoModelForCausalLM, LlamaConfig
    from transformers.integrations import HfDeepSpeedConfig

    with open(model_config_path) as f:
        model_cfg = json.load(f)
    model_cfg["vocab_size"] = vocab_size
    hf_ds_config = HfDeepSpeedConfig(ds_config)
    model = AutoModelForCausalLM.from_config(LlamaConfig(**model_cfg))
    engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(),
                                      config=ds_config)
    return engine, hf_ds_config


def pad_vocab(size: int, multiple: int) -> int:
    return (size + multiple - 1) // multiple * multiple


def token_blocks(tokenizer_path: str, n_sentences: int, seed: int, seq_len: int) -> torch.Tensor:
    """The corpus as [n_blocks, seq_len + 1] token ids (sentences joined by EOS)."""
    from .data.corpus import generate
    from .data.encode import text_encoder

    encode, eos = text_encoder(tokenizer_path)
    ids: List[int] = []
    for sentence in generate(n_sentences, seed):
        ids.extend(encode(sentence))
        ids.append(eos)
    n = len(ids) // (seq_len + 1)
    if n == 0:
        raise ValueError(f"--corpus-sentences {n_sentences} gives fewer than seq_len + 1 = "
                         f"{seq_len + 1} tokens")
    return torch.tensor(ids[: n * (seq_len + 1)]).view(n, seq_len + 1)


def _debug_exit(step: int) -> None:
    """Test hook: NTL_DEBUG_EXIT="rank:step" makes that rank die abruptly at that step."""
    spec = os.environ.get("NTL_DEBUG_EXIT")
    if spec and tuple(map(int, spec.split(":"))) == (dist.get_rank(), step):
        os._exit(3)


@dataclass
class Trainer:
    args: object
    engine: object
    ds_config: dict
    ntl: NTLConfig
    vocab: NumberVocab
    blocks: torch.Tensor
    dp_group: object
    dp_rank: int
    dp_size: int
    tp_size: int
    hf_ds_config: object = None
    metrics: NTLMetrics = None
    history: List[Dict[str, float]] = field(default_factory=list)
    start_step: int = 0

    # ------------------------------------------------------------------ setup
    @classmethod
    def from_args(cls, args) -> "Trainer":
        ds_config, ntl = split_config(args.deepspeed_config)
        if args.ntl_weight is not None:
            ntl = ntl.replace(weight=args.ntl_weight)
        check_deepspeed_for_autotp(ds_config)
        init_distributed(args.mpi)
        tokenizer = args.tokenizer or shared_corpus_tokenizer(args.seed)
        pieces, tokenizer_size = read_pieces(tokenizer)  # read once: size, then numbers
        vocab_size = pad_vocab(tokenizer_size, 8 * autotp_size(ds_config))
        vocab = NumberVocab(pieces, mode=ntl.mode, vocab_size=vocab_size,
                            tokenizer_size=tokenizer_size)
        engine, hf_ds_config = build_engine(args.model, vocab_size, ds_config)
        trainer = cls(args, engine, ds_config, ntl, vocab, None, None, 0, 1,
                      autotp_size(ds_config), hf_ds_config, NTLMetrics(engine.device))
        layout = model_layout(engine.module)
        if trainer.tp_size > 1 and layout.tp_group is None:
            raise RuntimeError("AutoTP did not make lm_head vocab-parallel: set "
                               '"tensor_parallel": {"vocab_parallel_lm_head": true}')
        trainer.dp_group = layout.dp_group
        if not args.plain_ce:  # --plain-ce: the model's own loss (the baseline to compare with)
            install(engine, config=ntl, vocab=vocab, on_output=trainer.metrics)
        trainer.dp_rank = dist.get_rank(trainer.dp_group)
        trainer.dp_size = dist.get_world_size(trainer.dp_group)
        trainer.blocks = token_blocks(tokenizer, args.corpus_sentences, args.seed, args.seq_len)
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
        mb = self.engine.train_micro_batch_size_per_gpu()
        first = (micro_step * self.dp_size + self.dp_rank) * mb
        idx = torch.arange(first, first + mb) % self.blocks.shape[0]
        return self.blocks[idx]

    # ------------------------------------------------------------------ loop
    def train(self) -> None:
        from tqdm import tqdm

        rank0 = dist.get_rank() == 0
        steps = self.args.steps
        bar = tqdm(total=steps, initial=self.start_step, disable=not rank0, desc="pretrain",
                   dynamic_ncols=True, file=sys.stdout)
        gas = self.engine.gradient_accumulation_steps()
        for step in range(self.start_step, steps):  # one optimizer step = gas micro-batches
            t0 = time.perf_counter()
            losses, tokens = [], 0
            for micro in range(gas):
                ids = self.batch(step * gas + micro).to(self.engine.device)
                loss = self.engine(input_ids=ids, labels=ids).loss
                self.engine.backward(loss)
                self.engine.step()
                losses.append(loss.detach())
                tokens += ids.numel()
            _debug_exit(step)
            # the one host read of the step: losses and metrics, summed over DP ranks
            row = self.metrics.reduce(self.dp_group, loss=torch.stack(losses).mean(),
                                      tokens=tokens)
            seconds = time.perf_counter() - t0
            row = {"step": step, "step_s": seconds, "loss": row.pop("loss") / self.dp_size,
                   "tokens_per_s": row.pop("tokens") / max(seconds, 1e-9), **row}
            if self.args.plain_ce:
                row["ce"] = row["loss"]  # the model's own loss is the CE
            self.history.append(row)
            self.log(row)
            bar.set_postfix({k: f"{row[k]:.3g}" for k in ("ce", "ntl", "number_mae",
                                                          "tokens_per_s") if k in row})
            bar.update(1)
            if self.args.save_every and (step + 1) % self.args.save_every == 0:
                self.save(step + 1)
        bar.close()
        if not self.args.no_save:
            self.save(steps)
        self.write_run_info()
        if rank0:
            self.summary()

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
                    "tp_size": self.tp_size, "peak_rss_mb_max_rank": rss[0].item(),
                    "peak_rss_mb_sum": rss[1].item()}
            with open(os.path.join(self.args.output_dir, "run_info.json"), "w") as f:
                json.dump(info, f, indent=2)

    def log(self, row: Dict[str, float]) -> None:
        step = row["step"] + 1
        if self.engine.monitor.enabled:
            self.engine.monitor.write_events([(f"Train/ntl/{k}", v, step) for k, v in row.items()
                                              if k != "step"])
        if dist.get_rank() == 0:
            os.makedirs(self.args.output_dir, exist_ok=True)
            with open(self.metrics_path(), "a") as f:
                f.write(json.dumps(row) + "\n")

    # ------------------------------------------------------------------ checkpoints
    def checkpoint_dir(self) -> str:
        return os.path.join(self.args.output_dir, "checkpoints")

    def save(self, step: int) -> None:
        self.engine.save_checkpoint(self.checkpoint_dir(), tag=f"step{step}",
                                    client_state={"step": step})

    def load(self) -> None:
        path, state = self.engine.load_checkpoint(self.checkpoint_dir())
        if path is None:
            raise FileNotFoundError(f"--resume: no checkpoint in {self.checkpoint_dir()}")
        self.start_step = int(state["step"])

    # ------------------------------------------------------------------ end
    def summary(self) -> None:
        from .report import plot_curves, summary_table

        print(summary_table(self.history), flush=True)
        if not self.args.no_plot and self.history:
            path = plot_curves(self.history, os.path.join(self.args.output_dir, "curves.png"))
            print(f"curves: {path}", flush=True)



def exit_worker(code: int) -> None:
    """End a worker for good. On success: barrier, destroy the process group, finalize MPI
    (gloo can abort at interpreter exit otherwise); always flush and ``os._exit``."""
    sys.stdout.flush()
    sys.stderr.flush()
    if code == 0:
        if dist.is_initialized():
            dist.barrier()
            dist.destroy_process_group()
        if "mpi4py" in sys.modules:
            from mpi4py import MPI

            if MPI.Is_initialized() and not MPI.Is_finalized():
                MPI.Finalize()
    sys.stdout.flush()
    os._exit(code)
