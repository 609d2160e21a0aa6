"""Our trainer as an application: HF architectures, the user's own data (DP sharding, streaming,
resume), held-out evaluation, generation, --output-dir and --help."""
import gzip
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from dist_utils import free_port
from test_deepspeed_job import ROOT, TINY, env, metrics, variant

from ntl_deepspeed.train.data.corpus import (arithmetic_prompts, generate, generate_split,
                                             problem_in_eval)
from ntl_deepspeed.train.data.documents import (PackedStream, Position, Selection,
                                                document_text, iter_documents, list_files)

MODELS = os.path.join(ROOT, "configs", "model")
LLAMA = os.path.join(MODELS, "llama_tiny.json")


def launch(out_dir, *extra, config=TINY, model=LLAMA, timeout=240):
    cmd = ["deepspeed", "--num_gpus", "2", "--master_addr", "127.0.0.1", "--master_port",
           str(free_port()), os.path.join(ROOT, "launch", "pretrain.py"), "--deepspeed_config",
           config, "--model", model, "--output-dir", str(out_dir), *extra]
    proc = subprocess.run(cmd, cwd=ROOT, env=env(), capture_output=True, text=True,
                          timeout=timeout)
    if proc.returncode != 0:
        raise AssertionError(f"launch failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n"
                             f"{proc.stderr[-3000:]}")
    return proc


