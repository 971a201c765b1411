import pytest
import timm
import torch
from conftest import random_bn_stats

from ptq.arch import is_batchnorm
from ptq.config import QuantConfig
from ptq.quant import calibrate, prepare, set_quant_state
from ptq.quant.fold import fold_batchnorm
from ptq.quant.functional import sqnr_db
from ptq.quant.modules import ActQuantizer, OutputQuant, QuantLayer, act_quantizers, quant_layers

FAMILIES = [
    "test_resnet",
    "test_efficientnet",
    "resnet18",
    "mobilenetv2_050",
    "mobilenetv3_small_050",
    "regnetx_002",
    "mnasnet_small",
]


def _model(name):
    torch.manual_seed(0)
    return random_bn_stats(timm.create_model(name))


def _x(model, n=2, size=96):
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("name", ["test_resnet", "test_efficientnet", "mobilenetv3_small_050"])
def test_bn_folding_preserves_outputs(name):
    model = _model(name)
    x = _x(model)
    with torch.no_grad():
        ref = model(x)
        folded = model
        import copy

        folded = copy.deepcopy(model)
        names = fold_batchnorm(folded, x[:1])
        out = folded(x)
    assert names, "nothing was folded"
    assert not any(is_batchnorm(m) for m in folded.modules())
    assert torch.allclose(ref, out, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", FAMILIES)
def test_prepare_quantizes_every_layer_input_and_keeps_output_fp(name):
    model = _model(name)
    x = _x(model)
    config = QuantConfig(w_bits=8, a_bits=8)
    qmodel = prepare(model, config, x[:1])
    layers = quant_layers(qmodel)
    assert len(layers) == sum(isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)) for m in model.modules())
    placement = qmodel.ptq_state.placement
    assert len(placement.first_layers) == 1
    # every layer but the first reads a quantized value: from an activation quantizer or its own input quantizer
    for lname, layer in layers.items():
        if lname in placement.first_layers:
            assert layer.input_quantizer is None
        else:
            assert layer.input_quantizer is not None or placement.input_producer[lname] is not None, lname
    # the original model is untouched
    assert not any(isinstance(m, QuantLayer) for m in model.modules())
    # with quantizers off, the prepared model is the (BN-folded) FP model
    set_quant_state(qmodel, False, False)
    with torch.no_grad():
        assert torch.allclose(model(x), qmodel(x), rtol=1e-3, atol=1e-4)
    # W8A8 round-to-nearest stays close to FP, and the network output itself is not quantized
    calibrate(qmodel, [x], config)
    with torch.no_grad():
        out = qmodel(x)
    assert sqnr_db(model(x).detach(), out) > 15
    assert len(torch.unique(out)) > 2**8


def test_activation_quantizers_sit_after_nonlinearities_and_residual_adds():
    qmodel = prepare(_model("mobilenetv2_050"), QuantConfig(), _x(None)[:1])
    wrapped = {type(m.module).__name__ for m in qmodel.modules() if isinstance(m, OutputQuant)}
    assert "ReLU6" in wrapped and "InvertedResidual" in wrapped
    resnet = prepare(_model("resnet18"), QuantConfig(), _x(None)[:1])
    # ResNet blocks end with ReLU after the add: one quantizer there, none on the block itself
    assert isinstance(resnet.layer1[0].act2, OutputQuant)
    assert not any(isinstance(m, OutputQuant) and hasattr(m.module, "conv1") for m in resnet.modules())
    # the pooled features entering the classifier get an input quantizer
    assert resnet.fc.input_quantizer is not None


@pytest.mark.parametrize(
    "convention, first_w, last_w, last_in, first_out",
    [("all", 4, 4, 4, 4), ("brecq", 8, 8, 4, 8), ("qdrop", 8, 8, 8, 4)],
)
def test_first_last_bit_conventions(convention, first_w, last_w, last_in, first_out):
    qmodel = prepare(_model("resnet18"), QuantConfig(w_bits=4, a_bits=4, first_last_bits=convention), _x(None)[:1])
    assert qmodel.conv1.weight_quantizer.bits == first_w
    assert qmodel.fc.weight_quantizer.bits == last_w
    assert qmodel.fc.input_quantizer.bits == last_in
    assert qmodel.act1.quantizer.bits == first_out  # the output of the first conv
    assert qmodel.layer2[0].conv1.weight_quantizer.bits == 4


