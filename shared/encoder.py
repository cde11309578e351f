"""A sentence encoder's declared config: what makes an ONNX model's token outputs one
embedding per text, kept in the model file's own metadata (``metadata_props``), so the
file signed and delivered is all a device needs to serve ``/v1/embeddings``:

    embedding.tokenizer    the tokenizer, as Hugging Face ``tokenizers`` saves it (JSON)
    embedding.pooling      mean | cls | max over the tokens the attention mask keeps, or
                           none: the model's output is already one vector per text
    embedding.normalize    true | false: scale each vector to length 1
    embedding.max_tokens   the longest input the model takes, in tokens; a longer one is
                           refused (not cut short)

The model takes ``input_ids`` and ``attention_mask`` (and ``token_type_ids`` if it has
it), ``[batch, tokens]``; its first output is ``[batch, tokens, dim]``, or ``[batch,
dim]`` with pooling none. ``edgefleet model push --encoder DIR`` writes these from a
sentence-transformers model directory (``from_sentence_transformers``).
"""

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

PREFIX = "embedding."
POOLING = ("mean", "cls", "max", "none")
INPUTS = ("input_ids", "attention_mask", "token_type_ids")
#: sentence-transformers' pooling modes that a device can do
_ST_POOLING = {"mean_tokens": "mean", "cls_token": "cls", "max_tokens": "max"}


@dataclass(frozen=True)
class Encoder:
    pooling: str
    normalize: bool
    max_tokens: int
    tokenizer: str  # tokenizer.json's text


def parse(props: Mapping[str, str]) -> Encoder | None:
    """The config in a model's metadata, None if it declares none; ValueError saying
    what is missing or wrong."""
    if not any(key.startswith(PREFIX) for key in props):
        return None
    missing = [k for k in ("tokenizer", "pooling", "max_tokens") if PREFIX + k not in props]
    if missing:
        raise ValueError(f"its embedding config has no {', '.join(PREFIX + k for k in missing)}")
    pooling = props[PREFIX + "pooling"]
    if pooling not in POOLING:
        raise ValueError(f"{PREFIX}pooling is {pooling!r}, not one of {', '.join(POOLING)}")
    normalize = props.get(PREFIX + "normalize", "false")
    if normalize not in ("true", "false"):
        raise ValueError(f"{PREFIX}normalize is {normalize!r}, not true or false")
    try:
        max_tokens = int(props[PREFIX + "max_tokens"])
    except ValueError:
        max_tokens = 0
    if max_tokens < 1:
        raise ValueError(f"{PREFIX}max_tokens is {props[PREFIX + 'max_tokens']!r}, not a "
                         "positive integer")
    try:
        tokenizer = json.loads(props[PREFIX + "tokenizer"])
    except ValueError:
        tokenizer = None
    if not isinstance(tokenizer, dict) or not isinstance(tokenizer.get("model"), dict):
        raise ValueError(f"{PREFIX}tokenizer is not a tokenizer.json (Hugging Face "  # noqa: TRY004
                         "tokenizers' format)")
    return Encoder(pooling, normalize == "true", max_tokens, props[PREFIX + "tokenizer"])


def from_sentence_transformers(directory: Path) -> dict[str, str]:
    """The metadata that declares a sentence-transformers model directory's tokenizer
    (``tokenizer.json``), pooling (``1_Pooling/config.json``, named in ``modules.json``),
    normalization (a Normalize module) and longest input (``sentence_bert_config.json``);
    ValueError naming the file that is missing or says something else."""
    def read(name: str) -> Any:
        try:
            return json.loads((directory / name).read_text())
        except FileNotFoundError:
            raise ValueError(f"{directory} has no {name}: is it a sentence-transformers "
                             "model directory?") from None
        except ValueError as exc:
            raise ValueError(f"{directory / name} is not JSON: {exc}") from None

    modules = read("modules.json")
    kinds = {m.get("type", "").rpartition(".")[2]: m.get("path", "") for m in modules}
    if "Pooling" not in kinds:
        raise ValueError(f"{directory}/modules.json names no Pooling module")
    pooling_config = read(f"{kinds['Pooling']}/config.json")
    chosen = [k.removeprefix("pooling_mode_") for k, v in pooling_config.items()
              if k.startswith("pooling_mode_") and v]
    if len(chosen) != 1 or chosen[0] not in _ST_POOLING:
        raise ValueError(f"{directory}/{kinds['Pooling']}/config.json asks for pooling "
                         f"{' + '.join(chosen) or 'none'}; a device pools by exactly one "
                         "of mean, cls or max")
    max_tokens = read("sentence_bert_config.json").get("max_seq_length")
    if not isinstance(max_tokens, int):
        raise ValueError(f"{directory}/sentence_bert_config.json has no max_seq_length")  # noqa: TRY004
    tokenizer = directory / "tokenizer.json"
    if not tokenizer.is_file():
        raise ValueError(f"{directory} has no tokenizer.json (save the tokenizer with a "
                         "fast tokenizer: AutoTokenizer.from_pretrained(...).save_pretrained)")
    return {PREFIX + "tokenizer": tokenizer.read_text(),
            PREFIX + "pooling": _ST_POOLING[chosen[0]],
            PREFIX + "normalize": "true" if "Normalize" in kinds else "false",
            PREFIX + "max_tokens": str(max_tokens)}
