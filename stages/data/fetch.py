"""fetch: download one video over HTTP(S), robustly, for the `collect` stage.

Why it works the way it does:
- Content addressing: the file is stored as <sha256 of its bytes><ext>, so the same video reached through two URLs is
  stored once, a changed video never overwrites an old one silently, and DVC sees identical outputs across runs.
- Resume: bytes go to folder/.partial/<sha256 of the URL>.part first. A dropped connection (in this process or an
  earlier, killed one) leaves that file behind, and the next attempt asks only for the rest with a Range header.
  If-Range carries the first response's ETag (or Last-Modified) beside it, so a file changed on the server since
  comes back whole instead of its tail being spliced onto the old bytes.
  Only a complete, checked download is moved (atomically) to its final name, so no half video is ever mistaken for one.
- No silent drops: every way a URL can fail ends in FetchError with a reason a person can act on (HTTP status,
  timeout, size cap, checksum, refused scheme) and the number of attempts, which collect records in
  data/raw/rejects.jsonl instead of skipping the URL quietly.
- Outbound requests only where the user allows (issue 21): every hop, the first URL and each redirect, is resolved
  and refused when an answer is a loopback, private, link-local, multicast, reserved or otherwise non-global address,
  unless its host:port is in `collect.download.allow_private`. The connection then goes to the very address that was
  checked (the adapter pins it; the URL's host stays in the Host header, TLS SNI and the certificate check), so a
  second DNS answer cannot swap in another one. Redirects are followed here, hop by hop, never by requests itself.
  Proxies from the environment are not used: a proxy would make the connection, out of our sight.
- Transient failures (429, 5xx, dropped or timed-out connections) are retried by the pipeline's one policy
  (stages/common/retry.py: exponential backoff, or the server's Retry-After on 429/503, seconds or an HTTP date, both
  capped at 60 s); permanent ones (other 4xx, refused schemes, size cap, checksum) fail at once, since retrying cannot
  fix them. The adapter has max_retries=0, so no request is retried twice.
"""
import hashlib
import ipaddress
import os
import re
import socket
from collections.abc import Callable, Iterable
from pathlib import Path, PurePosixPath
from urllib.parse import unquote, urljoin, urlsplit

import requests
import urllib3

from stages.common.files import sha256_file
from stages.common.retry import retry_after, retrying

EXTENSIONS = frozenset({".mp4", ".webm", ".mkv", ".mov", ".avi", ".m4v", ".mpg", ".mpeg", ".ts", ".flv", ".gif",
                        ".wav", ".mp3", ".m4a", ".flac", ".ogg", ".jpg", ".jpeg", ".png"})
CHUNK = 1 << 16
CONTENT_RANGE = re.compile(r"bytes (\d+)-(\d+)/(\d+|\*)")
# identity: byte offsets in Range and Content-Length must count the stored bytes, not a gzip stream of them.
HEADERS = {"Accept-Encoding": "identity"}
REDIRECTS = frozenset({301, 302, 303, 307, 308})
DEFAULT_PORTS = {"http": 80, "https": 443}
MAX_REDIRECTS = 5
# the first that applies names the refusal; anything else that is not global (shared 100.64/10, ...) is "not global"
_KINDS = ("loopback", "link_local", "multicast", "unspecified", "reserved", "private")


class FetchError(Exception):
    """A URL that could not be fetched; str(error) is the reason that collect records in data/raw/rejects.jsonl."""


class _Transient(Exception):
    """One attempt failed in a way another attempt may fix; `retry_after` is the server's Retry-After in seconds,
    read while the response was at hand."""

    def __init__(self, reason: str, retry_after: float | None = None, note: str = ""):
        super().__init__(reason)
        self.retry_after = retry_after
        self.note = note  # appended after the attempt count, e.g. the timeout that was used


def check_url(url: str) -> None:
    """Raise FetchError unless url is http:// or https:// with a host."""
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https"):
        raise FetchError(f"refused URL scheme {scheme or '(none)'}: only http and https are fetched")
    if not parts.hostname:
        raise FetchError(f"refused URL without a host: {url!r}")


