"""stages.data.fetch against a real threaded HTTP server on 127.0.0.1: statuses, retries, resume, size cap, checksums.

Each test gets its own server, so the per-path request counters (which drive "fail the first n requests") and the
request log start empty; the log lets a test assert how many attempts the client really made, with which Range.
"""
import email.utils
import hashlib
import re
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from stages.data.fetch import FetchError, check_url, download, refusal

BODY = bytes(range(256)) * 400  # 102,400 bytes, not all equal so a wrong offset shows
CAP = 200_000
SLEEP = 0.8  # longer than FAST["timeout"]


class Handler(BaseHTTPRequestHandler):
    """Each path is one server behaviour; see the module docstring of the test for why the counters exist."""

    def do_GET(self):
        path = self.path.split("?")[0]
        with self.server.lock:
            self.server.log.append((path, self.headers.get("Range")))
            if "If-Range" in self.headers:
                self.server.if_range.append(self.headers["If-Range"])
            count = self.server.counts[path] = self.server.counts.get(path, 0) + 1
        route = ROUTES.get(path.rsplit(".", 1)[0])
        if route is None:
            return self.send_error(404)
        try:
            route(self, count)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client gave up first, on purpose (size cap, timeout)

    def log_message(self, *args):
        pass  # keep pytest output clean

    def send_body(self, body: bytes, status: int = 200, headers: dict | None = None, length: bool = True):
        self.send_response(status)
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        if length:
            self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def send_range(self, count: int, body: bytes = BODY, headers: dict | None = None):
        """Honour `Range: bytes=n-` like a real file server does, and If-Range: another version gets the whole file."""
        headers = headers or {}
        wanted, version = self.headers.get("Range"), headers.get("ETag") or headers.get("Last-Modified")
        if not wanted or self.headers.get("If-Range", version) != version:
            return self.send_body(body, headers=headers)
        start = int(wanted.removeprefix("bytes=").rstrip("-"))
        if start >= len(body):
            return self.send_body(b"", 416, {"Content-Range": f"bytes */{len(body)}"})
        self.send_body(body[start:], 206, {**headers, "Content-Range": f"bytes {start}-{len(body) - 1}/{len(body)}"})

    def send_half(self, body: bytes, headers: dict):
        self.send_response(200)
        for key, value in {**headers, "Content-Length": str(len(body))}.items():
            self.send_header(key, value)
        self.end_headers()
        self.wfile.write(body[: len(body) // 2])
        self.wfile.flush()
        self.connection.shutdown(socket.SHUT_RDWR)  # mid-body: the client has half the promised bytes

    def drop(self, count: int):
        return self.send_half(BODY, {}) if count == 1 else self.send_range(count)

    def versioned(self, count: int):
        """A file with an ETag (/...-etag) or a Last-Modified date whose first answer drops mid-body. A /changing-...
        file is replaced by another version (BODY reversed) right after that; a /steady-... one stays as it was."""
        name = self.path.split("?")[0].rsplit(".", 1)[0]
        version = 2 if count > 1 and name.startswith("/changing") else 1
        headers = ({"ETag": f'"v{version}"'} if name.endswith("etag")
                   else {"Last-Modified": f"Mon, 0{version} Nov 2026 00:00:00 GMT"})
        body = BODY[::-1] if version == 2 else BODY
        return self.send_half(body, headers) if count == 1 else self.send_range(count, body, headers)

    def later(self, count: int):
        """503 with Retry-After as an HTTP date 2 s ahead (in whole seconds: a wait of 1 to 2 s), then the file."""
        if count > 1:
            self.server.retried_at = time.time()
            return self.send_body(BODY)
        self.server.retry_at = email.utils.formatdate(time.time() + 2, usegmt=True)
        self.send_body(b"back soon", 503, {"Retry-After": self.server.retry_at})

    def stall(self, count: int):
        self.send_response(200)
        self.send_header("Content-Length", str(len(BODY)))
        self.end_headers()
        self.wfile.write(BODY[:1000])
        self.wfile.flush()
        time.sleep(SLEEP)  # headers arrived in time, the rest of the body does not

    def liar(self, count: int):
        self.send_response(200)
        self.end_headers()  # no Content-Length: HTTP/1.0 body runs until the connection closes
        for _ in range(CAP // len(BODY) + 3):
            self.wfile.write(BODY)


ROUTES = {
    "/ok": lambda h, n: h.send_body(BODY),
    "/copy": lambda h, n: h.send_body(BODY),
    "/other": lambda h, n: h.send_body(BODY[::-1]),
    "/range": Handler.send_range,
    "/norange": lambda h, n: h.send_body(BODY),  # ignores Range
    "/badrange": lambda h, n: h.send_body(BODY, 206, {"Content-Range": f"bytes 0-{len(BODY) - 1}/{len(BODY)}"}),
    "/busy": lambda h, n: h.send_body(b"slow down", 429, {"Retry-After": "0"}) if n <= 2 else h.send_body(BODY),
    "/flaky": lambda h, n: h.send_body(b"oops", 500) if n == 1 else h.send_body(BODY),
    "/down": lambda h, n: h.send_body(b"maintenance", 503),
    "/later": Handler.later,
    "/forbidden": lambda h, n: h.send_body(b"no", 403),
    "/slow": lambda h, n: (time.sleep(SLEEP), h.send_body(BODY)),
    "/drop": Handler.drop,
    "/changing-etag": Handler.versioned,
    "/changing-date": Handler.versioned,
    "/steady-etag": Handler.versioned,
    "/stall": Handler.stall,
    "/huge": lambda h, n: h.send_body(b"", headers={"Content-Length": str(CAP + 1)}, length=False),
    "/liar": Handler.liar,
    "/redirect": lambda h, n: h.send_body(b"", 302, {"Location": h.server.redirect_to}),
    "/loop": lambda h, n: h.send_body(b"", 302, {"Location": "/loop.mp4"}),
    "/host": lambda h, n: h.send_body(h.headers["Host"].encode()),   # echoes the Host header it was sent
}
FAST = {"max_bytes": CAP, "timeout": 0.3, "retries": 3, "backoff": 0.01}


@pytest.fixture
def server():
    yield from serve()


@pytest.fixture
def second_server():
    """Another local server, on a port that the first one's allow-list does not name."""
    yield from serve()


def serve():
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)  # port 0: the OS picks a free one
    httpd.lock, httpd.log, httpd.counts, httpd.if_range, httpd.redirect_to = threading.Lock(), [], {}, [], ""
    httpd.base = f"http://127.0.0.1:{httpd.server_address[1]}"
    # the server's own port is allowed, as collect.download.allow_private would list it; no other local port is
    httpd.fast = dict(FAST, allow_private=[f"127.0.0.1:{httpd.server_address[1]}"])
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield httpd
    httpd.shutdown()
    httpd.server_close()


def partial_files(folder: Path) -> list[Path]:
    return sorted((folder / ".partial").glob("*.part"))


def partial_of(folder: Path, url: str) -> Path:
    return folder / ".partial" / (hashlib.sha256(url.encode()).hexdigest() + ".part")


def leave_partial(folder: Path, url: str, data: bytes) -> None:
    """The partial file an earlier, interrupted run would have left for `url`."""
    partial = partial_of(folder, url)
    partial.parent.mkdir(parents=True)
    partial.write_bytes(data)


def test_ok_is_stored_content_addressed(server, tmp_path):
    path = download(server.base + "/ok.mp4", tmp_path, **server.fast)
    assert path == tmp_path / (hashlib.sha256(BODY).hexdigest() + ".mp4")
    assert path.read_bytes() == BODY
    assert server.log == [("/ok.mp4", None)]
    assert partial_files(tmp_path) == []


@pytest.mark.parametrize("name, ext", [("/ok.MP4", ".mp4"), ("/ok.webm?x=1", ".webm"), ("/ok.exe", ".bin"),
                                       ("/ok", ".bin")])
def test_extension_from_url_path(server, tmp_path, name, ext):
    assert download(server.base + name, tmp_path, **server.fast).name == hashlib.sha256(BODY).hexdigest() + ext


def test_same_bytes_from_two_urls_give_one_file(server, tmp_path):
    first = download(server.base + "/ok.mp4", tmp_path, **server.fast)
    second = download(server.base + "/copy.mp4", tmp_path, **server.fast)
    other = download(server.base + "/other.mp4", tmp_path, **server.fast)
    assert first == second != other
    assert sorted(p.name for p in tmp_path.glob("*.mp4")) == sorted([first.name, other.name])
    assert partial_files(tmp_path) == []


def test_missing_fails_at_once(server, tmp_path):
    with pytest.raises(FetchError, match=r"^HTTP 404 Not Found$"):
        download(server.base + "/missing.mp4", tmp_path, **server.fast)
    assert len(server.log) == 1


def test_forbidden_fails_at_once(server, tmp_path):
    with pytest.raises(FetchError, match=r"^HTTP 403 Forbidden$"):
        download(server.base + "/forbidden.mp4", tmp_path, **server.fast)
    assert len(server.log) == 1


def test_busy_honours_retry_after_then_succeeds(server, tmp_path):
    started = time.monotonic()
    path = download(server.base + "/busy.mp4", tmp_path, **dict(server.fast, backoff=5))  # Retry-After: 0 wins over 5 s
    assert time.monotonic() - started < 2
    assert path.read_bytes() == BODY
    assert len(server.log) == 3


def test_503_honours_retry_after_as_an_http_date(server, tmp_path, capsys):
    started = time.monotonic()
    path = download(server.base + "/later.mp4", tmp_path, **server.fast)  # FAST's own backoff would wait 0.01 s
    assert path.read_bytes() == BODY and len(server.log) == 2
    assert server.retried_at >= email.utils.parsedate_to_datetime(server.retry_at).timestamp()  # not before the date
    assert 1 <= time.monotonic() - started < 3
    assert "collect: " + server.base + "/later.mp4: HTTP 503 Service Unavailable on try 1" in capsys.readouterr().out


def test_flaky_500_is_retried(server, tmp_path):
    assert download(server.base + "/flaky.mp4", tmp_path, **server.fast).read_bytes() == BODY
    assert len(server.log) == 2


def test_persistent_503_reports_status_and_attempts(server, tmp_path):
    with pytest.raises(FetchError, match=r"^HTTP 503 Service Unavailable after 4 attempts$"):
        download(server.base + "/down.mp4", tmp_path, **server.fast)
    assert len(server.log) == 4


def test_no_retries_means_one_attempt(server, tmp_path):
    with pytest.raises(FetchError, match=r"^HTTP 503 Service Unavailable after 1 attempt$"):
        download(server.base + "/down.mp4", tmp_path, **dict(server.fast, retries=0))
    assert len(server.log) == 1


def test_slow_server_times_out(server, tmp_path):
    started = time.monotonic()
    with pytest.raises(FetchError, match=r"^timed out after 2 attempts \(timeout=0.3 s\)$"):
        download(server.base + "/slow.mp4", tmp_path, **dict(server.fast, retries=1))
    assert len(server.log) == 2
    assert time.monotonic() - started < 2 * SLEEP  # the client gave up, it did not wait for the server


def test_stalled_body_times_out_and_keeps_partial(server, tmp_path):
    url = server.base + "/stall.mp4"
    with pytest.raises(FetchError, match=r"^timed out after 1 attempt \(timeout=0.3 s\)$"):
        download(url, tmp_path, **dict(server.fast, retries=0))
    assert partial_of(tmp_path, url).read_bytes() == BODY[:1000]  # kept for the next run to resume


def test_dropped_connection_resumes_with_range(server, tmp_path):
    path = download(server.base + "/drop.mp4", tmp_path, **server.fast)
    assert path.read_bytes() == BODY
    assert server.log == [("/drop.mp4", None), ("/drop.mp4", f"bytes={len(BODY) // 2}-")]
    assert partial_files(tmp_path) == []


@pytest.mark.parametrize("validator, sent", [("etag", '"v1"'), ("date", "Mon, 01 Nov 2026 00:00:00 GMT")])
def test_a_file_changed_since_the_partial_comes_back_whole(server, tmp_path, validator, sent):
    url = f"{server.base}/changing-{validator}.mp4"
    with pytest.raises(FetchError, match="connection dropped mid-body"):
        download(url, tmp_path, **dict(server.fast, retries=0))        # version 1: half of it kept
    # version 2 whole, not its tail on version 1
    assert download(url, tmp_path, **server.fast).read_bytes() == BODY[::-1]
    assert [range_ for _, range_ in server.log] == [None, f"bytes={len(BODY) // 2}-"]
    assert server.if_range == [sent]
    assert list((tmp_path / ".partial").iterdir()) == []      # neither bytes nor validator left behind


def test_an_unchanged_file_resumes_under_if_range(server, tmp_path):
    path = download(server.base + "/steady-etag.mp4", tmp_path, **server.fast)
    assert path.read_bytes() == BODY
    assert [range_ for _, range_ in server.log] == [None, f"bytes={len(BODY) // 2}-"] and server.if_range == ['"v1"']
    assert list((tmp_path / ".partial").iterdir()) == []


def test_dropped_connection_reported_when_out_of_retries(server, tmp_path):
    url = server.base + "/drop.mp4"
    with pytest.raises(FetchError, match=r"^connection dropped mid-body \(.+\) after 1 attempt$"):
        download(url, tmp_path, **dict(server.fast, retries=0))
    assert partial_of(tmp_path, url).stat().st_size == len(BODY) // 2


def test_partial_from_earlier_run_is_resumed(server, tmp_path):
    url = server.base + "/range.mp4"
    leave_partial(tmp_path, url, BODY[:12345])
    assert download(url, tmp_path, **server.fast).read_bytes() == BODY
    assert server.log == [("/range.mp4", "bytes=12345-")]


def test_server_ignoring_range_starts_over(server, tmp_path):
    url = server.base + "/norange.mp4"
    leave_partial(tmp_path, url, BODY[:12345])
    assert download(url, tmp_path, **server.fast).read_bytes() == BODY
    assert server.log == [("/norange.mp4", "bytes=12345-")]


def test_unsatisfiable_range_restarts_from_zero(server, tmp_path):
    url = server.base + "/range.mp4"
    leave_partial(tmp_path, url, BODY + b"stale tail")  # longer than the resource: it changed since
    assert download(url, tmp_path, **server.fast).read_bytes() == BODY
    assert server.log == [("/range.mp4", f"bytes={len(BODY) + 10}-"), ("/range.mp4", None)]


def test_range_answered_with_another_range_starts_over(server, tmp_path):
    url = server.base + "/badrange.mp4"
    leave_partial(tmp_path, url, BODY[:12345])
    assert download(url, tmp_path, **server.fast).read_bytes() == BODY  # not BODY[:12345] + BODY
    assert server.log == [("/badrange.mp4", "bytes=12345-"), ("/badrange.mp4", None)]


def test_content_length_over_cap_fails_at_once(server, tmp_path):
    with pytest.raises(FetchError, match=rf"^larger than max_bytes={CAP} \(Content-Length says {CAP + 1} bytes\)$"):
        download(server.base + "/huge.mp4", tmp_path, **server.fast)
    assert len(server.log) == 1
    assert partial_files(tmp_path) == []


def test_stream_over_cap_without_content_length_fails(server, tmp_path):
    with pytest.raises(FetchError, match=rf"^larger than max_bytes={CAP} \(stopped after \d+ bytes\)$"):
        download(server.base + "/liar.mp4", tmp_path, **server.fast)
    assert len(server.log) == 1
    assert partial_files(tmp_path) == []


def test_body_of_exactly_max_bytes_is_allowed(server, tmp_path):
    assert download(server.base + "/ok.mp4", tmp_path, **dict(server.fast, max_bytes=len(BODY))).read_bytes() == BODY


def test_checksum_match(server, tmp_path):
    digest = hashlib.sha256(BODY).hexdigest()
    assert download(server.base + "/ok.mp4", tmp_path, **server.fast, sha256=digest.upper()).name == digest + ".mp4"


def test_checksum_mismatch(server, tmp_path):
    wrong = "0" * 64
    actual = hashlib.sha256(BODY).hexdigest()
    with pytest.raises(FetchError, match=rf"^sha256 mismatch: expected {wrong}, got {actual}$"):
        download(server.base + "/ok.mp4", tmp_path, **server.fast, sha256=wrong)
    assert list(tmp_path.glob("*.mp4")) == [] and partial_files(tmp_path) == []


@pytest.mark.parametrize("scheme", ["file", "ftp"])
def test_other_schemes_refused_without_a_request(server, tmp_path, scheme):
    url = server.base.replace("http", scheme, 1) + "/ok.mp4"  # points at our server: any request would show up
    with pytest.raises(FetchError, match=rf"^refused URL scheme {scheme}: only http and https are fetched$"):
        download(url, tmp_path, **server.fast)
    assert server.log == []
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("url, reason", [
    ("data:video/mp4;base64,AAAA", "refused URL scheme data"),
    ("/ok.mp4", r"refused URL scheme \(none\)"),
    ("http:///ok.mp4", "refused URL without a host"),
    ("https://", "refused URL without a host"),
])
def test_check_url_refuses(url, reason):
    with pytest.raises(FetchError, match=f"^{reason}"):
        check_url(url)


def test_check_url_accepts_http_and_https():
    check_url("http://example.com/a.mp4")
    check_url("HTTPS://example.com:8443/a.mp4?x=1")


def test_connection_refused_is_retried_and_reported(tmp_path):
    with socket.socket() as s:  # a port that was free a moment ago: nothing listens there now
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(FetchError, match=r"^connection failed \(.*refused.*\) after 2 attempts$"):
        download(f"http://127.0.0.1:{port}/ok.mp4", tmp_path,
                 **dict(FAST, retries=1, allow_private=[f"127.0.0.1:{port}"]))


# ---------------------------------------------------------------- outbound requests only where the user allows

def test_a_local_port_not_listed_is_refused_without_a_request(server, tmp_path):
    with pytest.raises(FetchError, match=r"^refused address 127\.0\.0\.1 of 127\.0\.0\.1:\d+ \(loopback\); .*"
                                         r"collect\.download\.allow_private"):
        download(server.base + "/ok.mp4", tmp_path, **FAST)
    assert server.log == [] and stored(tmp_path) == []


def test_a_redirect_to_a_port_not_listed_is_refused_and_nothing_stored(server, second_server, tmp_path):
    server.redirect_to = second_server.base + "/ok.mp4"
    refused = rf"^redirected to {second_server.base}/ok\.mp4: refused address 127\.0\.0\.1 of 127\.0\.0\.1:\d+ "
    with pytest.raises(FetchError, match=refused):
        download(server.base + "/redirect.mp4", tmp_path, **server.fast)
    assert server.log == [("/redirect.mp4", None)]   # the allowed hop was asked ...
    assert second_server.log == []                   # ... the one it pointed at never was
    assert stored(tmp_path) == []


def test_a_redirect_to_a_listed_port_is_followed(server, second_server, tmp_path):
    server.redirect_to = second_server.base + "/ok.mp4"
    both = dict(server.fast, allow_private=server.fast["allow_private"] + second_server.fast["allow_private"])
    assert download(server.base + "/redirect.mp4", tmp_path, **both).read_bytes() == BODY
    assert second_server.log == [("/ok.mp4", None)]


@pytest.mark.parametrize("location", ["file:///etc/passwd", "ftp://example.com/a.mp4", "gopher://127.0.0.1:70/"])
def test_a_redirect_to_another_scheme_is_refused(server, tmp_path, location):
    server.redirect_to = location
    with pytest.raises(FetchError, match=rf"^redirected to {re.escape(location)}: refused URL scheme"):
        download(server.base + "/redirect.mp4", tmp_path, **server.fast)
    assert stored(tmp_path) == []


def test_a_redirect_loop_ends(server, tmp_path):
    with pytest.raises(FetchError, match=r"^more than 5 redirects$"):
        download(server.base + "/loop.mp4", tmp_path, **server.fast)
    assert len(server.log) == 6 and stored(tmp_path) == []


@pytest.mark.parametrize("answers", [["127.0.0.1"], ["10.1.2.3"], ["169.254.169.254"], ["93.184.216.34", "127.0.0.1"],
                                     ["::1"], ["::ffff:127.0.0.1"]])
def test_a_name_that_resolves_to_a_private_address_is_refused(server, tmp_path, answers):
    """The resolver hook stands in for DNS: a public-looking name whose answer (or one of them) is private."""
    url = f"http://videos.example.com:{server.server_address[1]}/ok.mp4"
    with pytest.raises(FetchError, match=r"^refused address \S+ of videos\.example\.com:\d+ \("):
        download(url, tmp_path, **server.fast, resolver=lambda host, port: answers)
    assert server.log == [] and stored(tmp_path) == []


def test_a_redirect_to_a_name_that_resolves_to_the_metadata_address_is_refused(server, tmp_path):
    server.redirect_to = "http://metadata.example.com/latest/meta-data/"
    answers = {"127.0.0.1": ["127.0.0.1"], "metadata.example.com": ["169.254.169.254"]}
    with pytest.raises(FetchError, match=r"refused address 169\.254\.169\.254 of metadata\.example\.com:80 "
                                         r"\(link-local\)"):
        download(server.base + "/redirect.mp4", tmp_path, **server.fast, resolver=lambda host, port: answers[host])
    assert stored(tmp_path) == []


def test_the_connection_goes_to_the_checked_address_not_a_new_lookup(server, tmp_path):
    """`.invalid` never resolves (RFC 6761): the download can only work by connecting to the address our resolver
    returned and checked, and the server still sees the URL's host in Host."""
    port = server.server_address[1]
    lookups = []

    def resolver(host, port_):
        lookups.append(host)
        return ["127.0.0.1"]
    allowed = dict(FAST, allow_private=[f"rebind.invalid:{port}"])
    path = download(f"http://rebind.invalid:{port}/host.mp4", tmp_path, **allowed, resolver=resolver)
    assert path.read_bytes() == f"rebind.invalid:{port}".encode() and lookups == ["rebind.invalid"]


@pytest.mark.parametrize("address, kind", [
    ("127.0.0.1", "loopback"), ("127.255.255.254", "loopback"), ("::1", "loopback"), ("::ffff:127.0.0.1", "loopback"),
    ("10.0.0.1", "private"), ("172.16.5.4", "private"), ("192.168.1.1", "private"), ("fc00::1", "private"),
    ("169.254.169.254", "link-local"), ("fe80::1%eth0", "link-local"), ("224.0.0.251", "multicast"),
    ("ff02::1", "multicast"), ("240.0.0.1", "reserved"), ("0.0.0.0", "unspecified"), ("::", "unspecified"),
    ("100.64.0.1", "not global"), ("198.18.0.1", "private"),
    ("93.184.216.34", None), ("2606:4700::1111", None), ("8.8.8.8", None),
])
def test_refusal_names_the_kind_of_address(address, kind):
    assert refusal(address) == kind


def stored(folder: Path) -> list[Path]:
    """Every file a download left in `folder`: stored videos and partial files alike."""
    return sorted(path for path in folder.rglob("*") if path.is_file())
