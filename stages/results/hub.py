"""Publishing to the Hugging Face Hub: one commit per repo that mirrors a set of files exactly, retried with
exponential backoff on 429, 5xx and dropped connections, and skipped when the Hub already holds the same content.

The token comes from the HF_TOKEN environment variable only (never from params, a file or the local token cache), is
handed to huggingface_hub in memory and is never printed.
"""
import email.utils
import hashlib
import os
import time
from pathlib import Path

import httpx2
from huggingface_hub import CommitOperationAdd, CommitOperationDelete, HfApi
from huggingface_hub.errors import HfHubHTTPError
from tenacity import Retrying, retry_if_exception, stop_after_attempt

CONTENT_TAG = "content-sha256: "   # written into each commit's description; how a rerun recognises its own upload
MAX_WAIT_S = 60


def client() -> HfApi:
    token = os.environ.get("HF_TOKEN")
    if not token:
        raise SystemExit("push: push.target is hf, so the HF_TOKEN environment variable must hold a Hub token with "
                         "write access (the token is read from the environment only)")
    return HfApi(endpoint=os.environ.get("HF_ENDPOINT") or None, token=token)


def content_sha256(files: dict[str, Path | bytes]) -> str:
    """One hash for a set of files: their repo paths and the sha256 of each one's bytes."""
    digest = hashlib.sha256()
    for name in sorted(files):
        data = files[name]
        file_hash = hashlib.sha256(data if isinstance(data, bytes) else data.read_bytes()).hexdigest()
        digest.update(f"{name}\0{file_hash}\n".encode())
    return digest.hexdigest()


def is_transient(error: BaseException) -> bool:
    if isinstance(error, HfHubHTTPError) and error.response is not None:
        return error.response.status_code == 429 or error.response.status_code >= 500
    return isinstance(error, (httpx2.TransportError, ConnectionError, TimeoutError))


def retry_after(error: BaseException) -> float | None:
    """Seconds the server asked us to wait (Retry-After as seconds or as an HTTP date), if it said so."""
    response = getattr(error, "response", None)
    value = response.headers.get("Retry-After") if response is not None else None
    if not value:
        return None
    if value.strip().isdigit():
        return float(value)
    try:
        return max(0.0, email.utils.parsedate_to_datetime(value).timestamp() - time.time())
    except (TypeError, ValueError):
        return None


def backoff_wait(state) -> float:
    """1 s, 2 s, 4 s ... capped at 60 s, unless the server's Retry-After says otherwise."""
    asked = retry_after(state.outcome.exception())
    return asked if asked is not None else min(MAX_WAIT_S, 2.0 ** (state.attempt_number - 1))


def with_retries(call, attempts: int, what: str):
    def report(state):
        error = state.outcome.exception()
        status = getattr(getattr(error, "response", None), "status_code", type(error).__name__)
        print(f"push: {what}: {status} on try {state.attempt_number}; retrying in {state.next_action.sleep:.0f} s",
              flush=True)

    return Retrying(stop=stop_after_attempt(attempts), wait=backoff_wait, retry=retry_if_exception(is_transient),
                    before_sleep=report, reraise=True)(call)


def publish(api: HfApi, repo_id: str, files: dict[str, Path | bytes], *, repo_type: str, private: bool,
            title: str, attempts: int) -> dict:
    """Make `repo_id` hold exactly `files` ({path in repo: local file or bytes}) in one commit; return a receipt."""
    content = content_sha256(files)

    def attempt() -> tuple[str, bool]:
        api.create_repo(repo_id, repo_type=repo_type, private=private, exist_ok=True)
        head = api.list_repo_commits(repo_id, repo_type=repo_type)[0]
        if CONTENT_TAG + content in f"{head.title}\n{head.message}":
            return head.commit_id, False     # already there: a rerun, or a retry after a commit whose reply was lost
        stale = set(api.list_repo_files(repo_id, repo_type=repo_type)) - set(files) - {".gitattributes"}
        operations = ([CommitOperationAdd(path_in_repo=name,
                                          path_or_fileobj=data if isinstance(data, bytes) else str(data))
                       for name, data in sorted(files.items())]
                      + [CommitOperationDelete(path_in_repo=name) for name in sorted(stale)])
        info = api.create_commit(repo_id, operations=operations, repo_type=repo_type, commit_message=title,
                                 commit_description=CONTENT_TAG + content)
        return info.oid, True

    try:
        commit, uploaded = with_retries(attempt, attempts, repo_id)
    except HfHubHTTPError as error:
        raise SystemExit(f"push: the Hub refused {repo_type} repo {repo_id}: {error}") from None
    except (httpx2.TransportError, ConnectionError, TimeoutError) as error:
        raise SystemExit(f"push: could not reach the Hub at {api.endpoint} for {repo_id} after {attempts} tries: "
                         f"{error}") from None
    return {"repo": repo_id, "repo_type": repo_type, "commit": commit, "content_sha256": content, "uploaded": uploaded}
