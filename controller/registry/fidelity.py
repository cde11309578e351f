"""How faithful a derived variant is to its source: metrics chosen from the outputs.

Pure numpy over the outputs both models produced on the same sample inputs; no model
is loaded here. Each metric is a similarity in [0, 1] (1 = the same answers):

- ``cosine``: mean cosine similarity of each output, flattened per sample (embeddings,
  hidden states, regressions: any float output).
- ``top1``: how often the arg-max over the last axis agrees (class scores ``[N, C]``,
  per-position token scores ``[N, T, C]``).
- ``iou``: intersection over union of the maps thresholded at 0.5 for probabilities and
  at 0 for logits (segmentation and detection maps ``[N, C, H, W]``, ``[N, H, W]``).
- ``token_agreement``: per-position agreement of generated token ids (GGUF).
- ``perplexity``: the source's perplexity on a text over the variant's, at most 1 (0.95:
  the variant is 5% less sure of the text than its source; GGUF generators).

A model with several outputs is judged by its worst output. The metric that describes a
model best (its *primary* metric) is chosen from the first output's name and shape
unless the pusher names one. A quality floor (``--min-fidelity cosine>=0.99``) names
metrics from ``METRICS``; ``parse_floor`` refuses any other.
"""

import math
import re
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

METRICS = ("cosine", "top1", "iou", "token_agreement", "perplexity")
ONNX_METRICS = ("cosine", "top1", "iou")
#: below this, a variant without a floor is still offered but flagged as poor
POOR = {"cosine": 0.98, "top1": 0.9, "iou": 0.7, "token_agreement": 0.5, "perplexity": 0.9}

_FLOOR = re.compile(r"^\s*([a-z_0-9]+)\s*>=\s*([0-9]*\.?[0-9]+)\s*$")
_EMBEDDING_NAMES = re.compile(r"embed|pool|sentence|feature|hidden|vector", re.IGNORECASE)
_MAP_NAMES = re.compile(r"mask|map|seg|heat|prob", re.IGNORECASE)

Outputs = Sequence[Mapping[str, Any]]  # per sample: {output name: array-like}


class UnknownMetric(ValueError):
    """A floor or metric name that is not one of ``METRICS``."""


def parse_floor(text: str | Mapping[str, float]) -> dict[str, float]:
    """``"cosine>=0.99,top1>=0.95"`` (or a mapping) as {metric: minimum}; raises
    ValueError naming what is wrong."""
    items = text.items() if isinstance(text, Mapping) else [
        _split_floor(part) for part in text.split(",") if part.strip()]
    floor: dict[str, float] = {}
    for metric, value in items:
        if metric not in METRICS:
            raise UnknownMetric(f"unknown fidelity metric {metric!r}; known: "
                                f"{', '.join(METRICS)}")
        if not 0.0 <= float(value) <= 1.0:
            raise ValueError(f"the floor for {metric} must be between 0 and 1, not {value}")
        floor[metric] = float(value)
    return floor


def _split_floor(part: str) -> tuple[str, float]:
    match = _FLOOR.match(part)
    if match is None:
        raise ValueError(f"{part.strip()!r} is not METRIC>=VALUE, e.g. cosine>=0.99")
    return match[1], float(match[2])


def compare(variant: Outputs, source: Outputs) -> dict[str, float]:
    """Every ONNX metric that applies to these outputs, each the worst over outputs."""
    if len(variant) != len(source) or not source:
        raise ValueError("the variant and the source were run on different inputs")
    per_metric: dict[str, list[float]] = {}
    for name in source[0]:
        pairs = [(np.asarray(v[name]), np.asarray(s[name])) for v, s in zip(variant, source,
                                                                           strict=True)]
        if not np.issubdtype(pairs[0][1].dtype, np.floating):
            agree = float(np.mean([np.array_equal(a, b) for a, b in pairs]))
            per_metric.setdefault("top1", []).append(agree)
            continue
        per_metric.setdefault("cosine", []).append(_mean(_cosine(a, b) for a, b in pairs))
        if pairs[0][1].ndim >= 2 and pairs[0][1].shape[-1] >= 2:
            per_metric.setdefault("top1", []).append(_top1(pairs))
        if pairs[0][1].ndim >= 3:
            per_metric.setdefault("iou", []).append(_iou(pairs))
    return {metric: round(min(values), 6) for metric, values in per_metric.items()}


def primary_metric(outputs: Sequence[tuple[str, Sequence[int | str | None]]],
                   named: str | None = None) -> str:
    """The metric that describes a model with these ``(name, shape)`` outputs best."""
    if named:
        return named
    name, shape = outputs[0]
    rank = len(shape)
    if _EMBEDDING_NAMES.search(name) or rank <= 1:
        return "cosine"
    if rank >= 3 and _MAP_NAMES.search(name):
        return "iou"
    if rank in (2, 3):
        return "top1"
    return "cosine"


def below_floor(figures: Mapping[str, float], floor: Mapping[str, float]) -> str | None:
    """Why ``figures`` fall below ``floor``, or None. A floor metric the figures lack
    (it does not apply to these outputs) is a failure too: the floor cannot be shown."""
    for metric, minimum in floor.items():
        got = figures.get(metric)
        if got is None:
            return f"{metric} does not apply to this model's outputs (has {sorted(figures)})"
        if got < minimum:
            return f"{metric} {got:.4f} is below the version's floor of {minimum:g}"
    return None


def poor(figures: Mapping[str, float], primary: str) -> str | None:
    """A warning when the primary figure is poor, for versions without a floor."""
    got = figures.get(primary)
    if got is not None and got < POOR[primary]:
        return f"{primary} {got:.4f} is poor (below {POOR[primary]:g}); check before rolling out"
    return None


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    x, y = a.astype(np.float64).ravel(), b.astype(np.float64).ravel()
    if x.shape != y.shape:
        return 0.0
    nx, ny = float(np.linalg.norm(x)), float(np.linalg.norm(y))
    if nx == 0.0 and ny == 0.0:
        return 1.0
    if nx == 0.0 or ny == 0.0 or not math.isfinite(nx * ny):
        return 0.0
    return float(np.dot(x, y) / (nx * ny))


def _top1(pairs: list[tuple[np.ndarray, np.ndarray]]) -> float:
    same = total = 0
    for a, b in pairs:
        if a.shape != b.shape:
            total += max(1, int(np.prod(b.shape[:-1])))
            continue
        same += int(np.sum(np.argmax(a, axis=-1) == np.argmax(b, axis=-1)))
        total += int(np.prod(b.shape[:-1]))
    return same / total if total else 1.0


def _iou(pairs: list[tuple[np.ndarray, np.ndarray]]) -> float:
    inter = union = 0
    for a, b in pairs:
        if a.shape != b.shape:
            union += b.size
            continue
        cut = 0.5 if float(np.min(b)) >= 0.0 and float(np.max(b)) <= 1.0 else 0.0
        ma, mb = a > cut, b > cut
        inter += int(np.sum(ma & mb))
        union += int(np.sum(ma | mb))
    return inter / union if union else 1.0


def _mean(values: Any) -> float:
    got = list(values)
    return float(np.mean(got)) if got else 1.0
