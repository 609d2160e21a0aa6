"""ntl-deepspeed: Number Token Loss as a vocab-parallel, fused CE+NTL op."""
from .config import NTLConfig
from .numbers import NumberVocab
from .reference import ntl_loss, number_level_loss

__all__ = ["NTLConfig", "NumberVocab", "ntl_loss", "number_level_loss"]
__version__ = "0.1.0"
