"""stages.common.retry, the one retry policy, tested once: real tenacity, with its sleep replaced by a recorder."""
import email.utils
import time
from types import SimpleNamespace

import pytest

from stages.common.retry import MAX_WAIT_S, retry_after, retrying


class Busy(Exception):
    """A transient failure; `wish` stands for a server's Retry-After, already in seconds."""

    def __init__(self, message: str = "busy", wish: float | None = None, status: int | None = None):
        super().__init__(message)
        self.wish = wish
        if status is not None:
            self.response = SimpleNamespace(status_code=status)


class Broken(Exception):
    """A permanent failure: retrying cannot fix it."""


def run(fn, attempts: int = 4, backoff: float = 1.0):
    """Run fn under the policy; return its result (or the error it ends with) and the waits the policy slept."""
    sleeps = []
    policy = retrying("test: thing", attempts=attempts, backoff=backoff, transient=lambda e: isinstance(e, Busy),
                      asked=lambda e: e.wish, sleep=sleeps.append)
    try:
        return policy(fn), sleeps
    except Exception as error:
        return error, sleeps


def failing(*errors: Exception, result: str = "done"):
    """A call that raises `errors` one per call, then returns `result`; `calls` counts how often it ran."""
    def call():
        call.calls += 1
        if call.calls <= len(errors):
            raise errors[call.calls - 1]
        return result
    call.calls = 0
    return call


def http_date(offset_s: float) -> str:
    return email.utils.formatdate(time.time() + offset_s, usegmt=True)


@pytest.mark.parametrize("value, seconds", [("3", 3.0), (" 120 ", 120.0), ("0", 0.0), ("1.5", 1.5),
                                            ("3600", 3600.0)])   # the cap is the policy's, not the parser's
def test_retry_after_in_seconds(value, seconds):
    assert retry_after(value) == seconds


def test_retry_after_as_a_future_http_date_is_the_time_left():
    assert 28 <= retry_after(http_date(30)) <= 30   # HTTP dates have whole seconds


def test_retry_after_as_a_date_without_zone_is_gmt():
    assert 28 <= retry_after(http_date(30).replace("GMT", "-0000")) <= 30


def test_retry_after_as_a_past_http_date_is_no_wait():
    assert retry_after(http_date(-3600)) == 0.0
    assert retry_after("Wed, 21 Oct 2015 07:28:00 GMT") == 0.0


@pytest.mark.parametrize("value", [None, "", "  ", "soon", "-5", "nan", "inf", "1e3", "12 s",
                                   "Wed, 99 Oct 2015 07:28:00 GMT"])
def test_retry_after_garbage_or_absent_is_none(value):
    assert retry_after(value) is None


def test_backoff_doubles_each_try_up_to_the_cap():
    call = failing(*[Busy() for _ in range(8)])
    assert run(call, attempts=9, backoff=1.0) == ("done", [1, 2, 4, 8, 16, 32, 60, 60])
    assert run(failing(Busy(), Busy(), Busy()), backoff=0.25)[1] == [0.25, 0.5, 1.0]


def test_the_servers_wish_wins_over_backoff_but_is_capped():
    result, sleeps = run(failing(Busy(wish=0.0), Busy(wish=retry_after("3600")), Busy()), backoff=5.0)
    assert result == "done" and sleeps == [0.0, MAX_WAIT_S, 20.0]   # third try: own backoff, 5 * 2**2
    assert MAX_WAIT_S == 60


def test_an_http_date_wish_is_honoured():
    _, sleeps = run(failing(Busy(wish=retry_after(http_date(30)))), backoff=0.01)
    assert 28 <= sleeps[0] <= 30


def test_attempts_are_counted_and_the_last_error_is_reraised():
    errors = [Busy("first"), Busy("second"), Busy("third")]
    call = failing(*errors)
    result, sleeps = run(call, attempts=3, backoff=0.5)
    assert result is errors[2] and call.calls == 3 and sleeps == [0.5, 1.0]


def test_one_attempt_means_no_retry():
    call = failing(Busy())
    assert run(call, attempts=1)[1] == [] and call.calls == 1


def test_a_non_transient_error_is_not_retried(capsys):
    error = Broken("404")
    call = failing(error)
    assert run(call) == (error, []) and call.calls == 1
    assert capsys.readouterr().out == ""


def test_each_retry_prints_one_line(capsys):
    run(failing(Busy(status=503), Busy("connection dropped\nmore detail"), Busy(wish=2.97)), backoff=1.0)
    assert capsys.readouterr().out.splitlines() == [
        "test: thing: 503 on try 1; retrying in 1 s",               # an HTTP error: its status
        "test: thing: connection dropped on try 2; retrying in 2 s",  # otherwise the first line of its message
        "test: thing: busy on try 3; retrying in 3 s",
    ]
