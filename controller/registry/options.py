"""What a push asks of its derivation, checked before anything is registered.

A push may declare sample inputs, give a samples file, choose the variants to build
(or none), name the fidelity metric and set a quality floor. Everything that can be
known wrong at push time is refused here with a 422 that names the problem, so a
version is never registered with a derivation that cannot work: an unknown variant or
metric, a declaration or sample that does not fit the model, or a model whose inputs
cannot be generated safely when no samples were given.
"""

from collections.abc import Mapping
from typing import Any

import numpy as np

from controller.registry import fidelity, inputs
from controller.registry.derive import default_variants, known_variants
from controller.registry.inspect import ArtifactInfo
from controller.registry.service import RegistryError


def derive_options(info: ArtifactInfo, *, declared: Mapping[str, str],
                   variants: list[str] | None, derive: bool, floor: str | None,
                   metric: str | None, samples: list[dict[str, np.ndarray]] | None,
                   smoke_inputs: bool, text: str | None = None) -> dict[str, Any]:
    """The version's ``derive_options``; raises RegistryError(422) naming the problem."""
    if not derive:
        if variants:
            raise RegistryError(422, "invalid_variants", "--no-derive builds no variants, "
                                "so it cannot be given with --variants")
        variants = []
    known = known_variants(info.format)
    for name in variants or ():
        if name not in known:
            raise RegistryError(422, "unknown_variant", f"{info.format} versions cannot have "
                                f"a {name!r} variant; known: {', '.join(known)}")
    parsed_floor = _floor(info, floor, metric)
    if info.format == "onnx":
        _check_inputs(info, declared, samples, smoke_inputs)
    elif declared or samples:
        raise RegistryError(422, "invalid_samples", "GGUF versions take prompts as their "
                            "smoke-test inputs, not tensors")
    if text is not None and (info.format != "gguf" or info.requirements.get("gguf_embedding")):
        raise RegistryError(422, "invalid_text", "a text to measure perplexity on is for GGUF "
                            "language models; this model is not one")
    out: dict[str, Any] = {"floor": parsed_floor, "metric": metric}
    if text is not None:
        out["text"] = text
    if declared:
        out["inputs"] = dict(declared)
    if variants is not None:
        out["variants"] = list(dict.fromkeys(variants))
    elif not default_variants(info.format, info.quantization):
        out["variants"] = []
    return out


def _floor(info: ArtifactInfo, floor: str | None, metric: str | None) -> dict[str, float]:
    try:
        parsed = fidelity.parse_floor(floor or "")
    except fidelity.UnknownMetric as exc:
        raise RegistryError(422, "unknown_metric", str(exc)) from None
    except ValueError as exc:
        raise RegistryError(422, "invalid_floor", str(exc)) from None
    allowed = fidelity.ONNX_METRICS if info.format == "onnx" else (
        ("cosine",) if info.requirements.get("gguf_embedding")
        else ("token_agreement", "perplexity"))
    for name in [*parsed, *([metric] if metric else [])]:
        if name not in allowed:
            raise RegistryError(422, "unknown_metric", f"{name!r} is not a fidelity metric of "
                                f"{info.format} models; use one of {', '.join(allowed)}")
    return parsed


def _check_inputs(info: ArtifactInfo, declared: Mapping[str, str],
                  samples: list[dict[str, np.ndarray]] | None, smoke_inputs: bool) -> None:
    model_inputs = list(info.inputs)
    try:
        decls = inputs.parse_declarations(declared, model_inputs)
        if samples is not None:
            inputs.check_feeds(samples, model_inputs)
            return
        if smoke_inputs:
            return
        needs = inputs.missing(model_inputs, decls)
    except inputs.InputError as exc:
        raise RegistryError(422, "invalid_samples", str(exc)) from None
    if needs:
        raise RegistryError(422, "inputs_needed",
                            "sample inputs cannot be generated safely for this model; "
                            "give --samples or declare its inputs: " + "; ".join(needs))
