"""The install state machine: states, events, one transition table. No I/O, no clock.

    idle --start--> downloading --downloaded--> verifying --verified--> staging
    staging --staged--> activating --activated--> smoke_test --passed--> probation
    probation --passed--> committed
    smoke_test --proven--> committed                  (a rollback: the kept copy was proven)
    smoke_test / probation --failed--> rolled_back   (the previous model serves again)
    downloading .. activating --failed--> failed      (the previous model never stopped)
    any state --start--> downloading                  (a newer desired state wins)

``RESUME`` says where an install continues after the agent was killed in a state: the
steps before activation start over (nothing they wrote is trusted); activation is redone
(idempotent: it re-verifies the staged file and swaps a symlink); a smoke test or
probation runs again on the model that is active.

The states are ``shared.messages.InstallState``: the controller, the CLI and the
dashboard read the same ones from reports.
"""

from enum import StrEnum

from shared.messages import InstallState

State = InstallState  # the installer's name for them


class Event(StrEnum):
    START = "start"
    DOWNLOADED = "downloaded"
    VERIFIED = "verified"
    STAGED = "staged"
    ACTIVATED = "activated"
    PASSED = "passed"
    PROVEN = "proven"  # a rollback's smoke test passed: probation proved it before
    FAILED = "failed"


class IllegalTransition(Exception):
    pass


TERMINAL = frozenset({State.IDLE, State.COMMITTED, State.ROLLED_BACK, State.FAILED})
BEFORE_ACTIVATION = frozenset({State.DOWNLOADING, State.VERIFYING, State.STAGING})

_TABLE: dict[tuple[State, Event], State] = {
    (State.DOWNLOADING, Event.DOWNLOADED): State.VERIFYING,
    (State.VERIFYING, Event.VERIFIED): State.STAGING,
    (State.STAGING, Event.STAGED): State.ACTIVATING,
    (State.ACTIVATING, Event.ACTIVATED): State.SMOKE_TEST,
    (State.SMOKE_TEST, Event.PASSED): State.PROBATION,
    (State.SMOKE_TEST, Event.PROVEN): State.COMMITTED,
    (State.PROBATION, Event.PASSED): State.COMMITTED,
    (State.SMOKE_TEST, Event.FAILED): State.ROLLED_BACK,
    (State.PROBATION, Event.FAILED): State.ROLLED_BACK,
    **{(s, Event.FAILED): State.FAILED for s in (*BEFORE_ACTIVATION, State.ACTIVATING)},
}

RESUME: dict[State, State] = {
    State.DOWNLOADING: State.DOWNLOADING,
    State.VERIFYING: State.DOWNLOADING,
    State.STAGING: State.DOWNLOADING,
    State.ACTIVATING: State.ACTIVATING,
    State.SMOKE_TEST: State.SMOKE_TEST,
    State.PROBATION: State.SMOKE_TEST,
}


def next_state(state: State, event: Event) -> State:
    """The state after ``event``; ``start`` begins a new install from any state."""
    if event == Event.START:
        return State.DOWNLOADING
    try:
        return _TABLE[(state, event)]
    except KeyError:
        raise IllegalTransition(f"{event.value} is not possible in {state.value}") from None
