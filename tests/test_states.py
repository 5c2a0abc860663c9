"""The whole transition matrix, and the errors of an illegal transition."""

from __future__ import annotations

import itertools

import pytest

from actors import TERMINAL_STATES, TRANSITIONS, IllegalTransitionError, JobState, check_transition

S = JobState

ALLOWED = {
    (S.CREATED, S.RUNNING),
    (S.CREATED, S.CANCELLED),
    (S.CREATED, S.FAILED),
    (S.CREATED, S.PAUSED),
    (S.CREATED, S.CREATED),
    (S.RUNNING, S.COMPLETED),
    (S.RUNNING, S.FAILED),
    (S.RUNNING, S.CANCELLED),
    (S.RUNNING, S.PAUSED),
    (S.RUNNING, S.CREATED),
    (S.PAUSED, S.CREATED),
    (S.PAUSED, S.CANCELLED),
    (S.FAILED, S.CREATED),
    (S.CANCELLED, S.CREATED),
}


@pytest.mark.parametrize(("src", "dst"), list(itertools.product(JobState, JobState)))
def test_transition_matrix(src: JobState, dst: JobState) -> None:
    if (src, dst) in ALLOWED:
        check_transition("j1", src, dst)
    else:
        with pytest.raises(IllegalTransitionError) as info:
            check_transition("j1", src, dst)
        assert info.value.from_state == src.value
        assert info.value.to_state == dst.value
        assert f"{src.value} -> {dst.value}" in str(info.value)


def test_table_is_the_matrix() -> None:
    assert {(a, b) for a, targets in TRANSITIONS.items() for b in targets} == ALLOWED


def test_completed_is_final_and_terminal_states_only_restart() -> None:
    assert TRANSITIONS[S.COMPLETED] == frozenset()
    for state in TERMINAL_STATES - {S.COMPLETED}:
        assert TRANSITIONS[state] == {S.CREATED}
