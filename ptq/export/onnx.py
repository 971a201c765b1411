"""Export a quantized model to ONNX in QDQ form, as onnxruntime, TensorRT and OpenVINO consume it; verify it.

`export_onnx(folder, out, ...)` reloads a `ptq quantize` output folder and writes `model.onnx`:

- every enabled activation quantizer becomes QuantizeLinear → DequantizeLinear with its per-tensor step and zero
  point (uint8: ptq's grid is {0, …, 2^b−1}). Below 8 bits the tensor is first clipped to the b-bit grid's range,
  so the 8-bit pair lands exactly on the b-bit grid: the graph computes what ptq's model computes, and a runtime
  can still fuse the pair into its 8-bit kernels where the clip is redundant (never below 8 bits);
- every quantized weight is stored as integer codes feeding a per-output-channel DequantizeLinear (axis 0):
  unsigned codes q with ptq's zero points z, or signed codes q − 2^(b−1) with zero point 0 on symmetric grids
  (what the fast int8 kernels and TensorRT want; `codes`). Weights of ≤ 4 bits are UINT4/INT4 initializers at
  opset ≥ 21 (two per byte: the file really is smaller), UINT8/INT8 otherwise; no float copy of a quantized weight
  stays in the file. Biases stay FP32 (or int32 after the layer: see `_Layer`);
- folded BatchNorm, timm's "SAME" padding, squeeze-excite and the activations export as plain ONNX ops.

The graph is made by `torch.onnx.export(dynamo=True)` (torch.export, the exporter PyTorch maintains): the
quantizers are two custom ops whose translations write the QDQ nodes, so no pattern matching of traced arithmetic
is needed. The model's timm data config and quantization settings ride along in the ONNX metadata, so
`ptq evaluate model.onnx` preprocesses its images as the checkpoint does.

Verification (`verify`) runs the file in onnxruntime on a few inputs and compares it with ptq's PyTorch model.
The two cannot be bit-identical: an int8 runtime accumulates in int32 and adds the bias at its own step, float
kernels sum in another order (onnxruntime's SiLU is an approximation), so a value that lies within float rounding
of a quantizer's rounding tie lands on the other grid point. In a deep network each such flip changes many values
in the next layers, which flip further: on tf_efficientnet_lite0 W8A8, 1e-5 of the first quantizer's values differ
and 40% of the tenth's, and the two models' logits differ by 25-30 dB of SQNR, about as much as the activation
quantization noise itself. So the file passes when its logits match ptq's to MATCH_SQNR_DB, or else when it is as
faithful as ptq's model to the same network with FP activations (logit SQNR within FIDELITY_MARGIN_DB): measured
within 0.3 dB for every model tried, while one wrong scale costs several dB. On failure the first quantized
activation that diverges (on more than DIVERGED_FRACTION of its values) is named.
"""

from __future__ import annotations

import copy
import json
import math
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from ptq._io import atomic_path
from ptq.errors import PtqError
from ptq.quant.functional import channel_view, quantize_codes, sqnr_db
from ptq.quant.modules import ActQuantizer, OutputQuant, Quantizer, QuantLayer, quant_layers

ONNX_EXTRA = "pip install 'ptq[onnx]' (onnx, onnxruntime, onnxscript)"
DEFAULT_OPSET = 21  # the first with INT4/UINT4 initializers and QuantizeLinear/DequantizeLinear types
MIN_OPSET = 18  # the lowest the exporter writes (it converts lower ones, not always successfully)
MATCH_SQNR_DB = 30.0  # logit SQNR between ONNX and ptq at which the two simply agree
FIDELITY_MARGIN_DB = 1.0  # otherwise: the ONNX model must be as faithful as ptq's, within this margin
BIAS_ROUNDING = 1 / 4  # of the output step: see `_Layer`
DIVERGED_FRACTION = 0.01
INT4_MIN_OPSET = 21
META_KEY = "ptq"  # metadata_props key holding the JSON below
EXTERNAL_DATA_BYTES = 2_000_000_000  # protobuf's 2 GB limit: beyond it the initializers go to model.onnx.data


class ExportError(PtqError, RuntimeError):
    """The model cannot be exported or the exported file does not compute what ptq computes."""


