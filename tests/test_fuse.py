import logging

import pytest
import torch

from ptq import _fuse


def _chain(x, s):
    return (x / s).round().clamp(-8, 7) * s


def test_a_compile_failure_falls_back_to_eager_once_with_a_warning(monkeypatch, caplog):
    calls = []

    def broken_compile(fn, **kw):
        def run(*args):
            calls.append(1)
            raise RuntimeError("no C++ compiler found\nmore detail")

        return run

    monkeypatch.setattr(torch, "compile", broken_compile)
    fn = _fuse.fused(_chain)
    x, s = torch.randn(100), torch.tensor(0.1)
    with caplog.at_level(logging.WARNING, logger="ptq._fuse"):
        assert torch.equal(fn(x, s), _chain(x, s))
        assert torch.equal(fn(x, s), _chain(x, s))
    assert len(calls) == 1  # not retried
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 1 and "_chain" in warnings[0] and "no C++ compiler found" in warnings[0]
    assert "more detail" not in warnings[0]


def test_compiling_can_be_turned_off(monkeypatch):
    monkeypatch.setenv("PTQ_COMPILE", "0")
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: pytest.fail("compiled although PTQ_COMPILE=0"))
    x, s = torch.randn(100), torch.tensor(0.1)
    assert torch.equal(_fuse.fused(_chain)(x, s), _chain(x, s))


def test_probes_run_fused_functions_eagerly_and_synthesis_keeps_its_compiled_kernels(monkeypatch):
    """Synthesis routes BatchNorm through a torch-function mode and must keep its compiled kernels; a probe that
    watches every call asks for eager ones with `_fuse.eager()`."""
    from ptq.synth.stats import BNStatistics, _BatchNormCalls

    compiled = []

    def recording_compile(fn, **kw):
        def run(*args):
            compiled.append(1)
            return fn(*args)

        return run

    monkeypatch.setattr(torch, "compile", recording_compile)
    fn = _fuse.fused(_chain)
    x, s = torch.randn(100), torch.tensor(0.1)
    with _BatchNormCalls(BNStatistics(torch.nn.Sequential())):
        fn(x, s)
    assert len(compiled) == 1
    with _fuse.eager():
        fn(x, s)
    assert len(compiled) == 1
    fn(x, s)
    assert len(compiled) == 2


@pytest.mark.parametrize("keep", [False, True])
@pytest.mark.parametrize("learn", [False, True])
@pytest.mark.parametrize("clip", [False, True])
def test_compiled_activation_kernel_equals_its_eager_form(keep, learn, clip):
    from ptq.quant.functional import _act_backward, _act_forward

    torch.manual_seed(0)
    x = torch.randn(10_000) * 3
    s, z = torch.tensor(0.1), torch.tensor(7.0)
    mask = (torch.rand(10_000) < 0.5).to(torch.uint8) if keep else None
    bounds = (torch.tensor(0.0), torch.tensor(6.0)) if clip else (None, None)
    assert torch.equal(
        _act_forward(x, s, -z, 15 - z, mask, *bounds), _act_forward.eager(x, s, -z, 15 - z, mask, *bounds)
    )
    grad = torch.randn(10_000)
    got = _act_backward(grad, x, s, -z, 15 - z, mask, *bounds, True, learn)
    want = _act_backward.eager(grad, x, s, -z, 15 - z, mask, *bounds, True, learn)
    assert torch.equal(got[0], want[0])
    assert (got[1] is None) == (not learn) and (not learn or torch.allclose(got[1], want[1], rtol=1e-5))


def test_the_gpu_mask_form_gives_the_same_values():
    """On GPUs the masks stay bool (`_as_weights`); checked here on the op-by-op form."""
    from ptq.quant.functional import _act_backward, _act_forward

    torch.manual_seed(0)
    x, grad = torch.randn(1000) * 3, torch.randn(1000)
    s, z = torch.tensor(0.1), torch.tensor(7.0)
    keep = torch.rand(1000) < 0.5
    for form in (keep, keep.view(torch.uint8)):
        got = _act_forward.eager(x, s, -z, 15 - z, form, None, None)
        assert torch.equal(got, _act_forward.eager(x, s, -z, 15 - z, keep, None, None))
        got = _act_backward.eager(grad, x, s, -z, 15 - z, form, None, None, True, True)
        want = _act_backward.eager(grad, x, s, -z, 15 - z, keep, None, None, True, True)
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


def test_compiled_bit_unpacking_equals_its_eager_form():
    from ptq.quant.functional import _bits

    octets = torch.randint(0, 256, (1001,), dtype=torch.uint8)
    bits = _bits(octets)
    assert torch.equal(bits, _bits.eager(octets))
    assert torch.equal((2.0 ** torch.arange(8)).double() @ bits.view(8, -1).double(), octets.double())


@pytest.mark.parametrize("fisher", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("shape", [(6, 5, 4, 3), (6, 10)])
def test_the_loss_kernels_equal_the_squared_error_on_the_gathered_rows(fisher, dtype, shape):
    """Σ_c w(ẑ − z)² averaged over the rest, value and gradient (as the whole loss and scaled), with targets read at
    rows of a cache."""
    from ptq.recon.losses import reconstruction_loss

    torch.manual_seed(0)
    cache = torch.randn(10, *shape[1:]).to(dtype)
    weights = torch.rand(10, *shape[1:]).to(dtype) if fisher else None
    idx = torch.tensor([7, 0, 3, 3, 9, 1])
    out = torch.randn(shape, requires_grad=True)
    factor = 0.5 if fisher else 1.0
    loss = reconstruction_loss(out, cache, weights, idx)
    (loss * factor).backward()
    ref_out = out.detach().clone().requires_grad_()
    err = (ref_out - cache[idx].float()).square() * (1 if weights is None else weights[idx].float())
    want = err.sum(dim=1).mean()
    (want * factor).backward()
    assert torch.allclose(loss, want, rtol=1e-5) and torch.allclose(out.grad, ref_out.grad, rtol=1e-5, atol=1e-7)
    gathered = cache[idx].float()
    assert torch.allclose(reconstruction_loss(out, gathered), (out - gathered).square().sum(1).mean())


def test_the_gathered_qdrop_input_equals_mixing_the_gathered_rows():
    from ptq.quant.functional import keep_mask, mix
    from ptq.recon.cache import UnitData

    torch.manual_seed(0)
    q, fp = torch.randn(10, 3, 5, 5), torch.randn(10, 3, 5, 5)
    data = UnitData(q, fp, torch.randn(10, 4))
    idx = torch.tensor([4, 2, 2, 8])
    torch.manual_seed(1)
    got = data.inputs(idx, torch.device("cpu"), keep_prob=0.5)
    torch.manual_seed(1)
    want = mix(fp[idx], q[idx], keep_mask(q[idx], 0.5))
    assert torch.equal(got, want)
    assert not torch.equal(got, q[idx]) and not torch.equal(got, fp[idx])
    assert torch.equal(data.inputs(idx, torch.device("cpu")), q[idx])  # no mixing at p = 1
