"""Publishing to the Hugging Face Hub: one commit per repo that mirrors a set of files exactly, retried on 429, 5xx
and dropped connections by the pipeline's one policy (stages/common/retry.py), and skipped when the Hub already holds
the same content.

The token comes from the HF_TOKEN environment variable only (never from params, a file or the local token cache), is
handed to huggingface_hub in memory and is never printed.
"""
import hashlib
import os
from pathlib import Path

import httpx2
from huggingface_hub import CommitOperationAdd, CommitOperationDelete, HfApi
from huggingface_hub.errors import HfHubHTTPError

from stages.common.retry import retry_after, retrying

CONTENT_TAG = "content-sha256: "   # written into each commit's description; how a rerun recognises its own upload
BACKOFF_S = 1.0                    # first wait; the policy doubles it each try


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
    if getattr(error, "retried_by_hub", False):
        return False    # huggingface_hub's http_backoff has retried this request already (see retried_by_hub)
    if isinstance(error, HfHubHTTPError) and error.response is not None:
        return error.response.status_code == 429 or error.response.status_code >= 500
    return isinstance(error, (httpx2.TransportError, ConnectionError, TimeoutError))


def retried_by_hub(call, *args, **kwargs):
    """Run a huggingface_hub call whose requests its http_backoff retries itself: an error that still comes out has
    been retried enough, so it is marked for is_transient, and our policy lets it through instead of retrying again."""
    try:
        return call(*args, **kwargs)
    except Exception as error:
        error.retried_by_hub = True
        raise


def server_wait(error: BaseException) -> float | None:
    """Seconds the Hub asked us to wait in Retry-After (seconds or an HTTP date), if it said so."""
    response = getattr(error, "response", None)
    return retry_after(response.headers.get("Retry-After")) if response is not None else None


def _additions(files: dict[str, Path | bytes]) -> list[CommitOperationAdd]:
    return [CommitOperationAdd(path_in_repo=name, path_or_fileobj=data if isinstance(data, bytes) else str(data))
            for name, data in sorted(files.items())]


def publish(api: HfApi, repo_id: str, files: dict[str, Path | bytes], *, repo_type: str, private: bool,
            title: str, attempts: int) -> dict:
    """Make `repo_id` hold exactly `files` ({path in repo: local file or bytes}) in one commit; return a receipt."""
    content = content_sha256(files)

    def attempt() -> tuple[str, bool]:
        api.create_repo(repo_id, repo_type=repo_type, private=private, exist_ok=True)
        head = retried_by_hub(api.list_repo_commits, repo_id, repo_type=repo_type)[0]
        if CONTENT_TAG + content in f"{head.title}\n{head.message}":
            return head.commit_id, False     # already there: a rerun, or a retry after a commit whose reply was lost
        held = retried_by_hub(api.list_repo_files, repo_id, repo_type=repo_type)
        additions = _additions(files)
        deletions = [CommitOperationDelete(path_in_repo=name)
                     for name in sorted(set(held) - set(files) - {".gitattributes"})]
        # Uploaded first, under huggingface_hub's own retries, so that create_commit is left with the commit POST.
        retried_by_hub(api.preupload_lfs_files, repo_id, additions=additions, repo_type=repo_type, free_memory=False)
        info = api.create_commit(repo_id, operations=additions + deletions, repo_type=repo_type, commit_message=title,
                                 commit_description=CONTENT_TAG + content)
        return info.oid, True

    # Retries: huggingface_hub owns its listings and uploads (retried_by_hub), ours create_repo and the commit POST.
    policy = retrying(f"push: {repo_id}", attempts=attempts, backoff=BACKOFF_S, transient=is_transient,
                      asked=server_wait)
    try:
        commit, uploaded = policy(attempt)
    except HfHubHTTPError as error:
        raise SystemExit(f"push: the Hub refused {repo_type} repo {repo_id}: {error}") from None
    except (httpx2.TransportError, ConnectionError, TimeoutError) as error:
        raise SystemExit(f"push: could not reach the Hub at {api.endpoint} for {repo_id} after {attempts} tries: "
                         f"{error}") from None
    return {"repo": repo_id, "repo_type": repo_type, "commit": commit, "content_sha256": content, "uploaded": uploaded}
