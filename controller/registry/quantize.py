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
    last: Exception | None = None
    for symbolic in (False, True):  # symbolic shape inference fails on some graphs
        try:
            quant_pre_process(str(source), str(out), skip_symbolic_shape=symbolic)
        except Exception as exc:  # noqa: BLE001 - the tools raise many types
            last = exc
            continue
        return out
    raise BuildError(f"pre-processing failed: {_first_line(last)}")


def int8_dynamic(prepared: Path, out: Path) -> Path:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    _quiet()
    try:
        # weights only: quantising activation x activation products (attention scores)
        # per run cost a sentence encoder 3 points of cosine similarity
        quantize_dynamic(str(prepared), str(out), weight_type=QuantType.QInt8,
                         per_channel=True, extra_options={"MatMulConstBOnly": True})
    except Exception as exc:  # noqa: BLE001
        raise BuildError(f"dynamic int8 quantisation failed: {_first_line(exc)}") from None
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
                        per_channel=_opset(prepared) >= 13, activation_type=QuantType.QUInt8,
                        weight_type=QuantType.QInt8, calibrate_method=CalibrationMethod.MinMax)
    except Exception as exc:  # noqa: BLE001
        raise BuildError(f"static int8 quantisation failed: {_first_line(exc)}") from None
    return out


def fp16(prepared: Path, out: Path) -> Path:
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    _quiet()
    try:
        model = convert_float_to_float16(onnx.load(str(prepared)), keep_io_types=True)
        onnx.save(model, str(out))
    except Exception as exc:  # noqa: BLE001
        raise BuildError(f"fp16 conversion failed: {_first_line(exc)}") from None
    return out


def _opset(model_path: Path) -> int:
    import onnx

    model = onnx.load(str(model_path), load_external_data=False)
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)


def has_conv(model_path: Path) -> bool:
    return "Conv" in _ops(model_path)


def int8_ops(model_path: Path) -> set[str]:
    """The 8-bit integer ops in the model (subgraphs included)."""
    return _ops(model_path) & INT8_OPS


def _ops(model_path: Path) -> set[str]:
    import onnx

    model = onnx.load(str(model_path), load_external_data=False)
    found: set[str] = set()
    graphs = [model.graph]
    while graphs:
        graph = graphs.pop()
        for node in graph.node:
            found.add(node.op_type)
            for a in node.attribute:
                if a.type == onnx.AttributeProto.GRAPH:
                    graphs.append(a.g)
                elif a.type == onnx.AttributeProto.GRAPHS:
                    graphs.extend(a.graphs)
    return found


def _quiet() -> None:
    # the quantisers log each node they skip at WARNING; the job's messages say enough
    logging.getLogger("onnxruntime").setLevel(logging.ERROR)
    logging.getLogger().setLevel(logging.ERROR)


def _first_line(exc: BaseException | None) -> str:
    lines = str(exc).strip().splitlines() if exc is not None else []
    return lines[0][:300] if lines else type(exc).__name__
