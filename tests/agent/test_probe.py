"""What the agent says of its box, without loading runtimes into the agent's process."""

import json
import subprocess
import sys

CHECK = """
import json, sys
from pathlib import Path
from agent import probe
caps = probe.capabilities(Path("."))
print(json.dumps({"providers": [list(r.providers) for r in caps.runtimes
                                if r.name == "onnxruntime"],
                  "loaded": sorted({"numpy", "onnxruntime", "llama_cpp"} & set(sys.modules))}))
"""


def test_capabilities_name_onnxruntimes_providers_without_importing_it_in_the_agent() -> None:
    """Importing onnxruntime to ask for its providers kept it and numpy in the idle
    agent for good (+30 MB of 79)."""
    done = subprocess.run([sys.executable, "-c", CHECK], capture_output=True, text=True,
                          timeout=120, check=True)
    out = json.loads(done.stdout.splitlines()[-1])
    assert ["CPUExecutionProvider" in p for p in out["providers"]] == [True]
    assert out["loaded"] == []
