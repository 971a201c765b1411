"""Packed low-bit checkpoints."""

from ptq.export.checkpoint import load_quantized, save_quantized

__all__ = ["load_quantized", "save_quantized"]
