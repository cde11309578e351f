"""The local API's bearer token: none on loopback, one always beyond it.

On 127.0.0.1 (the default) the API answers anyone on the box, as Ollama and
llama-server do. Listening on any other address exposes the model to the network, so a
token is then required: the one in ``inference_token_file`` (agent.toml), or one made
on first start in ``<state_dir>/inference-token``. A token file must be readable by its
owner only (0600), as the agent's other secrets are; the token itself is never logged.
"""

import ipaddress
import logging
import os
import secrets
import stat

from agent.config import AgentConfig, ConfigError

log = logging.getLogger(__name__)

TOKEN_FILE = "inference-token"  # noqa: S105 - a file name


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a host name: it may resolve to anything


def token(config: AgentConfig) -> str | None:
    """The token the local API asks for (None: none, on loopback without a file)."""
    host = config.inference_listen.rpartition(":")[0] or "127.0.0.1"
    path = config.inference_token_file
    if path is None and is_loopback(host):
        return None
    if path is None:
        path = config.state_dir / TOKEN_FILE
        if not path.exists():
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(secrets.token_urlsafe(32) + "\n")
            log.info("the local API listens on %s, beyond loopback: requests need "
                     "'Authorization: Bearer <the token in %s>'", host, path)
    try:
        mode = path.stat().st_mode
        text = path.read_text().strip()
    except OSError as exc:
        raise ConfigError(f"inference_token_file {path}: {exc.strerror}") from None
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise ConfigError(f"{path} can be read by others (mode {stat.S_IMODE(mode):o}); "
                          f"chmod 600 {path}")
    if len(text) < 16:
        raise ConfigError(f"{path} holds no token of at least 16 characters")
    return text
