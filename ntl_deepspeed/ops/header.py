"""The fixed-size per-rank header of the first (MAX) collective: each rank's vocab slice,
non-finite count, its verdict on its own inputs, check mode, and fingerprints of what must be
identical on every rank (token count, loss options and number vocabulary, labels). After the
all-reduce every rank holds the same header, so every rank raises the same error: by default as
device-side asserts (no host sync), with ``read_header`` on the host, naming the rank.
"""
from __future__ import annotations

import dataclasses
import functools
import zlib
from typing import TYPE_CHECKING, Optional

import torch
import torch.distributed as dist

from ..checks import bad_labels, bad_loss_weights
from ..config import LOSS_FIELDS, NTLConfig
from ..numbers import VocabShard

if TYPE_CHECKING:
    from .statistics import OpSpec

# per rank, in the MAX all-reduce: its vocab slice (start, end), non-finite count, shard error,
# its local verdict (LOCAL_PROBLEMS bits), and what must be identical on every rank of the
# group: the check mode, token count, a fingerprint of the options and number vocabulary, the
# labels
HEADER_SLOTS = 9
(_START, _END, _NONFINITE, _SHARD_ERROR, _VERDICT, _MODE, _TOKENS, _OPTIONS,
 _LABELS) = range(HEADER_SLOTS)
# a rank's local verdict: bit -> what failed (on that rank only, or the ranks would all have
# raised already). Bits 0 and 1 are computed on the device (no host sync)
LOCAL_PROBLEMS = ("a label id outside the vocabulary (and not ignore_index)",
                  "loss_weights negative or not finite",
                  "its arguments (a shape, dtype or number range: the exception that rank "
                  "raised before the op is this error's cause there)")
BAD_LABEL, BAD_WEIGHTS, BAD_INPUT = (float(1 << bit) for bit in range(len(LOCAL_PROBLEMS)))
_FP32_EXACT = float(1 << 24)
_FINGERPRINT_MASK = (1 << 24) - 1  # fingerprints are 24-bit integers: exact in fp32


@functools.lru_cache(maxsize=256)
def _options_fingerprint(options: tuple, vocab_fingerprint: int) -> float:
    return float(zlib.crc32(repr((options, vocab_fingerprint)).encode()) & _FINGERPRINT_MASK)


def options_fingerprint(config: NTLConfig, vocab) -> float:
    """A 24-bit fingerprint (exact in fp32) of the options that change the loss and of the
    number vocabulary (size, number ids, values): equal on every rank that computes the same
    loss."""
    options = tuple((name, getattr(config, name)) for name in LOSS_FIELDS)
    return _options_fingerprint(options, vocab.fingerprint)


def labels_fingerprint(labels1d: torch.Tensor) -> torch.Tensor:
    """``sum(labels * (position + 1))`` in int64 (wrapping identically everywhere), its low 24
    bits as a 0-dim float: any changed, added, missing or swapped label changes it. On the
    labels' device: no host sync."""
    positions = torch.arange(1, labels1d.numel() + 1, device=labels1d.device)
    return ((labels1d.long() * positions).sum() & _FINGERPRINT_MASK).float()


# ---------------------------------------------------------------------- the shard header
def build_header(shard: VocabShard, nonfinite: Optional[torch.Tensor], tokens: int, spec: OpSpec,
            labels_fp: Optional[torch.Tensor], device) -> torch.Tensor:
    """This rank's row of the header (other rows -1, so the MAX all-reduce assembles it)."""
    header = torch.full((shard.group_size, HEADER_SLOTS), -1.0, device=device)
    row = header[shard.rank]
    # fill_ / copy_ are device kernels; `row[i] = number` would be a blocking host-to-device copy
    for slot, value in ((_START, shard.start), (_END, shard.end),
                        (_SHARD_ERROR, 0.0 if shard.fits else 1.0), (_MODE, spec.mode),
                        (_TOKENS, min(tokens, _FP32_EXACT)), (_OPTIONS, spec.fingerprint)):
        row[slot].fill_(value)
    for slot, value in ((_NONFINITE, nonfinite), (_LABELS, labels_fp), (_VERDICT, spec.verdict)):
        row[slot].fill_(0.0) if value is None else row[slot].copy_(value.clamp(max=_FP32_EXACT))
    return header


def local_verdict(labels: torch.Tensor, loss_weights: Optional[torch.Tensor], vocab_size: int,
                  ignore_index: int) -> torch.Tensor:
    """This rank's verdict on its input values (a 0-dim float of LOCAL_PROBLEMS bits, on the
    device: no host sync), carried in the header instead of raising on this rank alone."""
    verdict = bad_labels(labels, vocab_size, ignore_index).any().float() * BAD_LABEL
    if loss_weights is not None:
        verdict = verdict + bad_loss_weights(loss_weights).any().float() * BAD_WEIGHTS
    return verdict


