"""Validate an uploaded model file and describe it, before anything is registered.

ONNX: ``onnx.checker`` must pass and onnxruntime must open a session on it.
GGUF: the ``gguf`` package must parse it and it must name a known architecture.
The format is taken from the content (GGUF files start with ``GGUF``), and a file
whose name says otherwise is refused as mislabelled.
"""

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from controller.registry.inputs import TensorSpec, shape_text, specs
from shared import encoder

GGUF_MAGIC = b"GGUF"
_ONNX_QUANT_OPS = {"QuantizeLinear", "DynamicQuantizeLinear", "MatMulInteger",
                   "QLinearMatMul", "QLinearConv", "ConvInteger"}


class InvalidModel(Exception):
    """The file is not a usable model; the message says what is wrong."""


@dataclass(frozen=True)
class ArtifactInfo:
    format: str  # "onnx" | "gguf"
    quantization: str  # "fp32", "fp16", "int8", "q8_0", "q4_k_m", ...
    requirements: dict[str, Any] = field(default_factory=dict)
    ram_estimate_bytes: int = 0
    #: an ONNX model's inputs and outputs as onnxruntime describes them
    inputs: tuple[TensorSpec, ...] = ()
    outputs: tuple[TensorSpec, ...] = ()


def inspect_artifact(path: Path, *, filename: str | None = None,
                     checker: bool = True) -> ArtifactInfo:
    """Validate ``path`` and describe it; raise InvalidModel with the reason.
    ``checker=False`` skips ``onnx.checker`` for variants the controller built itself and
    has run: quantisers can write graphs it refuses (nodes out of topological order)
    that onnxruntime runs correctly."""
    with path.open("rb") as f:
        head = f.read(4)
    fmt = "gguf" if head == GGUF_MAGIC else "onnx"
    if filename:
        suffix = Path(filename).suffix.lower().lstrip(".")
        if suffix in ("onnx", "gguf") and suffix != fmt:
            raise InvalidModel(f"{filename} is named .{suffix} but its content is {fmt}")
    return _inspect_gguf(path) if fmt == "gguf" else _inspect_onnx(path, checker=checker)


def _inspect_onnx(path: Path, *, checker: bool) -> ArtifactInfo:
    import onnx
    import onnxruntime as ort

    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # noqa: BLE001 - onnx raises many types for bad input
        raise InvalidModel(f"not a valid ONNX model: {first_line(exc)}") from None
    if external := external_data(model):
        raise InvalidModel(f"its weights are in external data files ({', '.join(external)}), "
                           "which an upload cannot carry; push it with 'edgefleet model "
                           "push', which folds them into the model, or save it with "
                           "onnx.save(model, path, save_as_external_data=False)")
    try:
        if checker:
            onnx.checker.check_model(str(path))
    except Exception as exc:  # noqa: BLE001
        raise InvalidModel(f"not a valid ONNX model: {first_line(exc)}") from None
    try:
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own types
        raise InvalidModel(f"onnxruntime cannot load the model: {first_line(exc)}") from None
    opset = opset_of(model)
    ops = {node.op_type for node in model.graph.node}
    dtypes = [init.data_type for init in model.graph.initializer]
    if ops & _ONNX_QUANT_OPS:
        quant = "int8"
    elif dtypes and dtypes.count(onnx.TensorProto.FLOAT16) > len(dtypes) / 2:
        quant = "fp16"
    else:
        quant = "fp32"
    size = path.stat().st_size
    requirements = {"runtime": "onnxruntime", "onnx_ir_version": model.ir_version,
                    "onnx_opset": opset, "min_onnxruntime": min_onnxruntime(opset)}
    inputs, outputs = tuple(specs(session.get_inputs())), tuple(specs(session.get_outputs()))
    if embedding := _encoder(model, inputs, outputs):
        requirements["onnx_embedding"] = embedding
    return ArtifactInfo(format="onnx", quantization=quant, requirements=requirements,
                        ram_estimate_bytes=2 * size + (16 << 20), inputs=inputs,
                        outputs=outputs)


def _encoder(model: Any, inputs: tuple[TensorSpec, ...], outputs: tuple[TensorSpec, ...]
             ) -> dict[str, Any] | None:
    """A sentence encoder's declared config (``shared.encoder``), checked against the
    graph it describes, as the target's requirement (the device reads the rest from the
    file): None for a model that declares none."""
    try:
        declared = encoder.parse({p.key: p.value for p in model.metadata_props})
    except ValueError as exc:
        raise InvalidModel(str(exc)) from None
    if declared is None:
        return None
    names = {i.name: i for i in inputs}
    wrong = [n for n in names if n not in encoder.INPUTS] + [
        n for n in encoder.INPUTS[:2] if n not in names]
    if wrong or any(not (i.dtype or "").startswith("int") or len(i.shape) != 2
                    for i in names.values()):
        raise InvalidModel("a sentence encoder takes input_ids and attention_mask (and "
                           "token_type_ids), integers [batch, tokens]; this one takes "
                           + ", ".join(f"{i.name} {i.dtype}{shape_text(i.shape)}" for i in inputs))
    rank = 2 if declared.pooling == "none" else 3
    if len(outputs[0].shape) != rank:
        raise InvalidModel(f"with {encoder.PREFIX}pooling {declared.pooling} the first "
                           f"output must have {rank} dimensions; {outputs[0].name} has "
                           f"{shape_text(outputs[0].shape)}")
    dim = outputs[0].shape[-1]
    return {"pooling": declared.pooling, "normalize": declared.normalize,
            "max_tokens": declared.max_tokens,
            "dimension": dim if isinstance(dim, int) and dim > 0 else None}


