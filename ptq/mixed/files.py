"""The files of a sensitivity table: `sensitivity.json` read back (checked against the model and recipe it is
used with) and the per-layer CSV. The plot is `ptq.mixed.plot`."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

from torch import nn

from ptq.config import Recipe
from ptq.data import DataError
from ptq.mixed.allocate import Allocation
from ptq.mixed.sensitivity import SensitivityTable, describe_layers
from ptq.quant.modules import quant_layers

SENSITIVITY_FILE = "sensitivity.json"


def read_sensitivity(path: str | Path, model_name: str, qmodel: nn.Module, recipe: Recipe) -> SensitivityTable:
    """A table written by `ptq sensitivity` (its folder or its JSON), checked against the model and the recipe."""
    path = Path(path)
    path = path / SENSITIVITY_FILE if path.is_dir() else path
    try:
        table = SensitivityTable.from_dict(json.loads(path.read_text())["table"])
    except FileNotFoundError:
        raise DataError(f"--sensitivity {path} does not exist; point at a folder made by `ptq sensitivity`") from None
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
        raise DataError(f"--sensitivity {path} is not a sensitivity table ({e}); re-run `ptq sensitivity`") from None
    if table.model != model_name or [layer.name for layer in table.layers] != list(quant_layers(qmodel)):
        raise DataError(f"--sensitivity {path} was measured on {table.model}, not on {model_name} as prepared here")
    # the widths allowed now (recipe, hardware limits) may differ from when the table was made
    fresh = {layer.name: layer.allowed for layer in describe_layers(qmodel, recipe.mixed, recipe.quant.first_last_bits)}
    for layer in table.layers:
        missing = set(fresh[layer.name]) - set(layer.perturbation)
        if missing:
            raise DataError(
                f"--sensitivity {path} lacks {sorted(missing)}-bit values for {layer.name}; re-run `ptq sensitivity` "
                "with the same mixed.w_candidates"
            )
        layer.allowed = fresh[layer.name]
    table.convention = recipe.quant.first_last_bits
    return table


def sensitivity_csv(table: SensitivityTable, chosen: Allocation) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    widths = table.candidates
    writer.writerow(
        ["layer", "kind", "params", "channels", "macs", "in_bits", "trace", "chosen_bits"]
        + [f"omega_w{b}" for b in widths]
    )
    for layer in table.layers:
        writer.writerow(
            [layer.name, layer.kind.value, layer.numel, layer.channels, layer.macs, layer.in_bits, f"{layer.trace:.6g}"]
            + [chosen.bits[layer.name]]
            + [f"{layer.omega(b):.6g}" if b in layer.perturbation else "" for b in widths]
        )
    return buffer.getvalue()