# ---------------------------------------------------------------------------- unit: data
def write_corpus(root, n=400, seed=5):
    """Half the sentences in a .txt file (one per line, blank lines between some), half in a
    nested .jsonl, a few in a .txt.gz; returns the documents in index order."""
    sentences = generate(n, seed)
    (root / "nested").mkdir(parents=True, exist_ok=True)
    a, b, c = sentences[: n // 2], sentences[n // 2: n - 20], sentences[n - 20:]
    (root / "a.txt").write_text("\n".join(s + ("\n" if i % 7 == 0 else "")
                                          for i, s in enumerate(a)) + "\n")
    with gzip.open(root / "b.txt.gz", "wt") as f:
        f.write("\n".join(c) + "\n")
    with open(root / "nested" / "c.jsonl", "w") as f:
        for s in b:
            f.write(json.dumps({"text": s, "meta": 1}) + "\n")
    (root / "ignored.csv").write_text("not data\n")
    return a + c + b  # sorted order: a.txt, b.txt.gz, nested/c.jsonl


def documents(files):
    return [document_text(files[fi], raw, here) for fi, here, _, _, raw in iter_documents(files)]


def test_files_sorted_one_document_per_line(tmp_path):
    expected = write_corpus(tmp_path)
    files = list_files([str(tmp_path)])
    assert [os.path.relpath(f, tmp_path) for f in files] == \
        ["a.txt", "b.txt.gz", os.path.join("nested", "c.jsonl")]
    assert documents(files) == expected  # blank lines are not documents
    with pytest.raises(FileNotFoundError, match="no such file"):
        list_files([str(tmp_path / "missing")])
    (tmp_path / "bad.jsonl").write_text('{"body": "x"}\n')
    with pytest.raises(ValueError, match='no "text" string field'):
        documents([str(tmp_path / "bad.jsonl")])


@pytest.mark.parametrize("dp_size", [2, 3])
def test_dp_shares_are_disjoint_and_complete(tmp_path, dp_size):
    write_corpus(tmp_path)
    files = list_files([str(tmp_path)])
    n = len(documents(files))
    train = [{i for i in range(n) if Selection(r, dp_size, "train", 0.2)(i)}
             for r in range(dp_size)]
    held = [{i for i in range(n) if Selection(r, dp_size, "eval", 0.2)(i)}
            for r in range(dp_size)]
    everything = train + held
    assert sum(map(len, everything)) == n  # disjoint ...
    assert set().union(*everything) == set(range(n))  # ... and complete
    assert 0.1 * n < len(set().union(*held)) < 0.3 * n


def encoder():
    # a character "tokenizer": enough to check packing exactly
    return (lambda text: [ord(ch) % 250 + 3 for ch in text]), 1


def test_stream_packs_this_ranks_documents_and_resumes_anywhere(tmp_path):
    expected = write_corpus(tmp_path, n=60)
    files = list_files([str(tmp_path)])
    encode, eos = encoder()
    select = Selection(1, 2, "train", 0.25)
    tokens = [t for i, d in enumerate(expected) if select(i) for t in encode(d) + [eos]]
    stream = PackedStream(files, encode, eos, 33, select)
    blocks = [stream.next_block() for _ in range(3 * len(tokens) // 33)]  # ~3 epochs
    assert sum(blocks, [])[: len(tokens)] == tokens
    assert stream.position.epoch == 2
    for cut in (1, 7, len(tokens) // 33, len(tokens) // 33 + 1, 50):
        first = PackedStream(files, encode, eos, 33, select)
        head = [first.next_block() for _ in range(cut)]
        saved = Position.from_dict(json.loads(json.dumps(first.state())))
        rest = PackedStream(files, encode, eos, 33, select, position=saved)
        assert head + [rest.next_block() for _ in range(len(blocks) - cut)] == blocks, cut
    # a finite (evaluation) stream ends with its short last block
    finite = PackedStream(files, encode, eos, 33, select, cycle=False)
    got = []
    while (block := finite.next_block()) is not None:
        got.append(block)
    assert sum(got, []) == tokens and len(got[-1]) <= 33


def test_embedded_corpus_holds_out_problems_in_every_wording():
    train, held = generate_split(4000, seed=3, eval_fraction=0.2, by="problems")
    assert sorted(train + held) == sorted(generate(4000, 3)) and 0.1 < len(held) / 4000 < 0.3
    import re

    def facts(sentence):
        m = re.fullmatch(r"(\d+) ([-+*]) (\d+) = \d+", sentence)
        if m:
            a, op, b = int(m[1]), m[2], int(m[3])
            return {(op, min(a, b), max(a, b))}
        m = re.search(r"had (\d+) \w+ and bought (\d+)", sentence)
        if m:
            a, b = int(m[1]), int(m[2])
            return {("+", min(a, b), max(a, b))}
        return set()

    seen = set().union(*map(facts, train))
    assert seen and not any(problem_in_eval(p, 0.2) for p in seen)
    prompts = arithmetic_prompts(60, 0.2)
    assert len({p for p, _, _ in prompts}) == 60
    for prompt, answer, op in prompts:
        a, _, b, _ = prompt.split()
        assert eval(f"{a} {op} {b}") == answer
        assert problem_in_eval((op, min(int(a), int(b)), max(int(a), int(b))), 0.2)


# ---------------------------------------------------------------------------- unit: metrics
def test_eval_metrics_against_cross_entropy():
    from ntl_deepspeed import NTLConfig, NumberVocab, ce_ntl
    from ntl_deepspeed.train.evaluation import EvalMetrics, shift_left

    torch.manual_seed(0)
    pieces = ["<unk>", "<s>", "</s>"] + [str(d) for d in range(10)] + ["a", "b", "▁c", "+"]
    vocab = NumberVocab.from_tokens(pieces, mode="digits")
    logits = torch.randn(2, 9, len(pieces))
    ids = torch.randint(0, len(pieces), (2, 9))
    labels = ids.clone()
    labels[1, 6:] = -100  # padding of a short last block
    metrics = EvalMetrics()
    shifted = shift_left(labels, -100)
    metrics(ce_ntl(shifted, vocab, NTLConfig(kind="was", weight=0.0), logits=logits,
                   reduction="none"))
    got = metrics.reduce(None)
    ce = F.cross_entropy(logits.reshape(-1, len(pieces)), shifted.reshape(-1),
                         reduction="none", ignore_index=-100)
    valid = shifted.reshape(-1) != -100
    number = valid & (shifted.reshape(-1) >= 3) & (shifted.reshape(-1) <= 12)
    text = valid & ~number
    assert got["ce"] == pytest.approx(ce[valid].mean().item(), rel=1e-6)
    assert got["ce_non_number"] == pytest.approx(ce[text].mean().item(), rel=1e-6)
    assert got["ce_number"] == pytest.approx(ce[number].mean().item(), rel=1e-6)
    assert got["tokens"] == valid.sum().item() and got["number_labels"] == number.sum().item()
    # number-token accuracy: the label is the most likely of the 10 digits
    flat = logits.reshape(-1, len(pieces))[number][:, 3:13]
    assert got["number_accuracy"] == pytest.approx(
        (flat.argmax(-1) + 3 == shifted.reshape(-1)[number]).float().mean().item())
    assert metrics.reduce(None)["tokens"] == 0  # cleared


# ---------------------------------------------------------------------------- unit: config/cli
def test_model_configs_and_monitor_redirect(tmp_path):
    from ntl_deepspeed.train.models import model_config
    from ntl_deepspeed.train.outputs import redirect_monitors

    kinds = {"llama_tiny": "LlamaConfig", "qwen2_tiny": "Qwen2Config",
             "mistral_tiny": "MistralConfig", "gpt2_tiny": "GPT2Config"}
    for name, cls in kinds.items():
        config = model_config(os.path.join(MODELS, f"{name}.json"), 520)
        assert type(config).__name__ == cls and config.vocab_size == 520
        assert config.eos_token_id is None or config.eos_token_id < 520
    bad = tmp_path / "bad.json"
    bad.write_text('{"model_type": "lama"}')
    with pytest.raises(ValueError, match="'lama' is not a transformers architecture"):
        model_config(str(bad), 512)
    ds = {"csv_monitor": {"enabled": True, "output_path": "elsewhere", "job_name": "j"},
          "tensorboard": {"enabled": False, "output_path": "/abs"}}
    out = redirect_monitors(ds, "o")
    assert out["csv_monitor"]["output_path"] == os.path.join("o", "monitor")
    assert out["tensorboard"]["output_path"] == os.path.join("o", "tensorboard")
    assert ds["csv_monitor"]["output_path"] == "elsewhere"  # a copy


def test_help_lists_every_option_with_its_default():
    from ntl_deepspeed.train.cli import build_parser

    proc = subprocess.run([sys.executable, "-m", "ntl_deepspeed.train.cli", "--help"], cwd=ROOT,
                          env=env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0
    text = " ".join(proc.stdout.split())
    for action in build_parser()._actions:
        if action.option_strings and action.dest != "help":
            assert action.option_strings[0] in text
            assert action.help and "%(default)" not in action.help
    assert text.count("(default:") == len(build_parser()._actions) - 1
    assert "--eval-fraction EVAL_FRACTION hold out" in text and "(default: 0.0)" in text


# ---------------------------------------------------------------------------- launches
def rows(out_dir, split=None):
    return [r for r in metrics(out_dir) if r.get("split") == split]


@pytest.mark.parametrize("arch", ["qwen2", "mistral", "gpt2"])
def test_architectures_train_under_zero3(tmp_path, arch):
    model = os.path.join(MODELS, f"{arch}_tiny.json")
    extra = ["--seq-len", "32"]
    config = TINY
    if arch == "mistral":  # the fused head on another architecture; eval gets real logits
        config = variant(tmp_path, TINY, "fused", {"fused_head": True})
        extra += ["--eval-fraction", "0.1", "--eval-batches", "1"]
    if arch == "gpt2":  # tied embeddings; eval + generation + every output in --output-dir
        config = variant(tmp_path, TINY, "csv", csv_monitor={
            "enabled": True, "output_path": "runs/should_not_be_used", "job_name": "gpt2"})
        extra += ["--eval-fraction", "0.1", "--eval-batches", "2", "--generate-eval", "6"]
    if arch != "gpt2":
        extra.append("--no-plot")
    proc = launch(tmp_path / "out", "--steps", "2", *extra, config=config, model=model)
    train = rows(tmp_path / "out")
    assert len(train) == 2
    for r in train:
        assert all(k in r for k in ("ce", "ntl", "number_accuracy", "number_mae"))
        assert all(v == v and abs(v) < 1e9 for v in r.values())
    with open(tmp_path / "out" / "run_info.json") as f:
        assert json.load(f)["parameters"] > 0
    if arch == "mistral":
        (evals,) = rows(tmp_path / "out", "eval")
        assert evals["ce"] > 0 and evals["ntl"] > 0 and evals["tokens"] == 2 * 8 * 32
    if arch != "gpt2":
        return
    (evals,) = rows(tmp_path / "out", "eval")
    assert evals["step"] == 1 and evals["tokens"] > 0 and evals["number_labels"] > 0
    generation = json.loads((tmp_path / "out" / "generation.json").read_text())
    assert generation["held_out"] and generation["n"] == 6 and len(generation["samples"]) == 6
    written = sorted(os.path.relpath(os.path.join(r, f), tmp_path / "out")
                     for r, _, fs in os.walk(tmp_path / "out") for f in fs)
    assert {"metrics.jsonl", "run_info.json", "generation.json", "curves.png",
            "checkpoints/latest",
            "monitor/gpt2/Train_ntl_ce.csv", "monitor/gpt2/Eval_ntl_ce_non_number.csv"} <= \
        set(written)
    assert not os.path.exists(os.path.join(ROOT, "runs", "should_not_be_used"))
    listing = proc.stdout[proc.stdout.index("files written under"):]
    for name in written:  # the summary names every file
        assert name in listing, name


def test_own_data_dp_sharded_streamed_with_eval_and_exact_resume(tmp_path):
    write_corpus(tmp_path / "data", n=600)
    common = ["--data", str(tmp_path / "data"), "--eval-fraction", "0.2", "--seq-len", "32",
              "--eval-batches", "2", "--eval-every", "3", "--no-plot", "--steps", "6"]
    launch(tmp_path / "full", "--save-every", "3", *common)
    # resume the step-3 checkpoint of the same run elsewhere: a mid-run data position
    ckpt = tmp_path / "part" / "checkpoints"
    shutil.copytree(tmp_path / "full" / "checkpoints" / "step3", ckpt / "step3")
    (ckpt / "latest").write_text("step3")
    launch(tmp_path / "part", "--resume", *common)
    full, resumed = rows(tmp_path / "full"), rows(tmp_path / "part")
    assert [r["step"] for r in resumed] == [3, 4, 5]
    assert [r["loss"] for r in resumed] == pytest.approx([r["loss"] for r in full[3:]],
                                                         rel=1e-6)
    evals = rows(tmp_path / "full", "eval")
    assert [r["step"] for r in evals] == [2, 5]
    assert evals[-1]["ce_non_number"] > 0 and evals[-1]["number_labels"] > 0
    # the resumed run's evaluation saw the same model and the same held-out data
    (again,) = rows(tmp_path / "part", "eval")
    assert again["ce"] == pytest.approx(evals[-1]["ce"], rel=1e-6)
    state = torch.load(ckpt / "step6" / "zero_pp_rank_0_mp_rank_00_model_states.pt",
                       weights_only=False)
    positions = state["data_position"]
    assert set(positions) == {0, 1} and state["data_dp_size"] == 2
    assert all(p["blocks"] == 6 * 8 for p in positions.values())  # 6 steps x micro-batch 8
    assert positions[0] != positions[1]  # each rank streams its own documents
