"""ntl-deepspeed: Number Token Loss as a vocab-parallel, fused CE+NTL op."""
from .config import NTLConfig
from .loss import CENTLOutput, vocab_parallel_ce_ntl
from .numbers import NumberVocab
from .ops.fused_linear import fused_linear_ce_ntl
from .reference import ntl_loss, number_level_loss

__all__ = ["CENTLOutput", "NTLConfig", "NumberVocab", "fused_linear_ce_ntl", "ntl_loss",
           "number_level_loss", "vocab_parallel_ce_ntl"]
__version__ = "0.1.0"
