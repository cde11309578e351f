"""What a signed TUF target says about itself: the ``custom`` field of its metadata.

The controller's registry builds these when it publishes targets; the agent parses them
from the target info a refreshed ``Updater`` returns (signed, so trusted once parsed)
and keeps the model's as the staged copy's ``meta.json``. Built strictly, parsed
leniently (``shared.messages.Message``): a newer controller can add fields.
"""

from typing import Any, Literal

from pydantic import Field, ValidationError

from shared.messages import Count, Message, Name
from shared.smoke import SmokeRef


class TargetInfo(Message):
    """A model variant's file: what it is and what it needs to run."""

    model: Name
    version: Name
    variant: Name
    format: Literal["onnx", "gguf"]
    quantization: Name
    requirements: dict[Name, Any] = Field(default_factory=dict)
    ram_estimate_bytes: Count = 0
    #: the variant's smoke test, a signed target of its own pinned by hash
    smoke_test: SmokeRef | None = None
    kind: Literal["model"] = "model"

    @property
    def ref(self) -> str:
        """``name@version``, as health reports and the registry name a version."""
        return f"{self.model}@{self.version}"

    @property
    def runtime_format(self) -> str:
        """What the model worker loads the file as: an embedding model (a GGUF encoder,
        an ONNX sentence encoder) is ``gguf-embed`` or ``onnx-embed``."""
        if self.requirements.get("gguf_embedding" if self.format == "gguf"
                                 else "onnx_embedding"):
            return f"{self.format}-embed"
        return self.format


class SmokeTargetInfo(Message):
    """A variant's smoke test file (``<variant target>.smoke.json``)."""

    model: Name
    version: Name
    variant: Name
    kind: Literal["smoke_test"] = "smoke_test"


def parse(custom: Any) -> TargetInfo:
    """A model target's ``custom`` as ``TargetInfo``; ValueError saying what is wrong."""
    try:
        return TargetInfo.model_validate(custom)
    except ValidationError as exc:
        err = exc.errors()[0]
        where = ".".join(str(p) for p in err["loc"]) or "custom"
        raise ValueError(f"{where}: {err['msg']}") from None

