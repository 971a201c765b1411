"""ptq: post-training and zero-shot quantization of pretrained timm image models.

    import ptq
    qmodel = ptq.quantize("tf_efficientnet_lite0", calib="zero-shot", w_bits=4, a_bits=8)
    qmodel.save("runs/lite0-w4a8")
    ptq.evaluate(["tf_efficientnet_lite0", ptq.load_quantized("runs/lite0-w4a8")], "data/samples")

The verbs (`quantize`, `synthesize`, `sensitivity`, `evaluate`, `load_quantized`) are what the `ptq` command
runs; the stages they are made of (`prepare`, `calibrate`, ...) stay importable for custom pipelines.
"""

from ptq.api import QuantizedModel, Result, evaluate, load_quantized, quantize, sensitivity, synthesize
from ptq.config import ConfigError, QuantConfig, Recipe, keyword_names, load_recipe
from ptq.errors import PtqError
from ptq.export import save_quantized
from ptq.models import load_model
from ptq.quant import calibrate, prepare, set_quant_state
from ptq.report import Report

__version__ = "0.1.0"
__all__ = [
    "ConfigError",
    "PtqError",
    "QuantConfig",
    "QuantizedModel",
    "Recipe",
    "Report",
    "Result",
    "calibrate",
    "evaluate",
    "keyword_names",
    "load_model",
    "load_quantized",
    "load_recipe",
    "prepare",
    "quantize",
    "save_quantized",
    "sensitivity",
    "set_quant_state",
    "synthesize",
]
