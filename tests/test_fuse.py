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
    got = _act_forward(x, s, -z, 15 - z, mask, learn, torch.float32)
    want = _act_forward.eager(x, s, -z, 15 - z, mask, learn, torch.float32)
    for a, b in zip(got, want, strict=True):
        assert (a is None and b is None) or torch.equal(a, b)
    grad = torch.randn(10_000)
    got, want = _act_backward(grad, got[1], got[2]), _act_backward.eager(grad, want[1], want[2])
    assert torch.equal(got[0], want[0])
    assert (got[1] is None) == (not learn) and (not learn or torch.allclose(got[1], want[1], rtol=1e-5))


def test_the_gpu_mask_form_gives_the_same_values():
    """On GPUs the masks stay bool (`_mask_dtype`, `_as_weights`); checked here on the op-by-op form."""
    from ptq.quant.functional import _act_backward, _act_forward

    torch.manual_seed(0)
    x, grad = torch.randn(1000) * 3, torch.randn(1000)
    s, z = torch.tensor(0.1), torch.tensor(7.0)
    keep = torch.rand(1000) < 0.5
    gpu = _act_forward.eager(x, s, -z, 15 - z, keep, True, torch.bool)
    cpu = _act_forward.eager(x, s, -z, 15 - z, keep.view(torch.uint8), True, torch.float32)
    assert gpu[1].dtype == torch.bool and torch.equal(gpu[1].float(), cpu[1])
    assert torch.equal(gpu[0], cpu[0]) and torch.equal(gpu[2], cpu[2])
    assert torch.equal(_act_backward.eager(grad, gpu[1], gpu[2])[0], _act_backward.eager(grad, cpu[1], cpu[2])[0])