def system_resolver(host: str, port: int) -> list[str]:
    """Every address the system's resolver gives for host (IP literals come back as they are)."""
    return [info[4][0] for info in socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)]


def refusal(address: str) -> str | None:
    """Why an address may not be fetched from without the allow-list ("loopback", ...), or None for a global one."""
    ip = ipaddress.ip_address(address.split("%", 1)[0])   # an IPv6 zone ("fe80::1%eth0") names no other address
    ip = getattr(ip, "ipv4_mapped", None) or ip            # ::ffff:127.0.0.1 is 127.0.0.1
    kind = next((kind for kind in _KINDS if getattr(ip, f"is_{kind}")), None)
    return kind.replace("_", "-") if kind else None if ip.is_global else "not global"


class Guard:
    """Decides where a request may connect: `pin(url)` is the checked address to connect to, or FetchError."""

    def __init__(self, allow_private: Iterable[str] = (), resolver: Callable[[str, int], list[str]] = system_resolver):
        self.allowed = {entry.strip().lower() for entry in allow_private}
        self.resolver = resolver

    def pin(self, url: str) -> str:
        check_url(url)
        parts = urlsplit(url)
        host, port = parts.hostname, parts.port or DEFAULT_PORTS[parts.scheme.lower()]
        try:
            addresses = self.resolver(host, port)
        except OSError as error:   # socket.gaierror: no such name, or DNS down (may pass: retried)
            raise _Transient(f"cannot resolve {host} ({error})") from error
        if not addresses:
            raise _Transient(f"cannot resolve {host} (no address)")
        # the name as the URL writes it: listing 127.0.0.1:8080 lets no other name that resolves there through
        endpoint = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        for address in addresses:   # one bad answer refuses the name: the next lookup could return it
            kind = refusal(address)
            if kind and endpoint not in self.allowed:
                raise FetchError(f"refused address {address} of {endpoint} ({kind}); private addresses are "
                                 f"fetched only when collect.download.allow_private lists {endpoint}")
        return addresses[0]


class PinnedAdapter(requests.adapters.HTTPAdapter):
    """An HTTPAdapter that connects to the address the Guard checked for each host:port (`pins`), not to whatever a
    new DNS lookup returns. The URL's host stays what TLS sends (SNI) and checks the certificate against."""

    def __init__(self):
        super().__init__(max_retries=0)   # requests and urllib3 never retry: our policy does (see module docstring)
        self.pins: dict[tuple[str, int], str] = {}

    def build_connection_pool_key_attributes(self, request, verify, cert=None):
        host_params, pool_kwargs = super().build_connection_pool_key_attributes(request, verify, cert)
        host = host_params["host"]
        pinned = self.pins[(host, host_params["port"])]   # KeyError: a request the Guard never saw (a bug)
        if host_params["scheme"] == "https":
            pool_kwargs = {**pool_kwargs, "server_hostname": host, "assert_hostname": host}
        return {**host_params, "host": pinned}, pool_kwargs


class Client:
    """One download's connections: the Guard's checks and the adapter that pins them."""

    def __init__(self, guard: Guard):
        self.guard, self.adapter = guard, PinnedAdapter()

    def get(self, url: str, headers: dict, timeout: float) -> requests.Response:
        """GET url, following redirects hop by hop, each hop checked and pinned before it is sent."""
        for hop in range(MAX_REDIRECTS + 1):
            request = requests.Request("GET", url, headers=headers).prepare()   # the URL as sent (IDNA, quoting)
            parts = urlsplit(request.url)
            try:
                address = self.guard.pin(request.url)
            except FetchError as error:
                raise (FetchError(f"redirected to {url}: {error}") if hop else error) from None
            self.adapter.pins[(parts.hostname, parts.port or DEFAULT_PORTS[parts.scheme])] = address
            # the URL's host, not the pinned address, in Host: urllib3 would send the address it connects to
            request.headers["Host"] = parts.netloc.rsplit("@", 1)[-1]
            response = self.adapter.send(request, stream=True, timeout=timeout)
            location = response.headers.get("Location")
            if response.status_code not in REDIRECTS or not location:
                return response
            response.close()
            url = urljoin(url, location)
        raise FetchError(f"more than {MAX_REDIRECTS} redirects")

    def close(self) -> None:
        self.adapter.close()


