"""Signed envelopes for controller -> device messages (Ed25519).

An envelope is JSON ``{"v", "kid", "alg", "payload", "sig"}`` where ``payload`` is
the base64url of the inner message's bytes and ``sig`` the Ed25519 signature over
exactly those bytes. Verification takes bytes and does no I/O. The generation rule
(only strictly newer desired states are applied) is enforced by ``open_desired``.
"""

import base64
import binascii
import hashlib
import json
from dataclasses import dataclass

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from shared.errors import MalformedMessage, SignatureError, StaleGeneration, WrongDevice
from shared.messages import MAX_SIZE, DesiredState, decode, loads_object
from shared.topics import Kind

ALG = "ed25519"


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: object) -> bytes:
    if not isinstance(text, str):
        raise MalformedMessage("envelope field is not a string")
    try:
        return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except (binascii.Error, ValueError) as exc:
        raise MalformedMessage(f"bad base64: {exc}") from None


def key_id(public_key: Ed25519PublicKey) -> str:
    """A short stable id for a public key: the first 16 hex digits of its sha256."""
    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


def public_key_to_text(public_key: Ed25519PublicKey) -> str:
    """The raw public key as base64url, as handed to devices at enrolment."""
    return _b64(public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw))


def public_key_from_text(text: str) -> Ed25519PublicKey:
    """Inverse of ``public_key_to_text``."""
    try:
        return Ed25519PublicKey.from_public_bytes(_unb64(text))
    except ValueError as exc:
        raise SignatureError(f"not an Ed25519 public key: {exc}") from None


@dataclass(frozen=True)
class Signer:
    """Signs payloads with one private key."""

    private_key: Ed25519PrivateKey

    @property
    def key_id(self) -> str:
        return key_id(self.private_key.public_key())

    def seal(self, payload: bytes) -> bytes:
        """Wrap ``payload`` in a signed envelope."""
        sig = self.private_key.sign(payload)
        env = {"v": 1, "kid": self.key_id, "alg": ALG, "payload": _b64(payload), "sig": _b64(sig)}
        return _compact_json(env)


@dataclass(frozen=True)
class Verifier:
    """Verifies envelopes against a set of trusted public keys."""

    keys: dict[str, Ed25519PublicKey]

    @classmethod
    def of(cls, *public_keys: Ed25519PublicKey) -> "Verifier":
        return cls({key_id(k): k for k in public_keys})

    def open(self, envelope: bytes, *, limit: int) -> bytes:
        """Return the payload of a verified envelope; raise a ProtocolError otherwise."""
        env = loads_object(envelope, limit=limit)
        if env.get("alg") != ALG:
            raise SignatureError(f"unsupported signature algorithm {env.get('alg')!r}")
        key = self.keys.get(str(env.get("kid")))
        if key is None:
            raise SignatureError(f"signed by unknown key {env.get('kid')!r}")
        payload, sig = _unb64(env.get("payload")), _unb64(env.get("sig"))
        try:
            key.verify(sig, payload)
        except InvalidSignature:
            raise SignatureError("signature does not verify") from None
        return payload


def seal_desired(signer: Signer, desired: DesiredState) -> bytes:
    """Sign a desired state for its device."""
    return signer.seal(desired.model_dump_json(exclude_none=True).encode())


def open_desired(
    verifier: Verifier, envelope: bytes, *, device_id: str, last_generation: int
) -> DesiredState:
    """Verify a desired-state envelope for ``device_id``.

    Raises:
        SignatureError: not signed by a trusted key.
        WrongDevice: addressed to another device.
        StaleGeneration: generation not newer than ``last_generation`` (a replay or
            an older state). The retained copy of the state already applied also
            lands here, with ``generation == current``.
    """
    limit = MAX_SIZE[Kind.DESIRED]
    payload = verifier.open(envelope, limit=limit)
    desired = decode(DesiredState, payload, limit=limit)
    if desired.device_id != device_id:
        raise WrongDevice(f"desired state is for {desired.device_id!r}, not {device_id!r}")
    if desired.generation <= last_generation:
        raise StaleGeneration(desired.generation, last_generation)
    return desired


def _compact_json(value: object) -> bytes:
    return json.dumps(value, separators=(",", ":"), sort_keys=True).encode()
