"""Controller settings: one frozen object built from flags and the environment."""

import os
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

from shared.topics import DEFAULT_ROOT


@dataclass(frozen=True)
class HostPort:
    """A listen or connect address."""

    host: str
    port: int

    @classmethod
    def parse(cls, text: str) -> "HostPort":
        host, sep, port = text.rpartition(":")
        if not sep or not port.isdigit() or not host:
            raise ValueError(f"expected HOST:PORT, got {text!r}")
        return cls(host.strip("[]"), int(port))

    def __str__(self) -> str:
        return f"{self.host}:{self.port}"


@dataclass(frozen=True)
class MqttUrl:
    """A broker URL ``mqtt://[user[:password]@]host[:port]`` (``mqtts://`` for TLS)."""

    host: str
    port: int
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    tls: bool = False

    @classmethod
    def parse(cls, url: str) -> "MqttUrl":
        parts = urlsplit(url)
        if parts.scheme not in ("mqtt", "mqtts", "tcp"):
            raise ValueError(f"expected an mqtt:// or mqtts:// URL, got {url!r}")
        if not parts.hostname:
            raise ValueError(f"no host in MQTT URL {url!r}")
        tls = parts.scheme == "mqtts"
        return cls(
            host=parts.hostname,
            port=parts.port or (8883 if tls else 1883),
            username=parts.username,
            password=parts.password,
            tls=tls,
        )

    def public(self) -> str:
        """The URL without credentials: what devices are told to connect to."""
        return f"{'mqtts' if self.tls else 'mqtt'}://{self.host}:{self.port}"


@dataclass(frozen=True)
class Settings:
    """Everything the controller needs to start."""

    data_dir: Path = Path(".edgefleet")
    database_url: str | None = None  # default: SQLite in data_dir
    mqtt_url: MqttUrl | None = None  # default: the embedded broker
    mqtt_dynsec: bool = False  # give devices broker accounts through Mosquitto's dynsec
    http: HostPort = HostPort("127.0.0.1", 8080)
    broker_listen: HostPort = HostPort("127.0.0.1", 1883)
    advertise_mqtt: str | None = None  # URL devices are told; default derived
    topic_root: str = DEFAULT_ROOT
    keepalive_s: int = 10  # MQTT keepalive handed to devices; offline within 1.5x
    health_interval_s: float = 5.0  # how often devices report health
    admin_token: str | None = field(default=None, repr=False)
    max_upload_bytes: int = 4 << 30  # largest model file accepted by a push
    ingest_linger_s: float = 0.05  # how often received messages go to the ingest worker
    rollout_tick_s: float = 2.0  # how often rollouts advance (0: only when called)

    @property
    def db_url(self) -> str:
        if self.database_url:
            return self.database_url
        return f"sqlite:///{(self.data_dir / 'controller.db').resolve()}"

    @property
    def device_mqtt_url(self) -> str:
        if self.advertise_mqtt:
            return self.advertise_mqtt
        if self.mqtt_url is not None:
            return self.mqtt_url.public()
        return f"mqtt://{self.broker_listen}"

    @classmethod
    def from_env(cls, **overrides: object) -> "Settings":
        """Settings from ``EDGEFLEET_*`` variables, then explicit overrides (flags)."""
        env: dict[str, object] = {}
        if url := os.environ.get("EDGEFLEET_DATABASE_URL"):
            env["database_url"] = url
        if url := os.environ.get("EDGEFLEET_MQTT_URL"):
            env["mqtt_url"] = MqttUrl.parse(url)
        if os.environ.get("EDGEFLEET_MQTT_DYNSEC", "").lower() in ("1", "true", "yes"):
            env["mqtt_dynsec"] = True
        if token := os.environ.get("EDGEFLEET_ADMIN_TOKEN"):
            env["admin_token"] = token
        env.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**env)  # type: ignore[arg-type]
