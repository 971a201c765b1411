"""The sensitivity report as a picture: per-layer sensitivity with the chosen widths, and the Pareto front."""

from __future__ import annotations

from pathlib import Path

from ptq._io import atomic_path
from ptq.mixed.allocate import Allocation, evaluate
from ptq.mixed.sensitivity import SensitivityTable


def plot_sensitivity(table: SensitivityTable, front: list[Allocation], chosen: Allocation, path: str | Path) -> None:
    """Write a PNG: top, Ω_i(b) per layer for every allowed width (the chosen one marked); bottom, the Pareto front
    of (weight size, predicted KL) with the uniform widths and the chosen point."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (top, bottom) = plt.subplots(2, 1, figsize=(max(8.0, 0.12 * len(table.layers) + 4), 9))
    xs = range(len(table.layers))
    widths = sorted({b for layer in table.layers for b in layer.allowed})
    colours = plt.get_cmap("viridis")
    for k, b in enumerate(widths):
        points = [(x, layer.omega(b)) for x, layer in zip(xs, table.layers, strict=True) if b in layer.allowed]
        colour = colours(k / max(1, len(widths) - 1))
        top.scatter([p[0] for p in points], [max(p[1], 1e-30) for p in points], s=10, color=colour, label=f"{b}-bit")
    picked = [(x, layer.omega(chosen.bits[layer.name])) for x, layer in zip(xs, table.layers, strict=True)]
    top.plot([p[0] for p in picked], [max(p[1], 1e-30) for p in picked], color="crimson", lw=1, label="chosen")
    top.set_yscale("log")
    top.set_xlabel("layer (network order)")
    top.set_ylabel("sensitivity Ω = Tr(H)/n · ‖Q(W) − W‖²")
    top.set_title(f"{table.model}: per-layer sensitivity ({table.images} images, {table.probes} probes)")
    top.legend(fontsize=8, ncol=len(widths) + 1)

    bottom.plot(
        [a.weight_bytes / 1e6 for a in front], [a.predicted_kl for a in front], "o-", ms=3, label="Pareto front"
    )
    for b in widths:
        uniform = evaluate(table, table.uniform_bits(b))
        bottom.scatter(uniform.weight_bytes / 1e6, uniform.predicted_kl, marker="x", color="grey")
        bottom.annotate(f"W{b}", (uniform.weight_bytes / 1e6, uniform.predicted_kl), fontsize=8)
    bottom.scatter(chosen.weight_bytes / 1e6, chosen.predicted_kl, marker="*", s=200, color="crimson", label="chosen")
    bottom.set_yscale("log")
    bottom.set_xlabel("weight size (MB: packed codes + scales)")
    bottom.set_ylabel("predicted KL increase ½ΣΩ")
    bottom.legend(fontsize=8)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
