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


@pytest.mark.parametrize("keep", [False, True])
@pytest.mark.parametrize("learn", [False, True])
def test_compiled_activation_kernel_equals_its_eager_form(keep, learn):
    from ptq.quant.functional import _act_backward, _act_forward

    torch.manual_seed(0)
    x = torch.randn(10_000) * 3
    s, z = torch.tensor(0.1), torch.tensor(7.0)
    mask = (torch.rand(10_000) < 0.5).to(torch.uint8) if keep else None
    assert torch.equal(_act_forward(x, s, -z, 15 - z, mask), _act_forward.eager(x, s, -z, 15 - z, mask))
    grad = torch.randn(10_000)
    got = _act_backward(grad, x, s, -z, 15 - z, mask, True, learn)
    want = _act_backward.eager(grad, x, s, -z, 15 - z, mask, True, learn)
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
        assert torch.equal(_act_forward.eager(x, s, -z, 15 - z, form), _act_forward.eager(x, s, -z, 15 - z, keep))
        got = _act_backward.eager(grad, x, s, -z, 15 - z, form, True, True)
        want = _act_backward.eager(grad, x, s, -z, 15 - z, keep, True, True)
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


def test_compiled_bit_unpacking_equals_its_eager_form():
    from ptq.quant.functional import _bits

    octets = torch.randint(0, 256, (1001,), dtype=torch.uint8)
    bits = _bits(octets)
    assert torch.equal(bits, _bits.eager(octets))
    assert torch.equal(bits.view(-1, 8).double() @ (2.0 ** torch.arange(8)).double(), octets.double())
