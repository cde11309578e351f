"""Fetching TUF metadata and model blobs over MQTT: one chunk per request.

A device publishes a ``FetchRequest`` on its own ``fetch`` topic; the controller answers
on the device's own ``data`` topic with a response: one line of JSON header, a newline,
then the chunk's bytes. Paths are what ``tuf.ngclient`` asks for under its two base
URLs: ``meta/<N.root.json|N.targets.json|N.snapshot.json|timestamp.json>`` and
``targets/<dirs>/<sha256>.<name>`` (consistent snapshots: a blob is named by its hash).

Many devices, one blob: a request for a target chunk may be ``shared``; the controller
then publishes the chunk once on the blob's own topic (``Topics.blob``), which every
device fetching that blob subscribes to, and skips a chunk it has published since the
requester started watching that topic (a retry is answered to the requester alone).
Devices keep chunks that arrive ahead of where they are and ask only for what they
still miss, so the controller's published bytes grow with the blob, not with devices
times the blob.

Every request has a size cap (``MAX_CHUNK``); a download is a sequence of requests by
offset, so a transfer cut by a disconnect resumes where it stopped. Nothing here
verifies content: the Updater does, with the hashes in signed metadata.
"""

import re
from typing import Annotated, Literal

from pydantic import Field

from shared.errors import MalformedMessage
from shared.messages import Count, Message, Name, decode

DEFAULT_CHUNK = 256 * 1024
MAX_CHUNK = 1024 * 1024
MAX_REQUEST = 1024
MAX_RUN = 64
_MAX_HEADER = 1024

Path = Annotated[str, Field(min_length=1, max_length=512, pattern=r"^(meta|targets)/[^\x00]+$")]


_TARGET_NAME = re.compile(r"^([0-9a-f]{64})\.[^/]+$")


def target_digest(path: str) -> str | None:
    """The sha256 a ``targets/.../<sha256>.<name>`` path names, else None (metadata)."""
    if not path.startswith("targets/"):
        return None
    match = _TARGET_NAME.match(path.rpartition("/")[2])
    return match.group(1) if match else None


class FetchRequest(Message):
    id: Name  # the requester's own id, echoed in the response
    path: Path
    offset: Count = 0
    length: Annotated[int, Field(ge=1, le=MAX_CHUNK)] = DEFAULT_CHUNK
    #: consecutive chunks of ``length`` wanted from ``offset`` (targets only): one request
    #: keeps a run of chunks streaming instead of paying a round trip per chunk
    count: Annotated[int, Field(ge=1, le=MAX_RUN)] = 1
    #: for a target: answer on the blob's broadcast topic (which the requester has
    #: subscribed to), where every device fetching the same blob receives it too
    shared: bool = False
    #: asked again after a miss: answer this device alone, whatever was broadcast
    retry: bool = False


class FetchResponse(Message):
    id: Name
    status: Literal["ok", "not_found", "bad_request"]
    offset: Count = 0
    total: Count = 0  # the whole file's size
    error: Annotated[str, Field(max_length=512)] = ""


def encode_request(request: FetchRequest) -> bytes:
    return request.model_dump_json().encode()


def decode_request(payload: bytes) -> FetchRequest:
    return decode(FetchRequest, payload, limit=MAX_REQUEST)


def encode_response(response: FetchResponse, data: bytes = b"") -> bytes:
    return response.model_dump_json().encode() + b"\n" + data


def decode_response(payload: bytes) -> tuple[FetchResponse, bytes]:
    """Split and validate a response; raise a ``ProtocolError`` on anything else."""
    end = payload.find(b"\n", 0, _MAX_HEADER)
    if end < 0:
        raise MalformedMessage("fetch response has no header line")
    response = decode(FetchResponse, payload[:end], limit=_MAX_HEADER)
    data = payload[end + 1:]
    if len(data) > MAX_CHUNK:
        raise MalformedMessage(f"fetch response chunk is larger than {MAX_CHUNK} bytes")
    return response, data
