"""ZeRO-3 with NTL on the fused head of Llama-3.2-3B-shaped models, parameters and optimizer
states offloaded to NVMe (DeepSpeed's async I/O op), 2 ranks on a 24 GB, 2-core machine.

Shapes: configs/model/llama_3b.json (hidden 3072, 28 layers, 24 heads, 8 KV heads,
intermediate 8192, tied embeddings; 3.21 B parameters) with a 128256-row vocabulary; the ids
come from Mistral's 32000-piece sentencepiece model (digits split one by one), the other rows
are padding (Llama-3's shapes, not its text). bf16 (this CPU's bf16 GEMMs are faster than fp32
at these shapes), torch SGD (ZeRO's fp32 master weights and gradients on NVMe; Adam's two
moments would need two more optimizer swap buffers and 2x the disk), micro-batch 1, sequence
32. Config: configs/zero3_cpu_nvme_3b_blocks.json (its NVMe folder is replaced by --nvme-dir).
Needs libaio-dev (launch/setup_env.sh installs it); the aio op is JIT-built with ninja on first
use (2-12 min).

What makes 3.21 B fit in 2 x ~8 GB (each measured; docs/deepspeed.md has the file:line):
- the tied 128256x3072 embedding is held as --vocab-blocks (16) row-block parameters, the same
  matrix (benchmarks/_vocab_blocks.py, checked against one matrix): DeepSpeed sizes its
  parameter and optimizer swap buffers by the largest parameter / sub-group, and a sub-group
  cannot split a parameter; so buffer_size and sub_group_size drop from 200 M / 100 M elements
  (394 M embedding) to 12.6 M / 25 M (an MLP matrix): 2.7 GB less per rank (with one matrix,
  --vocab-blocks 1 --ds-config configs/zero3_cpu_nvme_3b.json, 3.21 B peaks at 10.5 GB per rank);
- "memory_efficient_linear": true: with torch's F.linear autograd keeps the transposed view of
  each gathered weight until the backward, i.e. every layer's gathered bf16 parameters
  (0.19 GB per layer and rank); DeepSpeed's linear saves the parameter itself (the other
  configs set it false only for the flops profiler, which double-counts it);
- MALLOC_MMAP_THRESHOLD_=65536 for the workers (glibc heap fragmentation: ~0.1 GB per layer);
- the fused head stores its weight gradient in bf16 (one token chunk; 1.6 GB less).
What stays: DeepSpeed's gradient buffer for the whole partition (stage3.py, bf16, 0.1 GB per
layer and rank), the gathered embedding, and around the fused head its gathered blocks, their
concatenation and its bf16 gradient (0.8 GB each).

Each run: two forwards of the *materialised* head (real logits: the model's bf16 ones, and
fp32 ones from the same bf16 hidden states and weight, as the fused head's GEMMs are fp32 on
CPU), then the training steps with the *fused* head; step 0 uses the same batch and weights,
so its loss must equal the materialised one. Records per-phase peak RSS per rank (VmHWM), the
peak disk use of the NVMe folder, step times. The full model first; if the machine's available
RAM falls below --min-available-gb, that run is stopped (before the kernel's OOM killer picks
some process of this shared machine), recorded with how far it got, and --fallback-layers
layers are run instead. Writes benchmarks/results/scale.json.

    bash -c 'source launch/setup_env.sh && python benchmarks/scale.py'            # ~9 min
    python benchmarks/scale.py --layers 2 --steps 2 --out /tmp/scale_small.json   # ~3 min
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _harness import ROOT, free_port, mistral_tokenizer, write_json  # noqa: E402

VOCAB = 128256  # Llama-3's
DS_CONFIG = os.path.join(ROOT, "configs", "zero3_cpu_nvme_3b_blocks.json")
MODEL = os.path.join(ROOT, "configs", "model", "llama_3b.json")


def llama_params(cfg: dict, vocab: int = VOCAB):
    """(total parameters, largest layer's parameters) of a Llama config."""
    h, i, layers = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"]
    kv = h * cfg["num_key_value_heads"] // cfg["num_attention_heads"]
    per_layer = 2 * h * h + 2 * h * kv + 3 * h * i + 2 * h
    embed = vocab * h * (1 if cfg.get("tie_word_embeddings") else 2)
    return layers * per_layer + embed + h, max(vocab * h, 3 * h * i)


def estimates():
    """DeepSpeed's own ZeRO-3 model-state estimates (its printed table), 1 node x 8 GPUs."""
    import contextlib
    import io

    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs_all_cold

    out = {}
    for name in ("3b", "8b"):
        with open(os.path.join(ROOT, "configs", "model", f"llama_{name}.json")) as f:
            cfg = json.load(f)
        total, largest = llama_params(cfg, VOCAB)
        text = io.StringIO()
        with contextlib.redirect_stdout(text):
            estimate_zero3_model_states_mem_needs_all_cold(total, largest, num_gpus_per_node=8,
                                                           num_nodes=1)
        out[f"llama_{name}"] = {"parameters": total, "largest_layer_parameters": largest,
                                "deepspeed_estimate": text.getvalue().strip().splitlines()}
    return out


# ---------------------------------------------------------------------------- worker (per rank)
class PhaseMemory:
    """Peak resident memory of this process per phase: the kernel's high-water mark (VmHWM)
    is reset at each phase start (``/proc/self/clear_refs``, Linux >= 4.0)."""

    def __init__(self):
        self.peaks = {}  # phase -> peak MB (max over repeats)

    @staticmethod
    def _status(key: str) -> float:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) / 1024.0
        raise KeyError(key)

    def start(self) -> None:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")

    def end(self, phase: str) -> None:
        peak = self._status("VmHWM")
        self.peaks[phase] = max(self.peaks.get(phase, 0.0), peak)
        print(f"[scale] pid {os.getpid()} {phase}: peak RSS {peak:.0f} MB (at its end "
              f"{self._status('VmRSS'):.0f} MB)", flush=True)
        self.start()


