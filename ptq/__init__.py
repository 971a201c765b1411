"""ptq: post-training and zero-shot quantization of pretrained timm image models."""

__version__ = "0.1.0"
