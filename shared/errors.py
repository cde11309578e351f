"""The one exception tree for everything that can be wrong with a message.

    ProtocolError
    ├── MessageTooLarge      payload over the size limit; rejected before parsing
    ├── MalformedMessage     not JSON, or not the schema
    ├── TopicError           not an edgefleet topic, or a bad device id
    ├── SignatureError       unsigned, unknown key, or a signature that does not verify
    ├── WrongDevice          a signed message addressed to another device
    └── StaleGeneration      a replayed or older desired-state generation

Receivers log and drop a message that raises any of these; none is fatal.
"""


class ProtocolError(Exception):
    """Base of every wire-protocol error."""


class MessageTooLarge(ProtocolError):
    """The payload is larger than the limit for its kind."""


class MalformedMessage(ProtocolError):
    """The payload is not valid JSON or does not match the schema."""


class TopicError(ProtocolError):
    """The topic is not one of ours, or names an invalid device."""


class SignatureError(ProtocolError):
    """The envelope is unsigned, signed by an unknown key, or the signature is wrong."""


class WrongDevice(ProtocolError):
    """A signed message was addressed to a different device."""


class StaleGeneration(ProtocolError):
    """A desired-state generation not newer than the one already applied."""

    def __init__(self, generation: int, current: int) -> None:
        super().__init__(f"generation {generation} is not newer than {current}")
        self.generation = generation
        self.current = current
