"""Faults that must end a run loudly, or never start it: inconsistent tensor-parallel ranks, a
stalled rank, a killed launcher, values fp16/fp32 cannot hold, and bad inputs (each a clear
error). Checkpoint faults: test_checkpoints.py."""
import random
import re
import signal
import time

import pytest
import torch
import torch.distributed as dist

from dist_utils import run_distributed
from launch_utils import gone, kill_all, metrics, start, wait_for, workers
from cases import V, vocab37
from ntl_deepspeed import NTLConfig, NumberVocab, ce_ntl
from ntl_deepspeed.integrations.deepspeed import (check_half_precision, check_ranks_agree,
                                                  split_config)
from ntl_deepspeed.numbers.token_sources import read_pieces

tp_vocab = vocab37


# ---------------------------------------------------------------------- tensor-parallel ranks
def worker_inconsistent_ranks(rank, world):
    vocab = tp_vocab()
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 6, V, generator=g)
    labels = torch.randint(0, V, (2, 6), generator=g)
    shard = vocab.shard_for((V + 1) // 2 if rank == 0 else V // 2, dist.group.WORLD)
    part = logits[..., shard.start:shard.end]
    checked = NTLConfig(check_inputs=True)

    def both_modes(labels_, part_, config, detail):
        # default: device-side assert on the shared header; check_inputs: the named problem
        with pytest.raises(RuntimeError, match="vocab shards are inconsistent.*different labels, "
                                               "token counts, NTL options"):
            ce_ntl(labels_, shard, config, logits=part_)
        with pytest.raises(ValueError, match=detail):
            ce_ntl(labels_, shard, config.replace(check_inputs=True), logits=part_)

    # 1) one label differs on rank 1
    other = labels.clone()
    if rank == 1:
        other[1, 4] = (other[1, 4] + 1) % V
    both_modes(other, part, NTLConfig(), r"disagree on their labels \(fingerprints\): \{0: \d+, "
                                         r"1: \d+\}.*same batch")
    # 2) two labels swapped on rank 1 (same multiset of labels)
    swapped = labels.clone()
    if rank == 1:
        swapped[0, 0], swapped[0, 1] = labels[0, 1], labels[0, 0]
    assert labels[0, 0] != labels[0, 1]
    both_modes(swapped, part, NTLConfig(), "disagree on their labels")
    # 3) different options: reweigh on rank 1 only; a different weight
    both_modes(labels, part, NTLConfig(reweigh=rank == 1), "disagree on their NTL options")
    both_modes(labels, part, NTLConfig(weight=0.3 + 0.1 * rank), "disagree on their NTL options")
    # 5) the fused path carries the same header
    hidden = torch.randn(12, 8, generator=g)
    head = torch.randn(V, 8, generator=g)[shard.start:shard.end]
    with pytest.raises(ValueError, match="disagree on their labels"):
        ce_ntl(other.view(-1), shard, checked, hidden=hidden, head_weight=head)
    # the group is still in step: a consistent call works, in both modes
    for config in (NTLConfig(), checked):
        assert torch.isfinite(ce_ntl(labels, shard, config, logits=part).loss)


def test_inconsistent_tensor_parallel_ranks_raise_the_same_error_everywhere():
    run_distributed(worker_inconsistent_ranks, 2, timeout=120)


PG_TIMEOUT = 10.0  # a rank left waiting in a collective would fail only after this


def raises_promptly(expected, match, call, limit=PG_TIMEOUT / 2):
    """``call()`` raises ``expected`` matching ``match`` well before the process-group timeout
    (a rank waiting for one that raised alone would fail only at the timeout). Returns it."""
    t0 = time.monotonic()
    with pytest.raises(expected, match=match) as info:
        call()
    elapsed = time.monotonic() - t0
    assert elapsed < limit, f"took {elapsed:.1f} s: a rank waited in a collective"
    return info.value


def worker_one_rank_fails_alone(rank, world):
    """Each case: one rank's inputs or options differ; every rank must raise the same error,
    within seconds, and the group must stay in step afterwards."""
    vocab = tp_vocab()
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 6, V, generator=g)
    labels = torch.randint(0, V, (2, 6), generator=g)
    hidden, head = torch.randn(2, 6, 8, generator=g), torch.randn(V, 8, generator=g)
    shard = vocab.shard_for((V + 1) // 2 if rank == 0 else V // 2, dist.group.WORLD)
    part, head_part = logits[..., shard.start:shard.end], head[shard.start:shard.end]
    checked = NTLConfig(check_inputs=True)
    bad_label = labels.clone()
    if rank == 1:
        bad_label[0, 2] = V + 5
    local = "a tensor-parallel rank failed its local input check"

    # 1) a label id outside the vocab on rank 1 only: default (device-side verdict in the
    # header, no host sync), check_inputs (named rank), fused head
    raises_promptly(RuntimeError, f"{local}: a label id outside the vocabulary",
                    lambda: ce_ntl(bad_label, shard, logits=part))
    raises_promptly(ValueError, r"tensor-parallel rank\(s\) \[1\] failed its local input check: "
                                "a label id outside the vocabulary",
                    lambda: ce_ntl(bad_label, shard, checked, logits=part))
    raises_promptly(RuntimeError, f"{local}: a label id outside the vocabulary",
                    lambda: ce_ntl(bad_label, shard, hidden=hidden, head_weight=head_part))
    # 2) a negative loss weight on rank 0 only
    weights = torch.ones(2, 6)
    weights[1, 1] = -1.0 if rank == 0 else 1.0
    raises_promptly(RuntimeError, f"{local}: loss_weights negative or not finite",
                    lambda: ce_ntl(labels, shard, logits=part, loss_weights=weights))
    # 3) a shape error on rank 1 only (its logits one column short), found before the op: the
    # rank joins the first collective with its verdict; its own error is the cause
    short = part[..., :-1] if rank == 1 else part
    err = raises_promptly(RuntimeError, f"{local}: its arguments",
                          lambda: ce_ntl(labels, shard, logits=short))
    if rank == 1:
        assert "columns wide but the logits have" in str(err.__cause__)
    raises_promptly(ValueError, r"rank\(s\) \[1\] failed its local input check: its arguments",
                    lambda: ce_ntl(labels, shard, checked, logits=short))
    # float labels on rank 0 only
    odd = labels.float() if rank == 0 else labels
    raises_promptly(RuntimeError, f"{local}: its arguments", lambda: ce_ntl(odd, shard,
                                                                             logits=part))
    # 4) options that used to change the collectives: check_inputs / check_finite on one rank
    mode = "tensor-parallel ranks use different check modes"
    raises_promptly(RuntimeError, mode, lambda: ce_ntl(
        labels, shard, NTLConfig(check_inputs=rank == 1), logits=part))
    raises_promptly(RuntimeError, mode, lambda: ce_ntl(
        labels, shard, NTLConfig(check_finite=rank == 0), hidden=hidden, head_weight=head_part))
    # normalization="global" on one rank of a tensor-parallel group: the options fingerprint
    raises_promptly(RuntimeError, "different labels, token counts, NTL options", lambda: ce_ntl(
        labels, shard, NTLConfig(normalization="global" if rank == 0 else "micro_batch"),
        logits=part, dp_group=None))
    # ... and on one data-parallel rank: refused once at setup (install / initialize / our
    # trainer), naming the field and the ranks
    raises_promptly(ValueError, r"different ntl settings: normalization: \{0: 'global', 1: "
                                r"'micro_batch'\} \(per rank\)", lambda: check_ranks_agree(
        NTLConfig(normalization="global" if rank == 0 else "micro_batch"), vocab))
    check_ranks_agree(NTLConfig(normalization="global"), vocab)
    # the group is still in step: consistent calls work, and match the unsharded loss
    whole = ce_ntl(labels, vocab, logits=logits)
    for config in (NTLConfig(), checked):
        torch.testing.assert_close(ce_ntl(labels, shard, config, logits=part).loss, whole.loss)


def test_one_rank_failing_or_differing_alone_raises_the_same_error_everywhere_promptly():
    run_distributed(worker_one_rank_fails_alone, 2, timeout=120, pg_timeout=PG_TIMEOUT)


# ---------------------------------------------------------------------- numbers fp16/fp32 cannot hold
def test_fp16_refuses_number_values_whose_ntl_gradient_overflows():
    tokens = [f"w{i}" for i in range(40)] + ["1000000", "5", "999999", "12", "250000", "1"]
    big = NumberVocab.from_tokens(tokens, mode="integers", vocab_size=48)
    # measured: fp16 logits, MSE on values up to 1e6: the gradient overflows to inf (the
    # op's own check is bypassed here to show it); the op now refuses from host values
    torch.manual_seed(0)
    logits = (torch.randn(4, 16, 48) * 2).half().requires_grad_()
    labels = torch.randint(40, 46, (4, 16))
    mse = NTLConfig(kind="mse", mode="integers")
    big._representable.add((torch.float16, "mse", mse.weight, False, None))
    ce_ntl(labels, big, mse, logits=logits).loss.backward()
    assert not torch.isfinite(logits.grad).all()
    big._representable.clear()
    named = r"largest: token '1000000', id 40, value 1e\+06\).*beyond torch\.float16"
    for kind in ("mse", "was"):  # WAS: 0.3 * 1e6 > 65504 as well
        with pytest.raises(ValueError, match=named):
            ce_ntl(labels, big, NTLConfig(kind=kind, mode="integers"), logits=logits)
    ce_ntl(labels, big, mse, logits=logits.float())  # fp32 / bf16: fine
    ce_ntl(labels, big, mse, logits=logits.bfloat16())
    hidden, head = torch.randn(4, 16, 8).half(), torch.randn(48, 8).half()
    with pytest.raises(ValueError, match=named):  # the fused head: the hidden states' dtype
        ce_ntl(labels, big, mse, hidden=hidden, head_weight=head)
    with pytest.raises(ValueError, match=r"kind='mse' .* valued 1\.\.1e\+06 .* up to 6e\+11 per "
                                         r"token, beyond torch\.float16's largest value 65504.*"
                                         r"bf16 or fp32.*kind='was'"):
        big.check_representable(torch.float16, "mse", weight=0.3)
    with pytest.raises(ValueError, match="squash_factor"):
        big.check_representable(torch.float16, "was", weight=0.3)
    big.check_representable(torch.bfloat16, "mse", weight=0.3)  # float32's range: fine
    big.check_representable(torch.float16, "was", weight=0.3, squash_factor=10.0)
    digits = tp_vocab()
    for kind in ("was", "mse", "l1", "huber"):  # digits: 2 * 9^2 at most
        digits.check_representable(torch.float16, kind, weight=1.0, reweigh=True)

    # the DeepSpeed install path runs the check when the model is fp16
    from tiny_llama import model_and_batch

    model = model_and_batch()[0].half()
    vocab = NumberVocab.from_tokens(tokens[:40] + tokens[40:] + [f"x{i}" for i in range(18)],
                                    mode="integers", vocab_size=64)
    with pytest.raises(ValueError, match="float16"):
        check_half_precision(model, vocab, NTLConfig(kind="mse", mode="integers"))
    check_half_precision(model.float(), vocab, NTLConfig(kind="mse", mode="integers"))

    class FP16Engine:  # what install() asks a DeepSpeed engine
        module = model

        def fp16_enabled(self):
            return True

    with pytest.raises(ValueError, match="float16"):
        check_half_precision(FP16Engine(), vocab, NTLConfig(kind="mse", mode="integers"))


@pytest.mark.parametrize("token,kind", [("1e20", "mse"), ("3e38", "was"), ("-2e38 2e38", "l1")])
def test_float_tokens_whose_loss_overflows_float32_are_refused(token, kind):
    """floats mode: values float32 holds, but the op's float32 sums or squares would not (the
    loss came out inf). Refused before any math, from host values, in any logits dtype; a
    single token of -2e38 with L1 stays finite and is accepted."""
    tokens = ["a", "b", "1", "2.5", *token.split(), "7"]
    with pytest.warns(RuntimeWarning, match="rounded"):
        lone = NumberVocab.from_tokens(["a", "b", "1", "2.5", "-2e38", "7"], mode="floats")
    out = ce_ntl(torch.tensor([2, 4, 5]), lone, NTLConfig(kind="l1"), logits=torch.zeros(3, 6))
    assert torch.isfinite(out.loss)
    with pytest.warns(RuntimeWarning, match="rounded"):
        vocab = NumberVocab.from_tokens(tokens, mode="floats")
    logits = torch.zeros(3, len(tokens))
    logits[:, 4] = 30.0 if kind == "l1" else 0.0  # L1: all mass on -2e38, the label is 2e38
    labels = torch.tensor([2, len(tokens) - 2, 3])
    config = NTLConfig(kind=kind, mode="floats")
    vocab._representable.add((torch.float32, kind, config.weight, False, None))  # bypassed:
    assert not torch.isfinite(ce_ntl(labels, vocab, config, logits=logits).loss)  # inf / NaN
    vocab._representable.clear()
    for dtype in (torch.float32, torch.bfloat16):
        with pytest.raises(ValueError, match=rf"NTL kind='{kind}' .*largest: token '[-\de.]+', "
                                             r"id \d.*float32 arithmetic reaches .*beyond "
                                             r"float32's largest value"):
            ce_ntl(labels, vocab, NTLConfig(kind=kind, mode="floats"), logits=logits.to(dtype))
    out = ce_ntl(labels, vocab, NTLConfig(enabled=False), logits=logits)  # CE alone: fine
    assert torch.isfinite(out.loss)


def test_integer_token_beyond_any_float_is_named_and_left_out():
    huge = "9" * 400  # float(int(...)) raised a bare OverflowError
    with pytest.warns(RuntimeWarning, match=r"overflow float32 and are not treated as numbers: "
                                            r"'9{48}'\.\.\. \(400 characters\) \(id 2\)"):
        vocab = NumberVocab.from_tokens(["a", "7", huge, "\u2581" + huge, "12"], mode="integers")
    assert vocab.number_ids.tolist() == [1, 4]
    with pytest.warns(RuntimeWarning, match="'1e400'"):  # floats mode: named too, not dropped
        vocab = NumberVocab.from_tokens(["a", "1e400", "inf", "nan", "3"], mode="floats")
    assert vocab.number_ids.tolist() == [4]


def test_number_tokens_float32_cannot_hold_are_named():
    tokens = ["a", "16777217", "1" + "0" * 40, "5", "12", "b"]
    with pytest.warns(RuntimeWarning) as caught:
        vocab = NumberVocab.from_tokens(tokens, mode="integers")
    text = " | ".join(str(w.message) for w in caught)
    assert "'16777217' (id 1, becomes 16777216)" in text
    assert "overflow float32 and are not treated as numbers: '1" + "0" * 40 + "' (id 2)" in text
    assert vocab.number_ids.tolist() == [1, 3, 4]  # the overflowing one is left out
    assert torch.isfinite(vocab.number_values).all()


@pytest.mark.parametrize("section,message", [
    ('{"squash_factor": Infinity}', r"ntl\.squash_factor: must be finite, got inf"),
    ('{"weight": NaN}', r"ntl\.weight: must be finite, got nan"),
    ('{"weight": "0.3"}', r"ntl\.weight: expected a number, got '0\.3'"),
    ('{"reweigh": "yes"}', r"ntl\.reweigh: expected true or false, got 'yes'"),
    ('{"check_finite": 1}', r"ntl\.check_finite: expected true or false, got 1"),
])
def test_ds_config_values_are_never_coerced(section, message, tmp_path):
    path = tmp_path / "ds.json"
    path.write_text('{"train_micro_batch_size_per_gpu": 1, "ntl": ' + section + "}")
    with pytest.raises(ValueError, match=message):
        split_config(str(path))


# ---------------------------------------------------------------------- inputs: clear errors
@pytest.mark.parametrize("argv,message", [
    (["--seq-len", "0"], "--seq-len: must be > 0, got 0"),
    (["--seq-len", "-4"], "--seq-len: must be > 0, got -4"),
    (["--steps", "-1"], "--steps: must be >= 0, got -1"),
    (["--dist-timeout", "0"], "--dist-timeout: must be a positive number of seconds"),
    (["--keep-checkpoints", "-2"], "--keep-checkpoints: must be >= 0"),
])
def test_bad_numbers_on_the_command_line(argv, message, capsys):
    from ntl_deepspeed.train import preflight
    from ntl_deepspeed.train.cli import parse_args

    with pytest.raises(SystemExit):
        parse_args(["--deepspeed_config", "x.json", "--model", "m.json", *argv])
    assert message in capsys.readouterr().err
    with pytest.raises(preflight.PreflightError, match=message.split(":")[0]):
        preflight.check(["--deepspeed_config", "x.json", "--model", "m.json", *argv])


@pytest.mark.parametrize("name", ["tokenizer.model", "tokenizer.json", "vocab.tiktoken"])
def test_tokenizer_of_random_bytes_names_the_file(tmp_path, name):
    path = tmp_path / name
    path.write_bytes(b"\x00" + random.Random(0).randbytes(4095))
    with pytest.raises(ValueError, match=str(path)):
        read_pieces(str(path))


def test_tiktoken_with_an_absurd_vocabulary_is_refused_before_allocating(tmp_path):
    path = tmp_path / "huge.tiktoken"
    path.write_bytes(b"MA== 0\nMQ== 1\nMg== 99999999999999\n")  # "0", "1", "2" at rank 1e14
    t0 = time.perf_counter()
    with pytest.raises(ValueError, match=rf"{path}:3: token id 99999999999999 is outside "
                                         r"\[0, 10,000,000\]"):
        read_pieces(str(path))
    assert time.perf_counter() - t0 < 1.0  # no 1e14-entry list


def test_vocab_start_index_without_a_tensor_parallel_group():
    with pytest.raises(ValueError, match="vocab_start_index=5 was given without a "
                                         "tensor-parallel group"):
        tp_vocab().shard_for(V, None, start=5)


# ---------------------------------------------------------------------- stalled ranks, orphans
def test_stalled_rank_fails_the_run_within_the_timeout(tmp_path):
    timeout = 15
    launcher = start(tmp_path, "--steps", "100000", "--dist-timeout", str(timeout),
                     "--save-every", "0", "--no-save", log=str(tmp_path / "log.txt"))
    ranks = {}
    try:
        wait_for(lambda: len(metrics(tmp_path)) >= 3, 120, "training to start")
        ranks = workers(launcher.pid)
        assert sorted(ranks) == [0, 1]
        ranks[1].send_signal(signal.SIGSTOP)  # rank 1 hangs: no crash, no message
        stalled_at = time.monotonic()
        wait_for(lambda: gone(ranks[0]), timeout + 20, "rank 0 to fail")
        assert time.monotonic() - stalled_at < timeout + 10
        # DeepSpeed's launcher SIGTERMs the stalled rank (delivered once it runs again) and
        # waits up to 30 s before SIGKILL: let it run so the launch ends now
        ranks[1].send_signal(signal.SIGCONT)
        assert launcher.wait(timeout=60) != 0
        log = (tmp_path / "log.txt").read_text()
        assert "Timed out" in log or "timed out" in log, log[-3000:]
        # before failing, rank 0 said what it was waiting in (after min(60 s, timeout / 3))
        assert re.search(r"\[rank 0\] no progress for [56] s: still in training step \d+ "
                         r"\(forward, backward, optimizer\); if another rank is stalled or "
                         r"missing, the run fails after --dist-timeout 15 s", log), log[-3000:]
    finally:
        kill_all(list(ranks.values()))
        kill_all([launcher])


def test_killing_the_launcher_leaves_no_worker_training(tmp_path):
    launcher = start(tmp_path, "--steps", "100000", "--save-every", "0", "--no-save")
    processes = []
    try:
        wait_for(lambda: len(metrics(tmp_path)) >= 3, 120, "training to start")
        import psutil

        processes = psutil.Process(launcher.pid).children(recursive=True)  # launch + workers
        assert len(workers(launcher.pid)) == 2
        launcher.send_signal(signal.SIGKILL)  # the deepspeed runner: no chance to clean up
        launcher.wait(timeout=10)
        killed_at = time.monotonic()
        wait_for(lambda: all(gone(p) for p in processes), 10, "every worker to exit")
        assert time.monotonic() - killed_at < 10
    finally:
        kill_all(processes)


def test_second_node_never_starting_is_said_and_fails_within_the_timeout(tmp_path):
    """A two-node launch whose second node never starts: node 0's rank says what it waits for
    (every rank at the rendezvous address), repeats it while waiting, and the launch fails after
    --dist-timeout instead of waiting silently for torch's 30 minutes."""
    import subprocess

    from launch_utils import FAST, MODEL, ROOT, TINY, env
    from dist_utils import free_port

    hostfile = tmp_path / "hostfile"
    hostfile.write_text("node-a slots=1\nnode-b slots=1\n")
    port, timeout = free_port(), 12
    cmd = ["deepspeed", "--hostfile", str(hostfile), "--no_ssh", "--node_rank", "0",
           "--master_addr", "127.0.0.1", "--master_port", str(port),
           f"{ROOT}/launch/pretrain.py", "--deepspeed_config", TINY, "--model", MODEL,
           "--output-dir", str(tmp_path / "out"), *FAST, "--dist-timeout", str(timeout)]
    t0 = time.monotonic()
    proc = subprocess.run(cmd, cwd=ROOT, env=env(), capture_output=True, text=True, timeout=180)
    elapsed = time.monotonic() - t0
    log = proc.stdout + proc.stderr
    assert proc.returncode != 0, log[-3000:]
    assert (f"[rank 0, node 0] joining the process group: waiting for all 2 ranks to connect "
            f"to 127.0.0.1:{port} (every node's launcher must be started); giving up after "
            f"--dist-timeout {timeout} s") in log, log[-3000:]
    assert "no progress for" in log and "still joining the process group" in log, log[-3000:]
    assert "1/2 clients joined" in log, log[-3000:]  # torch's own error, after the timeout
    assert elapsed < timeout + 60, elapsed  # start-up (imports) + the timeout, not 30 min


def test_a_rank_without_progress_says_what_it_waits_for():
    """The default --dist-timeout is 10 minutes (torch's is 30); a rank that makes no progress
    says what it is doing after min(60 s, timeout / 3), again at each interval, never when
    progressing."""
    import io

    from ntl_deepspeed.train.cli import DEFAULT_DIST_TIMEOUT, parse_args
    from ntl_deepspeed.train.activity import Activity

    assert parse_args(["--deepspeed_config", "ds.json", "--model", "m.json"]).dist_timeout \
        == DEFAULT_DIST_TIMEOUT == 600
    out = io.StringIO()
    activity = Activity(timeout=1.5, rank="3", out=out)
    assert activity.report_after == 1.0
    try:
        activity.now("in training step 7 (forward, backward, optimizer)")
        time.sleep(2.6)
        activity.now(None)
        time.sleep(1.3)
    finally:
        activity.stop()
    lines = out.getvalue().splitlines()
    assert len(lines) == 2, lines  # at ~1 s and ~2 s, none once idle
    assert lines[0] == ("[rank 3] no progress for 1 s: still in training step 7 (forward, "
                        "backward, optimizer); if another rank is stalled or missing, the run "
                        "fails after --dist-timeout 1.5 s"), lines
