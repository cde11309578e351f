"""Variant choice: table cases and Hypothesis properties."""

from hypothesis import given
from hypothesis import strategies as st

from controller.registry.choice import VariantSpec, choose_variant, misfit
from shared.messages import Capabilities, Runtime

GIB = 1 << 30
ORT = Runtime(name="onnxruntime", version="1.32.0")
LLAMA = Runtime(name="llama.cpp", version="0.3.36")


def device(ram_gib: float = 8, disk_gib: float = 32, runtimes=(ORT, LLAMA)) -> Capabilities:
    return Capabilities(arch="arm64", cpu_count=4, ram_bytes=int(ram_gib * GIB),
                        disk_free_bytes=int(disk_gib * GIB), runtimes=runtimes)


def variant(name: str, fmt: str, quant: str, gib: float, **req) -> VariantSpec:
    return VariantSpec(name, fmt, quant, int(gib * GIB), int(gib * 1.5 * GIB), req)


FP32 = variant("source", "onnx", "fp32", 2.0, min_onnxruntime="1.18.0")
INT8 = variant("int8", "onnx", "int8", 0.5, min_onnxruntime="1.18.0")
Q4 = variant("q4_k_m", "gguf", "q4_k_m", 0.3)


def test_the_highest_fidelity_variant_that_fits_wins() -> None:
    assert choose_variant([INT8, FP32], device(ram_gib=8)).variant == FP32
    assert choose_variant([INT8, FP32], device(ram_gib=2)).variant == INT8


def test_a_missing_runtime_or_old_runtime_is_a_reason() -> None:
    no_ort = device(runtimes=(LLAMA,))
    choice = choose_variant([FP32, INT8, Q4], no_ort)
    assert choice.variant == Q4
    assert "needs onnxruntime" in choice.reasons["source"]
    old = device(runtimes=(Runtime(name="onnxruntime", version="1.16.3"),))
    assert "needs onnxruntime >= 1.18.0" in (misfit(FP32, old) or "")


def test_when_nothing_fits_every_variant_says_why() -> None:
    choice = choose_variant([FP32, INT8], device(ram_gib=0.25, disk_gib=0.5))
    assert choice.variant is None
    assert set(choice.reasons) == {"source", "int8"}
    assert "RAM" in choice.reasons["int8"]


def test_disk_must_hold_the_download_beside_the_running_model() -> None:
    assert "free disk" in (misfit(FP32, device(disk_gib=3)) or "")


VARIANTS = st.builds(
    VariantSpec,
    name=st.text("abcdefgh", min_size=1, max_size=6),
    format=st.sampled_from(["onnx", "gguf"]),
    quantization=st.sampled_from(["fp32", "fp16", "int8", "q8_0", "q4_k_m", "weird"]),
    size=st.integers(1, 8 * GIB),
    ram_estimate_bytes=st.integers(1, 16 * GIB),
    requirements=st.sampled_from([{}, {"min_onnxruntime": "1.18"}, {"min_onnxruntime": "9.0"}]),
)
DEVICES = st.builds(
    Capabilities, arch=st.sampled_from(["arm64", "x86_64"]), cpu_count=st.integers(1, 16),
    ram_bytes=st.integers(GIB // 2, 16 * GIB), disk_free_bytes=st.integers(0, 64 * GIB),
    runtimes=st.lists(st.sampled_from([ORT, LLAMA]), unique=True).map(tuple))


@given(st.lists(VARIANTS, max_size=6, unique_by=lambda v: v.name), DEVICES)
def test_the_choice_fits_whenever_something_fits(variants, dev) -> None:
    choice = choose_variant(variants, dev)
    fitting = [v for v in variants if misfit(v, dev) is None]
    assert (choice.variant is None) == (not fitting)
    if choice.variant is not None:
        assert misfit(choice.variant, dev) is None
        runtime = {"onnx": "onnxruntime", "gguf": "llama.cpp"}[choice.variant.format]
        assert runtime in {r.name for r in dev.runtimes}  # never a runtime it lacks
    assert set(choice.reasons) == {v.name for v in variants} - {v.name for v in fitting}
