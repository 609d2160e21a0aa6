"""Which tokens are numbers, their values, and each rank's slice of them (``VocabShard``)."""
from .vocab import NumberVocab, VocabShard, label_targets, partition_bounds, token_value

__all__ = ["label_targets", "NumberVocab", "VocabShard", "partition_bounds", "token_value"]
