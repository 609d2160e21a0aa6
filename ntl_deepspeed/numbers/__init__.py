"""Which tokens are numbers, their values, and each rank's slice of them (``VocabShard``)."""
from .shard import VocabShard, label_targets, partition_bounds
from .values import token_value
from .vocab import NumberVocab

__all__ = ["label_targets", "NumberVocab", "VocabShard", "partition_bounds", "token_value"]
