import pytest
import timm
import torch

from ptq.config import QuantConfig
from ptq.quant import prepare
from ptq.quant.modules import quant_layers
from ptq.recon import UnitKind, find_units


def _units(name, size=64):
    torch.manual_seed(0)
    model = timm.create_model(name).eval()
    x = torch.zeros(1, 3, size, size)
    qmodel = prepare(model, QuantConfig(), x)
    return qmodel, find_units(qmodel, x)


@pytest.mark.parametrize(
    "name, blocks",
    [
        ("resnet18", 8),
        ("tf_efficientnet_lite0", 16),
        ("mobilenetv2_050", 17),
        ("mobilenetv3_small_050", 12),
        ("regnetx_002", 13),
        ("mnasnet_small", 15),
        ("test_efficientnet", 5),
    ],
)
def test_units_cover_every_layer_once_in_network_order(name, blocks):
    qmodel, units = _units(name)
    covered = [layer for u in units for layer in u.layers]
    assert sorted(covered) == sorted(quant_layers(qmodel)) and len(covered) == len(set(covered))
    assert sum(u.kind is UnitKind.BLOCK for u in units) == blocks
    assert units[0].kind is UnitKind.LAYER and units[0].layers == qmodel.ptq_state.placement.first_layers
    assert units[-1].layers == [qmodel.ptq_state.placement.last_layer]


def test_block_units_include_their_output_quantizer():
    qmodel, units = _units("tf_efficientnet_lite0")
    block = next(u for u in units if u.kind is UnitKind.BLOCK and u.name == "blocks.1.1")
    assert type(block.module(qmodel)).__name__ == "OutputQuant"
    assert block.layers == ["blocks.1.1.module.conv_pw", "blocks.1.1.module.conv_dw", "blocks.1.1.module.conv_pwl"]
    resnet, units = _units("resnet18")
    assert [u.name for u in units[:3]] == ["conv1", "layer1.0", "layer1.1"]
    assert "layer2.0.downsample.0" in next(u for u in units if u.name == "layer2.0").layers
