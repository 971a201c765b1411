"""Packed low-bit checkpoints: `save_quantized(model, folder, ...)` and `load_quantized(folder)`.

`model.safetensors` holds, for every quantized layer `L`, the integer weight codes packed into bytes
(`L.layer.weight.packed`, uint8), the per-channel `L.weight_quantizer.scale` (fp32) and `zero_point` (uint8); every
other tensor (biases, activation ranges, BatchNorms that could not be folded) stays FP32. `quant_config.json` holds
what is needed to rebuild the model: format version, timm model name and head shape, data config, quantization
config (bit convention included) and per-layer bits and shapes. Loading re-creates the architecture with timm,
prepares it with the same config and dequantizes the codes; its outputs are identical to the saved model's.
"""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path
from typing import Any

import timm
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from ptq._io import atomic_path, write_json
from ptq.config import ConfigError, QuantConfig, build_config, to_plain
from ptq.errors import PtqError
from ptq.export.packing import pack, packed_size, unpack
from ptq.quant.functional import channel_view, dequantize_codes, quantize_codes
from ptq.quant.modules import Quantizer, quant_layers
from ptq.quant.prepare import layer_bits, prepare

FORMAT_VERSION = 1
WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "quant_config.json"
PACKED = ".packed"


class CheckpointError(PtqError, RuntimeError):
    """A quantized checkpoint folder is missing, corrupt or from an incompatible version."""


def _packed_layers(model: nn.Module) -> dict[str, Any]:
    return {
        name: layer
        for name, layer in quant_layers(model).items()
        if layer.weight_quantizer.enabled and layer.weight_quantizer.calibrated
    }


def quantized_state(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, dict[str, Any]]]:
    """The tensors to store (packed codes for quantized weights) and per-layer packing metadata."""
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    layers = {}
    for name, layer in _packed_layers(model).items():
        q = layer.weight_quantizer
        w = layer.weight.detach().cpu()
        s, z = channel_view(q.scale.cpu(), w.ndim), channel_view(q.zero_point.cpu(), w.ndim)
        codes = quantize_codes(w, s, z, q.bits)
        del state[f"{name}.layer.weight"]
        state[f"{name}.layer.weight{PACKED}"] = pack(codes, q.bits)
        state[f"{name}.weight_quantizer.zero_point"] = q.zero_point.detach().cpu().to(torch.uint8)
        layers[name] = {"bits": q.bits, "shape": list(w.shape)}
    return state, layers


def packed_bytes(model: nn.Module) -> int:
    """Bytes of the tensors `save_quantized` would store (the file adds a small header)."""
    state, _ = quantized_state(model)
    return sum(t.numel() * t.element_size() for t in state.values())


def _quantizer_states(model: nn.Module) -> dict[str, dict[str, Any]]:
    return {
        name: {"bits": m.bits, "enabled": m.enabled, "calibrated": m.calibrated}
        for name, m in model.named_modules()
        if isinstance(m, Quantizer)
    }


def save_quantized(
    model: nn.Module, folder: str | Path, model_name: str, config: QuantConfig, data_config: dict, **extra: Any
) -> dict[str, Any]:
    """Write `model.safetensors` and `quant_config.json` into `folder`; return the written config."""
    folder = Path(folder)
    state, packed = quantized_state(model)
    example_shape = list(model.ptq_state.example_shape)
    meta = {
        "format_version": FORMAT_VERSION,
        "model": model_name,
        "num_classes": getattr(model, "num_classes", None),
        "example_shape": example_shape,
        "data_config": data_config,
        "quant": to_plain(config.__dict__),
        "bit_convention": config.first_last_bits.value,
        "layers": {name: {**bits, **packed.get(name, {})} for name, bits in layer_bits(model).items()},
        "quantizers": _quantizer_states(model),
        **extra,
    }
    with atomic_path(folder / WEIGHTS_FILE) as tmp:
        save_file(state, str(tmp), metadata={"format": "ptq", "format_version": str(FORMAT_VERSION)})
    write_json(folder / CONFIG_FILE, meta)
    return meta


def read_quant_config(folder: str | Path) -> dict[str, Any]:
    folder = Path(folder)
    path = folder / CONFIG_FILE
    if not folder.is_dir():
        raise CheckpointError(f"{folder} is not a quantized model folder (made by `ptq quantize --out`)")
    if not path.is_file() or not (folder / WEIGHTS_FILE).is_file():
        raise CheckpointError(
            f"{folder} lacks {CONFIG_FILE} or {WEIGHTS_FILE}; point at a folder made by `ptq quantize`"
        )
    try:
        meta = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path} is corrupt ({e.msg}); re-run `ptq quantize`") from None
    if meta.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(
            f"{path} has format version {meta.get('format_version')}; this ptq reads version {FORMAT_VERSION}"
        )
    return meta


