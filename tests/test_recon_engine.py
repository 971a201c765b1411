import torch
from conftest import accuracy

from ptq.config import QuantConfig
from ptq.quant import calibrate, prepare
from ptq.quant.functional import channel_view, fake_quantize
from ptq.quant.modules import act_quantizers
from ptq.recon import UnitKind, find_units
from ptq.recon.engine import collect, reconstruct_unit, unit_error


def _quantized(digits_model, digits, w_bits=3, a_bits=8):
    xtr = digits[0]
    config = QuantConfig(w_bits=w_bits, a_bits=a_bits)
    qmodel = calibrate(prepare(digits_model, config, xtr[:1]), [xtr[:256]], config)
    return qmodel, [xtr[i : i + 64] for i in range(0, 256, 64)]


def test_reconstruction_beats_round_to_nearest_on_a_block(digits_model, digits):
    qmodel, batches = _quantized(digits_model, digits)
    unit = next(u for u in find_units(qmodel, batches[0][:1]) if u.kind is UnitKind.BLOCK)
    data = collect(qmodel, unit, batches)
    assert data.q_inputs.shape[0] == 256 and data.targets.shape[0] == 256
    rtn = unit_error(qmodel, unit, data)
    result = reconstruct_unit(qmodel, unit, data, iters=300, batch_size=32, lr=1e-2, seed=0)  # short run, higher lr
    assert result["reconstruction_error"] < 0.7 * rtn
    # the learned weights lie on each layer's quantizer grid
    for name in unit.layers:
        layer = qmodel.get_submodule(name)
        q = layer.weight_quantizer
        s, z = channel_view(q.scale, layer.weight.ndim), channel_view(q.zero_point, layer.weight.ndim)
        assert torch.allclose(fake_quantize(layer.weight, s, z, q.bits), layer.weight, atol=1e-6)


def test_reconstructing_every_unit_recovers_the_accuracy_rtn_loses(digits_model, digits):
    xte, yte = digits[2], digits[3]
    qmodel, batches = _quantized(digits_model, digits, w_bits=3, a_bits=8)
    rtn_acc = accuracy(qmodel, xte, yte)
    for unit in find_units(qmodel, batches[0][:1]):
        reconstruct_unit(qmodel, unit, collect(qmodel, unit, batches), iters=400, lr=1e-2, keep_prob=0.5)
    acc = accuracy(qmodel, xte, yte)
    assert acc > rtn_acc + 10 and acc >= accuracy(digits_model, xte, yte) - 2


def test_qdrop_with_keep_probability_one_is_the_plain_quantized_forward(digits_model, digits):
    qmodel, batches = _quantized(digits_model, digits, a_bits=4)
    x = batches[0]
    with torch.no_grad():
        plain = qmodel(x)
        for q in act_quantizers(qmodel).values():
            q.keep_prob = 1.0
        same = qmodel(x)
        for q in act_quantizers(qmodel).values():
            q.keep_prob = 0.0
        fp_acts = qmodel(x)
    assert torch.equal(plain, same) and not torch.equal(plain, fp_acts)
