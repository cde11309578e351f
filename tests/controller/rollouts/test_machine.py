"""The rollout state machine, table-driven: every (state, event) pair."""

import pytest

from controller.rollouts.machine import (
    ACTIVE,
    RUNNING,
    TERMINAL,
    Event,
    IllegalTransition,
    State,
    next_state,
)

S, E = State, Event
LEGAL = {
    (S.PENDING, E.START): S.DEPLOYING,
    (S.DEPLOYING, E.DEPLOYED): S.BAKING,
    (S.BAKING, E.BAKED): S.EVALUATING,
    (S.EVALUATING, E.PROMOTE): S.DEPLOYING,
    (S.EVALUATING, E.FINISH): S.COMPLETED,
    (S.ROLLING_BACK, E.REVERTED): S.ROLLED_BACK,
    **{(s, E.PAUSE): S.PAUSED for s in (S.PENDING, S.DEPLOYING, S.BAKING, S.EVALUATING,
                                         S.ROLLING_BACK)},
    **{(s, E.ABORT): S.ABORTED for s in (S.PENDING, S.DEPLOYING, S.BAKING, S.EVALUATING,
                                         S.PAUSED, S.ROLLING_BACK)},
    **{(s, E.ROLLBACK): S.ROLLING_BACK for s in (S.PENDING, S.DEPLOYING, S.BAKING,
                                                 S.EVALUATING, S.PAUSED)},
    (S.PAUSED, E.RESUME): S.DEPLOYING,
}


@pytest.mark.parametrize(("state", "event"), [(s, e) for s in State for e in Event])
def test_transition_table(state: State, event: Event) -> None:
    if (state, event) in LEGAL:
        assert next_state(state, event) == LEGAL[(state, event)]
    else:
        with pytest.raises(IllegalTransition, match=f"cannot {event.value}"):
            next_state(state, event)


@pytest.mark.parametrize("state", sorted(TERMINAL))
def test_terminal_states_absorb_every_event(state: State) -> None:
    for event in Event:
        with pytest.raises(IllegalTransition):
            next_state(state, event)


@pytest.mark.parametrize(("paused_from", "back_to"), [
    (S.PENDING, S.PENDING), (S.DEPLOYING, S.DEPLOYING), (S.BAKING, S.DEPLOYING),
    (S.EVALUATING, S.DEPLOYING), (S.ROLLING_BACK, S.ROLLING_BACK)])
def test_resume_returns_to_where_it_was_paused(paused_from: State, back_to: State) -> None:
    assert next_state(S.PAUSED, E.RESUME, paused_from=paused_from) == back_to


def test_every_non_terminal_state_can_be_stopped_by_an_operator() -> None:
    assert frozenset(State) - TERMINAL == ACTIVE
    for state in ACTIVE:
        assert next_state(state, E.ABORT) == S.ABORTED
    assert RUNNING <= ACTIVE
