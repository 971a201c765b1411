"""Accuracy on real data: a small timm model trained on scikit-learn's digits keeps its accuracy at 8 bits."""

import pytest
from conftest import accuracy

from ptq.config import QuantConfig
from ptq.quant import calibrate, prepare


def test_fp_model_learned_the_digits(digits_model, digits):
    _, _, xte, yte = digits
    assert accuracy(digits_model, xte, yte) > 95


@pytest.mark.parametrize("convention", ["qdrop", "all"])
def test_w8a8_rtn_keeps_accuracy_within_one_point(digits_model, digits, convention):
    xtr, _, xte, yte = digits
    config = QuantConfig(w_bits=8, a_bits=8, first_last_bits=convention)
    qmodel = calibrate(prepare(digits_model, config, xtr[:1]), [xtr[:128], xtr[128:256]], config)
    assert accuracy(qmodel, xte, yte) >= accuracy(digits_model, xte, yte) - 1.0


def test_w4a8_rtn_stays_usable_and_below_fp(digits_model, digits):
    xtr, _, xte, yte = digits
    config = QuantConfig(w_bits=4, a_bits=8)
    qmodel = calibrate(prepare(digits_model, config, xtr[:1]), [xtr[:256]], config)
    acc = accuracy(qmodel, xte, yte)
    assert 50 < acc <= accuracy(digits_model, xte, yte) + 1.0
