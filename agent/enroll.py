"""One-time enrolment: trade an enrolment token for an identity and write the config."""

import json
import os
import pwd
import socket
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from agent.config import AgentConfig, ConfigError, Identity, write_private


def request_enrolment(controller: str, token: str, *, name: str | None,
                      labels: dict[str, str], timeout: float = 30.0) -> Identity:
    """POST the token to the controller; return the identity it hands out."""
    body = json.dumps({"token": token, "name": name, "labels": labels}).encode()
    req = urllib.request.Request(f"{controller.rstrip('/')}/api/v1/enroll", data=body,  # noqa: S310
                                 headers={"Content-Type": "application/json"}, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:  # noqa: S310
            data: dict[str, Any] = json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        raise ConfigError(f"the controller refused enrolment: {_problem(exc)}") from None
    except (urllib.error.URLError, OSError) as exc:
        raise ConfigError(f"cannot reach the controller at {controller}: {exc}") from None
    return Identity.from_enrolment(data)


def _problem(exc: urllib.error.HTTPError) -> str:
    try:
        return str(json.loads(exc.read()).get("detail") or exc)
    except ValueError:
        return str(exc)


def enroll(*, controller: str, token: str, config_path: Path, state_dir: Path,
           name: str | None = None, labels: dict[str, str] | None = None,
           inference_listen: str = "127.0.0.1:8787", owner: str | None = None) -> Identity:
    """Enrol this box: write ``identity.json`` (0600) and the config file. With
    ``owner`` (the service's user, when run as root), the state dir and identity
    become that user's and the config readable by its group (0640)."""
    labels = labels or {}
    account = _account(owner) if owner else None
    identity = request_enrolment(controller, token, name=name or socket.gethostname(),
                                 labels=labels)
    identity.save(state_dir)
    config = AgentConfig(state_dir=state_dir, controller=controller,
                         inference_listen=inference_listen, labels=labels)
    write_private(config_path, config.dump())
    if account is not None:
        uid, gid = account
        for path in (state_dir, state_dir / "identity.json"):
            os.chown(path, uid, gid)
        os.chown(config_path, -1, gid)
        config_path.chmod(0o640)
    return identity


def _account(user: str) -> tuple[int, int]:
    try:
        entry = pwd.getpwnam(user)
    except KeyError:
        raise ConfigError(f"no user {user!r} on this box; create it (the packages do) or "
                          "leave out --owner") from None
    return entry.pw_uid, entry.pw_gid