def _require_onnx():
    try:
        import onnx
        import onnxruntime
        import onnxscript  # noqa: F401 - the exporter needs it
    except ImportError as e:
        raise ExportError(f"ONNX export needs the onnx extra ({e.name} is missing): {ONNX_EXTRA}") from None
    return onnx, onnxruntime


# ---------------------------------------------------------------------------------------------------------------
# The two quantizer ops: PyTorch semantics for tracing and checking, ONNX translations for the file.


@torch.library.custom_op("ptq_export::act_qdq", mutates_args=())
def act_qdq(x: torch.Tensor, scale: float, zero_point: int, bits: int, signed: bool) -> torch.Tensor:
    """ptq's activation fake quantization with a fixed step and (unsigned-grid) zero point."""
    return (torch.clamp(torch.round(x / scale) + zero_point, 0, 2**bits - 1) - zero_point) * scale


@act_qdq.register_fake
def _(x, scale, zero_point, bits, signed):
    return torch.empty_like(x)


@torch.library.custom_op("ptq_export::weight_dq", mutates_args=())
def weight_dq(codes: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor) -> torch.Tensor:
    """Integer codes → FP32 weight, per output channel (axis 0)."""
    return (codes.float() - channel_view(zero_point.float(), codes.ndim)) * channel_view(scale, codes.ndim)


@weight_dq.register_fake
def _(codes, scale, zero_point):
    return torch.empty(codes.shape, dtype=torch.float32, device=codes.device)


@torch.library.custom_op("ptq_export::bias_dq", mutates_args=())
def bias_dq(codes: torch.Tensor, scale: float) -> torch.Tensor:
    """int32 codes → FP32 bias (a step of max|b| / 2^30: exact to FP32 rounding)."""
    return codes.double().mul(scale).float()


@bias_dq.register_fake
def _(codes, scale):
    return torch.empty(codes.shape, dtype=torch.float32, device=codes.device)


def _translations(opset: int) -> dict:
    import onnx_ir as ir
    from onnxscript import opset18, opset21

    op = opset21 if opset >= 21 else opset18

    def const(value, dtype):
        return op.Constant(value=ir.tensor(np.array(value, dtype=dtype)))

    def act_qdq_onnx(x, scale: float, zero_point: int, bits: int, signed: bool):
        s = const(scale, np.float32)
        z = const(zero_point - 2 ** (bits - 1), np.int8) if signed else const(zero_point, np.uint8)
        if bits < 8:  # onto the b-bit grid's range first: the uint8 pair then lands on the b-bit grid
            x = op.Clip(
                x, const(-zero_point * scale, np.float32), const((2**bits - 1 - zero_point) * scale, np.float32)
            )
        return op.DequantizeLinear(op.QuantizeLinear(x, s, z), s, z)

    def weight_dq_onnx(codes, scale, zero_point):
        return op.DequantizeLinear(codes, scale, zero_point, axis=0)

    def bias_dq_onnx(codes, scale: float):
        return op.DequantizeLinear(codes, const(scale, np.float32))

    return {
        torch.ops.ptq_export.act_qdq.default: act_qdq_onnx,
        torch.ops.ptq_export.weight_dq.default: weight_dq_onnx,
        torch.ops.ptq_export.bias_dq.default: bias_dq_onnx,
    }


# ---------------------------------------------------------------------------------------------------------------
# The export model: ptq's quantized model with its quantizers replaced by the two ops.


class _Act(nn.Module):
    """An activation quantizer as a QDQ pair: uint8, or with `signed` int8 where its grid is symmetric."""

    def __init__(self, quantizer: ActQuantizer | None, signed: bool):
        super().__init__()
        self.qparams = None
        if quantizer is not None and quantizer.enabled:
            z = int(quantizer.zero_point)
            signed = signed and z == 2 ** (quantizer.bits - 1)
            self.qparams = (float(quantizer.scale), z, quantizer.bits, signed)

    def forward(self, x):
        return x if self.qparams is None else act_qdq(x, *self.qparams)


