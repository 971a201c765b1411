"""One peer toolkit on the same model and images as ptq — runs in the peers' own virtualenv (`run.py` makes it from
`requirements.txt`), never with ptq installed.

    benchmarks/peers/.venv/bin/python benchmarks/peers/peer_rows.py BUNDLE ROW OUT.pt

BUNDLE (written by `run.py`) holds the model name, its weights (timm layout), the calibration images and the
evaluation images, already preprocessed with the model's data config, so every toolkit sees the same tensors. ROW
is one of ROWS below. OUT.pt receives the quantized model's logits on the evaluation images, the wall and process
CPU seconds of the toolkit's own work (from the FP model to the quantized one) and what it was asked to do; run.py
computes the metrics with ptq's own code.

MCT traces models with torch.fx, which fails on timm's dynamic "SAME"-padding convolutions: each is replaced by a
fixed zero padding at the model's input size and a plain convolution (identical outputs, checked).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import timm
import torch
from safetensors.torch import load_file
from torch import nn


def static_same_padding(model: nn.Module, example: torch.Tensor) -> nn.Module:
    """Replace timm's Conv2dSame by ZeroPad2d + Conv2d with the padding it computes for `example`'s size."""
    pads: dict[str, tuple[int, int, int, int]] = {}
    handles = []
    for name, m in model.named_modules():
        if type(m).__name__ == "Conv2dSame":

            def hook(mod, args, name=name):
                ih, iw = args[0].shape[-2:]
                (kh, kw), (sh, sw), (dh, dw) = mod.weight.shape[-2:], mod.stride, mod.dilation
                ph = max((-(ih // -sh) - 1) * sh + (kh - 1) * dh + 1 - ih, 0)
                pw = max((-(iw // -sw) - 1) * sw + (kw - 1) * dw + 1 - iw, 0)
                pads[name] = (pw // 2, pw - pw // 2, ph // 2, ph - ph // 2)

            handles.append(m.register_forward_pre_hook(hook))
    with torch.no_grad():
        reference = model(example)
    for h in handles:
        h.remove()
    for name, pad in pads.items():
        old = model.get_submodule(name)
        conv = nn.Conv2d(old.in_channels, old.out_channels, old.kernel_size, old.stride, 0, old.dilation, old.groups,
                         old.bias is not None)  # fmt: skip
        conv.load_state_dict(old.state_dict())
        parent_name, _, attr = name.rpartition(".")
        setattr(
            model.get_submodule(parent_name) if parent_name else model, attr, nn.Sequential(nn.ZeroPad2d(pad), conv)
        )
    with torch.no_grad():
        assert torch.allclose(model(example), reference, atol=1e-5), "fixed padding changed the outputs"
    return model


def load(bundle: dict) -> nn.Module:
    model = timm.create_model(bundle["model"], pretrained=False, num_classes=bundle["num_classes"])
    model.load_state_dict(load_file(bundle["weights"]))
    return model.eval()


def batches(x: torch.Tensor, size: int = 32):
    def gen():
        for i in range(0, len(x), size):
            yield [x[i : i + size]]

    return gen


def _mct_tpc(w_bits: int, a_bits: int):
    """MCT's default (IMX500 v1) platform with every conv/linear kernel at `w_bits` and activations at `a_bits`."""
    from model_compression_toolkit.target_platform_capabilities.constants import KERNEL_ATTR, WEIGHTS_N_BITS
    from model_compression_toolkit.target_platform_capabilities.tpc_models.imx500_tpc.v1_0 import tpc as imx500

    linear, _, default = imx500.get_op_quantization_configs()
    linear = linear.clone_and_edit(attr_to_edit={KERNEL_ATTR: {WEIGHTS_N_BITS: w_bits}})
    if a_bits != 8:
        linear = linear.clone_and_edit(activation_n_bits=a_bits, supported_input_activation_n_bits=(a_bits,))
        default = default.clone_and_edit(activation_n_bits=a_bits, supported_input_activation_n_bits=(a_bits,))
    return imx500.generate_tpc(default_config=default, base_config=linear, mixed_precision_cfg_list=[linear],
                               name=f"w{w_bits}a{a_bits}")  # fmt: skip


def mct_ptq(model, calib, bundle, w_bits, a_bits, images=None):
    import model_compression_toolkit as mct

    tpc = _mct_tpc(w_bits, a_bits)
    return mct.ptq.pytorch_post_training_quantization(model, batches(calib), target_platform_capabilities=tpc)[0]


def mct_gptq(model, calib, bundle, w_bits, a_bits, epochs, hessian=True):
    import model_compression_toolkit as mct

    # MCT's Hessian-based loss weights take ~35 minutes of 2-core CPU on lite0 before any training: optional here
    config = mct.gptq.get_pytorch_gptq_config(
        n_epochs=epochs, use_hessian_based_weights=hessian, use_hessian_sample_attention=hessian
    )
    return mct.gptq.pytorch_gradient_post_training_quantization(
        model, batches(calib), gptq_config=config, target_platform_capabilities=_mct_tpc(w_bits, a_bits)
    )[0]


