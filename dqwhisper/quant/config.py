"""Quantization settings (config group `quant/`). Owned by the quantization package; the trainer only passes it on."""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class WeightQuantConfig:
    bits: int = 8  # 2..8
    symmetric: bool = True  # symmetric (zero point 0) or asymmetric
    granularity: str = "per_channel"  # per_tensor | per_channel | per_group
    group_size: int = 64  # with per_group: input columns sharing one scale
    lsq: bool = False  # learnable step size (LSQ) instead of a min/max scale


@dataclass
class ActivationQuantConfig:
    enabled: bool = False  # 8-bit per-token dynamic activation fake quantization on quantized linears
    bits: int = 8


@dataclass
class QuantConfig:
    enabled: bool = False
    scope: str = "decoder"  # decoder (the paper) | encoder | all
    include: list[str] = field(default_factory=list)  # regexes on module names, narrowing the scope
    exclude: list[str] = field(default_factory=list)  # regexes on module names to leave in float
    embedding: bool = True  # quantize the token embedding (and so the tied output projection)
    weight: WeightQuantConfig = field(default_factory=WeightQuantConfig)
    activation: ActivationQuantConfig = field(default_factory=ActivationQuantConfig)
    ptq: bool = False  # post-training quantization of a float student: quantize, no training
