"""Calibration by reconstruction (AdaRound, BRECQ, QDrop): units of a prepared model, reconstructed one at a time."""

from ptq.recon.units import Unit, UnitKind, find_units

__all__ = ["Unit", "UnitKind", "find_units"]
