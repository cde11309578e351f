"""Agent configuration (TOML + environment) and the device identity from enrolment.

``agent.toml`` holds settings an operator may edit; ``<state_dir>/identity.json``
(mode 0600) holds what enrolment handed out: device id, broker credentials, and the
controller's desired-state public key.
"""

import json
import os
import tomllib
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

DEFAULT_CONFIG = Path("/etc/edgefleet/agent.toml")


class ConfigError(Exception):
    """The configuration or identity is missing or invalid; the message says how to fix it."""


@dataclass(frozen=True)
class AgentConfig:
    """Operator-editable settings."""

    state_dir: Path
    controller: str = ""
    inference_listen: str = "127.0.0.1:8787"
    #: a file (mode 0600) whose text is the bearer token the local API asks for; beyond
    #: loopback one is made in the state dir if none is named (agent.localauth)
    inference_token_file: Path | None = None
    health_interval_s: float | None = None  # None: what the controller said at enrolment
    mqtt_url: str | None = None  # None: what the controller said at enrolment
    labels: dict[str, str] = field(default_factory=dict)
    probation_s: float = 30.0  # how long a new model is watched before it is committed
    fetch_chunk_bytes: int = 256 * 1024  # per MQTT fetch request (the controller caps 1 MiB)
    #: requests that may wait while the model answers another; more get 429 + Retry-After
    max_queue: int = 4
    #: ONNX requests the model answers at once ("auto", None here: one per CPU), each
    #: with its share of the cores. One by default, with every core for each call: a
    #: conv net's own threads fill the cores, so several at once only share them (a
    #: call alone takes twice as long with one core); models whose work is sequential
    #: (recurrent, small batches) gain under concurrent load (a GRU at 4 at once on 2
    #: cores: 1.55-2.0x the throughput of one at a time)
    onnx_parallel: int | None = 1
    #: the memory models may use on this box, where that is less than the host has (a box
    #: shared with other work, a container limit): reported as the device's RAM, so the
    #: registry picks a variant that fits it, checked before a model is installed, and
    #: the model worker's hard limit where a memory cgroup can be made (agent.limits)
    memory_limit_bytes: int | None = None

    @classmethod
    def load(cls, path: Path, *, env: dict[str, str] | None = None) -> "AgentConfig":
        """Read ``path``, then apply ``EDGEFLEET_AGENT_*`` / ``EDGEFLEET_*`` overrides."""
        env = dict(os.environ) if env is None else env
        try:
            raw = tomllib.loads(path.read_text())
        except FileNotFoundError:
            raise ConfigError(f"no agent config at {path}; run `edgefleet agent enroll` "
                              "first or pass --config") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{path} is not valid TOML: {exc}") from None
        if "state_dir" not in raw:
            raise ConfigError(f"{path} has no state_dir")
        overrides = {
            "state_dir": env.get("EDGEFLEET_AGENT_STATE_DIR"),
            "controller": env.get("EDGEFLEET_CONTROLLER"),
            "mqtt_url": env.get("EDGEFLEET_MQTT_URL"),
            "health_interval_s": env.get("EDGEFLEET_AGENT_HEALTH_INTERVAL"),
            "probation_s": env.get("EDGEFLEET_AGENT_PROBATION"),
            "fetch_chunk_bytes": env.get("EDGEFLEET_AGENT_FETCH_CHUNK"),
            "memory_limit_bytes": env.get("EDGEFLEET_AGENT_MEMORY_LIMIT"),
        }
        raw.update({k: v for k, v in overrides.items() if v is not None})
        try:
            return cls(
                state_dir=Path(raw["state_dir"]),
                controller=str(raw.get("controller", "")),
                inference_listen=str(raw.get("inference_listen", "127.0.0.1:8787")),
                inference_token_file=(Path(raw["inference_token_file"])
                                      if raw.get("inference_token_file") else None),
                health_interval_s=(float(raw["health_interval_s"])
                                   if raw.get("health_interval_s") is not None else None),
                mqtt_url=raw.get("mqtt_url"),
                labels={str(k): str(v) for k, v in dict(raw.get("labels", {})).items()},
                probation_s=float(raw.get("probation_s", 30.0)),
                fetch_chunk_bytes=int(raw.get("fetch_chunk_bytes", 256 * 1024)),
                max_queue=int(raw.get("max_queue", 4)),
                onnx_parallel=_parallel(raw.get("onnx_parallel", 1)),
                memory_limit_bytes=(int(raw["memory_limit_bytes"])
                                    if raw.get("memory_limit_bytes") is not None else None),
            )
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"{path}: {exc}") from None

    def dump(self) -> str:
        """TOML text for this config (flat keys plus a [labels] table)."""
        lines = [f"state_dir = {_toml_str(str(self.state_dir))}",
                 f"controller = {_toml_str(self.controller)}",
                 f"inference_listen = {_toml_str(self.inference_listen)}"]
        if self.inference_token_file is not None:
            lines.append(f"inference_token_file = {_toml_str(str(self.inference_token_file))}")
        if self.health_interval_s is not None:
            lines.append(f"health_interval_s = {self.health_interval_s}")
        if self.mqtt_url:
            lines.append(f"mqtt_url = {_toml_str(self.mqtt_url)}")
        if self.memory_limit_bytes is not None:
            lines.append(f"memory_limit_bytes = {self.memory_limit_bytes}")
        lines.append("\n[labels]")
        lines += [f"{_toml_str(k)} = {_toml_str(v)}" for k, v in sorted(self.labels.items())]
        return "\n".join(lines) + "\n"


def _parallel(value: Any) -> int | None:
    if value == "auto":
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"onnx_parallel must be a positive integer or \"auto\", not {value!r}")
    return value


def _toml_str(value: str) -> str:
    return json.dumps(value)  # JSON string escapes are valid TOML basic strings


@dataclass(frozen=True)
class Identity:
    """What enrolment gave this device."""

    device_id: str
    mqtt_url: str
    mqtt_username: str
    mqtt_password: str = field(repr=False)
    topic_root: str
    keepalive_s: int
    health_interval_s: float
    desired_state_key: str
    tuf_root: str = ""  # 1.root.json from enrolment: where trust in model metadata starts

    @classmethod
    def from_enrolment(cls, data: dict[str, Any]) -> "Identity":
        names = set(cls.__dataclass_fields__)
        try:
            return cls(**{k: v for k, v in data.items() if k in names})
        except TypeError as exc:
            raise ConfigError(f"enrolment answer is incomplete: {exc}") from None

    @classmethod
    def load(cls, state_dir: Path) -> "Identity":
        path = state_dir / "identity.json"
        try:
            return cls.from_enrolment(json.loads(path.read_text()))
        except FileNotFoundError:
            raise ConfigError(f"no identity at {path}; run `edgefleet agent enroll`") from None
        except ValueError as exc:
            raise ConfigError(f"{path} is corrupt: {exc}") from None

    def save(self, state_dir: Path) -> None:
        write_private(state_dir / "identity.json", json.dumps(asdict(self), indent=2))

    def with_overrides(self, config: AgentConfig) -> "Identity":
        return replace(self, mqtt_url=config.mqtt_url or self.mqtt_url,
                       health_interval_s=config.health_interval_s or self.health_interval_s)


def write_private(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` atomically with mode 0600 (the directory 0700)."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
