"""Tiny real models built in the tests: an fp32 ONNX MLP, a fixed-size image model, a
recurrent model and a llama GGUF that loads; and ``staged``, a model as the installer
leaves it to be served."""

from pathlib import Path
from typing import Any

import gguf
import numpy as np

from cli.samples import mlp_onnx
from tests.conftest import unavailable


def staged(model_dir: Path, data: bytes, *, model: str, version: str = "1.0.0",
           fmt: str = "onnx", quantization: str = "fp32", variant: str = "source",
           requirements: dict[str, Any] | None = None) -> Path:
    """``data`` staged in ``model_dir`` as the installer leaves a model for ``Serving`` to
    activate: the file (``model.<fmt>``) and its signed description (``meta.json``)."""
    from shared.targets import TargetInfo

    model_dir.mkdir(parents=True, exist_ok=True)
    (model_dir / f"model.{fmt}").write_bytes(data)
    (model_dir / "meta.json").write_text(TargetInfo(
        model=model, version=version, variant=variant, format=fmt,
        quantization=quantization, requirements=requirements or {}).model_dump_json())
    return model_dir


def llama_cpp() -> Any:
    """The llama_cpp module; skips (fails in CI) without the ``llm`` extra."""
    try:
        import llama_cpp
    except ImportError:
        unavailable("llama-cpp-python (the llm extra)")
    return llama_cpp


def tiny_onnx(hidden: int = 4096, inputs: int = 128, classes: int = 10) -> bytes:
    """An fp32 MLP (x[1, inputs] -> relu -> y[1, classes]), as the demo pushes."""
    return mlp_onnx(hidden, inputs, classes)


#: the words a tiny encoder knows (ids from 2: 0 is [PAD], 1 is [UNK])
ENCODER_WORDS = ("the", "cat", "sat", "on", "mat", "dog", "ran", "far")
#: the tiny encoder's vector of each token id: row i is (i, i^2 mod 7, 1, -i)
ENCODER_TABLE = np.array([[i, i * i % 7, 1, -i] for i in range(2 + len(ENCODER_WORDS))],
                         dtype=np.float32)


def tiny_encoder(directory: Path, *, pooling: str = "mean", max_tokens: int = 8) -> Path:
    """A sentence encoder saved as sentence-transformers saves one, in ``directory``:
    ``model.onnx`` (token ids and attention mask in, each token's row of
    ``ENCODER_TABLE`` out, zero where masked), a word-level tokenizer
    (``tokenizers``' own ``tokenizer.json``), ``pooling`` and Normalize."""
    import json

    from onnx import TensorProto, helper, numpy_helper
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"[PAD]": 0, "[UNK]": 1} | {w: i + 2 for i, w in enumerate(ENCODER_WORDS)}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    (directory / "1_Pooling").mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(directory / "tokenizer.json"))
    (directory / "modules.json").write_text(json.dumps([
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling",
         "type": "sentence_transformers.models.Pooling"},
        {"idx": 2, "name": "2", "path": "2_Normalize",
         "type": "sentence_transformers.models.Normalize"}]))
    (directory / "1_Pooling" / "config.json").write_text(json.dumps(
        {"word_embedding_dimension": 4, "pooling_mode_cls_token": pooling == "cls",
         "pooling_mode_mean_tokens": pooling == "mean",
         "pooling_mode_max_tokens": pooling == "max"}))
    (directory / "sentence_bert_config.json").write_text(json.dumps(
        {"max_seq_length": max_tokens, "do_lower_case": False}))
    tokens = ["batch", "tokens"]
    graph = helper.make_graph(
        [helper.make_node("Gather", ["table", "input_ids"], ["rows"]),
         helper.make_node("Unsqueeze", ["attention_mask", "last"], ["mask3"]),
         helper.make_node("Cast", ["mask3"], ["maskf"], to=TensorProto.FLOAT),
         helper.make_node("Mul", ["rows", "maskf"], ["last_hidden_state"])],
        "encoder",
        [helper.make_tensor_value_info("input_ids", TensorProto.INT64, tokens),
         helper.make_tensor_value_info("attention_mask", TensorProto.INT64, tokens)],
        [helper.make_tensor_value_info("last_hidden_state", TensorProto.FLOAT, [*tokens, 4])],
        [numpy_helper.from_array(ENCODER_TABLE, "table"),
         numpy_helper.from_array(np.array([-1], dtype=np.int64), "last")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    path = directory / "model.onnx"
    path.write_bytes(model.SerializeToString())
    return path


def image_onnx() -> bytes:
    """A fixed-size image backbone, about as costly as a small detector's at this size
    (8-10 ms on these CPUs): image[1, 3, 320, 320] -> three stages of a 3x3 stride-2
    conv and a 3x3 conv (24, 48, 96 channels, ReLU) -> global average pool ->
    scores[1, 96]."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    nodes, weights, last, cin = [], [], "image", 3
    for i, cout in enumerate((24, 48, 96)):
        for j, stride in enumerate((2, 1)):
            name = f"W{i}{j}"
            fan_in = (cin if j == 0 else cout) * 9
            w = (rng.standard_normal((cout, cin if j == 0 else cout, 3, 3))
                 / fan_in ** 0.5).astype(np.float32)
            weights.append(numpy_helper.from_array(w, name))
            nodes += [helper.make_node("Conv", [last, name], [f"c{i}{j}"],
                                       strides=[stride, stride], pads=[1, 1, 1, 1]),
                      helper.make_node("Relu", [f"c{i}{j}"], [f"r{i}{j}"])]
            last = f"r{i}{j}"
        cin = cout
    nodes += [helper.make_node("GlobalAveragePool", [last], ["pooled"]),
              helper.make_node("Flatten", ["pooled"], ["scores"])]
    graph = helper.make_graph(
        nodes, "backbone",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, [1, 3, 320, 320])],
        [helper.make_tensor_value_info("scores", TensorProto.FLOAT, [1, 96])], weights)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    return bytes(model.SerializeToString())


def recurrent_onnx(steps: int, features: int = 64, hidden: int = 128) -> bytes:
    """A GRU over ``steps`` frames of ``features`` (x[steps, 1, features] -> h[1, 1,
    hidden]): sequential work that onnxruntime's threads cannot split, so calls gain
    from running at once (4000 steps: about 10 ms on these CPUs)."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    weights = [numpy_helper.from_array((rng.standard_normal((1, 3 * hidden, cols)) * 0.1)
                                       .astype(np.float32), name)
               for name, cols in (("W", features), ("R", hidden))]
    graph = helper.make_graph(
        [helper.make_node("GRU", ["x", "W", "R"], ["y", "h"], hidden_size=hidden)], "gru",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [steps, 1, features])],
        [helper.make_tensor_value_info("h", TensorProto.FLOAT, [1, 1, hidden])], weights)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    return bytes(model.SerializeToString())