def _inspect_gguf(path: Path) -> ArtifactInfo:
    import gguf

    try:
        reader = gguf.GGUFReader(str(path))
        arch = _field_str(reader, "general.architecture")
    except Exception as exc:  # noqa: BLE001 - a truncated file fails in many ways
        raise InvalidModel(f"not a valid GGUF file: {first_line(exc)}") from None
    known = set(gguf.MODEL_ARCH_NAMES.values())
    if arch not in known:
        raise InvalidModel(f"GGUF architecture {arch!r} is not one llama.cpp knows")
    file_type = _field_int(reader, "general.file_type")
    quant = _GGUF_FILE_TYPES.get(file_type, f"type{file_type}") if file_type is not None \
        else _dominant_tensor_type(reader)
    size = path.stat().st_size
    requirements: dict[str, Any] = {"runtime": "llama.cpp", "gguf_architecture": arch}
    if f"{arch}.pooling_type" in reader.fields:  # an encoder: it embeds, it does not generate
        requirements["gguf_embedding"] = True
    return ArtifactInfo(format="gguf", quantization=quant, requirements=requirements,
                        ram_estimate_bytes=size + (64 << 20))


def external_data(model: Any) -> list[str]:
    """The external data files an ``onnx.ModelProto`` (loaded without them) refers to."""
    import onnx

    files: set[str] = set()
    for graph in graphs(model):
        tensors = list(graph.initializer) + [a.t for n in graph.node for a in n.attribute
                                             if a.type == onnx.AttributeProto.TENSOR]
        for t in tensors:
            if t.data_location == onnx.TensorProto.EXTERNAL:
                files |= {e.value for e in t.external_data if e.key == "location"}
    return sorted(files)


def graphs(model: Any) -> Iterator[Any]:
    """An ``onnx.ModelProto``'s main graph and every subgraph (``If``, ``Loop``, ...)."""
    import onnx

    pending = [model.graph]
    while pending:
        graph = pending.pop()
        yield graph
        for node in graph.node:
            for a in node.attribute:
                if a.type == onnx.AttributeProto.GRAPH:
                    pending.append(a.g)
                elif a.type == onnx.AttributeProto.GRAPHS:
                    pending.extend(a.graphs)


def opset_of(model: Any) -> int:
    """The default-domain opset an ``onnx.ModelProto`` is stamped with (0 if none)."""
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)


def prepare_upload(path: Path, out: Path, *, metadata: dict[str, str] | None = None
                   ) -> bool:
    """Write ``path`` to ``out`` as one file, with its external data folded in and
    ``metadata`` (``metadata_props``) set; False if there is nothing to change (or it is
    not ONNX at all: the controller says what is wrong with it). Raises InvalidModel if
    the data files are missing or the result is over protobuf's 2 GiB limit."""
    import onnx

    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception:  # noqa: BLE001 - not ONNX: left for the controller to refuse
        return False
    if not external_data(model) and not metadata:
        return False
    try:
        onnx.load_external_data_for_model(model, str(path.parent))
        onnx.helper.set_model_props(model, {p.key: p.value for p in model.metadata_props}
                                    | (metadata or {}))
        onnx.save(model, str(out))
    except Exception as exc:  # noqa: BLE001
        raise InvalidModel(f"cannot write the model as one file: {first_line(exc)}") from None
    return True


#: The first onnxruntime release implementing each ONNX opset (onnxruntime's
#: docs/Versioning.md). Newer opsets than listed need what the controller runs.
_ORT_FOR_OPSET = {11: "1.0", 12: "1.3", 13: "1.6", 14: "1.8", 15: "1.9", 16: "1.11",
                  17: "1.13", 18: "1.14", 19: "1.15", 20: "1.17", 21: "1.18", 22: "1.20"}


def min_onnxruntime(opset: int) -> str:
    """The oldest onnxruntime that runs a model stamped with ``opset``."""
    import onnxruntime as ort

    if opset > max(_ORT_FOR_OPSET):
        return str(ort.__version__)
    return _ORT_FOR_OPSET.get(max(opset, 11), "1.0")


_GGUF_FILE_TYPES = {0: "f32", 1: "f16", 2: "q4_0", 3: "q4_1", 7: "q8_0", 8: "q5_0", 9: "q5_1",
                    10: "q2_k", 11: "q3_k_s", 12: "q3_k_m", 13: "q3_k_l", 14: "q4_k_s",
                    15: "q4_k_m", 16: "q5_k_s", 17: "q5_k_m", 18: "q6_k"}


def _field_str(reader: Any, key: str) -> str:
    field_ = reader.fields.get(key)
    if field_ is None:
        raise InvalidModel(f"GGUF file has no {key}")
    return bytes(field_.parts[field_.data[0]]).decode("utf-8", "replace")


def _field_int(reader: Any, key: str) -> int | None:
    field_ = reader.fields.get(key)
    if field_ is None:
        return None
    return int(field_.parts[field_.data[0]][0])


def _dominant_tensor_type(reader: Any) -> str:
    counts: dict[str, int] = {}
    for tensor in reader.tensors:
        name = tensor.tensor_type.name.lower()
        counts[name] = counts.get(name, 0) + int(tensor.n_bytes)
    return max(counts, key=lambda k: counts[k]) if counts else "unknown"


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message (at most 300 characters), for operators."""
    text = str(exc).strip().splitlines()
    return text[0][:300] if text else type(exc).__name__
