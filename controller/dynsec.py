"""Device credentials in Mosquitto's dynamic security plugin (``--mqtt-dynsec``).

With the plugin, the controller gives each device its broker account at enrolment and
removes it when the device is deleted, so nobody edits a password file by hand. The
controller's own MQTT user must be a dynamic-security admin (the user that
``mosquitto_ctrl dynsec init`` creates). Commands travel on the plugin's control topic
and are matched to their answers by correlation data.

Each device gets a role of its own listing its topics literally: Mosquitto 2.0's
plugin does not substitute ``%u`` in ACL topics (checked on 2.0.11), so one shared role
cannot confine devices to their own topics. The controller's user gets a role that
reads and writes everything under the topic root.
"""

import json
import logging
import secrets
import threading
import time
from collections.abc import Callable
from typing import Any

from shared.topics import DEVICE_PUBLISHES, DEVICE_SUBSCRIBES, Topics

log = logging.getLogger(__name__)

CONTROL = "$CONTROL/dynamic-security/v1"
RESPONSE = f"{CONTROL}/response"
CONTROLLER_ROLE = "edgefleet-controller"


class DynsecError(Exception):
    """The broker refused a dynamic-security command, or did not answer in time."""


class DynamicSecurity:
    """Sends dynamic-security commands through ``publish(topic, payload)``; answers come
    back through ``on_response`` (the bridge routes the response topic to it)."""

    def __init__(self, publish: Callable[[str, bytes], object], topics: Topics, *,
                 timeout: float = 10.0) -> None:
        self._publish = publish
        self.topics = topics
        self._timeout = timeout
        self._cond = threading.Condition()
        self._waiting: set[str] = set()  # correlation ids of commands being waited for
        self._answers: dict[str, dict[str, Any]] = {}

    def on_response(self, payload: bytes) -> None:
        try:
            responses = json.loads(payload).get("responses", [])
        except (ValueError, AttributeError):
            log.warning("dropped a malformed dynamic-security response")
            return
        with self._cond:
            for response in responses:  # late ones, and other replicas', are not kept
                if isinstance(response, dict) and \
                        str(response.get("correlationData")) in self._waiting:
                    self._answers[str(response["correlationData"])] = response
            self._cond.notify_all()

    def run(self, *commands: dict[str, Any], tolerate: tuple[str, ...] = (),
            timeout: float | None = None) -> list[dict[str, Any]]:
        """Run ``commands`` in order and return their answers; raise DynsecError on the
        first refusal whose error is not in ``tolerate`` (say, "already exists")."""
        ids = [secrets.token_hex(8) for _ in commands]
        body = {"commands": [{**c, "correlationData": i} for c, i in zip(commands, ids,
                                                                            strict=True)]}
        timeout = timeout or self._timeout
        with self._cond:
            self._waiting.update(ids)
        try:
            self._publish(CONTROL, json.dumps(body).encode())
            with self._cond:
                self._cond.wait_for(lambda: all(i in self._answers for i in ids), timeout)
                answers = [self._answers.get(i) for i in ids]
        finally:
            with self._cond:
                self._waiting.difference_update(ids)
                for i in ids:
                    self._answers.pop(i, None)
        got = [a for a in answers if a is not None]
        if len(got) < len(ids):
            raise DynsecError("the broker did not answer dynamic-security commands within "
                              f"{timeout:g} s: is the plugin loaded and the controller's MQTT "
                              "user a dynamic-security admin?")
        for command, answer in zip(commands, got, strict=True):
            error = answer.get("error")
            if error and not any(t in error for t in tolerate):
                raise DynsecError(f"the broker refused {command['command']}: {error}")
        return got

    def ensure_controller(self, username: str, *, clock: Callable[[], float] = time.monotonic
                          ) -> None:
        """Give the controller's user read and write access to the whole topic root.

        Changing a client's roles makes the broker disconnect that client, here the
        controller itself, so the answer to that command is lost: it is sent without
        waiting, and the role is looked for again once the bridge has reconnected."""
        if self._has_role(username):
            return
        everything = f"{self.topics.root}/#"
        self.run({"command": "createRole", "rolename": CONTROLLER_ROLE, "acls": [
                     {"acltype": kind, "topic": everything, "priority": 10, "allow": True}
                     for kind in ("publishClientSend", "publishClientReceive",
                                  "subscribePattern")]},
                 tolerate=("already exists",))
        self._publish(CONTROL, json.dumps({"commands": [{
            "command": "addClientRole", "username": username, "rolename": CONTROLLER_ROLE,
            "priority": 10}]}).encode())
        deadline = clock() + self._timeout
        while clock() < deadline:
            try:
                if self._has_role(username, timeout=1.0):
                    return
            except DynsecError:
                pass  # not reconnected yet
        raise DynsecError(f"could not give {username} the {CONTROLLER_ROLE} role")

    def _has_role(self, username: str, *, timeout: float | None = None) -> bool:
        (answer,) = self.run({"command": "getClient", "username": username}, timeout=timeout)
        roles = answer.get("data", {}).get("client", {}).get("roles", [])
        return any(r.get("rolename") == CONTROLLER_ROLE for r in roles)

    def add_device(self, device_id: str, password: str) -> None:
        """Create the device's broker account and its role (its own topics only)."""
        role = _role(device_id)
        acls = [{"acltype": "publishClientSend", "topic": self.topics.device(device_id, k),
                 "priority": 1, "allow": True} for k in sorted(DEVICE_PUBLISHES)]
        acls += [{"acltype": "subscribeLiteral", "topic": self.topics.device(device_id, k),
                  "priority": 1, "allow": True} for k in sorted(DEVICE_SUBSCRIBES)]
        acls.append({"acltype": "subscribePattern", "topic": f"{self.topics.root}/blob/+",
                     "priority": 1, "allow": True})  # signed blobs, readable fleet-wide
        self.run({"command": "createRole", "rolename": role, "acls": acls},
                 {"command": "createClient", "username": device_id, "password": password,
                  "roles": [{"rolename": role, "priority": 1}]})

    def remove_device(self, device_id: str) -> None:
        """Delete the device's account (its sessions are disconnected) and its role."""
        self.run({"command": "deleteClient", "username": device_id},
                 {"command": "deleteRole", "rolename": _role(device_id)},
                 tolerate=("not found",))


def _role(device_id: str) -> str:
    return f"edgefleet-device-{device_id}"