def _weight_forward(layer: nn.Module, weight_shape: tuple[int, ...]):
    """f(x, weight, bias) computing `layer` with another weight and bias, or None for a layer kind without a known
    form."""
    from timm.layers import Conv2dSame
    from timm.layers import Linear as TimmLinear  # nn.Linear with a cast for TorchScript: the same function
    from timm.layers.padding import pad_same

    kind = type(layer)
    if kind in (nn.Linear, TimmLinear):
        return lambda x, w, b: F.linear(x, w, b)
    if kind is nn.Conv2d:
        return lambda x, w, b: layer._conv_forward(x, w, b)
    if kind is Conv2dSame:
        return lambda x, w, b: F.conv2d(
            pad_same(x, weight_shape[-2:], layer.stride, layer.dilation),
            w,
            b,
            layer.stride,
            (0, 0),
            layer.dilation,
            layer.groups,
        )
    return None


class _Layer(nn.Module):
    """A conv/linear whose weight is DequantizeLinear(integer codes); no float weight is kept. Unsigned: the codes
    q and zero points z of ptq's grid as they are; signed: q − 2^(b−1) and z − 2^(b−1) (0 on symmetric grids)."""

    def __init__(self, name: str, qlayer: QuantLayer, int4: bool, storage: str, steps: tuple[float, float] | None):
        super().__init__()
        q = qlayer.weight_quantizer
        self.input = _Act(qlayer.input_quantizer, storage == "signed")
        self.layer = copy.copy(qlayer.layer)  # shares the bias; its own parameter dict, without the weight
        self.layer._parameters = {k: v for k, v in qlayer.layer._parameters.items() if k != "weight"}
        self.weight_shape = tuple(qlayer.layer.weight.shape)
        self.forward_with = _weight_forward(self.layer, self.weight_shape)
        if self.forward_with is None:
            raise ExportError(
                f"layer {name} ({type(qlayer.layer).__name__}) has no ONNX form in ptq's exporter; replace it by "
                "nn.Conv2d/nn.Linear, or quantize with --set quant.quantize_weights=false to keep FP weights"
            )
        w = qlayer.layer.weight.detach().cpu()
        s, z = q.scale.detach().float().cpu(), q.zero_point.detach().float().cpu()
        codes = quantize_codes(w, channel_view(s, w.ndim), channel_view(z, w.ndim), q.bits)
        offset = 2 ** (q.bits - 1)
        symmetric = bool((z == offset).all())
        # auto: signed where no int8 kernel can overflow (symmetric, ≤ 7 bits: x86 CPUs without VNNI sum pairs of
        # u8·s8 products in int16, which 8-bit weights can saturate), unsigned (exact everywhere) otherwise
        self.signed = storage == "signed" or (storage == "auto" and symmetric and q.bits <= 7)
        if self.signed:
            if not symmetric:
                raise ExportError(
                    f"layer {name} has an asymmetric weight grid; signed weights need symmetric ones: quantize with "
                    "--set quant.w_symmetric=true (and, for TensorRT, --set quant.a_symmetric=true)"
                )
            codes, zero = (codes.to(torch.int16) - offset).to(torch.int8), torch.zeros(len(z), dtype=torch.int8)
        else:
            zero = z.round().to(torch.uint8)
        self.register_buffer("qweight", codes)
        self.register_buffer("qscale", s.clone())
        self.register_buffer("qzero", zero)
        self.int4 = int4 and q.bits <= 4
        # An int8 runtime adds the bias to the integer accumulator, rounded to the step s_in·s_weight (onnxruntime
        # does so to any float bias of a conv whose inputs are dequantized). Where that rounding can move a channel
        # by more than BIAS_ROUNDING of the output quantizer's step s_out — coarse weight steps, or an output that
        # no quantizer reads directly — and for INT4/UINT4 weights (no runtime has integer kernels for them, and
        # onnxruntime's rounding of their bias measured worse than that bound), the bias is instead added
        # after the layer as DequantizeLinear(int32) at a step of max|b| / 2^30 (exact to FP32 rounding).
        # `steps`: (s_in, s_out), s_in None where the input is not quantized, s_out None where no quantizer reads it.
        self.bias_step = None
        bias = self.layer._parameters.get("bias")
        s_in, s_out = steps if steps is not None else (None, None)
        self.output_quantized = s_out is not None
        self.symmetric = symmetric
        on_layer = s_in is None or (
            not self.int4 and s_out is not None and 0.5 * s_in * float(s.max()) <= BIAS_ROUNDING * s_out
        )
        if not on_layer and bias is not None:
            del self.layer._parameters["bias"]
            self.layer.bias = None
            b = bias.detach().double().cpu()
            self.bias_step = max(float(b.abs().max()), 1e-30) / 2**30
            self.register_buffer("qbias", torch.round(b / self.bias_step).to(torch.int32))

    def forward(self, x):
        w = weight_dq(self.qweight, self.qscale, self.qzero)
        if self.bias_step is None:
            return self.forward_with(self.input(x), w, self.layer.bias)
        y = self.forward_with(self.input(x), w, None)
        b = bias_dq(self.qbias, self.bias_step)
        return y + (b if y.ndim == 2 else b.view(-1, *[1] * (y.ndim - 2)))