def nvme_config(path: str, nvme_dir: str):
    """(DeepSpeed config without "ntl", NTLConfig); NVMe offload folders set to ``nvme_dir``."""
    from ntl_deepspeed.integrations.deepspeed import split_config

    ds_config, ntl = split_config(path)
    zero = ds_config["zero_optimization"]
    for key in ("offload_param", "offload_optimizer"):
        if (zero.get(key) or {}).get("device") == "nvme":
            zero[key] = dict(zero[key], nvme_path=nvme_dir)
    return ds_config, ntl


def model_file(model: str, layers: int, tmp: str) -> str:
    """The model config ``model``, with ``layers`` layers if given (fallback/development runs)."""
    if not layers:
        return model
    with open(model) as f:
        cfg = dict(json.load(f), num_hidden_layers=layers)
    path = os.path.join(tmp, f"llama_3b_{layers}layers.json")
    with open(path, "w") as f:
        json.dump(cfg, f)
    return path


def worker(args) -> None:
    import torch
    import torch.distributed as dist

    from ntl_deepspeed.integrations.deepspeed import install
    from ntl_deepspeed.numbers import NumberVocab
    from ntl_deepspeed.numbers.token_sources import read_pieces
    from ntl_deepspeed.train.data.corpus import generate
    from ntl_deepspeed.train.data.encode import text_encoder
    from ntl_deepspeed.train.data.sources import pack
    from ntl_deepspeed.train.processes import build_engine, exit_worker, init_distributed

    init_distributed(mpi=False)
    rank, world = dist.get_rank(), dist.get_world_size()
    ds_config, ntl = nvme_config(args.ds_config, args.nvme_dir)
    tokenizer = mistral_tokenizer()
    pieces, tokenizer_size = read_pieces(tokenizer)
    vocab = NumberVocab(pieces, mode=ntl.mode, vocab_size=VOCAB, tokenizer_size=tokenizer_size)
    encode, eos = text_encoder(tokenizer)  # the trainer's packing of the embedded corpus
    blocks = torch.tensor([b for b in pack((encode(s) for s in generate(400, 0)), eos,
                                           args.seq_len + 1) if len(b) == args.seq_len + 1])
    torch.manual_seed(args.seed)  # the same initial weights run after run
    memory = PhaseMemory()
    t0 = time.perf_counter()
    if args.vocab_blocks > 1:  # the tied embedding as row blocks (benchmarks/_vocab_blocks.py)
        from _vocab_blocks import build_engine as build_blocked

        engine, _hf_config = build_blocked(args.model, VOCAB, ds_config, args.vocab_blocks)
    else:
        engine, _hf_config, _ = build_engine(args.model, VOCAB, ds_config)  # keep it alive
    init_s = time.perf_counter() - t0
    memory.end("init")  # (the whole process so far)
    params = sum(getattr(p, "ds_numel", p.numel()) for p in engine.module.parameters())
    compute_dtype = str(next(engine.module.parameters()).dtype)

    def batch(step: int) -> torch.Tensor:  # rank-disjoint, deterministic
        return blocks[(step * world + rank) % len(blocks), :-1].unsqueeze(0)

    parts = {}

    def keep(out) -> None:
        parts.update(ce=out.ce.detach().float(), ntl=out.ntl.detach().float())

    def mean_over_ranks(*values) -> list:
        t = torch.tensor([float(v) for v in values], dtype=torch.float64)
        dist.all_reduce(t)
        return (t / world).tolist()

    # the materialised head: real [1, S, V] logits, CE + lambda*NTL on them; no update. Twice:
    # the model's own bf16 logits, and fp32 logits of the same bf16 hidden states and weight
    # (the fused head's GEMMs run in fp32 on CPU: that one must agree to rounding)
    reference = install(engine, config=ntl.replace(fused_head=False), vocab=vocab, on_output=keep)
    head = engine.module.get_output_embeddings()
    materialised = {}
    for logits_dtype in ("bf16", "fp32"):
        if logits_dtype == "fp32":  # an instance attribute: ZeRO's hooks on the module stay
            head.forward = lambda x: torch.nn.functional.linear(x.float(), head.weight.float())
        t0 = time.perf_counter()
        with torch.no_grad():
            loss = engine(input_ids=batch(0), labels=batch(0)).loss.float()
        memory.end("materialised_forward")
        values = mean_over_ranks(loss, parts["ce"], parts["ntl"])
        materialised[logits_dtype] = dict(zip(("loss", "ce", "ntl"), values),
                                          seconds=time.perf_counter() - t0)
        if rank == 0:
            print(f"[scale] materialised head, {logits_dtype} logits: {materialised[logits_dtype]}",
                  flush=True)
    del head.forward
    reference.remove()

    install(engine, config=ntl.replace(fused_head=True), vocab=vocab, on_output=keep)
    rows = []
    for step in range(args.steps):
        t0 = time.perf_counter()
        ids = batch(step)
        memory.start()
        out = engine(input_ids=ids, labels=ids)
        memory.end("forward")
        if out.logits is not None:
            raise RuntimeError("the fused head did not run: the model returned logits")
        loss = out.loss
        engine.backward(loss)
        memory.end("backward")
        engine.step()
        memory.end("optimizer_step")
        seconds = time.perf_counter() - t0
        loss_, ce, ntl_ = mean_over_ranks(loss.detach().float(), parts["ce"], parts["ntl"])
        rows.append({"step": step, "step_s": seconds, "loss": loss_, "ce": ce, "ntl": ntl_})
        if rank == 0:
            print(f"[scale] step {step}: loss {loss_:.6f} (ce {ce:.6f}, ntl {ntl_:.6f}) "
                  f"{seconds:.1f} s", flush=True)
    phases = sorted(memory.peaks)
    # (ru_maxrss is the same high-water mark, reset per phase: the peak is the phases' max)
    mine = torch.tensor([max(memory.peaks.values())] + [memory.peaks[p] for p in phases],
                        dtype=torch.float64)
    gathered = [torch.zeros_like(mine) for _ in range(world)]
    dist.all_gather(gathered, mine)
    if rank == 0:
        with open(args.result, "w") as f:
            json.dump({"parameters": params, "compute_dtype": compute_dtype, "init_s": init_s,
                       "peak_rss_mb_per_rank": [g[0].item() for g in gathered],
                       "phase_peak_rss_mb_per_rank": {
                           p: [g[1 + i].item() for g in gathered] for i, p in enumerate(phases)},
                       "materialised": materialised,
                       "rows": rows}, f)
    exit_worker(0)


