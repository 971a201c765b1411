"""What ptq knows about the layers of timm (and torch) CNNs, in one place: which modules are nonlinearities,
squeeze-excite gates, BatchNorms, residual blocks, "SAME"-padded convs, and which pass values through unchanged.
Synthesis, quantizer placement, folding, GPTQ, bias correction and reconstruction all read it. Classes a timm
version does not have are simply absent."""

from __future__ import annotations

import importlib

from torch import nn


def timm_classes(module: str, names: tuple[str, ...]) -> tuple[type, ...]:
    """The classes of that name in a timm module (none where this timm version lacks the module or a name)."""
    try:
        mod = importlib.import_module(module)
    except ImportError:
        return ()
    return tuple(getattr(mod, n) for n in names if hasattr(mod, n))


def is_batchnorm(m: nn.Module) -> bool:
    """Any module with BatchNorm running statistics (torch BatchNorm*, timm BatchNormAct2d, frozen variants)."""
    return all(hasattr(m, a) for a in ("running_mean", "running_var", "eps")) and m.running_var is not None


# elementwise nonlinearities: an activation quantizer goes after each (not inside squeeze-excite gates)
NONLINEARITIES = (
    (
        nn.ReLU,
        nn.ReLU6,
        nn.SiLU,
        nn.GELU,
        nn.Hardswish,
        nn.Mish,
        nn.LeakyReLU,
        nn.ELU,
        nn.CELU,
        nn.SELU,
        nn.PReLU,
    )
    + timm_classes(
        "timm.layers.activations", ("Swish", "Mish", "HardSwish", "HardMish", "GELU", "GELUTanh", "QuickGELU", "PReLU")
    )
    + timm_classes("timm.layers.activations_me", ("SwishMe", "MishMe", "HardSwishMe", "HardMishMe"))
)

# squeeze-excite modules: their output (the gated product) is quantized, their gate is not
SQUEEZE_EXCITE = timm_classes("timm.layers.squeeze_excite", ("SEModule", "EffectiveSEModule", "SqueezeExcite")) + (
    timm_classes("timm.models._efficientnet_blocks", ("SqueezeExcite",))
)

# modules whose output lies on the grid of their (quantized) input
GRID_PRESERVING = (nn.Identity, nn.Dropout, nn.MaxPool2d, nn.Flatten, nn.ReLU) + timm_classes(
    "timm.layers", ("DropPath",)
)

# identities at inference, and modules that preserve a per-channel mean (for bias correction from BN statistics)
IDENTITIES = (nn.Identity, nn.Dropout) + timm_classes("timm.layers", ("DropPath", "DropBlock2d"))
MEAN_PRESERVING = (nn.AdaptiveAvgPool2d, nn.AvgPool2d, nn.Flatten) + timm_classes(
    "timm.layers", ("SelectAdaptivePool2d",)
)

# residual blocks reconstructed as one unit (efficientnet-family blocks are recognised by their `has_skip`)
BLOCK_CLASSES = timm_classes("timm.models.resnet", ("BasicBlock", "Bottleneck")) + timm_classes(
    "timm.models.regnet", ("Bottleneck", "PreBottleneck")
)

# timm's conv with TensorFlow-style dynamic "SAME" padding
CONV_SAME = timm_classes("timm.layers.conv2d_same", ("Conv2dSame",))
