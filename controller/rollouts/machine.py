"""The rollout state machine: states, events, one transition table. No I/O, no clock.

    pending --start--> deploying --deployed--> baking --baked--> evaluating
    evaluating --promote--> deploying           (the next stage)
    evaluating --finish--> completed            (the last stage passed)
    pending / running / rolling_back --pause--> paused --resume--> where it was paused
    any non-terminal --abort--> aborted         (stop; keep what is installed)
    pending / running / paused --rollback--> rolling_back --reverted--> rolled_back

"running" is deploying, baking or evaluating: one stage at a time, with the stage
index kept beside the state. The tick (``controller.rollouts.tick``) decides which
event happens; this module only says whether it may.
"""

from enum import StrEnum


class State(StrEnum):
    PENDING = "pending"
    DEPLOYING = "deploying"
    BAKING = "baking"
    EVALUATING = "evaluating"
    PAUSED = "paused"
    COMPLETED = "completed"
    ROLLING_BACK = "rolling_back"
    ROLLED_BACK = "rolled_back"
    ABORTED = "aborted"


class Event(StrEnum):
    START = "start"
    DEPLOYED = "deployed"
    BAKED = "baked"
    PROMOTE = "promote"
    FINISH = "finish"
    PAUSE = "pause"
    RESUME = "resume"
    ABORT = "abort"
    ROLLBACK = "rollback"
    REVERTED = "reverted"


class IllegalTransition(Exception):
    """An event that the state does not allow (``state`` and ``event`` say which)."""

    def __init__(self, state: State, event: Event) -> None:
        super().__init__(f"cannot {event.value} a rollout that is {state.value}")
        self.state, self.event = state, event


RUNNING = frozenset({State.DEPLOYING, State.BAKING, State.EVALUATING})
TERMINAL = frozenset({State.COMPLETED, State.ROLLED_BACK, State.ABORTED})
ACTIVE = frozenset(State) - TERMINAL

_TABLE: dict[tuple[State, Event], State] = {
    (State.PENDING, Event.START): State.DEPLOYING,
    (State.DEPLOYING, Event.DEPLOYED): State.BAKING,
    (State.BAKING, Event.BAKED): State.EVALUATING,
    (State.EVALUATING, Event.PROMOTE): State.DEPLOYING,
    (State.EVALUATING, Event.FINISH): State.COMPLETED,
    (State.ROLLING_BACK, Event.REVERTED): State.ROLLED_BACK,
    **{(s, Event.PAUSE): State.PAUSED for s in (State.PENDING, *RUNNING, State.ROLLING_BACK)},
    **{(s, Event.ABORT): State.ABORTED for s in ACTIVE},
    **{(s, Event.ROLLBACK): State.ROLLING_BACK for s in (State.PENDING, *RUNNING,
                                                          State.PAUSED)},
}

#: Where ``resume`` leads, by the state the rollout was paused in: a running stage is
#: re-entered at deploying (it finishes assigning, then bakes again from the start).
RESUME_TO: dict[State, State] = {
    State.PENDING: State.PENDING,
    **dict.fromkeys(RUNNING, State.DEPLOYING),
    State.ROLLING_BACK: State.ROLLING_BACK,
}


def next_state(state: State, event: Event, *, paused_from: State | None = None) -> State:
    """The state after ``event``; raise ``IllegalTransition`` if it is not allowed."""
    if state == State.PAUSED and event == Event.RESUME:
        return RESUME_TO[paused_from or State.DEPLOYING]
    try:
        return _TABLE[(state, event)]
    except KeyError:
        raise IllegalTransition(state, event) from None
