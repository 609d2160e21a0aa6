"""The trainer's data: training micro-batches and this rank's evaluation batches.

Without ``--data``: the embedded generated corpus (:mod:`.corpus`), packed once into a
``[n_blocks, seq_len + 1]`` tensor; micro-batch ``m`` of DP rank ``r`` is blocks
``(m * D + r) * mb ...`` (mod ``n_blocks``), a pure function of the step (so every layout with
the same global batch sees the same rows, and resume needs no data state). With ``--data``:
:class:`~.documents.PackedStream` per DP rank (round-robin documents, streamed), whose position
goes into the checkpoint.

Evaluation (``--eval-fraction F`` or ``--eval-data PATH``): this DP rank's share of the held-out
blocks, at most ``--eval-batches`` micro-batches, built once. The last block of the held-out
text is padded with EOS and its padding carries ``ignore_index`` labels.
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch

from .corpus import generate_split
from .documents import PackedStream, Position, Selection, list_files

EvalBatch = Tuple[torch.Tensor, torch.Tensor]  # (input ids, labels), both [rows, seq_len + 1]


class EmbeddedBlocks:
    """The embedded corpus (see the module docstring)."""

    kind = "embedded"

    def __init__(self, blocks: torch.Tensor, dp_rank: int, dp_size: int, micro_batch: int):
        self.blocks, self.dp_rank, self.dp_size, self.micro_batch = blocks, dp_rank, dp_size, \
            micro_batch

    def batch(self, micro_step: int) -> torch.Tensor:
        first = (micro_step * self.dp_size + self.dp_rank) * self.micro_batch
        idx = torch.arange(first, first + self.micro_batch) % self.blocks.shape[0]
        return self.blocks[idx]

    def state(self) -> Optional[dict]:
        return None  # derived from the step

    def restore(self, state: Optional[dict], micro_steps: int) -> None:
        pass


class StreamedBlocks:
    """``--data``: this DP rank's documents, packed and streamed; read in micro-step order."""

    kind = "streamed"

    def __init__(self, make_stream, micro_batch: int):
        self._make_stream = make_stream  # Position -> PackedStream
        self.stream: PackedStream = make_stream(Position())
        self.micro_batch = micro_batch

    def batch(self, micro_step: int) -> torch.Tensor:
        return torch.tensor([self.stream.next_block() for _ in range(self.micro_batch)])

    def state(self) -> dict:
        return self.stream.state()

    def restore(self, state: Optional[dict], micro_steps: int) -> None:
        """Continue at a saved position (``micro_steps`` micro-batches were trained on)."""
        if state is None:
            raise ValueError("--resume with --data: the checkpoint holds no data position (was "
                             "it written without --data, or by another data-parallel size?)")
        position = Position.from_dict(state)
        if position.blocks != micro_steps * self.micro_batch:
            raise ValueError(f"--resume: the checkpoint's data position has {position.blocks} "
                             f"blocks, its step {micro_steps * self.micro_batch}: a different "
                             f"micro-batch size?")
        self.stream = self._make_stream(position)


def pack(token_lists, eos: int, block_len: int) -> List[List[int]]:
    """Documents (token lists) joined by EOS and cut into blocks; the last one may be short."""
    ids: List[int] = []
    for tokens in token_lists:
        ids.extend(tokens)
        ids.append(eos)
    return [ids[i:i + block_len] for i in range(0, len(ids), block_len)]


def eval_batches(blocks: Sequence[List[int]], micro_batch: int, max_batches: int, pad: int,
                 ignore_index: int) -> List[EvalBatch]:
    """Up to ``max_batches`` batches of ``micro_batch`` blocks (the last batch may be smaller;
    short blocks padded with ``pad``, labelled ``ignore_index``)."""
    blocks = list(blocks)[: max_batches * micro_batch]
    out = []
    for i in range(0, len(blocks), micro_batch):
        rows = blocks[i:i + micro_batch]
        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), pad, dtype=torch.long)
        labels = torch.full((len(rows), width), ignore_index, dtype=torch.long)
        for j, r in enumerate(rows):
            ids[j, :len(r)] = torch.tensor(r)
            labels[j, :len(r)] = torch.tensor(r)
        out.append((ids, labels))
    return out


def _take(stream: PackedStream, n: int) -> List[List[int]]:
    blocks = []
    while len(blocks) < n:
        block = stream.next_block()
        if block is None:
            break
        blocks.append(block)
    return blocks


def build_data(args, tokenizer: str, dp_rank: int, dp_size: int, micro_batch: int,
               ignore_index: int = -100):
    """(training data, this rank's evaluation batches) for the trainer's arguments."""
    from .encode import text_encoder

    encode, eos = text_encoder(tokenizer)
    block_len = args.seq_len + 1
    fraction = args.eval_fraction
    want_eval = args.eval_batches
    n_eval = max(want_eval, 0) * micro_batch
    eval_blocks: List[List[int]] = []
    data = args.data
    if data:
        files = list_files(data, "--data")
        train = StreamedBlocks(lambda position: PackedStream(
            files, encode, eos, block_len, Selection(dp_rank, dp_size, "train", fraction),
            cycle=True, position=position, name="--data"), micro_batch)
        if fraction > 0 and n_eval:
            eval_blocks = _take(PackedStream(files, encode, eos, block_len, Selection(
                dp_rank, dp_size, "eval", fraction), cycle=False, name="--data (held out)"),
                n_eval)
    else:
        sentences, held = generate_split(args.corpus_sentences, args.seed, fraction,
                                         args.eval_split)
        blocks = [b for b in pack((encode(s) for s in sentences), eos, block_len)
                  if len(b) == block_len]
        if not blocks:
            raise ValueError(f"--corpus-sentences {args.corpus_sentences} gives fewer than "
                             f"seq_len + 1 = {block_len} training tokens")
        train = EmbeddedBlocks(torch.tensor(blocks), dp_rank, dp_size, micro_batch)
        if held and n_eval:
            eval_blocks = pack((encode(s) for s in held), eos, block_len)[dp_rank::dp_size]
    eval_data = args.eval_data
    if eval_data and n_eval:
        files = list_files(eval_data, "--eval-data")
        eval_blocks = _take(PackedStream(files, encode, eos, block_len, Selection(
            dp_rank, dp_size, "all"), cycle=False, name="--eval-data"), n_eval)
    return train, eval_batches(eval_blocks, micro_batch, want_eval, eos, ignore_index)
