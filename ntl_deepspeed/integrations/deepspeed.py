"""The ``"ntl"`` section of a DeepSpeed config, validated like DeepSpeed's own sections."""
from __future__ import annotations

from typing import Any, Dict, Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from ..config import NTLConfig


class NTLSection(BaseModel):
    """``"ntl": {...}`` in a ds_config JSON. Unknown keys are errors."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    enabled: bool = True
    weight: float = Field(0.3, ge=0, allow_inf_nan=False, description="lambda in CE + lambda*NTL")
    kind: Literal["was", "mse", "l1", "huber", "number_level"] = "was"
    mode: Literal["digits", "integers", "floats"] = "digits"
    reweigh: bool = False
    squash_factor: Optional[float] = Field(None, gt=1)
    normalization: Literal["micro_batch", "global", "token"] = "micro_batch"
    ignore_index: int = -100
    float_level: bool = False
    log_metrics: bool = True
    check_finite: bool = False
    fused_head: bool = Field(False, description="lm_head + loss without materialised logits")
    fused_block_size: int = Field(1024, ge=1, description="vocab columns per fused-head block")
    fused_token_chunk: int = Field(2048, ge=1, description="tokens per fused-head chunk")

    @field_validator("squash_factor")
    @classmethod
    def _squash_only_for_was(cls, v, info):
        if v is not None and info.data.get("kind", "was") != "was":
            raise ValueError("squash_factor applies to kind 'was' only")
        return v

    def to_ntl_config(self) -> NTLConfig:
        return NTLConfig(kind=self.kind, weight=self.weight, reweigh=self.reweigh,
                         squash_factor=self.squash_factor, normalization=self.normalization,
                         ignore_index=self.ignore_index, float_level=self.float_level,
                         enabled=self.enabled)


def parse_ntl_section(ds_config: Dict[str, Any]) -> NTLSection:
    """Validate ``ds_config["ntl"]`` (absent: NTL disabled). Errors name the offending key."""
    raw = ds_config.get("ntl")
    if raw is None:
        return NTLSection(enabled=False)
    if not isinstance(raw, dict):
        raise ValueError(f'ds_config "ntl" must be an object, got {type(raw).__name__}')
    try:
        section = NTLSection(**raw)
    except ValidationError as e:
        problems = "; ".join(f'ntl.{".".join(map(str, err["loc"])) or "?"}: {err["msg"]}'
                             for err in e.errors())
        raise ValueError(f'invalid "ntl" section in the DeepSpeed config: {problems}') from None
    return section


def split_ds_config(ds_config: Dict[str, Any]):
    """(DeepSpeed's own config without "ntl", the parsed NTL section)."""
    section = parse_ntl_section(ds_config)
    return {k: v for k, v in ds_config.items() if k != "ntl"}, section
