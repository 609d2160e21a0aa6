"""ntl-deepspeed: Number Token Loss as a vocab-parallel, fused CE+NTL op."""
from .config import NTLConfig
from .loss import CENTLOutput, vocab_parallel_ce_ntl
from .numbers import NumberVocab
from .reference import ntl_loss, number_level_loss

__all__ = ["CENTLOutput", "NTLConfig", "NumberVocab", "ntl_loss", "number_level_loss",
           "vocab_parallel_ce_ntl"]
__version__ = "0.1.0"
