"""One device's MQTT link with what delivery needs: its session, a fetch channel over
that connection, and TUF updaters that fetch through it.

The daemon runs one; tests and ``bench/distribute.py`` run many in one process.
"""

from collections.abc import Callable
from pathlib import Path

from tuf.api.metadata import TargetFile
from tuf.ngclient import Updater

from agent.config import Identity
from agent.fetcher import META_URL, TARGETS_URL, FetchChannel, MqttFetcher
from agent.mqtt import device_client, parse_broker
from agent.session import DeviceSession
from shared.fetch import DEFAULT_CHUNK


class DeviceLink:
    def __init__(self, identity: Identity, state_dir: Path, session: DeviceSession, *,
                 chunk_size: int = DEFAULT_CHUNK, bind_address: str = "",
                 progress: Callable[[str, int, int], None] | None = None,
                 **fetcher_options: float) -> None:
        self.identity, self.state_dir, self.session = identity, state_dir, session
        self.chunk_size = chunk_size
        self.progress = progress  # (target, bytes so far, total) while a blob downloads
        self.fetcher_options = fetcher_options  # MqttFetcher's window, timeouts
        self.client = device_client(session, bind_address=bind_address)
        topics, client = session.topics, self.client

        def subscribe(sha: str) -> None:
            session.blob_topics.add(topics.blob(sha))
            client.subscribe(topics.blob(sha), qos=1)

        def unsubscribe(sha: str) -> None:
            session.blob_topics.discard(topics.blob(sha))
            client.unsubscribe(topics.blob(sha))

        def ask(payload: bytes) -> None:
            # a request made while the link is down would be queued by paho and sent,
            # with every retry after it, once the link returns: each answered in full
            if client.is_connected():
                session.send_fetch(client, payload)

        self.channel = FetchChannel(ask,
                                    subscribe=subscribe, unsubscribe=unsubscribe)
        session.on_data = self.channel.deliver
        session.on_blob = self.channel.deliver_shared

    def connect(self) -> None:
        host, port, _ = parse_broker(self.identity.mqtt_url)
        self.client.connect_async(host, port, keepalive=self.identity.keepalive_s)
        self.client.loop_start()

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()

    def updater(self) -> Updater:
        """A fresh TUF Updater (one per install) that fetches over this link."""
        meta = self.state_dir / "tuf" / "metadata"
        meta.mkdir(parents=True, exist_ok=True)
        trusted = meta / "root.json"
        root = trusted.read_bytes() if trusted.exists() else self.identity.tuf_root.encode()
        return Updater(str(meta), META_URL, str(self._download_dir()), TARGETS_URL,
                       fetcher=self._fetcher(), bootstrap=root)

    def download(self, info: TargetFile) -> Path:
        """The signed target ``info`` (from a refreshed ``updater()``), downloaded and
        verified, in the download directory (``MqttFetcher.download_verified``)."""
        sha = info.hashes["sha256"]
        path = self._download_dir() / sha
        for other in self._download_dir().glob("*.part*"):  # a model no longer wanted
            if not other.name.startswith(sha):
                other.unlink(missing_ok=True)
        self._fetcher().download_verified(info, path)
        return path

    def _download_dir(self) -> Path:
        download = self.state_dir / "tuf" / "download"
        download.mkdir(parents=True, exist_ok=True)
        return download

    def _fetcher(self) -> MqttFetcher:
        return MqttFetcher(self.channel, chunk_size=self.chunk_size, progress=self.progress,
                           spool_dir=self._download_dir(),
                           **self.fetcher_options)  # type: ignore[arg-type]