def mct_mixed(model, calib, bundle, weight_bytes):
    """MCT's mixed precision (its default platform: 2, 4 or 8 bits per kernel, activations 8) under a weight-memory
    budget in bytes."""
    import model_compression_toolkit as mct

    config = mct.core.CoreConfig(
        mixed_precision_config=mct.core.MixedPrecisionQuantizationConfig(num_of_images=min(len(calib), 32))
    )
    target = mct.core.ResourceUtilization(weights_memory=weight_bytes)
    return mct.ptq.pytorch_post_training_quantization(
        model, batches(calib), target_resource_utilization=target, core_config=config
    )[0]


def mct_data(model, bundle, images, iters):
    """MCT's own zero-shot data generation (its defaults, fewer iterations to fit a CPU budget)."""
    import model_compression_toolkit as mct

    config = mct.data_generation.get_pytorch_data_generation_config(n_iter=iters, data_gen_batch_size=32)
    size = tuple(bundle["input_size"][1:])
    generated = mct.data_generation.pytorch_data_generation_experimental(model, images, size, config)
    return torch.cat([g.cpu() for g in generated]) if isinstance(generated, list) else generated


def nncf_w8a8(model, calib, bundle):
    import nncf

    dataset = nncf.Dataset([calib[i : i + 32] for i in range(0, len(calib), 32)])
    return nncf.quantize(model, dataset, subset_size=len(calib))


def ort_w8a8(model, calib, bundle, work: Path):
    """onnxruntime's static QDQ quantization (per-channel int8 weights, uint8 activations) of the FP ONNX export."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    fp_path, q_path = work / "fp.onnx", work / "ort_w8a8.onnx"
    torch.onnx.export(model, calib[:1], str(fp_path), input_names=["x"], output_names=["y"],
                      dynamic_axes={"x": {0: "n"}, "y": {0: "n"}}, dynamo=False)  # fmt: skip

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.items = iter([{"x": calib[i : i + 1].numpy()} for i in range(len(calib))])

        def get_next(self):
            return next(self.items, None)

    quantize_static(str(fp_path), str(q_path), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                    weight_type=QuantType.QInt8, activation_type=QuantType.QUInt8)  # fmt: skip
    return q_path


def logits_of(model, x: torch.Tensor) -> torch.Tensor:
    if isinstance(model, Path):
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = torch.get_num_threads()
        session = ort.InferenceSession(str(model), options, providers=["CPUExecutionProvider"])
        return torch.cat([torch.from_numpy(session.run(None, {"x": x[i : i + 32].numpy()})[0])
                          for i in range(0, len(x), 32)])  # fmt: skip
    model.eval()
    with torch.no_grad():
        return torch.cat([model(x[i : i + 32]).float() for i in range(0, len(x), 32)])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("bundle")
    parser.add_argument("row")
    parser.add_argument("out")
    args = parser.parse_args()
    bundle = torch.load(args.bundle, weights_only=False)
    kind, _, spec = args.row.partition(":")
    params = dict(p.split("=") for p in spec.split(",") if p)
    num = {k: int(v) for k, v in params.items() if v.isdigit()}
    calib = bundle["synthetic"] if params.get("calib") == "synthetic" else bundle["calib"]
    model = load(bundle)
    example = bundle["eval"][:1]
    if kind.startswith("mct"):
        model = static_same_padding(model, example)
    wall, cpu = time.perf_counter(), time.process_time()
    info = {}
    if kind == "mct-ptq":
        quantized = mct_ptq(model, calib, bundle, num["w"], num["a"])
    elif kind == "mct-gptq":
        quantized = mct_gptq(model, calib, bundle, num["w"], num["a"], num["epochs"], bool(num.get("hessian", 1)))
    elif kind == "mct-mixed":
        quantized = mct_mixed(model, calib, bundle, num["bytes"])
    elif kind == "mct-zero-shot":
        data = mct_data(model, bundle, num["images"], num["iters"])
        info["data_seconds"] = round(time.perf_counter() - wall, 1)
        quantized = mct_ptq(model, data, bundle, num["w"], num["a"])
    elif kind == "nncf":
        quantized = nncf_w8a8(model, calib, bundle)
    elif kind == "ort":
        quantized = ort_w8a8(model, calib, bundle, Path(args.out).parent)
    else:
        raise SystemExit(f"unknown row {args.row}")
    info.update(seconds=round(time.perf_counter() - wall, 1), cpu_seconds=round(time.process_time() - cpu, 1))
    logits = logits_of(quantized, bundle["eval"])
    torch.save({"row": args.row, "logits": logits, **info}, args.out)
    print(f"{args.row}: {info}")


if __name__ == "__main__":
    main()
