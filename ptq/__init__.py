"""ptq: post-training and zero-shot quantization of pretrained timm image models.

    import ptq
    qmodel = ptq.quantize("tf_efficientnet_lite0", calib="zero-shot", w_bits=4, a_bits=8)
    qmodel.save("runs/lite0-w4a8")
    ptq.evaluate(["tf_efficientnet_lite0", ptq.load_quantized("runs/lite0-w4a8")], "data/samples")

The verbs (`quantize`, `synthesize`, `sensitivity`, `evaluate`, `load_quantized`) are what the `ptq` command
runs; the stages they are made of (`prepare`, `calibrate`, ...) stay importable for custom pipelines.
"""

from __future__ import annotations

import importlib
import importlib.util
from typing import TYPE_CHECKING, Any

# Where each public name lives. They are imported on first use, so that `import ptq` and the command line's --help
# do not pay for torch and timm until something needs them.
_EXPORTS = {
    "QuantizedModel": "ptq.api",
    "Result": "ptq.api",
    "evaluate": "ptq.api",
    "load_quantized": "ptq.api",
    "quantize": "ptq.api",
    "sensitivity": "ptq.api",
    "synthesize": "ptq.api",
    "ConfigError": "ptq.config",
    "QuantConfig": "ptq.config",
    "Recipe": "ptq.config",
    "keyword_names": "ptq.config",
    "load_recipe": "ptq.config",
    "PtqError": "ptq.errors",
    "save_quantized": "ptq.export",
    "load_model": "ptq.models",
    "calibrate": "ptq.quant",
    "prepare": "ptq.quant",
    "set_quant_state": "ptq.quant",
    "Report": "ptq.report",
}

if TYPE_CHECKING:
    from ptq.api import QuantizedModel, Result, evaluate, load_quantized, quantize, sensitivity, synthesize
    from ptq.config import ConfigError, QuantConfig, Recipe, keyword_names, load_recipe
    from ptq.errors import PtqError
    from ptq.export import save_quantized
    from ptq.models import load_model
    from ptq.quant import calibrate, prepare, set_quant_state
    from ptq.report import Report


def __getattr__(name: str) -> Any:
    """A public name, imported on first use; or a subpackage (`ptq.quant`, `ptq.recon`, ...), as an eager package
    would have it already."""
    module = _EXPORTS.get(name)
    if module is not None:
        value = getattr(importlib.import_module(module), name)
    elif not name.startswith("__") and importlib.util.find_spec(f"{__name__}.{name}") is not None:
        value = importlib.import_module(f"{__name__}.{name}")
    else:
        raise AttributeError(f"module 'ptq' has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))


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
