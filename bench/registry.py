"""The registry on the corpus of real-world model shapes: push, derive, what each variant is worth.

For each model of ``tests/support/corpus.py`` (built here, cached), a controller on the
embedded defaults (in process) takes a push as ``edgefleet model push --samples`` sends
it and derives int8 and fp16 variants. Per model and variant: push time (upload,
validation, registration), derive time (until the job finished), size against the
source, fidelity on the pusher's samples (the model's primary metric), latency on this
machine beside the fp32 source (bare onnxruntime, timed in turns in one process), peak
RSS of a process that ran the samples (prompts, for GGUF), a language model's perplexity
on text none of them trained on, or the reason it was refused.

    python bench/registry.py [--models minilm,convnet] [--variants int8,fp16]

Prints a table and writes bench/results/registry.json.
"""

import argparse
import json
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from cli.ports import free_port, wait_until  # noqa: E402


def bench_model(client: Any, name: str, variants: list[str], tmp: Path) -> dict[str, Any]:
    from tests.support import corpus

    entry = corpus.build(name)
    started = time.perf_counter()
    # GGUF and fp16 sources get their defaults; other ONNX models every variant asked for
    body: dict[str, Any] = {} if entry.path.suffix != ".onnx" or name == "fp16" else {
        "variants": variants}
    created = corpus.push(client, entry, "1.0.0", tmp, **body)
    if created.status_code != 201:
        raise RuntimeError(f"{name}: {created.text}")
    ref = corpus.ref(entry)
    pushed = time.perf_counter()

    shown: dict[str, Any] = {}

    def done() -> bool:
        shown.update(client.get(f"/api/v1/models/{ref}/versions/1.0.0").json())
        return shown["status"] != "processing"

    if not wait_until(done, 1800):
        raise RuntimeError(f"{name}: the derive job did not finish")
    version = shown
    derived = time.perf_counter()
    source = version["variants"][0]
    rows = [{"variant": v["name"], "bytes": v["size"],
             "size_ratio": (v["comparison"] or {}).get("size_ratio", 1.0),
             "metric": (v["comparison"] or {}).get("metric"),
             "fidelity": (v["comparison"] or {}).get("fidelity", {}).get(
                 (v["comparison"] or {}).get("metric")),
             "latency_ms": (v["comparison"] or {}).get("latency_ms"),
             "ram_mib": round(v["ram_estimate_bytes"] / 2**20, 1),
             "ram_measured": v["ram_measured"], "method": (v["comparison"] or {}).get("method"),
             "perplexity": (v["comparison"] or {}).get("perplexity")}
            for v in version["variants"]]
    rows += [{"variant": r["name"], "refused": r["reason"]} for r in version["refused"]]
    return {"model": name, "status": version["status"], "source_bytes": source["size"],
            "samples": len(entry.samples), "push_s": round(pushed - started, 2),
            "derive_s": round(derived - pushed, 2), "variants": rows}


def report(results: dict[str, Any]) -> None:
    print(f"{'model':17} {'variant':13} {'bytes':>11} {'size':>5} {'fidelity':>16} "
          f"{'ms src/var':>13} {'RAM MiB':>8} {'perplexity':>11}  push/derive s")
    for m in results["models"]:
        first = True
        for v in m["variants"]:
            lead = f"{m['model']:17}" if first else " " * 17
            timing = f"  {m['push_s']}/{m['derive_s']}" if first else ""
            first = False
            if "refused" in v:
                print(f"{lead} {v['variant']:13} refused: {v['refused'][:90]}")
                continue
            ms = v["latency_ms"] or {}
            lat = f"{ms['source']:.3g}/{ms['variant']:.3g}" if ms else "-"
            fid = f"{v['metric']} {v['fidelity']:.4f}" if v["fidelity"] is not None else "-"
            ppl = v.get("perplexity") or {}
            ppl_text = f"{ppl['variant']:.4g}" if "variant" in ppl else (
                f"{ppl['perplexity']:.4g}" if ppl else "-")
            print(f"{lead} {v['variant']:13} {v['bytes']:>11,} {v['size_ratio']:>5.0%} "
                  f"{fid:>16} {lat:>13} {v['ram_mib']:>8} {ppl_text:>11}{timing}")
    out = ROOT / "bench" / "results" / "registry.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(results, indent=2))
    print(f"\nwrote {out}")


def main() -> None:
    from fastapi.testclient import TestClient

    from controller.api.app import create_app
    from controller.runtime import Runtime
    from controller.settings import HostPort, Settings
    from tests.support import corpus

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(corpus.BUILDERS))
    parser.add_argument("--variants", default="int8,fp16")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="ef-registry-") as tmp_name:
        tmp = Path(tmp_name)
        settings = Settings(data_dir=tmp / "data", max_upload_bytes=1 << 30,
                            broker_listen=HostPort("127.0.0.1", free_port()))
        results: dict[str, Any] = {"at": datetime.now(UTC).isoformat(), "models": []}
        with TestClient(create_app(settings, runtime=Runtime(settings))) as client:
            token = (settings.data_dir / "admin-token").read_text().strip()
            client.headers["Authorization"] = f"Bearer {token}"
            for name in args.models.split(","):
                print(f"pushing {name} ...", flush=True)
                results["models"].append(bench_model(client, name, args.variants.split(","),
                                                     tmp))
    report(results)


if __name__ == "__main__":
    main()
