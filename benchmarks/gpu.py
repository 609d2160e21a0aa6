"""GPU benchmark of the CE+NTL op against other cross-entropy implementations (needs CUDA).

Forward+backward time (CUDA events, warm-up, median of repetitions) and extra peak memory
(``torch.cuda.max_memory_allocated`` above the inputs) for

* the logits path: ours (``backend`` "torch" / "triton" / the default), ``F.cross_entropy``
  (on the bf16 logits, and upcast to fp32 as Hugging Face does), megatron-core's
  ``vocab_parallel_cross_entropy`` (TP=1);
* the fused head (hidden states and head weight, no logits tensor): ours, linear +
  ``F.cross_entropy``, ``F.linear_cross_entropy`` (torch >= 2.13), Liger-Kernel's
  ``LigerFusedLinearCrossEntropyLoss``, Cut Cross-Entropy's ``linear_cross_entropy``.

Unavailable baselines are recorded with the reason. Ratios: logits path vs ``F.cross_entropy``,
fused head vs Liger and vs linear + ``F.cross_entropy``. Writes benchmarks/results/gpu.json.
Without a CUDA device it measures nothing and exits 0.

    python benchmarks/gpu.py [--quick] [--reps 20] [--warmup 5]
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import sys
import time

import torch
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _harness import free_port  # noqa: E402

OUT = os.path.join(ROOT, "benchmarks", "results", "gpu.json")
SHAPES = [(8, 2048, 32000), (8, 2048, 128256)]  # (batch, sequence, vocab)
QUICK_SHAPES = [(2, 512, 32000)]
HIDDEN = 4096
DTYPE = torch.bfloat16
NUMBER_FRACTION = 0.10  # labels that are number tokens, so the NTL has work to do


class Unsupported(Exception):
    """A variant that cannot run here; the message says why."""


def synthetic_vocab(vocab_size: int):
    from ntl_deepspeed import NumberVocab

    return NumberVocab.from_tokens([str(i) if i < 10 else f"tok{i}" for i in range(vocab_size)])


def make_labels(tokens: int, vocab_size: int, generator) -> torch.Tensor:
    labels = torch.randint(10, vocab_size, (tokens,), generator=generator)
    numeric = torch.rand(tokens, generator=generator) < NUMBER_FRACTION
    labels[numeric] = torch.randint(0, 10, (int(numeric.sum()),), generator=generator)
    return labels.cuda()  # no ignore_index: megatron-core's CE has none


# ---------------------------------------------------------------------------- variants
def ours_logits(vocab, backend):
    from ntl_deepspeed import NTLConfig, ce_ntl

    config = NTLConfig() if backend is None else NTLConfig(backend=backend)

    def loss(logits, labels):
        return ce_ntl(labels, vocab, config, logits=logits).loss

    return loss


def megatron_logits():
    """megatron-core's CE at TP=1: needs torch.distributed and its model-parallel state."""
    try:
        import torch.distributed as dist
        from megatron.core import parallel_state
        from megatron.core.tensor_parallel import vocab_parallel_cross_entropy
    except ImportError as e:
        raise Unsupported(f"megatron-core not importable: {e}") from None
    try:
        if not dist.is_initialized():
            dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{free_port()}",
                                    world_size=1, rank=0)
        if not parallel_state.model_parallel_is_initialized():
            parallel_state.initialize_model_parallel(1, 1)
    except Exception as e:  # noqa: BLE001 - any setup failure means: skip, with the reason
        raise Unsupported(f"model-parallel state could not be set up: {e!r}") from None

    def loss(logits, labels):  # it takes [sequence, batch, vocab]
        return vocab_parallel_cross_entropy(logits.unsqueeze(1), labels.unsqueeze(1)).mean()

    return loss


def logits_variants(vocab):
    return {
        "F.cross_entropy": lambda: (lambda z, y: F.cross_entropy(z, y)),
        "F.cross_entropy(fp32)": lambda: (lambda z, y: F.cross_entropy(z.float(), y)),
        "ours_default": lambda: ours_logits(vocab, None),
        "ours_torch": lambda: ours_logits(vocab, "torch"),
        "ours_triton": lambda: ours_logits(vocab, "triton"),
        "megatron_vocab_parallel_ce": megatron_logits,
    }


def liger_fused():
    try:
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss
    except ImportError as e:
        raise Unsupported(f"liger-kernel not importable: {e}") from None
    module = LigerFusedLinearCrossEntropyLoss()
    return lambda h, w, y: module(w, h, y)  # (weight, input, target)


def cce_fused():
    try:
        from cut_cross_entropy import linear_cross_entropy
    except ImportError as e:
        raise Unsupported(f"cut-cross-entropy not importable: {e}") from None
    return lambda h, w, y: linear_cross_entropy(h, w, y)


def torch_fused():
    if not hasattr(F, "linear_cross_entropy"):
        raise Unsupported(f"torch {torch.__version__} has no F.linear_cross_entropy")
    return lambda h, w, y: F.linear_cross_entropy(h, w, y)


def ours_fused(vocab):
    from ntl_deepspeed import NTLConfig, ce_ntl

    config = NTLConfig()
    return lambda h, w, y: ce_ntl(y, vocab, config, hidden=h, head_weight=w).loss


