"""The Triton kernels of ntl_deepspeed/ops/triton_logits.py against plain torch, on CPU in
Triton's interpreter.

Triton reads TRITON_INTERPRET when it is first imported (its own library, e.g. ``tl.max``, is
built then), when each kernel is decorated, and again on lazy imports at the first launch. So
this module sets the variable before importing triton, loads a private copy of
triton_logits.py (the package's module, if imported elsewhere, stays as it was), and sets the
variable again while its tests run; otherwise it restores it, so that modules collected or run
later in the session do not see it. If triton was imported earlier in the session without the
variable, the kernels cannot be interpreted in this process: the file then re-runs itself in a
subprocess with the variable set from the start (test_rerun_in_subprocess).

bf16: loads are exact in the interpreter (triton 3.9), but its fp32 -> bf16 cast truncates
where GPUs round to nearest even, so bf16 gradients are checked to one bf16 ulp.
"""
import importlib.util
import json
import os
import subprocess
import sys
from collections import Counter
from contextlib import contextmanager

import pytest
import torch

from op_counter import count_dispatched_ops, count_host_syncs

# numpy, under the interpreter, warns on log(0) = -inf and exp overflow = inf: both intended
pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SOURCE = os.path.join(ROOT, "ntl_deepspeed", "ops", "triton_logits.py")
INF = float("inf")


@contextmanager
def triton_interpret(value):
    saved = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = value
    try:
        yield
    finally:
        if saved is None:
            del os.environ["TRITON_INTERPRET"]
        else:
            os.environ["TRITON_INTERPRET"] = saved


def load_copy(name, interpret):
    """Execute triton_logits.py as module ``name`` with TRITON_INTERPRET set as asked."""
    with triton_interpret("1" if interpret else "0"):
        spec = importlib.util.spec_from_file_location(name, SOURCE)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    return module


with triton_interpret("1"):  # before triton's first import in this process, if it is the first
    pytest.importorskip("triton", reason="triton is not installed (the kernels are optional)")
tk = load_copy("_triton_logits_interpreted", interpret=True)


@pytest.fixture(autouse=True, scope="module")
def interpreter_while_testing():
    with triton_interpret("1"):
        yield


needs_interpreter = pytest.mark.skipif(
    not tk.interpreted(), reason="triton was imported without TRITON_INTERPRET=1 before this "
    "module: the kernels run in test_rerun_in_subprocess instead")


def test_rerun_in_subprocess():
    if tk.interpreted():
        pytest.skip("the kernels run in Triton's interpreter in this process")
    env = dict(os.environ, TRITON_INTERPRET="1", OMP_NUM_THREADS="1")
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                          "-k", "not rerun_in_subprocess", __file__],
                         cwd=ROOT, env=env, capture_output=True, text=True)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert " passed" in run.stdout and "skipped" not in run.stdout, run.stdout[-3000:]


DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def logits_with_specials(rows, width, dtype, seed):
    """Random logits; row 0 has some -inf, row 2 is all -inf (when those rows exist)."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(rows, width, generator=g) * 4
    if width > 1:
        z[0, ::3] = -INF
    if rows > 2:
        z[2] = -INF
    return z.to(dtype), g


def reference_statistics(z, target_local, has_target):
    """Independent torch: fp32 logsumexp and the gathered label logit."""
    lse = torch.logsumexp(z.float(), -1)
    target = z.float().gather(1, target_local.unsqueeze(1)).squeeze(1)
    return lse, torch.where(has_target, target, torch.zeros_like(target))


@needs_interpreter
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("width", [1, 5, 130, 1000])
@pytest.mark.parametrize("rows", [1, 7, 33])
@pytest.mark.parametrize("block_w", [None, 32])  # 32: rows streamed in several column steps
def test_row_statistics(rows, width, dtype, block_w):
    z, g = logits_with_specials(rows, width, DTYPES[dtype], seed=rows * 1000 + width)
    target_local = torch.randint(0, width, (rows,), generator=g)
    has_target = torch.rand(rows, generator=g) < 0.7
    lse, target, nonfinite = tk.row_statistics(z, target_local, has_target, True,
                                               block_w=block_w)
    ref_lse, ref_target = reference_statistics(z, target_local, has_target)
    # inputs are exact in fp32 whatever their dtype, so fp32 tolerances hold for all dtypes
    torch.testing.assert_close(lse, ref_lse, rtol=1e-6, atol=1e-6)
    assert torch.equal(target, ref_target)
    assert nonfinite.dtype == torch.int64 and nonfinite.dim() == 0
    assert int(nonfinite) == int((~torch.isfinite(z)).sum())
    assert tk.row_statistics(z, target_local, has_target, False)[2] is None


@needs_interpreter
@pytest.mark.parametrize("block_w", [None, 16])
def test_row_statistics_nonfinite_rows(block_w):
    """-inf, +inf, NaN and huge values, placed in different column steps when block_w=16."""
    z = torch.randn(8, 40)
    z[0, 30] = INF                     # +inf in the last step  -> +inf
    z[1, 5] = float("nan")             # NaN in the first step   -> NaN
    z[2] = -INF                        # all -inf                -> -inf
    z[3, :20] = -INF                   # first steps all -inf, later finite
    z[4, 3], z[4, 35] = INF, -INF      # both infinities         -> +inf
    z[5, 33] = 1e30                    # huge but finite: no overflow -> 1e30
    z[6] = -1e30                       # all hugely negative     -> -1e30 + log(40)
    z[7, 10], z[7, 39] = float("nan"), INF
    target_local = torch.tensor([30, 5, 0, 25, 3, 33, 1, 2])
    has_target = torch.tensor([True, True, True, True, False, True, True, False])
    lse, target, nonfinite = tk.row_statistics(z, target_local, has_target, True,
                                               block_w=block_w)
    ref_lse, ref_target = reference_statistics(z, target_local, has_target)
    torch.testing.assert_close(lse, ref_lse, rtol=1e-6, atol=1e-6, equal_nan=True)
    torch.testing.assert_close(target, ref_target, rtol=0, atol=0, equal_nan=True)
    assert lse[0] == INF and torch.isnan(lse[1]) and lse[2] == -INF and lse[4] == INF
    assert torch.isnan(lse[7]) and torch.isfinite(lse[[3, 5, 6]]).all()
    assert int(nonfinite) == 1 + 1 + 40 + 20 + 2 + 2


@needs_interpreter
def test_strided_views():
    base = torch.randn(33, 1100)
    for z in (base[:, 50:1050],       # row-strided: stride(0) = 1100 != W
              base[::2, 7:600:3],     # every other row, every third column
              base.t()[:130, :9]):    # transposed: stride(1) != 1
        rows = z.shape[0]
        target_local = torch.arange(rows) % z.shape[1]
        has_target = torch.arange(rows) % 3 != 0
        lse, target, _ = tk.row_statistics(z, target_local, has_target)
        ref_lse, ref_target = reference_statistics(z, target_local, has_target)
        torch.testing.assert_close(lse, ref_lse, rtol=1e-6, atol=1e-6)
        assert torch.equal(target, ref_target)
        shift = torch.randn(rows) + 3
        negative = torch.arange(rows) % 2 == 0
        out = torch.zeros(rows, z.shape[1] + 4)[:, 2:-2]  # the gradient may be a view too
        tk.write_gradient(z, shift, negative, out)
        torch.testing.assert_close(out, reference_gradient(z, shift, negative, torch.float32),
                                   rtol=1e-6, atol=0)
        assert z.stride(1) != 1 or z.stride(0) != z.shape[1]


def reference_gradient(z, shift, negative, dtype):
    sign = torch.where(negative, -1.0, 1.0)
    g = torch.exp(z.float() - shift.unsqueeze(1)) * sign.unsqueeze(1)
    return torch.where(torch.isinf(shift).unsqueeze(1), torch.zeros_like(g), g).to(dtype)


# fp16: both sides round the same fp32 value, which may differ in its last bit (numpy vs torch
# exp), so one fp16 ulp; bf16: the interpreter truncates instead of rounding, one bf16 ulp.
GRAD_RTOL = {"fp32": 1e-6, "fp16": 2 ** -10, "bf16": 2 ** -7}


@needs_interpreter
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("width", [1, 5, 130, 1000])
@pytest.mark.parametrize("rows", [1, 7, 33])
def test_write_gradient(rows, width, dtype):
    z, g = logits_with_specials(rows, width, DTYPES[dtype], seed=rows * 7 + width)
    shift = torch.randn(rows, generator=g) + 4
    negative = torch.rand(rows, generator=g) < 0.5
    if rows > 1:
        shift[1] = INF  # zero coefficient: the row is exactly 0
    out = torch.full_like(z, 123.0)
    assert tk.write_gradient(z, shift, negative, out) is out
    ref = reference_gradient(z, shift, negative, z.dtype)
    torch.testing.assert_close(out, ref, rtol=GRAD_RTOL[dtype], atol=0)
    if rows > 1:
        assert torch.equal(out[1], torch.zeros_like(out[1]))
    if rows > 2:
        assert torch.equal(out[2].abs(), torch.zeros_like(out[2]))  # exp(-inf) = 0


@needs_interpreter
def test_write_gradient_in_place_and_strided_row_arguments():
    z = torch.randn(9, 70)
    shift = torch.randn(9, 2)[:, 1]           # 1-D arguments with stride 2
    negative = (torch.randn(9, 2) > 0)[:, 0]
    assert not (shift.is_contiguous() or negative.is_contiguous())
    ref = reference_gradient(z, shift, negative, torch.float32)
    assert tk.write_gradient(z, shift, negative, z) is z
    torch.testing.assert_close(z, ref, rtol=1e-6, atol=0)
    target_local = torch.arange(18).view(9, 2)[:, 0]
    has_target = (torch.randn(9, 3) > 0)[:, 1]
    assert not (target_local.is_contiguous() or has_target.is_contiguous())
    lse, target, _ = tk.row_statistics(z, target_local, has_target)
    ref_lse, ref_target = reference_statistics(z, target_local, has_target)
    torch.testing.assert_close(lse, ref_lse, rtol=1e-6, atol=1e-6)
    assert torch.equal(target, ref_target)


@needs_interpreter
def test_write_gradient_infinite_logit_with_infinite_shift_is_zero():
    """Documented difference from torch's exp(inf - inf) = NaN: a zero coefficient gives 0."""
    z = torch.tensor([[INF, 1.0], [INF, 1.0]])
    out = torch.empty_like(z)
    tk.write_gradient(z, torch.tensor([INF, 2.0]), torch.tensor([False, True]), out)
    assert out[0].tolist() == [0.0, 0.0]
    assert out[1, 0] == -INF and out[1, 1] == pytest.approx(-torch.exp(torch.tensor(-1.0)))


