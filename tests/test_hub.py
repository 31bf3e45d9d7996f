"""stages.results.hub against a Hub stand-in on 127.0.0.1, through the real huggingface_hub client."""
import socket

import httpx2
import pytest
from huggingface_hub.errors import HfHubHTTPError

from stages.results import hub
from tests.fake_hub import FakeHub

TOKEN = "hf_test_token_for_the_fake_hub"


@pytest.fixture
def fake_hub(monkeypatch):
    server = FakeHub()
    monkeypatch.setenv("HF_ENDPOINT", server.url)
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    yield server
    server.close()


def publish(files, attempts=4, repo="alice/model"):
    return hub.publish(hub.client(), repo, files, repo_type="model", private=True, title="test", attempts=attempts)


def test_the_token_comes_from_the_environment_only(fake_hub, monkeypatch):
    publish({"a.txt": b"a"})
    assert {r["authorization"] for r in fake_hub.requests} == {f"Bearer {TOKEN}"}
    monkeypatch.delenv("HF_TOKEN")
    with pytest.raises(SystemExit, match="HF_TOKEN environment variable"):
        hub.client()


def test_the_repo_holds_exactly_the_files_in_one_commit(fake_hub):
    receipt = publish({"a.txt": b"a", "sub/b.bin": b"\0b"})
    assert fake_hub.files("alice/model") == {".gitattributes": b"*.safetensors filter=lfs\n", "a.txt": b"a",
                                             "sub/b.bin": b"\0b"}
    assert fake_hub.repos[("model", "alice/model")]["private"]
    assert receipt["uploaded"] and receipt["commit"] == fake_hub.repos[("model", "alice/model")]["commits"][0]["id"]
    assert len(fake_hub.calls("POST", "/commit/")) == 1

    receipt = publish({"a.txt": b"A", "c.txt": b"c"})            # changed content: stale files go in the same commit
    assert set(fake_hub.files("alice/model")) == {".gitattributes", "a.txt", "c.txt"}
    assert fake_hub.files("alice/model")["a.txt"] == b"A" and receipt["uploaded"]


def test_a_rerun_with_the_same_content_uploads_nothing(fake_hub, tmp_path):
    (tmp_path / "w.bin").write_bytes(b"weights")
    first = publish({"w.bin": tmp_path / "w.bin"})
    second = publish({"w.bin": tmp_path / "w.bin"})
    assert second == {**first, "uploaded": False}
    assert len(fake_hub.calls("POST", "/commit/")) == 1 and len(fake_hub.calls("POST", "/preupload/")) == 1


def test_429_and_503_are_retried_with_backoff_honouring_retry_after(fake_hub, capsys):
    fake_hub.fail("POST", "/api/repos/create", 429, {"Retry-After": "3"})
    fake_hub.fail("POST", "/api/repos/create", 503)
    fake_hub.fail("POST", "/commit/", 502)
    receipt = publish({"a.txt": b"a"}, attempts=4)
    creates = [r["time"] for r in fake_hub.calls("POST", "/api/repos/create")]
    assert len(creates) == 4 and receipt["uploaded"]
    waits = [later - earlier for earlier, later in zip(creates, creates[1:])]
    assert 3 <= waits[0] < 4.5          # Retry-After: 3
    assert 2 <= waits[1] < 3.5          # second try: 2 s
    assert 4 <= waits[2] < 5.5          # third try: 4 s, after the commit's 502
    assert len(fake_hub.calls("POST", "/commit/")) == 2
    assert fake_hub.files("alice/model")["a.txt"] == b"a"
    assert "429 on try 1; retrying in 3 s" in capsys.readouterr().out


def test_huggingface_hub_retries_its_listings_and_preupload_itself(fake_hub, capsys):
    fake_hub.fail("GET", "/commits/", 503)      # list_repo_commits, through huggingface_hub's http_backoff
    fake_hub.fail("POST", "/preupload/", 502)   # preupload_lfs_files, likewise
    assert publish({"a.txt": b"a"})["uploaded"]
    assert len(fake_hub.calls("GET", "/commits/")) == 2 and len(fake_hub.calls("POST", "/preupload/")) == 2
    assert len(fake_hub.calls("POST", "/api/repos/create")) == 1   # our policy never started a second attempt
    assert "retrying in" not in capsys.readouterr().out


def test_an_error_huggingface_hub_already_retried_is_not_retried_again():
    # Running out of huggingface_hub's own retries takes 23 s of its fixed waits, so this checks the marking directly.
    request = httpx2.Request("GET", "http://127.0.0.1/api/models/alice/model/commits/main")
    error = HfHubHTTPError("503 Service Unavailable", response=httpx2.Response(503, request=request))
    assert hub.is_transient(error)

    def listing():
        raise error
    with pytest.raises(HfHubHTTPError):
        hub.retried_by_hub(listing)
    assert not hub.is_transient(error)


def test_other_client_errors_fail_at_once_with_the_servers_message(fake_hub):
    fake_hub.fail("POST", "/api/repos/create", 403, error="You don't have the rights to create a model under alice")
    with pytest.raises(SystemExit, match="You don't have the rights to create a model under alice"):
        publish({"a.txt": b"a"})
    assert len(fake_hub.calls("POST", "/api/repos/create")) == 1


def test_too_many_failures_stop_with_a_clear_message(fake_hub):
    for _ in range(2):
        fake_hub.fail("POST", "/api/repos/create", 500)
    with pytest.raises(SystemExit, match="the Hub refused model repo alice/model"):
        publish({"a.txt": b"a"}, attempts=2)


def test_an_unreachable_hub_is_retried_then_reported(monkeypatch):
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{port}")
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    with pytest.raises(SystemExit, match="could not reach the Hub .* after 2 tries"):
        publish({"a.txt": b"a"}, attempts=2)


def test_content_hash_depends_on_paths_and_bytes(tmp_path):
    (tmp_path / "x").write_bytes(b"1")
    assert hub.content_sha256({"x": tmp_path / "x"}) == hub.content_sha256({"x": b"1"})
    assert hub.content_sha256({"x": b"1"}) != hub.content_sha256({"y": b"1"})
    assert hub.content_sha256({"x": b"1"}) != hub.content_sha256({"x": b"2"})