# ---------------------------------------------------------------------------- launcher
def disk_bytes(path: str) -> int:
    """Allocated bytes of the files under ``path`` (sparse files count what they hold)."""
    total = 0
    for folder, _, files in os.walk(path):
        for name in files:
            try:
                total += os.lstat(os.path.join(folder, name)).st_blocks * 512
            except FileNotFoundError:
                pass
    return total


class Sampler(threading.Thread):
    """Every ``period`` s: disk use of the NVMe folder and used RAM of the machine. Below
    ``min_available`` bytes of available RAM it calls ``on_low_memory`` once (the machine is
    shared: stop this run before the kernel's OOM killer picks a process)."""

    def __init__(self, path: str, min_available: float, on_low_memory, period: float = 2.0):
        super().__init__(daemon=True)
        self.path, self.period = path, period
        self.min_available, self.on_low_memory = min_available, on_low_memory
        self.peak_disk = self.peak_used_ram = 0
        self.low_memory = None  # available bytes when the run was stopped
        self.done = threading.Event()

    def run(self):
        while not self.done.is_set():
            self.peak_disk = max(self.peak_disk, disk_bytes(self.path))
            with open("/proc/meminfo") as f:
                info = {line.split(":")[0]: int(line.split()[1]) * 1024 for line in f}
            self.peak_used_ram = max(self.peak_used_ram, info["MemTotal"] - info["MemAvailable"])
            if info["MemAvailable"] < self.min_available and self.low_memory is None:
                self.low_memory = info["MemAvailable"]
                self.on_low_memory()
            self.done.wait(self.period)


