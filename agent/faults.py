"""Fault injection for the crash-safety tests, and nothing else."""

import logging
import os
import signal

log = logging.getLogger(__name__)


def crash_point(name: str) -> None:
    """``EDGEFLEET_AGENT_CRASH_AT=<name>`` kills the agent with SIGKILL when it gets here
    (an install state just saved, ``swapped``, or ``download_half``)."""
    if os.environ.get("EDGEFLEET_AGENT_CRASH_AT") == name:
        log.warning("crash point %s: killing myself", name)
        os.kill(os.getpid(), signal.SIGKILL)