def test_quant_switch_turns_quantizers_on_and_off():
    model = _model("test_resnet")
    x = _x(model)
    config = QuantConfig(w_bits=4, a_bits=4)
    qmodel = calibrate(prepare(model, config, x[:1]), [x], config)
    assert all(q.enabled for q in act_quantizers(qmodel).values())
    with torch.no_grad():
        both = qmodel(x)
        set_quant_state(qmodel, weights=True, activations=False)
        w_only = qmodel(x)
        set_quant_state(qmodel, weights=False, activations=False)
        fp = qmodel(x)
    assert not torch.equal(both, w_only) and not torch.equal(w_only, fp)
    assert all(not q.enabled for q in qmodel.modules() if isinstance(q, ActQuantizer))
    off = prepare(model, QuantConfig(quantize_activations=False), x[:1])
    assert not any(q.enabled for q in act_quantizers(off).values())


@pytest.mark.parametrize(
    "layer",
    [
        torch.nn.Conv2d(3, 4, 3, stride=2, padding=1),
        torch.nn.Conv2d(4, 4, 3, padding=1, groups=4, bias=False, padding_mode="reflect"),
        torch.nn.Conv1d(3, 4, 3),
        torch.nn.Linear(5, 4),
        timm.layers.Conv2dSame(3, 4, 3, stride=2),  # a subclass: its own forward, with the weight swapped in
    ],
)
def test_quant_layer_runs_the_layers_forward_with_the_quantized_weight(layer):
    torch.manual_seed(0)
    shapes = {torch.nn.Linear: (5,), torch.nn.Conv1d: (3, 9)}
    x = torch.randn(2, *(shapes[type(layer)] if type(layer) in shapes else (layer.in_channels, 9, 9)))
    wrapped = QuantLayer(layer, w_bits=4)
    quantizer = wrapped.weight_quantizer
    quantizer.set_qparams(layer.weight.detach().abs().flatten(1).amax(1) / 7, torch.full((4,), 8.0))
    quantizer.enabled = True
    expected = torch.func.functional_call(layer, {"weight": quantizer(layer.weight)}, (x,))
    assert torch.equal(wrapped(x), expected)
    assert not torch.equal(wrapped(x), layer(x))


@pytest.mark.parametrize("name", ["test_resnet", "test_efficientnet"])
def test_quantize_layer_outputs_gives_every_layer_but_the_last_an_output_quantizer(name):
    """Residual branches end in a conv whose output timm adds in place (`x += shortcut`): followed by identity alone
    it would look quantized by the quantizer after the add. With `quantize_layer_outputs` every layer's output is
    read by a quantizer; without it those branch ends are not."""
    from ptq.quant.prepare import output_quantizers

    model = random_bn_stats(timm.create_model(name))
    x = torch.randn(1, 3, 64, 64)
    plain = output_quantizers(prepare(model, QuantConfig(), x), x)
    qmodel = prepare(model, QuantConfig(quantize_layer_outputs=True), x)
    reached = output_quantizers(qmodel, x)
    last = qmodel.ptq_state.placement.last_layer
    assert [n for n, q in reached.items() if q is None] == [last]
    bare = [n for n, q in plain.items() if q is None and n != last.removesuffix(".module")]
    assert bare and len(reached) == len(plain)


def test_per_tensor_weights_get_one_scale_per_layer():
    model = _model("test_resnet")
    x = _x(model)
    config = QuantConfig(w_bits=4, a_bits=8, w_granularity="tensor")
    qmodel = calibrate(prepare(model, config, x[:1]), [x], config)
    scales = {name: layer.weight_quantizer.scale.numel() for name, layer in quant_layers(qmodel).items()}
    assert set(scales.values()) == {1}
    per_channel = calibrate(prepare(model, QuantConfig(w_bits=4, a_bits=8), x[:1]), [x], QuantConfig(w_bits=4))
    assert all(layer.weight_quantizer.scale.numel() > 1 for layer in quant_layers(per_channel).values())