class _FloatLayer(nn.Module):
    """A layer whose weight stays FP32 (weight quantization disabled), with its input quantizer if any."""

    def __init__(self, qlayer: QuantLayer, signed: bool):
        super().__init__()
        self.input = _Act(qlayer.input_quantizer, signed)
        self.layer = qlayer.layer

    def forward(self, x):
        return self.layer(self.input(x))


class _Output(nn.Module):
    def __init__(self, wrapped: OutputQuant, signed: bool):
        super().__init__()
        self.module = wrapped.module
        self.output = _Act(wrapped.quantizer, signed)

    def forward(self, *args, **kwargs):
        return self.output(self.module(*args, **kwargs))


WEIGHT_CODES = ("auto", "unsigned", "signed")


def _layer_steps(model: nn.Module) -> dict[str, tuple[float | None, float | None]]:
    """Per layer: the step of the quantizer its input comes from and of the one its output reaches (None: none)."""
    from ptq.quant.prepare import output_quantizers

    quantizers = {n: m for n, m in model.named_modules() if isinstance(m, ActQuantizer)}

    def step(name):
        q = quantizers.get(name) if name is not None else None
        return float(q.scale) if q is not None and q.enabled else None

    state = model.ptq_state  # what `prepare` recorded
    outputs = output_quantizers(model, torch.zeros(state.example_shape)[:1])
    producers = state.placement.input_producer
    steps = {}
    for name, layer in quant_layers(model).items():
        q_in = layer.input_quantizer
        s_in = float(q_in.scale) if q_in is not None and q_in.enabled else step(producers.get(name))
        steps[name] = (s_in, step(outputs.get(name)))
    return steps


def _check_codes(codes: str) -> None:
    if codes not in WEIGHT_CODES:
        raise ExportError(f"--weights {codes!r}: choose one of {', '.join(WEIGHT_CODES)}")


def export_model(qmodel: nn.Module, opset: int, codes: str = "auto") -> tuple[nn.Module, dict[str, _Layer]]:
    """A copy of `qmodel` in which quantizers are the export ops; returns it and its integer-weight layers.
    `codes`: how weights are stored (WEIGHT_CODES; see `_Layer`)."""
    _check_codes(codes)
    signed = codes == "signed"
    from ptq.quant.fold import replace_module

    model = copy.deepcopy(qmodel).eval().cpu()
    int4 = opset >= INT4_MIN_OPSET
    steps = _layer_steps(model)
    layers: dict[str, _Layer] = {}
    names = [n for n, m in model.named_modules() if isinstance(m, (QuantLayer, OutputQuant))]
    for name in sorted(names, key=lambda n: n.count("."), reverse=True):  # deepest first: names stay valid
        m = model.get_submodule(name)
        if isinstance(m, OutputQuant):
            replace_module(model, name, _Output(m, signed))
        elif m.weight_quantizer.enabled and m.weight_quantizer.calibrated:
            layers[name] = _Layer(name, m, int4, codes, steps.get(name))
            replace_module(model, name, layers[name])
        else:
            replace_module(model, name, _FloatLayer(m, signed))
    left = [n for n, m in model.named_modules() if isinstance(m, Quantizer)]
    if left:
        raise ExportError(f"quantizer {left[0]} sits where the exporter cannot place it; re-run `ptq quantize`")
    return model, layers


class _Logits(nn.Module):
    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input):  # noqa: A002 - the ONNX input's name
        return self.model(input)


# ---------------------------------------------------------------------------------------------------------------
# Writing the file.


def _pack_int4(values: np.ndarray) -> bytes:
    """4-bit values (signed or unsigned), two per byte, the first in the low nibble (ONNX INT4/UINT4 raw data)."""
    v = (values.reshape(-1).astype(np.int16) & 0xF).astype(np.uint8)
    if v.size % 2:
        v = np.concatenate([v, np.zeros(1, np.uint8)])
    return (v[0::2] | (v[1::2] << 4)).tobytes()


