"""retry: the one retry policy of the pipeline, on tenacity, and the one Retry-After parser.

The policy: a fixed number of attempts; only errors the caller's predicate calls transient are retried, any other
error and the last transient one are re-raised as they are; the wait is `backoff` seconds, doubled each try, unless
the server said how long in Retry-After (seconds or an HTTP date); either wait is capped at MAX_WAIT_S, because a
server must not stall a stage for hours. Each retry prints one line: what, why, which try, how long.

Which layer owns which retry (one layer per request, so that no request is retried by two of them):
- fetch (the `collect` downloads): this policy, around each attempt. Its HTTPAdapter (fetch.PinnedAdapter) has
  max_retries=0 (urllib3 Retry(0, read=False)): requests and urllib3 never retry on their own.
- hub (the `push` upload), huggingface_hub 2.4.0: its `http_backoff` (utils/_http.py) retries 408, 429, 5xx,
  timeouts and network errors itself (5 retries, 1 s doubling to 8 s, or Retry-After + 1 s uncapped) for the listings
  (list_repo_commits, list_repo_files: utils/_pagination.py), preupload_lfs_files and the LFS transfers (hf_xet
  retries its own). hub.py calls those through `retried_by_hub`, which keeps this policy from retrying them again.
  create_repo and create_commit's commit POST are sent once (`_send_commit`'s retry_on_error stays False, since a
  commit whose reply was lost would be made twice): this policy retries those, around the whole attempt, whose first
  step asks the Hub whether the commit already landed.
"""
import email.utils
import re
import time
from collections.abc import Callable
from datetime import UTC

from tenacity import RetryCallState, Retrying, retry_if_exception, stop_after_attempt, wait_exponential

MAX_WAIT_S = 60.0
DELAY_SECONDS = re.compile(r"\d+(\.\d*)?")   # RFC 9110 says digits; a fraction is harmless, a sign or "nan" is not


def retry_after(value: str | None) -> float | None:
    """Seconds a Retry-After header value asks for (delay-seconds, or an HTTP date: the time left until then, 0 once
    past); None when there is none or it is garbage, so that the caller's own backoff applies. Not capped here."""
    value = (value or "").strip()
    if DELAY_SECONDS.fullmatch(value):
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, OverflowError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)  # HTTP dates are GMT by definition; "-0000" or no zone parses naive
    return max(0.0, when.timestamp() - time.time())


def retrying(what: str, *, attempts: int, backoff: float, transient: Callable[[BaseException], bool],
             asked: Callable[[BaseException], float | None] = lambda error: None,
             sleep: Callable[[float], None] = time.sleep) -> Retrying:
    """The policy, ready to run a call: `retrying(...)(fn, *args)`. `asked(error)` is the server's Retry-After in
    seconds (see retry_after), if the error carries one; `what` starts the printed line; `sleep` is for tests."""
    return Retrying(stop=stop_after_attempt(max(attempts, 1)), retry=retry_if_exception(transient),
                    wait=_wait(backoff, asked), before_sleep=_report(what), sleep=sleep, reraise=True)


def _wait(backoff: float, asked: Callable[[BaseException], float | None]) -> Callable[[RetryCallState], float]:
    own = wait_exponential(multiplier=backoff, max=MAX_WAIT_S)   # backoff, 2 backoff, 4 backoff ... capped

    def wait(state: RetryCallState) -> float:
        wish = asked(state.outcome.exception())
        return min(wish, MAX_WAIT_S) if wish is not None else own(state)
    return wait


def _report(what: str) -> Callable[[RetryCallState], None]:
    def report(state: RetryCallState) -> None:
        print(f"{what}: {_reason(state.outcome.exception())} on try {state.attempt_number}; "
              f"retrying in {round(state.next_action.sleep, 1):g} s", flush=True)
    return report


def _reason(error: BaseException) -> str:
    """The HTTP status when the error carries a response (its message can run to many lines), else its first line."""
    status = getattr(getattr(error, "response", None), "status_code", None)
    if status is not None:
        return str(status)
    return str(error).split("\n", 1)[0] or type(error).__name__