def phase_lines(log: str) -> list:
    """The workers' "[scale] ..." progress lines (phase peaks, losses) of a run's log."""
    return [line[line.index("[scale]"):] for line in log.splitlines() if "[scale]" in line]


def run(args, layers: int) -> dict:
    """One 2-rank run with ``layers`` layers (0: all 28); its figures, or, when the machine ran
    short of RAM, how far it got (``"status": "stopped"``)."""
    tmp = tempfile.mkdtemp(prefix="ntl_scale_")
    nvme_dir = os.path.abspath(args.nvme_dir or os.path.join(ROOT, ".nvme_offload"))
    shutil.rmtree(nvme_dir, ignore_errors=True)
    os.makedirs(nvme_dir)
    result = os.path.join(tmp, "worker.json")
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", GLOO_SOCKET_IFNAME="lo",
               PYTHONPATH=os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")])))
    env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")
    # glibc: blocks >= 64 KB straight from mmap, back to the system when freed (by default the
    # threshold climbs to 32 MB and DeepSpeed's 3-25 MB partitions fragment the heap: +0.1 GB
    # per layer and rank that is never given back)
    env.setdefault("MALLOC_MMAP_THRESHOLD_", "65536")
    cmd = ["deepspeed", "--num_gpus", "2", "--master_addr", "127.0.0.1", "--master_port",
           str(free_port()), os.path.abspath(__file__), "--worker", "--result", result,
           "--ds-config", args.ds_config, "--model", model_file(args.model, layers, tmp),
           "--nvme-dir", nvme_dir, "--steps", str(args.steps), "--seq-len", str(args.seq_len),
           "--seed", str(args.seed), "--vocab-blocks", str(args.vocab_blocks)]
    with open(model_file(args.model, layers, tmp)) as f:
        n_layers = json.load(f)["num_hidden_layers"]
    header = {"model": f"{os.path.relpath(args.model, ROOT)}, {n_layers} layers, vocab {VOCAB} "
                       f"(Mistral 32000-piece ids, rest padding)",
              "layers": n_layers, "vocab_blocks": args.vocab_blocks,
              "machine_ram_before": os.popen("free -m").read().splitlines()}
    t0 = time.perf_counter()
    log_path = os.path.join(tmp, "launcher.log")
    print(f"[scale] {n_layers} layers: launching 2 ranks; log: {log_path}", flush=True)
    try:
        with open(log_path, "w") as log_file:  # streamed: follow the run with tail -f
            proc = subprocess.Popen(cmd, cwd=ROOT, env=env, text=True, stdout=log_file,
                                    stderr=subprocess.STDOUT, start_new_session=True)
            sampler = Sampler(nvme_dir, args.min_available_gb * 2**30,
                              lambda: os.killpg(proc.pid, signal.SIGKILL))
            sampler.start()
            proc.wait()
        wall = time.perf_counter() - t0
        sampler.done.set()
        sampler.join()
    finally:
        shutil.rmtree(nvme_dir, ignore_errors=True)
    with open(log_path) as f:
        log = f.read()
    print("\n".join(phase_lines(log)), flush=True)
    measured = {"peak_machine_used_ram_mb": sampler.peak_used_ram / 2**20,
                "peak_nvme_disk_gb": sampler.peak_disk / 1e9, "wall_s": wall}
    if sampler.low_memory is not None:
        return {**header, "status": "stopped",
                "reason": f"the machine's available RAM fell to {sampler.low_memory / 2**30:.2f} GB "
                          f"(< --min-available-gb {args.min_available_gb}): run stopped",
                "progress": phase_lines(log), **measured}
    if proc.returncode != 0 or not os.path.exists(result):
        raise RuntimeError(f"{' '.join(cmd)} failed (exit {proc.returncode}); its output "
                           f"(full log {log_path}):\n{log[-6000:]}")
    with open(result) as f:
        res = json.load(f)
    rows, mat = res["rows"], res["materialised"]
    return {
        **header, "status": "completed", "parameters": res["parameters"],
        "dtype": res["compute_dtype"],
        "peak_rss_mb_per_rank": res["peak_rss_mb_per_rank"],
        "peak_rss_mb_sum": sum(res["peak_rss_mb_per_rank"]),
        "phase_peak_rss_mb_per_rank": res["phase_peak_rss_mb_per_rank"], **measured,
        "init_s": res["init_s"], "step_s": [r["step_s"] for r in rows],
        "median_step_s": statistics.median(r["step_s"] for r in rows),
        "first_batch": {"fused": {k: rows[0][k] for k in ("loss", "ce", "ntl")},
                        "materialised_fp32_logits": mat["fp32"],
                        "materialised_bf16_logits": mat["bf16"],
                        "abs_diff_loss_vs_fp32_logits": abs(rows[0]["loss"] - mat["fp32"]["loss"]),
                        "abs_diff_loss_vs_bf16_logits": abs(rows[0]["loss"] - mat["bf16"]["loss"])},
        "rows": rows,
    }


