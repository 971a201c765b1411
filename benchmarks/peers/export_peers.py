"""The peers' ONNX QDQ models of one FP32 ONNX file, for benchmarks/export_speed.py. Run with the peers' Python:

    python benchmarks/peers/export_peers.py FP32.onnx CALIB.npy OUT_DIR

Writes OUT_DIR/ort_static.onnx (onnxruntime `quantize_static`: QDQ, per-channel int8 weights, uint8 activations,
MinMax calibration — its defaults plus per-channel) and OUT_DIR/nncf.onnx (NNCF's ONNX backend, its defaults), both
calibrated on the images in CALIB.npy (N, C, H, W float32, preprocessed), and prints the seconds each took.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np


def ort_static(fp32: Path, calib: np.ndarray, out: Path) -> None:
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.batches = iter([{"input": calib[i : i + 1]} for i in range(len(calib))])

        def get_next(self):
            return next(self.batches, None)

    quantize_static(
        str(fp32),
        str(out),
        Reader(),
        quant_format=QuantFormat.QDQ,
        per_channel=True,
        activation_type=QuantType.QUInt8,
        weight_type=QuantType.QInt8,
    )


def nncf_onnx(fp32: Path, calib: np.ndarray, out: Path) -> None:
    import nncf
    import onnx

    model = onnx.load(str(fp32))
    dataset = nncf.Dataset([{"input": calib[i : i + 1]} for i in range(len(calib))])
    onnx.save(nncf.quantize(model, dataset, subset_size=len(calib)), str(out))


def main() -> None:
    fp32, calib_path, out_dir = Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3])
    calib = np.load(calib_path).astype(np.float32)
    for name, fn in (("ort_static", ort_static), ("nncf", nncf_onnx)):
        start = time.perf_counter()
        fn(fp32, calib, out_dir / f"{name}.onnx")
        print(f"{name} {time.perf_counter() - start:.1f}", flush=True)


if __name__ == "__main__":
    main()