def fail_together(shard: VocabShard, tokens: int, spec: OpSpec, problem: Exception) -> None:
    """For a rank whose inputs failed a check before the op (``problem``): join the op's first
    collective (the same size: ``tokens`` from the labels, which every rank shares) with the
    verdict in its header, so that every rank of the group raises the same error after it
    instead of the others waiting for this one. Raises that error, with ``problem`` as its
    cause."""
    device = shard.values.device
    spec = dataclasses.replace(spec, verdict=torch.full((), BAD_INPUT, device=device))
    header = build_header(shard, None, tokens, spec, torch.zeros((), device=device), device)
    maxed = torch.cat([torch.full((3 * tokens,), float("-inf"), device=device),
                       header.reshape(-1)])
    dist.all_reduce(maxed, op=dist.ReduceOp.MAX, group=shard.group)
    try:
        check_header(maxed[3 * tokens:].view(shard.group_size, HEADER_SLOTS), shard, spec)
    except (RuntimeError, ValueError) as shared:
        raise shared from problem
    raise problem  # not reached: the header carries this rank's verdict


_MODE_MESSAGE = ("tensor-parallel ranks use different check modes (ntl.check_inputs / "
                 "ntl.check_finite differ between the ranks): every rank of the group must "
                 "use the same ntl options")


def _verdict_message(problem: str, ranks=None) -> str:
    who = "a tensor-parallel rank" if ranks is None else f"tensor-parallel rank(s) {ranks}"
    return (f"{who} failed its local input check: {problem}. Every rank of the group raises "
            "this error; the other ranks' inputs may be fine")


def _device_checks(header: torch.Tensor, shard: VocabShard) -> None:
    """The header's checks as device-side asserts (no host sync), most specific first; every
    rank sees the same header, so all raise the same message."""
    verdict = header[:, _VERDICT].clamp_min(0)
    for bit, problem in enumerate(LOCAL_PROBLEMS):
        torch._assert_async(~(torch.floor(verdict / (1 << bit)) % 2 == 1).any(),
                            _verdict_message(problem) + " (set ntl.check_inputs for the rank)")
    starts, ends = header[:, _START], header[:, _END]
    same = header[:, _TOKENS:] == header[:1, _TOKENS:]
    ok = ((header[:, _SHARD_ERROR] == 0).all() & (starts[0] == 0)
          & (ends[-1] == shard.vocab_size) & (ends[:-1] == starts[1:]).all() & same.all())
    torch._assert_async(ok, "tensor-parallel vocab shards are inconsistent: a rank's logits "
                            "do not fit its vocab slice, the slices do not partition the "
                            "vocab in rank order, or the ranks got different labels, token "
                            "counts, NTL options or number vocabularies (set "
                            "ntl.check_inputs for the details)")


def check_header(header: torch.Tensor, shard: VocabShard, spec: OpSpec) -> None:
    """Every rank sees the same header after the MAX all-reduce, so all raise together. The
    check mode is compared first, the same way on every rank (a device-side assert); then by
    default the checks are device-side asserts (no host sync), and with ``read_header`` the
    header is read on the host to name the rank and the problem."""
    if shard.parallel:
        torch._assert_async((header[:, _MODE] == header[0, _MODE]).all(), _MODE_MESSAGE)
    if spec.read_header:
        _raise_on_bad_header(header.tolist(), shard.vocab_size)
    elif shard.parallel:
        _device_checks(header, shard)


def _raise_on_bad_header(rows, vocab_size: int) -> None:
    for bit, problem in enumerate(LOCAL_PROBLEMS):
        ranks = [r for r, row in enumerate(rows) if int(max(row[_VERDICT], 0)) >> bit & 1]
        if ranks:
            raise ValueError(_verdict_message(problem, ranks))
    for r, row in enumerate(rows):
        if row[_SHARD_ERROR] == 1.0:
            raise ValueError(f"tensor-parallel rank {r}: its logits shard does not fit the vocab "
                             f"slice [{int(row[_START])}, {int(row[_END])}) of a {vocab_size}-token "
                             "vocab")
    bounds = [(int(row[_START]), int(row[_END])) for row in rows]
    if bounds[0][0] != 0 or bounds[-1][1] != vocab_size or any(
            a[1] != b[0] for a, b in zip(bounds, bounds[1:])):
        raise ValueError(f"vocab shards {bounds} do not partition [0, {vocab_size}) in rank order")
    for slot, what in ((_TOKENS, "token counts"),
                       (_OPTIONS, "NTL options or number vocabularies (fingerprints)"),
                       (_LABELS, "labels (fingerprints)")):
        values = {r: int(row[slot]) for r, row in enumerate(rows)}
        if len(set(values.values())) > 1:
            raise ValueError(f"tensor-parallel ranks disagree on their {what}: {values} per "
                             "rank; every rank of the group must get the same batch (labels) "
                             "and the same ntl options and number vocabulary")
    bad = {r: int(row[_NONFINITE]) for r, row in enumerate(rows) if row[_NONFINITE] > 0}
    if bad:
        raise ValueError(f"logits contain {sum(bad.values())} non-finite values "
                         f"(per tensor-parallel rank: {bad})")