def launch(args) -> None:
    """The full model; while the machine runs short of RAM, the ``--fallback-layers`` in turn."""
    with open(args.ds_config) as f:
        ds = json.load(f)
    result = {"ds_config": os.path.relpath(args.ds_config, ROOT), "ranks": 2,
              "optimizer": ds["optimizer"]["type"], "seq_len": args.seq_len, "micro_batch": 1,
              "offload": "parameters and optimizer states (fp32 master weights, gradients) on "
                         "NVMe through DeepSpeed's async I/O op",
              "runs": [run(args, args.layers)]}
    for layers in args.fallback_layers:  # smaller until one completes
        if result["runs"][-1]["status"] != "stopped":
            break
        result["runs"].append(run(args, layers))
    result["deepspeed_estimates"] = estimates()
    write_json(result, args.out)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--seq-len", type=int, default=32)
    ap.add_argument("--layers", type=int, default=0, help="0: the model's 28 (development: 2)")
    ap.add_argument("--ds-config", default=DS_CONFIG)
    ap.add_argument("--model", default=MODEL)
    ap.add_argument("--nvme-dir", default=None, help="default: <repo>/.nvme_offload (deleted)")
    ap.add_argument("--fallback-layers", default="10,3",
                    type=lambda text: [int(n) for n in text.split(",") if int(n) > 0],
                    help="layer counts tried in turn while runs are stopped for RAM (0: none)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--vocab-blocks", type=int, default=16,
                    help="the tied embedding as this many row-block parameters (1: one matrix)")
    ap.add_argument("--min-available-gb", type=float, default=1.5,
                    help="stop the run when the machine's available RAM falls below this")
    ap.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results", "scale.json"))
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--result", help=argparse.SUPPRESS)
    ap.add_argument("--local_rank", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        worker(args)
    else:
        launch(args)


if __name__ == "__main__":
    main()