def fused_variants(vocab):
    return {
        "linear+F.cross_entropy": lambda: (lambda h, w, y: F.cross_entropy(h @ w.t(), y)),
        "ours_fused": lambda: ours_fused(vocab),
        "torch_linear_cross_entropy": torch_fused,
        "liger_fused_linear_ce": liger_fused,
        "cut_cross_entropy": cce_fused,
    }


# ---------------------------------------------------------------------------- measuring
def measure(loss_fn, inputs, labels, reps: int, warmup: int) -> dict:
    """Median fwd+bwd milliseconds and the peak memory one step adds above its inputs."""

    def step():
        for t in inputs:
            t.grad = None
        loss = loss_fn(*inputs, labels)
        if isinstance(loss, (tuple, list)):  # e.g. (loss, z_loss) from some Liger versions
            loss = loss[0]
        loss.backward()

    try:
        for _ in range(warmup):
            step()
        torch.cuda.synchronize()
        times = []
        for _ in range(reps):
            start = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True)
            start.record()
            step()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        for t in inputs:
            t.grad = None
        gc.collect()
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        step()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
    except torch.cuda.OutOfMemoryError as e:
        return {"status": "OOM", "reason": str(e).splitlines()[0]}
    except Unsupported as e:
        return {"status": "not supported", "reason": str(e)}
    except Exception as e:  # noqa: BLE001 - one broken baseline must not stop the others
        return {"status": "error", "reason": repr(e)[:500]}
    finally:
        for t in inputs:
            t.grad = None
        gc.collect()
        torch.cuda.empty_cache()
    return {"status": "ok", "ms_median": statistics.median(times),
            "ms_min": min(times), "peak_extra_mib": peak / 2 ** 20}


def run_path(path, variants, inputs, labels, shape, args) -> list:
    rows = []
    for name, build in variants.items():
        try:
            loss_fn = build()
            row = measure(loss_fn, inputs, labels, args.reps, args.warmup)
        except Unsupported as e:
            row = {"status": "not supported", "reason": str(e)}
        row = {"path": path, "variant": name, "batch": shape[0], "sequence": shape[1],
               "vocab": shape[2], **row}
        rows.append(row)
        shown = (f"{row['ms_median']:8.2f} ms  {row['peak_extra_mib']:9.1f} MiB"
                 if row["status"] == "ok" else f"{row['status']}: {row.get('reason', '')}")
        print(f"{path:6s} {str(shape):20s} {name:28s} {shown}", flush=True)
    return rows


def add_ratios(rows: list, path: str, baseline: str) -> None:
    """``time_vs_<baseline>`` and ``memory_vs_<baseline>`` on rows of ``path``, per shape."""
    for row in rows:
        base = next((r for r in rows if r["path"] == path and r["variant"] == baseline
                     and (r["batch"], r["sequence"], r["vocab"])
                     == (row["batch"], row["sequence"], row["vocab"])), None)
        if row["path"] != path or row["status"] != "ok" or not base or base["status"] != "ok":
            continue
        row[f"time_vs_{baseline}"] = row["ms_median"] / base["ms_median"]
        if base["peak_extra_mib"] > 0:
            row[f"memory_vs_{baseline}"] = row["peak_extra_mib"] / base["peak_extra_mib"]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="one small shape")
    parser.add_argument("--reps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--out", default=OUT)
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("no CUDA device: nothing measured")
        return 0

    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    rows = []
    g = torch.Generator().manual_seed(0)
    for shape in QUICK_SHAPES if args.quick else SHAPES:
        batch, sequence, vocab_size = shape
        tokens = batch * sequence
        vocab = synthetic_vocab(vocab_size)
        labels = make_labels(tokens, vocab_size, g)
        logits = (torch.randn(tokens, vocab_size, device="cuda", dtype=DTYPE) * 2
                  ).requires_grad_()
        rows += run_path("logits", logits_variants(vocab), [logits], labels, shape, args)
        del logits
        hidden = torch.randn(tokens, HIDDEN, device="cuda", dtype=DTYPE).requires_grad_()
        weight = (torch.randn(vocab_size, HIDDEN, device="cuda", dtype=DTYPE)
                  / HIDDEN ** 0.5).requires_grad_()
        rows += run_path("fused", fused_variants(vocab), [hidden, weight], labels, shape, args)
        del hidden, weight
        gc.collect()
        torch.cuda.empty_cache()
    add_ratios(rows, "logits", "F.cross_entropy")
    add_ratios(rows, "fused", "liger_fused_linear_ce")
    add_ratios(rows, "fused", "linear+F.cross_entropy")

    result = {
        "what": "forward+backward of a mean loss over all tokens; median of --reps after "
                "--warmup; peak_extra_mib = max_memory_allocated above the inputs during one "
                "step (includes the input gradients)",
        "device": torch.cuda.get_device_name(), "torch": torch.__version__,
        "cuda": torch.version.cuda, "triton": triton_version, "python": platform.python_version(),
        "dtype": str(DTYPE).replace("torch.", ""), "hidden": HIDDEN, "reps": args.reps,
        "warmup": args.warmup, "date": time.strftime("%Y-%m-%d %H:%M:%S"), "results": rows,
    }
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
