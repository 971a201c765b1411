"""ptq: post-training and zero-shot quantization of pretrained timm image models.

model, data_config = ptq.load_model("tf_efficientnet_lite0")
qmodel = ptq.calibrate(ptq.prepare(model, ptq.QuantConfig(w_bits=4, a_bits=8)), batches, config)
ptq.load_quantized("runs/lite0-w4a8")  # a folder written by `ptq quantize`
"""

from ptq.config import QuantConfig, Recipe, load_recipe
from ptq.export import load_quantized, save_quantized
from ptq.models import load_model
from ptq.quant import calibrate, prepare, set_quant_state

__version__ = "0.1.0"
__all__ = [
    "QuantConfig",
    "Recipe",
    "calibrate",
    "load_model",
    "load_quantized",
    "load_recipe",
    "prepare",
    "save_quantized",
    "set_quant_state",
]
