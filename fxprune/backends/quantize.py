"""INT8 models as onnxruntime deploys them: static quantization to QDQ with onnxruntime.quantization.

Weights per output channel (int8), activations per tensor (uint8) calibrated by MinMax on batches of the
model's inputs; onnxruntime's CPU provider fuses each QuantizeLinear/DequantizeLinear pair around a layer
into an integer kernel (QLinearConv, QGemm). ``reduce_range`` (7-bit weights) is on only where the CPU
lacks VNNI, as onnxruntime's guide advises: without VNNI, 8-bit products can saturate.
"""

from __future__ import annotations

import logging
import tempfile
from functools import lru_cache
from pathlib import Path
from typing import Iterable

import numpy as np
import onnx


@lru_cache(maxsize=1)
def has_vnni() -> bool:
    """Whether the CPU has the 8-bit dot-product instructions (AVX-512 VNNI or AVX-VNNI)."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_vnni" in flags or "avx_vnni" in flags


def settings() -> dict[str, object]:
    """What a quantized model's speed and numbers depend on (part of the INT8 engine's identity)."""
    return {"format": "QDQ", "weights": "int8 per channel", "activations": "uint8 per tensor, MinMax",
            "reduce_range": not has_vnni()}


def quantize_int8(model: bytes | str | Path | onnx.ModelProto, batches: Iterable[dict[str, np.ndarray]]) -> bytes:
    """``model`` (FP32 ONNX) statically quantized to INT8 QDQ, activations calibrated on ``batches`` (feeds
    by input name); returns the quantized model's bytes."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    class Batches(CalibrationDataReader):
        def __init__(self) -> None:
            self.batches = iter(list(batches))

        def get_next(self) -> dict | None:
            return next(self.batches, None)

    if isinstance(model, (str, Path)):
        model = onnx.load(str(model))
    elif isinstance(model, bytes):
        model = onnx.load_from_string(model)
    root = logging.getLogger()  # onnxruntime.quantization advises pre-processing on the root logger, per call
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            source, target = Path(tmp) / "fp32.onnx", Path(tmp) / "int8.onnx"
            onnx.save(model, str(source))
            quantize_static(str(source), str(target), Batches(), quant_format=QuantFormat.QDQ, per_channel=True,
                            reduce_range=not has_vnni(), activation_type=QuantType.QUInt8,
                            weight_type=QuantType.QInt8)
            return target.read_bytes()
    finally:
        root.setLevel(level)
