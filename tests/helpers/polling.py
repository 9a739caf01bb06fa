"""Waiting on a state, never on a sleep: poll until the state holds, fail loudly at a deadline."""
import time


def wait_until(probe, done=bool, timeout: float = 30.0, interval: float = 0.05, what: str = "the state"):
    """Calls ``probe()`` every ``interval`` s until ``done(state)`` holds for the state it returns,
    and returns that state. Raises ``AssertionError`` naming ``what`` and the last state seen
    after ``timeout`` s."""
    end = time.monotonic() + timeout
    while True:
        state = probe()
        if done(state):
            return state
        if time.monotonic() > end:
            raise AssertionError(f"{what} not reached within {timeout} s; last seen: {state!r}")
        time.sleep(interval)