def download(url: str, folder: Path, *, max_bytes: int, timeout: float, retries: int, backoff: float,
             sha256: str | None = None, allow_private: Iterable[str] = (),
             resolver: Callable[[str, int], list[str]] = system_resolver) -> Path:
    """Stream url into folder, content-addressed: returns folder/<sha256 of the bytes><ext>. Private addresses are
    reached only when `allow_private` lists their host:port; `resolver` is the DNS lookup (tests give their own)."""
    check_url(url)
    folder = Path(folder)
    partial = folder / ".partial" / (hashlib.sha256(url.encode()).hexdigest() + ".part")
    partial.parent.mkdir(parents=True, exist_ok=True)
    client = Client(Guard(allow_private, resolver))
    try:
        _with_retries(client, url, partial, max_bytes=max_bytes, timeout=timeout, retries=retries, backoff=backoff)
    finally:
        client.close()
    return _store(partial, folder, extension(url), sha256)


def extension(url: str) -> str:
    """The URL path's suffix when it names a known media type; `.bin` otherwise (never trust an arbitrary suffix)."""
    suffix = PurePosixPath(unquote(urlsplit(url).path)).suffix.lower()
    return suffix if suffix in EXTENSIONS else ".bin"


def _with_retries(client: Client, url: str, partial: Path, *, max_bytes: int, timeout: float,
                  retries: int, backoff: float) -> None:
    attempts = max(retries, 0) + 1
    policy = retrying(f"collect: {url}", attempts=attempts, backoff=backoff,
                      transient=lambda error: isinstance(error, _Transient), asked=lambda error: error.retry_after)
    try:
        policy(_attempt, client, url, partial, max_bytes, timeout)
    except _Transient as last:
        # The partial file stays: a later run of collect resumes it instead of starting over.
        raise FetchError(f"{last} after {attempts} attempt{'s' if attempts > 1 else ''}{last.note}") from last
    except FetchError:
        _discard(partial)  # permanent failure: nothing worth resuming
        raise


def _attempt(client: Client, url: str, partial: Path, max_bytes: int, timeout: float) -> None:
    """One request: resume the partial file if there is one, and stream the body into it."""
    try:
        offset = partial.stat().st_size if partial.exists() else 0
        validator = _validator(partial)
        known = validator.read_text() if offset and validator.exists() else None   # none: an older run's partial
        response = _get(client, url, offset, timeout, known)
        if response.status_code == 416 and offset:
            # Our partial is longer than the resource (it changed, or the partial is stale): start over, once.
            response.close()
            _discard(partial)
            offset, response = 0, _get(client, url, 0, timeout)
        with response:
            _check_status(response)
            offset = _resume_offset(response, partial, offset)
            if offset == 0:
                _remember_validator(response, partial)
            _stream(response, partial, offset, max_bytes)
    except (requests.exceptions.SSLError, urllib3.exceptions.SSLError) as error:
        raise FetchError(f"TLS error ({_root(error)})") from error  # a bad certificate does not fix itself on retry
    except (requests.Timeout, urllib3.exceptions.ReadTimeoutError) as error:
        raise _Transient("timed out", note=f" (timeout={timeout:g} s)") from error
    except urllib3.exceptions.ProtocolError as error:
        raise _Transient(f"connection dropped mid-body ({_root(error)})") from error
    except requests.ConnectionError as error:
        raise _Transient(f"connection failed ({_root(error)})") from error
    except (requests.RequestException, urllib3.exceptions.HTTPError) as error:
        raise FetchError(f"request failed: {error}") from error


def _get(client: Client, url: str, offset: int, timeout: float, if_range: str | None = None):
    headers = dict(HEADERS, Range=f"bytes={offset}-") if offset else dict(HEADERS)
    if if_range:
        headers["If-Range"] = if_range  # changed since: the server answers 200 with the whole new file
    return client.get(url, headers, timeout)


def _validator(partial: Path) -> Path:
    """Where the version of the partial file's bytes is kept: the ETag or Last-Modified they were sent with."""
    return partial.with_suffix(".validator")