def _to_int4(graph, names: set[str]) -> int:
    """Retype the named INT8/UINT8 initializers as INT4/UINT4 in place; returns how many."""
    from onnx import TensorProto, numpy_helper

    done = 0
    for tensor in graph.initializer:
        if tensor.name in names:
            values = numpy_helper.to_array(tensor)
            signed = tensor.data_type == TensorProto.INT8
            lo, hi = (-8, 7) if signed else (0, 15)
            if values.min(initial=0) < lo or values.max(initial=0) > hi:
                raise ExportError(f"{tensor.name}: codes outside the 4-bit range; re-run `ptq quantize`")
            tensor.ClearField("int32_data")
            tensor.data_type = TensorProto.INT4 if signed else TensorProto.UINT4
            tensor.raw_data = _pack_int4(values)
            done += 1
    retyped = {t.name: t.data_type for t in graph.initializer if t.name in names}
    for info in (*graph.value_info, *graph.input):  # the exporter's declared types follow the initializers
        if info.name in retyped:
            info.type.tensor_type.elem_type = retyped[info.name]
    return done


def _own_zero_points(graph, weights: set[str]) -> set[str]:
    """Give every DequantizeLinear of the named weights a zero-point initializer of its own (the exporter merges
    equal constants, e.g. the all-zero zero points of symmetric layers, across layers that will get other types);
    drop initializers nothing reads any more. Returns the weights' and their zero points' names."""
    from onnx import TensorProto

    inits = {t.name: t for t in graph.initializer}
    names = set(weights)
    for node in graph.node:
        if node.op_type == "DequantizeLinear" and node.input[0] in weights and len(node.input) > 2:
            own = TensorProto()
            own.CopyFrom(inits[node.input[2]])
            own.name = f"{node.input[0]}.zero_point"
            graph.initializer.append(own)
            node.input[2] = own.name
            names.add(own.name)
    used = {i for node in graph.node for i in node.input} | {o.name for o in graph.output}
    unused = [t for t in graph.initializer if t.name not in used]
    for t in unused:
        graph.initializer.remove(t)
    dropped = {t.name for t in unused}
    for info in [v for v in graph.value_info if v.name in dropped]:
        graph.value_info.remove(info)
    return names


def _float_weights(graph, layers: dict[str, _Layer]) -> list[str]:
    """Float initializers that are copies of a quantized layer's weight (there must be none)."""
    from onnx import TensorProto

    shapes = {tuple(layer.qweight.shape) for layer in layers.values()}
    return [
        t.name
        for t in graph.initializer
        if t.data_type in (TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.DOUBLE)
        and tuple(t.dims) in shapes
        and len(t.dims) >= 2
    ]


def _initializer_bytes(graph) -> int:
    return sum(len(t.raw_data) or 4 * math.prod(t.dims) for t in graph.initializer)


