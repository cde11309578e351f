"""Build an ONNX model's derived variants with onnxruntime's and onnx's own tools.

- pre-processing (``quant_pre_process``): shape inference, graph optimisation, and
  weights held in ``Constant`` nodes folded into initializers, which the quantisers need;
- ``int8_static``: QDQ int8, calibrated on the version's sample inputs, per-channel
  weights (what onnxruntime recommends for conv nets);
- ``int8_dynamic``: weights int8, activations quantised per run (transformers, RNNs);
- ``fp16``: weights and arithmetic in float16, inputs and outputs kept float32.

Each builder writes a file and returns its path, or raises ``BuildError`` with the
tool's reason. Whether a built file is worth offering is decided by the caller
(``controller.registry.derive``); ``int8_ops`` tells it whether a file really computes
in integers.
"""

import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from controller.registry.inspect import first_line, graphs, opset_of

#: ops that show a model computes (or stores weights) in 8-bit integers
INT8_OPS = frozenset({"QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear",
                      "MatMulInteger", "ConvInteger", "QLinearMatMul", "QLinearConv",
                      "QAttention", "DynamicQuantizeLSTM", "QGemm", "MatMulIntegerToFloat",
                      "DynamicQuantizeMatMul"})
ONNX_VARIANTS = ("int8", "int8_static", "int8_dynamic", "fp16")
CALIBRATION_SAMPLES = 64


class BuildError(Exception):
    """The tool could not build the variant; the message says why."""


def preprocess(source: Path, out: Path) -> Path:
    """``source`` with shapes inferred and constant weights folded into initializers."""
    from onnxruntime.quantization.shape_inference import quant_pre_process

    _quiet()
    try:
        quant_pre_process(str(source), str(out))
    except Exception:  # noqa: BLE001 - symbolic shape inference fails on some graphs
        try:
            quant_pre_process(str(source), str(out), skip_symbolic_shape=True)
        except Exception as exc:  # noqa: BLE001 - the tools raise many types
            raise BuildError(f"pre-processing failed: {first_line(exc)}") from None
    return out


def int8_dynamic(prepared: Path, out: Path) -> Path:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    _quiet()
    try:
        # weights only: quantising activation x activation products (attention scores)
        # per run cost a sentence encoder 3 points of cosine similarity
        quantize_dynamic(str(prepared), str(out), weight_type=QuantType.QInt8,
                         per_channel=True, extra_options={"MatMulConstBOnly": True})
    except Exception as exc:  # noqa: BLE001
        raise BuildError(f"dynamic int8 quantisation failed: {first_line(exc)}") from None
    return out


def int8_static(prepared: Path, out: Path, feeds: list[dict[str, Any]]) -> Path:
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )

    class Reader(CalibrationDataReader):  # type: ignore[misc]
        def __init__(self) -> None:
            self._feeds: Iterator[dict[str, Any]] = iter(feeds[:CALIBRATION_SAMPLES])

        def get_next(self) -> dict[str, Any] | None:
            return next(self._feeds, None)

    _quiet()
    try:
        # per-channel scales need DequantizeLinear's axis, which opset 13 introduced
        quantize_static(str(prepared), str(out), Reader(), quant_format=QuantFormat.QDQ,
                        per_channel=opset_of(_load(prepared)) >= 13,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                        calibrate_method=CalibrationMethod.MinMax)
    except Exception as exc:  # noqa: BLE001
        raise BuildError(f"static int8 quantisation failed: {first_line(exc)}") from None
    return out


def fp16(prepared: Path, out: Path) -> Path:
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    _quiet()
    try:
        model = convert_float_to_float16(onnx.load(str(prepared)), keep_io_types=True)
        onnx.save(model, str(out))
    except Exception as exc:  # noqa: BLE001
        raise BuildError(f"fp16 conversion failed: {first_line(exc)}") from None
    return out


def _load(model_path: Path) -> Any:
    import onnx

    return onnx.load(str(model_path), load_external_data=False)


def has_conv(model_path: Path) -> bool:
    return "Conv" in _ops(model_path)


def int8_ops(model_path: Path) -> set[str]:
    """The 8-bit integer ops in the model (subgraphs included)."""
    return _ops(model_path) & INT8_OPS


def _ops(model_path: Path) -> set[str]:
    return {node.op_type for graph in graphs(_load(model_path)) for node in graph.node}


def _quiet() -> None:
    # the quantisers log each node they skip at WARNING; the job's messages say enough
    logging.getLogger("onnxruntime").setLevel(logging.ERROR)
    logging.getLogger().setLevel(logging.ERROR)