@needs_interpreter
def test_launches_and_ops_do_not_grow_with_rows_or_width():
    def one_step(rows, width):
        z = torch.randn(rows, width)
        target_local = torch.zeros(rows, dtype=torch.long)
        has_target = torch.ones(rows, dtype=torch.bool)

        def step():
            tk.row_statistics(z, target_local, has_target, True)
            tk.write_gradient(z, torch.zeros(rows), has_target, torch.empty_like(z))

        before = Counter(tk.LAUNCHES)
        _, ops, per_op = count_dispatched_ops(step)
        launches = Counter(tk.LAUNCHES)
        launches.subtract(before)
        _, syncs, details = count_host_syncs(step)
        assert syncs == 0, details
        return dict(launches), ops, per_op

    base = one_step(6, 300)
    assert base[0] == {"row_statistics": 1, "write_gradient": 1}
    # width 2400 takes several column steps (BLOCK_W 4096 forward, 1024 backward)
    for rows, width in ((48, 300), (6, 2400), (48, 2400)):
        assert one_step(rows, width) == base


@needs_interpreter
def test_no_rows():
    z = torch.empty(0, 10)
    before = sum(tk.LAUNCHES.values())
    lse, target, nonfinite = tk.row_statistics(z, torch.empty(0, dtype=torch.long),
                                               torch.empty(0, dtype=torch.bool), True)
    assert lse.shape == target.shape == (0,) and int(nonfinite) == 0
    tk.write_gradient(z, torch.empty(0), torch.empty(0, dtype=torch.bool), torch.empty_like(z))
    assert sum(tk.LAUNCHES.values()) == before


@needs_interpreter
def test_bad_arguments():
    z = torch.randn(3, 4)
    with pytest.raises(ValueError, match="target_local"):
        tk.row_statistics(z, torch.zeros(2, dtype=torch.long), torch.ones(3, dtype=torch.bool))
    with pytest.raises(ValueError, match="2-D"):
        tk.row_statistics(z.double(), torch.zeros(3, dtype=torch.long),
                          torch.ones(3, dtype=torch.bool))
    with pytest.raises(ValueError, match="out must be"):
        tk.write_gradient(z, torch.zeros(3), torch.ones(3, dtype=torch.bool), torch.empty(3, 5))


def test_compiled_kernels_refuse_cpu_tensors():
    compiled = load_copy("_triton_logits_compiled", interpret=False)
    if compiled.interpreted():
        pytest.skip("TRITON_INTERPRET=1 for the whole process")
    assert compiled.triton_available("cpu") is False
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        compiled.row_statistics(torch.randn(2, 3), torch.zeros(2, dtype=torch.long),
                                torch.ones(2, dtype=torch.bool))