def data_config_from(meta: dict[str, Any]) -> dict[str, Any]:
    """The timm data config stored with a checkpoint (JSON lists turned back into tuples)."""
    return {k: tuple(v) if isinstance(v, list) else v for k, v in meta["data_config"].items()}


def load_quantized(
    folder: str | Path, device: torch.device | str = "cpu", architecture: nn.Module | None = None
) -> nn.Module:
    """Rebuild a quantized model saved by `save_quantized`; its outputs equal those of the model that was saved.
    `architecture`: an FP model of the saved architecture (its weights are not used), for models timm cannot
    create by name."""
    folder = Path(folder)
    meta = read_quant_config(folder)
    try:
        config = build_config(QuantConfig, meta["quant"], "quant.")
        kwargs = {"num_classes": meta["num_classes"]} if meta.get("num_classes") is not None else {}
        example = torch.zeros(meta["example_shape"])
        kwargs["in_chans"] = example.shape[1]
        if architecture is not None:
            model = copy.deepcopy(architecture).cpu().eval()
        else:
            model = timm.create_model(meta["model"], pretrained=False, **kwargs)
    except (KeyError, ConfigError, RuntimeError) as e:
        raise CheckpointError(
            f"{folder / CONFIG_FILE} does not describe a model this ptq can build: {e}; for a model timm does not "
            "know, pass the FP model it was made from (ptq.load_quantized(folder, model=...))"
        ) from None
    qmodel = prepare(model, config, example)
    try:
        stored = load_file(str(folder / WEIGHTS_FILE))
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{folder / WEIGHTS_FILE} is corrupt or truncated ({e}); re-run `ptq quantize`") from None
    state = _unpack_state(stored, meta, folder)
    for name, layer in quant_layers(qmodel).items():  # bias correction gave a bias to a layer that had none
        bias = state.get(f"{name}.layer.bias")
        if bias is not None and layer.layer.bias is None and bias.shape == (layer.weight.shape[0],):
            layer.layer.bias = nn.Parameter(torch.zeros_like(bias))
    try:
        result = qmodel.load_state_dict(state, strict=False)
    except RuntimeError:
        raise CheckpointError(
            f"{folder / WEIGHTS_FILE} does not match {meta['model']} as configured (shapes)"
        ) from None
    if result.missing_keys or result.unexpected_keys:
        bad = (result.missing_keys or result.unexpected_keys)[:3]
        raise CheckpointError(f"{folder / WEIGHTS_FILE} does not match {meta['model']} as configured ({bad})")
    quantizers = {n: m for n, m in qmodel.named_modules() if isinstance(m, Quantizer)}
    if set(quantizers) != set(meta["quantizers"]):
        raise CheckpointError(f"{folder / CONFIG_FILE}: quantizer layout does not match {meta['model']}")
    for name, q in quantizers.items():
        saved = meta["quantizers"][name]
        q.bits, q.enabled, q.calibrated = saved["bits"], saved["enabled"], saved["calibrated"]
    qmodel.quant_meta = meta
    return qmodel.eval().to(device)


def _unpack_state(stored: dict[str, torch.Tensor], meta: dict[str, Any], folder: Path) -> dict[str, torch.Tensor]:
    state = dict(stored)
    for name, info in meta["layers"].items():
        key = f"{name}.layer.weight{PACKED}"
        if key not in state:
            continue
        bits, shape = info["bits"], info["shape"]
        numel = math.prod(shape)
        if state[key].numel() != packed_size(numel, bits):
            raise CheckpointError(f"{folder / WEIGHTS_FILE}: {name} holds the wrong number of packed bytes")
        if f"{name}.weight_quantizer.scale" not in state:
            raise CheckpointError(f"{folder / WEIGHTS_FILE}: {name} has packed weights but no scale")
        scale = state[f"{name}.weight_quantizer.scale"]
        zero_point = state[f"{name}.weight_quantizer.zero_point"].float()
        codes = unpack(state.pop(key), bits, numel).reshape(shape)
        ndim = len(shape)
        state[f"{name}.layer.weight"] = dequantize_codes(
            codes, channel_view(scale, ndim), channel_view(zero_point, ndim)
        )
        state[f"{name}.weight_quantizer.zero_point"] = zero_point
    return state


def fp32_weight_bytes(model: nn.Module) -> int:
    """Size of the model's floating-point parameters and buffers stored as FP32 (the reference for size ratios)."""
    return sum(t.numel() * 4 for t in model.state_dict().values() if t.is_floating_point())