def write_onnx(
    qmodel: nn.Module,
    path: str | Path,
    example_shape: tuple[int, ...],
    opset: int = DEFAULT_OPSET,
    batch: int | None = None,
    metadata: dict[str, Any] | None = None,
    codes: str = "auto",
) -> dict[str, Any]:
    """Export `qmodel` (a prepared, calibrated ptq model) to `path`, atomically. `batch` None: dynamic batch size;
    `codes`: weights as unsigned codes with ptq's zero points (exact in every runtime), as signed codes with zero
    point 0 (symmetric grids only; TensorRT needs them, with symmetric activations), or auto (signed where the
    grid is symmetric and ≤ 7 bits, the fast int8 path that cannot overflow; unsigned otherwise).
    Returns facts about the file (size, opset, integer weight types)."""
    onnx, _ = _require_onnx()
    if not MIN_OPSET <= opset <= 23:
        raise ExportError(f"--opset {opset} is not supported; choose {MIN_OPSET}..23 (INT4 weights need 21)")
    path = Path(path)
    model, layers = export_model(qmodel, opset, codes)
    example = torch.zeros((batch or 2, *example_shape[1:]))
    dynamic = None if batch is not None else ({0: torch.export.Dim("batch", min=1)},)
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            program = torch.onnx.export(
                _Logits(model),
                (example,),
                dynamo=True,
                opset_version=opset,
                custom_translation_table=_translations(opset),
                dynamic_shapes=dynamic,
                input_names=["input"],
                output_names=["logits"],
                optimize=True,
                verbose=False,
            )
        except Exception as e:  # noqa: BLE001 - the exporter raises many kinds; name the first line
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise ExportError(f"torch.onnx.export failed: {first[:300]}") from None
    proto = program.model_proto
    code_names = {f"model.{n}.qweight" for n in layers}
    missing = code_names - {t.name for t in proto.graph.initializer}
    if missing:
        raise ExportError(f"the exported graph lacks the weight codes {sorted(missing)[0]}; please report this")
    int4_names = _own_zero_points(proto.graph, {f"model.{n}.qweight" for n, m in layers.items() if m.int4})
    retyped = _to_int4(proto.graph, int4_names)
    floats = _float_weights(proto.graph, layers)
    if floats:
        raise ExportError(f"a float copy of a quantized weight ({floats[0]}) stayed in the graph; please report this")
    for node in proto.graph.node:  # the exporter's per-node provenance (stack traces, FX names): ~2 KB a node
        node.ClearField("metadata_props")
        node.doc_string = ""
    proto.producer_name, proto.producer_version = "ptq", _version()
    if metadata is not None:
        entry = proto.metadata_props.add()
        entry.key, entry.value = META_KEY, json.dumps(metadata, default=str)
    onnx.checker.check_model(proto, full_check=False)
    external = _initializer_bytes(proto.graph) > EXTERNAL_DATA_BYTES
    with atomic_path(path) as tmp:
        if external:  # the data file is named after the final file, so it is written there directly
            onnx.save_model(
                proto, str(tmp), save_as_external_data=True, all_tensors_to_one_file=True, location=path.name + ".data"
            )
        else:
            onnx.save_model(proto, str(tmp))
    weight_types = {
        name: f"{'INT' if layer.signed else 'UINT'}{4 if layer.int4 else 8}" for name, layer in layers.items()
    }
    last = qmodel.ptq_state.placement.last_layer
    blockers = {  # why a conv cannot run in onnxruntime's int8 kernels (4-bit layers have none anyway)
        "asymmetric_weights": sum(not m.int4 and not m.symmetric for m in layers.values()),
        "unquantized_outputs": sum(not m.int4 and not m.output_quantized for n, m in layers.items() if n != last),
    }
    return {
        "integer_kernel_blockers": blockers,
        "file": str(path),
        "bytes": path.stat().st_size,
        "opset": opset,
        "batch": batch if batch is not None else "dynamic",
        "weight_codes": codes,
        "int4_initializers": retyped,
        "weights": {t: sum(1 for v in weight_types.values() if v == t) for t in sorted(set(weight_types.values()))},
        "seconds": round(time.perf_counter() - start, 2),
    }


def _version() -> str:
    try:
        from importlib.metadata import version

        return version("ptq")
    except Exception:  # noqa: BLE001
        return "0"


# ---------------------------------------------------------------------------------------------------------------
# Running and checking the file.


class OnnxModel:
    """An ONNX file run by onnxruntime, called like a model: float tensor (N, C, H, W) → logits tensor."""

    def __init__(self, path: str | Path, threads: int | None = None, optimized_path: str | Path | None = None):
        _, ort = _require_onnx()
        options = ort.SessionOptions()
        options.log_severity_level = 3
        if threads is not None:
            options.intra_op_num_threads = threads
            options.inter_op_num_threads = 1
        if optimized_path is not None:
            options.optimized_model_filepath = str(optimized_path)
        try:
            self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        except Exception as e:  # noqa: BLE001 - onnxruntime raises its own exception types
            raise ExportError(f"{path}: onnxruntime cannot load it ({str(e).splitlines()[0][:200]})") from None
        inp = self.session.get_inputs()[0]
        self.input_name = inp.name
        self.batch = inp.shape[0] if isinstance(inp.shape[0], int) else None
        meta = self.session.get_modelmeta().custom_metadata_map.get(META_KEY)
        self.meta: dict[str, Any] = json.loads(meta) if meta else {}

    def run(self, x: np.ndarray, outputs: list[str] | None = None) -> list[np.ndarray]:
        return self.session.run(outputs, {self.input_name: np.ascontiguousarray(x, dtype=np.float32)})

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """Logits on x's device."""
        return self._logits(x.detach().cpu().float().numpy()).to(x.device)

    def _logits(self, x: np.ndarray) -> torch.Tensor:
        if self.batch is None or len(x) == self.batch:
            return torch.from_numpy(self.run(x)[0])
        outs = []  # a fixed batch size: run in chunks, padding the last one
        for i in range(0, len(x), self.batch):
            chunk = x[i : i + self.batch]
            n = len(chunk)
            if n < self.batch:
                chunk = np.concatenate([chunk, np.zeros((self.batch - n, *chunk.shape[1:]), chunk.dtype)])
            outs.append(self.run(chunk)[0][:n])
        return torch.from_numpy(np.concatenate(outs))

    def eval(self) -> OnnxModel:
        return self