def test_imports_without_triton(monkeypatch):
    for name in [m for m in sys.modules if m == "triton" or m.startswith("triton.")]:
        monkeypatch.setitem(sys.modules, name, None)  # None in sys.modules: ImportError
    monkeypatch.setitem(sys.modules, "triton", None)
    bare = load_copy("_triton_logits_without_triton", interpret=True)
    assert bare.triton_available() is False and bare.triton_available("cuda") is False
    with pytest.raises(RuntimeError, match="triton is not installed"):
        bare.row_statistics(torch.randn(2, 3), torch.zeros(2, dtype=torch.long),
                            torch.ones(2, dtype=torch.bool))


# Compiles both kernels for CUDA sm_80 (Triton's GPU backend and its bundled ptxas; no GPU
# needed) at the launch configurations the launchers pick for a few shapes, and reads ptxas'
# register and spill report. Runs in a subprocess: this process's triton is in interpreter mode.
COMPILE_FOR_SM80 = r"""
import glob, json, os, re, subprocess, sys, tempfile
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from ntl_deepspeed.ops import triton_logits as tk

ptxas = glob.glob(os.path.join(os.path.dirname(triton.__file__), "backends/nvidia/bin/ptxas"))
if not ptxas:
    print(json.dumps({"skip": "this triton wheel bundles no ptxas"}))
    sys.exit(0)
target, report = GPUTarget("cuda", 80, 32), []
shapes = [(16384, 128256), (16384, 16032), (33, 130), (7, 5)]
for kernel, blocks in (("stats", tk.stats_blocks), ("gradient", tk.gradient_blocks)):
    for i, config in enumerate(sorted({blocks(t, w) for t, w in shapes})):
        block_t, block_w, warps = config
        # sorted: the first configuration (fewest rows per program) is the wide shapes' one
        for dt in ("fp32", "fp16", "bf16") if i == 0 else ("bf16",):
            if kernel == "stats":
                fn, sig = tk._row_statistics_kernel, dict(
                    z_ptr="*" + dt, stride_t="i32", stride_w="constexpr", T="i32", W="i32",
                    label_ptr="*i64", has_label_ptr="*u8", lse_ptr="*fp32",
                    label_logit_ptr="*fp32", bad_ptr="*i32", COUNT_NONFINITE="constexpr",
                    BLOCK_T="constexpr", BLOCK_W="constexpr")
                constexprs = dict(stride_w=1, COUNT_NONFINITE=True)
            else:
                fn, sig = tk._gradient_kernel, dict(
                    z_ptr="*" + dt, z_stride_t="i32", z_stride_w="constexpr", out_ptr="*" + dt,
                    out_stride_t="i32", out_stride_w="constexpr", shift_ptr="*fp32",
                    negative_ptr="*u8", T="i32", W="i32", BLOCK_T="constexpr",
                    BLOCK_W="constexpr")
                constexprs = dict(z_stride_w=1, out_stride_w=1)
            constexprs.update(BLOCK_T=block_t, BLOCK_W=block_w)
            compiled = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=constexprs),
                                      target=target, options={"num_warps": warps})
            with tempfile.NamedTemporaryFile("w", suffix=".ptx", delete=False) as f:
                f.write(compiled.asm["ptx"])
            info = subprocess.run([ptxas[0], "-v", "--gpu-name=sm_80", f.name, "-o", os.devnull],
                                  capture_output=True, text=True, check=True).stderr
            report.append(dict(kernel=kernel, dtype=dt, config=config,
                               registers=int(re.search(r"Used (\d+) registers", info).group(1)),
                               spilled=sum(map(int, re.findall(r"(\d+) bytes spill", info))),
                               cubin=bool(compiled.asm.get("cubin"))))
print(json.dumps(report))
"""


def test_kernels_compile_for_sm80_without_spills(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(TRITON_CACHE_DIR=str(tmp_path), TRITON_DEFAULT_FP_FUSION="1", PYTHONPATH=ROOT)
    run = subprocess.run([sys.executable, "-c", COMPILE_FOR_SM80], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    report = json.loads(run.stdout.strip().splitlines()[-1])
    if isinstance(report, dict):
        pytest.skip(report["skip"])
    assert {(r["kernel"], r["dtype"]) for r in report} >= {
        (k, d) for k in ("stats", "gradient") for d in ("fp32", "fp16", "bf16")}
    for r in report:
        assert r["cubin"] and r["spilled"] == 0 and r["registers"] <= 128, r