def _remember_validator(response: requests.Response, partial: Path) -> None:
    """Keep a strong ETag, else Last-Modified (a weak ETag is not allowed in If-Range); none: resume unguarded."""
    etag = response.headers.get("ETag", "")
    value = etag if etag and not etag.startswith("W/") else response.headers.get("Last-Modified")
    if value:
        _validator(partial).write_text(value)
    else:
        _validator(partial).unlink(missing_ok=True)


def _discard(partial: Path) -> None:
    """Forget a partial download: its bytes and their validator."""
    partial.unlink(missing_ok=True)
    _validator(partial).unlink(missing_ok=True)


def _check_status(response: requests.Response) -> None:
    status = response.status_code
    reason = f"HTTP {status} {response.reason or ''}".rstrip()
    if status == 429 or status >= 500:
        asked = retry_after(response.headers.get("Retry-After")) if status in (429, 503) else None
        raise _Transient(reason, retry_after=asked)
    if status not in (200, 206):
        raise FetchError(reason)  # 404, 403, ...: permanent, retrying cannot help


def _resume_offset(response: requests.Response, partial: Path, offset: int) -> int:
    """Where the body starts in the file: `offset` on a matching 206, else 0 (the server sent the whole file)."""
    if response.status_code == 206:
        content_range = response.headers.get("Content-Range", "")
        match = CONTENT_RANGE.fullmatch(content_range.strip())
        # Appending is only right for exactly "the rest from offset"; anything else would splice a wrong file.
        if match and int(match[1]) == offset and match[3] in ("*", str(int(match[2]) + 1)):
            return offset
        _discard(partial)  # start over on the next attempt
        raise _Transient(f"server answered Range bytes={offset}- with Content-Range {content_range or '(none)'!r}")
    if offset:
        _discard(partial)  # 200 to a Range request: the file changed, or the server ignores Range
    return 0


def _stream(response: requests.Response, partial: Path, offset: int, max_bytes: int) -> None:
    length = response.headers.get("Content-Length")
    expected = offset + int(length) if length and length.isdigit() else None
    if expected is not None and expected > max_bytes:
        raise FetchError(f"larger than max_bytes={max_bytes} (Content-Length says {expected} bytes)")
    size = offset
    try:
        with open(partial, "ab") as f:
            # read1, not iter_content: iter_content buffers whole chunks, and a connection dropped mid-chunk would
            # lose the bytes already received, so the next attempt could not resume from them.
            while chunk := response.raw.read1(CHUNK, decode_content=True):
                size += len(chunk)
                if size > max_bytes:  # servers can lie about, or omit, Content-Length
                    raise FetchError(f"larger than max_bytes={max_bytes} (stopped after {size} bytes)")
                f.write(chunk)
    except BaseException:
        if _encoded(response):
            _discard(partial)  # decoded offsets are not the Range offsets of the encoded body
        raise
    if expected is not None and size != expected and not _encoded(response):  # urllib3 normally raises first
        raise _Transient(f"connection dropped mid-body ({size} of {expected} bytes)")


def _encoded(response: requests.Response) -> bool:
    """True when a server ignored our Accept-Encoding: identity and compressed the body anyway."""
    return response.headers.get("Content-Encoding", "identity").lower() != "identity"


def _store(partial: Path, folder: Path, ext: str, sha256: str | None) -> Path:
    """Check the digest and move the partial file to its content-addressed name."""
    digest = sha256_file(partial)
    if sha256 is not None and digest != sha256.lower():
        _discard(partial)
        raise FetchError(f"sha256 mismatch: expected {sha256.lower()}, got {digest}")
    target = folder / (digest + ext)
    _validator(partial).unlink(missing_ok=True)
    if target.exists():
        partial.unlink()  # same name means same bytes: already stored
    else:
        os.replace(partial, target)
    return target


def _root(error: BaseException) -> str:
    """The innermost cause of a requests error, whose message is short and says what happened."""
    for _ in range(10):  # bounded: exception chains can, in principle, loop
        inner = error.__cause__ or error.__context__ or getattr(error, "reason", None)
        if not isinstance(inner, BaseException) or inner is error:
            break
        error = inner
    return f"{type(error).__name__}: {error}"