@torch.no_grad()
def compare(qmodel: nn.Module, onnx_model: OnnxModel, inputs: torch.Tensor) -> dict[str, float]:
    """The ONNX model against ptq's on `inputs`: logit SQNR and top-1 agreement between the two, and how faithful
    each is to the same network with activations in FP (its weights quantized): `fidelity_db` (ONNX) and
    `ptq_fidelity_db` (ptq)."""
    qmodel = qmodel.eval().cpu()
    inputs = inputs.cpu()
    reference = qmodel(inputs)
    got = onnx_model(inputs)
    float_acts = copy.deepcopy(qmodel)
    for m in float_acts.modules():
        if isinstance(m, ActQuantizer):
            m.enabled = False
    weights_only = float_acts(inputs)
    return {
        "images": len(inputs),
        "sqnr_db": round(sqnr_db(reference, got), 2),
        "agreement": round(100.0 * float((reference.argmax(1) == got.argmax(1)).float().mean()), 2),
        "fidelity_db": round(sqnr_db(weights_only, got), 2),
        "ptq_fidelity_db": round(sqnr_db(weights_only, reference), 2),
    }


@torch.no_grad()
def first_divergence(qmodel: nn.Module, path: str | Path, inputs: torch.Tensor) -> str | None:
    """The first activation quantizer (in execution order) whose output in the ONNX file differs from ptq's on more
    than DIVERGED_FRACTION of its elements, or None."""
    onnx, _ = _require_onnx()
    proto = onnx.load(str(path))
    produced = {o: n for n in proto.graph.node for o in n.output}
    initializers = {t.name for t in proto.graph.initializer}
    act_outputs = []
    for node in proto.graph.node:  # DequantizeLinear(QuantizeLinear(activation)): activation QDQ pairs, in order
        if node.op_type == "DequantizeLinear" and node.input[0] not in initializers:
            q = produced.get(node.input[0])
            if q is not None and q.op_type == "QuantizeLinear":
                act_outputs.append(node.output[0])
    existing = {o.name for o in proto.graph.output}
    for name in act_outputs:
        if name not in existing:
            proto.graph.output.add().name = name
    with tempfile.TemporaryDirectory() as tmp:  # never beside the user's files
        debug = Path(tmp) / "debug.onnx"
        onnx.save_model(proto, str(debug))
        got = OnnxModel(debug).run(inputs.numpy(), act_outputs)
    seen: list[tuple[str, torch.Tensor, float]] = []
    hooks = [
        m.register_forward_hook(lambda mod, _, y, n=n: seen.append((n, y.detach(), float(mod.scale))))
        for n, m in qmodel.named_modules()
        if isinstance(m, ActQuantizer) and m.enabled
    ]
    try:
        qmodel.eval().cpu()(inputs)
    finally:
        for h in hooks:
            h.remove()
    # a tie rounded the other way moves an element by one step; an error in the graph moves many
    for (name, ref, step), out in zip(seen, got, strict=False):
        if out.shape != tuple(ref.shape) or (np.abs(out - ref.numpy()) > 0.5 * step).mean() > DIVERGED_FRACTION:
            return name
    return None