def tiny_gguf(path: Path, *, width: int = 256, layers: int = 1) -> bytes:
    """An f16 llama that llama.cpp loads and generates from: the usual llama keys, a
    ``llama`` tokenizer with all 256 byte tokens, widths that k-quants accept (256)."""
    rng = np.random.default_rng(0)
    tokens = [b"<unk>", b"<s>", b"</s>"] + [f"<0x{i:02X}>".encode() for i in range(256)]
    tokens += [w.encode() for w in ("\u2581the", "\u2581quick", "\u2581fox", "\u2581edge")]
    vocab, heads, ff = len(tokens), 2, 2 * width
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_context_length(512)
    writer.add_embedding_length(width)
    writer.add_block_count(layers)
    writer.add_feed_forward_length(ff)
    writer.add_head_count(heads)
    writer.add_head_count_kv(heads)
    writer.add_rope_dimension_count(width // heads)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_file_type(1)  # mostly f16
    writer.add_tokenizer_model("llama")
    writer.add_token_list(tokens)
    writer.add_token_scores([0.0] * vocab)
    writer.add_token_types([2, 3, 3] + [6] * 256 + [1] * (vocab - 259))
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_unk_token_id(0)

    def matrix(name: str, rows: int, cols: int) -> None:
        writer.add_tensor(name, (rng.standard_normal((rows, cols)) * 0.05).astype(np.float16))

    def norm(name: str) -> None:
        writer.add_tensor(name, np.ones(width, dtype=np.float32))

    matrix("token_embd.weight", vocab, width)
    for i in range(layers):
        norm(f"blk.{i}.attn_norm.weight")
        for part in ("q", "k", "v", "output"):
            matrix(f"blk.{i}.attn_{part}.weight", width, width)
        norm(f"blk.{i}.ffn_norm.weight")
        matrix(f"blk.{i}.ffn_gate.weight", ff, width)
        matrix(f"blk.{i}.ffn_up.weight", ff, width)
        matrix(f"blk.{i}.ffn_down.weight", width, ff)
    norm("output_norm.weight")
    matrix("output.weight", vocab, width)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path.read_bytes()
