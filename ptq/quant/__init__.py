"""Quantizers, quantized modules and turning a model into a quantized one."""

from ptq.quant.calibrate import calibrate
from ptq.quant.modules import ActQuantizer, OutputQuant, QuantLayer, WeightQuantizer, set_quant_state
from ptq.quant.prepare import layer_bits, prepare

__all__ = [
    "ActQuantizer",
    "OutputQuant",
    "QuantLayer",
    "WeightQuantizer",
    "calibrate",
    "layer_bits",
    "prepare",
    "set_quant_state",
]
