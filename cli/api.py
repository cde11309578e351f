"""A small API client for the operator commands (stdlib only, like the agent).

Exit codes every command keeps, for scripts: 0 done; 1 the controller refused (its
problem detail is printed); 2 bad usage; 3, 4, 5 a rollout rolled back, aborted or
paused (``rollout status``); 6 the controller could not be reached.
"""

import json
import os
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click

DEFAULT_CONTROLLER = "http://127.0.0.1:8080"


class ApiFailure(click.ClickException):
    """An API call failed; the message says why and what to do."""

    exit_code = 1


class Unreachable(ApiFailure):
    exit_code = 6


@dataclass(frozen=True)
class Api:
    controller: str
    token: str | None

    def call(self, method: str, path: str, body: object | None = None,
             timeout: float = 30.0, *, prefix: str = "/api/v1") -> Any:
        """Call ``prefix + path``; raise ApiFailure with the problem detail on error."""
        data = json.dumps(body).encode() if body is not None else None
        return self._send(method, f"{prefix}{path}", data, "application/json", timeout)

    def ready(self) -> bool:
        """Whether the controller answers /readyz with ready."""
        try:
            self.call("GET", "/readyz", timeout=2, prefix="")
        except ApiFailure:
            return False
        return True

    def upload(self, path: str, file: Path, *, params: dict[str, str],
               timeout: float = 3600.0) -> Any:
        """POST ``file`` as the raw request body, streamed from disk."""
        with file.open("rb") as body:
            return self._send("POST", f"/api/v1{path}?{urllib.parse.urlencode(params)}", body,
                              "application/octet-stream", timeout,
                              length=file.stat().st_size)

    def _send(self, method: str, path: str, data: Any, content_type: str, timeout: float,
              *, length: int | None = None) -> Any:
        headers = {"Content-Type": content_type, "Accept": "application/json"}
        if length is not None:
            headers["Content-Length"] = str(length)
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        req = urllib.request.Request(f"{self.controller.rstrip('/')}{path}", data=data,  # noqa: S310
                                     headers=headers, method=method)
        try:
            with urllib.request.urlopen(req, timeout=timeout) as resp:  # noqa: S310
                raw = resp.read()
        except urllib.error.HTTPError as exc:
            raise ApiFailure(_problem_text(exc)) from None
        except (urllib.error.URLError, OSError) as exc:
            raise Unreachable(f"cannot reach the controller at {self.controller}: {exc}. "
                              "Is it running? Pass --controller or set EDGEFLEET_CONTROLLER."
                              ) from None
        return json.loads(raw) if raw else None


def _problem_text(exc: urllib.error.HTTPError) -> str:
    try:
        body = json.loads(exc.read())
        return f"{body.get('code', exc.code)}: {body.get('detail', exc.reason)}"
    except ValueError:
        return f"HTTP {exc.code}: {exc.reason}"


def parse_labels(pairs: tuple[str, ...]) -> dict[str, str]:
    """``KEY=VALUE`` options (labels, selectors, gates) as a dict."""
    labels = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise click.BadParameter(f"{pair!r} is not KEY=VALUE")
        labels[key] = value
    return labels


def api_options(f: Any) -> Any:
    """Add --controller and --token (with their environment variables) to a command."""
    f = click.option("--token", envvar="EDGEFLEET_TOKEN", help="API bearer token.")(f)
    return click.option("--controller", envvar="EDGEFLEET_CONTROLLER",
                        default=DEFAULT_CONTROLLER, show_default=True,
                        help="Controller API URL.")(f)


def make_api(controller: str, token: str | None) -> Api:
    return Api(controller, token or os.environ.get("EDGEFLEET_TOKEN"))
