"""Quantization: fake quantizers and modules (QAT), prepare/convert, the packed export file and its loader."""

from dqwhisper.quant.config import ActivationQuantConfig, QuantConfig, WeightQuantConfig, resolve_config
from dqwhisper.quant.fake_quant import (
    ActivationFakeQuantizer,
    FakeQuantizedConv1d,
    FakeQuantizedEmbedding,
    FakeQuantizedLinear,
    QuantSpec,
    WeightFakeQuantizer,
)
from dqwhisper.quant.prepare import convert, prepare, quantized_modules, select_modules
from dqwhisper.quant.quantized import QuantizedConv1d, QuantizedEmbedding, QuantizedLinear, QuantizedTensor

__all__ = [
    "QuantConfig",
    "WeightQuantConfig",
    "ActivationQuantConfig",
    "resolve_config",
    "QuantSpec",
    "WeightFakeQuantizer",
    "ActivationFakeQuantizer",
    "FakeQuantizedLinear",
    "FakeQuantizedConv1d",
    "FakeQuantizedEmbedding",
    "prepare",
    "convert",
    "select_modules",
    "quantized_modules",
    "QuantizedTensor",
    "QuantizedLinear",
    "QuantizedConv1d",
    "QuantizedEmbedding",
]
