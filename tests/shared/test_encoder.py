"""A sentence encoder's declared config: read from a sentence-transformers directory,
checked when a model is inspected, refused with the reason when it is not usable."""

import json

import pytest

from controller.registry.inspect import InvalidModel, inspect_artifact, prepare_upload
from shared import encoder
from tests.models import tiny_encoder, tiny_onnx


def test_a_sentence_transformers_directory_declares_its_pooling_and_limit(tmp_path) -> None:
    tiny_encoder(tmp_path, pooling="max", max_tokens=12)
    props = encoder.from_sentence_transformers(tmp_path)
    declared = encoder.parse(props)
    assert declared is not None
    assert (declared.pooling, declared.normalize, declared.max_tokens) == ("max", True, 12)
    assert declared.tokenizer == (tmp_path / "tokenizer.json").read_text()
    assert encoder.parse({"producer": "torch"}) is None  # declares nothing: not an encoder


@pytest.mark.parametrize(("change", "message"), [
    (lambda d: (d / "modules.json").unlink(), "has no modules.json"),
    (lambda d: (d / "tokenizer.json").unlink(), "has no tokenizer.json"),
    (lambda d: (d / "1_Pooling" / "config.json").write_text(json.dumps(
        {"pooling_mode_mean_tokens": True, "pooling_mode_max_tokens": True})),
     "asks for pooling mean_tokens \\+ max_tokens"),
    (lambda d: (d / "sentence_bert_config.json").write_text("{}"), "has no max_seq_length"),
])
def test_a_directory_that_cannot_be_served_says_which_file_is_wrong(
        tmp_path, change, message) -> None:
    tiny_encoder(tmp_path)
    change(tmp_path)
    with pytest.raises(ValueError, match=message):
        encoder.from_sentence_transformers(tmp_path)


@pytest.mark.parametrize(("changed", "message"), [
    ({"embedding.tokenizer": None, "embedding.max_tokens": None},
     "has no embedding.tokenizer, embedding.max_tokens"),
    ({"embedding.pooling": "sum"}, "'sum', not one of mean, cls, max, none"),
    ({"embedding.max_tokens": "lots"}, "'lots', not a positive integer"),
    ({"embedding.normalize": "yes"}, "'yes', not true or false"),
    ({"embedding.tokenizer": "[PAD]"}, "not a tokenizer.json"),
])
def test_a_config_that_is_wrong_is_refused_with_the_reason(tmp_path, changed, message) -> None:
    tiny_encoder(tmp_path)
    props = encoder.from_sentence_transformers(tmp_path) | changed
    with pytest.raises(ValueError, match=message):
        encoder.parse({k: v for k, v in props.items() if v is not None})


def test_a_model_is_inspected_as_an_encoder_only_if_its_graph_is_one(tmp_path) -> None:
    source = tiny_encoder(tmp_path / "st")
    props = encoder.from_sentence_transformers(tmp_path / "st")
    path = tmp_path / "encoder.onnx"
    assert prepare_upload(source, path, metadata=props)
    assert inspect_artifact(path).requirements["onnx_embedding"] == {
        "pooling": "mean", "normalize": True, "max_tokens": 8, "dimension": 4}
    assert "onnx_embedding" not in inspect_artifact(source).requirements
    (tmp_path / "mlp.onnx").write_bytes(tiny_onnx())
    prepare_upload(tmp_path / "mlp.onnx", path, metadata=props)
    with pytest.raises(InvalidModel, match=r"takes input_ids and attention_mask .* this one "
                       r"takes x float32\[1,128\]"):
        inspect_artifact(path)
    prepare_upload(source, path, metadata=props | {"embedding.pooling": "none"})
    with pytest.raises(InvalidModel, match=r"pooling none the first output must have 2 "
                       r"dimensions; last_hidden_state has \[\?,\?,4\]"):
        inspect_artifact(path)
