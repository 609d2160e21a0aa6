"""The scale run's model (benchmarks/_vocab_blocks.py): a tied embedding held as row-block
parameters is the same model as one matrix -- equal loss and gradients on a tiny Llama (the
plain HF model is the reference)."""
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

from _vocab_blocks import block_rows, check_equivalence  # noqa: E402


def test_row_blocks_cover_the_vocabulary():
    for vocab, blocks in ((128256, 16), (103, 5), (7, 7)):
        rows = block_rows(vocab, blocks)
        assert len(rows) == blocks and sum(rows) == vocab and min(rows) > 0


def test_row_blocks_equal_one_matrix():
    for blocks in (1, 5):
        assert check_equivalence(blocks=blocks) > 0