def verify(qmodel: nn.Module, path: str | Path, inputs: torch.Tensor) -> dict:
    """Compare the ONNX file with ptq's model (see the module docstring for the criterion); raise ExportError,
    naming the first diverging quantizer if found, when it fails."""
    result = compare(qmodel, OnnxModel(path), inputs)
    result["passed_by"] = (
        "match" if result["sqnr_db"] >= MATCH_SQNR_DB
        else "fidelity" if result["fidelity_db"] >= result["ptq_fidelity_db"] - FIDELITY_MARGIN_DB
        else None
    )  # fmt: skip
    if result["passed_by"] is None:
        where = first_divergence(qmodel, path, inputs)
        at = f"; first diverging activation: {where}" if where else ""
        raise ExportError(
            f"{path} does not compute what ptq's model computes: against the network with FP activations it scores "
            f"{result['fidelity_db']} dB of logit SQNR where ptq's model scores {result['ptq_fidelity_db']} dB "
            f"(logit SQNR between the two {result['sqnr_db']} dB, top-1 agreement {result['agreement']}%){at}"
        )
    return result


# ---------------------------------------------------------------------------------------------------------------
# The verb behind `ptq export`.

VERIFY_IMAGES = 8


def verification_inputs(data_config: dict, example_shape: tuple[int, ...], data: str | Path | None) -> torch.Tensor:
    """The first VERIFY_IMAGES images of `data`, preprocessed with the model's data config, or (no data) seeded
    standard-normal inputs: the preprocessed images' own mean and spread."""
    if data is not None:
        from ptq.data import ImageFolder

        folder = ImageFolder(data, data_config)
        return torch.stack([folder[i][0] for i in range(min(VERIFY_IMAGES, len(folder)))])
    return torch.randn((VERIFY_IMAGES, *example_shape[1:]), generator=torch.Generator().manual_seed(0))


def export_onnx(
    folder: str | Path,
    out: str | Path | None = None,
    opset: int = DEFAULT_OPSET,
    batch: int | None = None,
    data: str | Path | None = None,
    overwrite: bool = False,
    codes: str = "auto",
) -> dict[str, Any]:
    """Export the `ptq quantize` output `folder` to `out` (default `folder/model.onnx`), verify it in onnxruntime
    against the checkpoint, and record the result under "export" in `folder/report.json`. A file that fails
    verification is not kept."""
    from ptq._io import OutputError, write_json
    from ptq.export.checkpoint import data_config_from, load_quantized, read_quant_config

    _require_onnx()
    _check_codes(codes)  # before the model is loaded
    folder = Path(folder)
    meta = read_quant_config(folder)
    out = Path(out) if out is not None else folder / "model.onnx"
    if out.suffix != ".onnx":
        raise OutputError(f"--out {out} must end in .onnx")
    if out.exists() and not overwrite:
        raise OutputError(f"{out} already exists; choose another --out or pass --overwrite")
    if not out.parent.is_dir():
        raise OutputError(f"--out {out}: folder {out.parent} does not exist")
    if batch is not None and batch < 1:
        raise ExportError(f"--batch {batch}: give a positive batch size or 'dynamic'")
    qmodel = load_quantized(folder)
    data_config = data_config_from(meta)
    example_shape = tuple(meta["example_shape"])
    metadata = {
        "model": meta["model"],
        "checkpoint": meta.get("checkpoint"),
        "num_classes": meta.get("num_classes"),
        "data_config": meta["data_config"],
        "quant": meta["quant"],
        "source": str(folder),
    }
    facts = write_onnx(qmodel, out, example_shape, opset, batch, metadata, codes)
    try:
        inputs = verification_inputs(data_config, example_shape, data)
        facts["verification"] = verify(qmodel, out, inputs) | {"data": str(data) if data else "random normal"}
    except ExportError as e:
        out.unlink(missing_ok=True)
        if codes == "signed" and any(t == "INT8" for t in facts["weights"]):
            raise ExportError(
                f"{e}. Signed 8-bit weights overflow the int16 pair sums of onnxruntime's int8 kernels on x86 CPUs "
                "without VNNI: use --weights auto, or quantize with --w-bits 7 --set quant.w_symmetric=true"
            ) from None
        raise
    except BaseException:
        out.unlink(missing_ok=True)
        raise
    report_path = folder / "report.json"
    if report_path.is_file():
        try:
            report = json.loads(report_path.read_text())
        except json.JSONDecodeError:
            report = None
        if isinstance(report, dict):
            report.setdefault("export", {})["onnx"] = facts
            write_json(report_path, report)
    return facts
