"""Bring the user's own data into data/raw: local folders with an annotation file, lists of URLs, and listings.

A listing is a file of "<path or URL> <sha256>" lines: local paths anywhere (relative ones to the listing's folder),
http(s) URLs (fetched as a URL list's are), or any fsspec URL (s3://, gs://, ... with fsspec's package for it). The
sha256 on each line names the video's bytes, so the listing file changes whenever a listed video does: `collect`
depends on that one file, and DVC never walks the videos themselves, however many there are.

Every video is stored once, content-addressed as videos/<sha256><ext>, whether it came from a folder or a download;
a folder of already extracted frames (manifest v1) becomes one uncompressed tar, stored alike. collect then packs them
all (stages/data/packs.py). A row or a video that cannot be used becomes a reject record with its source, field and
reason; the rows beside it go on.
"""
import hashlib
import io
import json
import os
import re
import shutil
import tarfile
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import fsspec

from stages.common.files import sha256_file
from stages.common.retry import retrying
from stages.data import fetch, formats

# outside DVC's outputs: a failed run resumes its partial files there, and a rerun fetches no URL twice
DOWNLOADS = Path(".downloads")
IMAGES = {".jpg", ".jpeg", ".png", ".webp", ".bmp"}
DEFAULT_QUESTION = "Describe the video."
SHA256 = re.compile(r"[0-9a-f]{64}")


def is_url(reference: str) -> bool:
    return reference.startswith(("http://", "https://"))   # other schemes were refused by the importer


class SourceError(Exception):
    """A reference that cannot be stored; the message is the reject reason."""


class LineError(Exception):
    """A URL list's or listing's line that cannot be used: LineError(field, reason)."""


def store_file(path: Path, videos: Path) -> str:
    """Copy a local file into videos/ under its content hash; return its path relative to data/raw."""
    target = videos / f"{sha256_file(path)}{path.suffix.lower()}"
    if not target.exists():
        shutil.copyfile(path, target)
    return f"videos/{target.name}"


def store_frames(folder: Path, videos: Path) -> str:
    """Pack a folder of frame images (sorted by name) into a reproducible tar: same images, same bytes, same hash."""
    images = sorted(path for path in folder.iterdir() if path.suffix.lower() in IMAGES)
    if not images:
        raise SourceError(f"no frame images ({', '.join(sorted(IMAGES))}) in {folder}")
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for index, image in enumerate(images):
            data = image.read_bytes()
            info = tarfile.TarInfo(f"{index:06d}{image.suffix.lower()}")
            info.size = len(data)   # mtime, owner and mode stay at their zero defaults
            tar.addfile(info, io.BytesIO(data))
    digest = hashlib.sha256(buffer.getvalue()).hexdigest()
    (videos / f"{digest}.tar").write_bytes(buffer.getvalue())
    return f"videos/{digest}.tar"


def resolve(reference: str, folder: Path, directory: bool = False) -> Path:
    """A local file (or directory) inside the source folder; `..` or a symlink out of it is refused."""
    path = (folder / reference).resolve()
    if not path.is_relative_to(folder.resolve()):
        raise SourceError(f"{reference}: path escapes the source folder {folder}")
    if not (path.is_dir() if directory else path.is_file()):
        raise SourceError(f"{reference}: no such {'folder' if directory else 'file'} in {folder}")
    return path


def store_listed(reference: str, digest: str, folder: Path, videos: Path, download: dict) -> str:
    """Copy a listed local file or fsspec URL into videos/<sha256><ext>, checking its bytes against the listing's
    sha256; return the stored path relative to data/raw. A transient read error (timeout, dropped connection) is
    retried by the pipeline's one policy; anything else, and a mismatch, is a SourceError naming the reference."""
    suffix = Path(reference.split("?")[0]).suffix.lower()
    target = videos / f"{digest}{suffix if suffix in fetch.EXTENSIONS else '.bin'}"
    where = reference if "://" in reference else str(folder / reference)
    partial = target.with_name(target.name + ".part")

    def copy() -> str:
        hasher = hashlib.sha256()
        with fsspec.open(where, "rb") if "://" in where else open(where, "rb") as src, \
                open(partial, "wb") as out:
            while chunk := src.read(fetch.CHUNK):
                hasher.update(chunk)
                out.write(chunk)
        return hasher.hexdigest()
    policy = retrying(f"collect: {reference}", attempts=max(download["retries"], 0) + 1, backoff=download["backoff"],
                      transient=lambda error: isinstance(error, (TimeoutError, ConnectionError)))
    try:
        actual = policy(copy)
    except (OSError, ImportError, ValueError) as error:   # ImportError: fsspec lacks the protocol's package
        partial.unlink(missing_ok=True)
        raise SourceError(f"{reference}: {type(error).__name__}: {error}") from None
    if actual != digest:
        partial.unlink()
        raise SourceError(f"{reference}: sha256 mismatch: the listing says {digest}, the file's bytes give {actual}")
    os.replace(partial, target)   # the same name holds the same bytes when the video is listed twice
    return f"videos/{target.name}"


def download_all(urls: dict[str, str | None], videos: Path, download: dict) -> dict[str, str | Exception]:
    """{url: stored path or the error}, each URL fetched once (into DOWNLOADS, then linked), several at a time."""
    (DOWNLOADS / "urls").mkdir(parents=True, exist_ok=True)

    def one(url):
        seen = DOWNLOADS / "urls" / hashlib.sha256(url.encode()).hexdigest()   # holds the stored file's name
        path = DOWNLOADS / seen.read_text() if seen.exists() else None
        if path is None or not path.exists() or (urls[url] and not path.name.startswith(urls[url].lower())):
            try:
                path = fetch.download(url, DOWNLOADS, sha256=urls[url], timeout=download["timeout"],
                                      max_bytes=int(download["max_megabytes"] * 2**20), retries=download["retries"],
                                      backoff=download["backoff"], allow_private=download["allow_private"])
            except fetch.FetchError as error:
                return error
            seen.write_text(path.name)
        target = videos / path.name
        if not target.exists():
            try:
                os.link(path, target)
            except OSError:   # another file system: copy
                shutil.copyfile(path, target)
        return f"videos/{target.name}"
    with ThreadPoolExecutor(max_workers=download["parallel"]) as pool:
        return dict(zip(urls, pool.map(one, urls)))


def store_sample(sample: dict, folder: Path, videos: Path, fetched: dict, copied: dict, download: dict) -> dict:
    """The sample with its references replaced by stored paths; SourceError names the first one that failed.
    `copied` maps the local files stored so far to their stored paths: a video with ten questions is hashed once.
    A listing's sample (meta "listed") may name files outside the source folder: its line's sha256 vouches for them."""
    stored = []
    for reference in sample["videos"]:
        if is_url(reference):
            result = fetched[reference]
            if isinstance(result, Exception):
                raise SourceError(f"{reference}: {result}")
            stored.append(result)
        elif sample.get("meta", {}).get("listed"):
            stored.append(store_listed(reference, sample["meta"]["sha256"], folder, videos, download))
        else:
            path = resolve(reference, folder)
            stored.append(copied.get(path) or copied.setdefault(path, store_file(path, videos)))
    if sample.get("frames_dir"):
        stored.append(store_frames(resolve(sample["frames_dir"], folder, directory=True), videos))
    kept = {key: value for key, value in sample.items() if key not in ("frames_dir", "audio")}
    if sample.get("audio"):
        kept["audio"] = store_file(resolve(sample["audio"], folder), videos)
    return {**kept, "videos": stored}


def import_source(source: dict, download: dict, videos: Path, max_line_bytes: int = formats.MAX_LINE_BYTES):
    """Yield ("sample", sample) and ("reject", record) of one `local` or `urls` entry of collect.sources, one at a time:
    the rows that did not parse (or had a line over max_line_bytes) first, then every stored sample and every one
    whose video could not be stored, in the file's order.

    Memory stays bounded whatever the file's size: the rows that parsed wait in a spool file (not a list) while their
    URLs are downloaded, which has to come first since downloads run several at a time."""
    folder = Path(source.get("folder", "."))
    where = folder / source["file"] if "file" in source else "collect.sources.urls"
    if source["kind"] == "local":
        where = folder / source["annotations"]
        if not where.is_file():
            raise SystemExit(f"collect: annotation file {where} not found (collect.sources, kind local)")
    wanted = {}
    with tempfile.TemporaryFile("w+") as spool:
        for sample, reject in parsed(source, folder, max_line_bytes):
            if reject:
                yield "reject", reject
                continue
            for reference in sample["videos"]:
                if is_url(reference):
                    wanted.setdefault(reference, sample.get("meta", {}).get("sha256"))
            spool.write(json.dumps(sample) + "\n")   # ASCII (ensure_ascii), and loads gives the same dict back
        fetched = download_all(wanted, videos, download) if wanted else {}
        spool.seek(0)
        copied = {}
        for line in spool:
            sample = json.loads(line)
            try:
                yield "sample", store_sample(sample, folder, videos, fetched, copied, download)
            except SourceError as error:
                yield "reject", {"id": sample["id"], "source": str(where), "field": "videos", "reason": str(error)}


def parsed(source: dict, folder: Path, max_line_bytes: int):
    """Yield (sample, None) or (None, reject record) per row of a source's file or list, in its order."""
    if source["kind"] in ("urls", "listing"):
        yield from url_rows(source, folder, max_line_bytes)
        return
    for sample, error in formats.iter_annotations(folder / source["annotations"], source.get("format", "auto"),
                                                  max_line_bytes):
        yield sample, error and {"id": None, **error}   # a row that did not parse has no sure id


def url_lines(path: Path, max_line_bytes: int):
    """Yield (where, fields or None for a line that is too long or not UTF-8) per line of a URL list that is not
    blank or a # comment; read line by line, never whole."""
    with open(path, "rb") as f:
        for number, raw in formats.bounded_lines(f, max_line_bytes):
            try:
                line = raw.decode("utf-8-sig" if number == 1 else "utf-8") if raw is not None else None
            except UnicodeDecodeError:
                line = None
            if line is None or (line.strip() and not line.lstrip().startswith("#")):
                yield f"{path}:{number}", line.split() if line is not None else None


def url_rows(source: dict, folder: Path, max_line_bytes: int = formats.MAX_LINE_BYTES):
    """Yield (sample, None) or (None, reject record) in the file's order: one uncaptioned sample per URL, from `urls`
    (a list) or `file` (one "URL [sha256]" per line); or per line of a listing (`kind: listing`: "<path or URL>
    <sha256>", the sha256 required). One line at a time: a listing of millions is never held whole."""
    listing = source["kind"] == "listing"
    if "file" in source:
        lines = url_lines(folder / source["file"], max_line_bytes)
    else:
        lines = [(f"collect.sources.urls[{n}]", [url]) for n, url in enumerate(source["urls"])]
    for where, fields in lines:
        try:
            reference, checksum = listed_line(fields, max_line_bytes) if listing else url_line(fields, max_line_bytes)
        except LineError as error:
            field, reason = error.args
            yield None, {"id": None, "source": where, "field": field, "reason": reason}
            continue
        name = hashlib.sha256(reference.encode()).hexdigest()[:16]
        meta = {"source_url": reference, **({"sha256": checksum} if checksum else {}), **({"listed": True} if listing
                                                                                          else {})}
        yield {"id": f"{'listed' if listing else 'url'}-{name}", "videos": [reference], "question": DEFAULT_QUESTION,
               "caption": None, "messages": [{"role": "user", "content": f"{formats.VIDEO}\n{DEFAULT_QUESTION}"}],
               "meta": meta}, None


def url_line(fields: list[str] | None, max_line_bytes: int) -> tuple[str, str | None]:
    """(url, sha256 or None) of a URL list's line; LineError for one that cannot be used."""
    if fields is None:
        raise LineError("url", f"line longer than collect.max_line_bytes={max_line_bytes} bytes, or not UTF-8")
    url, *checksum = fields
    try:
        fetch.check_url(url)
    except fetch.FetchError as error:
        raise LineError("url", str(error)) from None
    return url, checksum[0] if checksum else None


def listed_line(fields: list[str] | None, max_line_bytes: int) -> tuple[str, str]:
    """(path or URL, sha256) of a listing's line; LineError for one that cannot be used."""
    if fields is None:
        raise LineError("line", f"line longer than collect.max_line_bytes={max_line_bytes} bytes, or not UTF-8")
    if len(fields) != 2:
        raise LineError("line", f'expected "<path or URL> <sha256>", got {len(fields)} fields')
    reference, checksum = fields[0], fields[1].lower()
    if not SHA256.fullmatch(checksum):
        raise LineError("sha256", f"{fields[1]!r} is not a sha256 (64 hex digits)")
    if is_url(reference) or reference.startswith(("http:", "https:")):
        url_line([reference], max_line_bytes)
    elif "://" in reference and reference.split("://")[0] not in fsspec.available_protocols():
        raise LineError("path", f"{reference}: no fsspec protocol {reference.split('://')[0]!r}")
    return reference, checksum


def assign_split(sample_id: str, val_fraction: float, test_fraction: float) -> str:
    """A split drawn from the id's hash: stable when other samples are added or removed."""
    draw = int(hashlib.sha256(sample_id.encode()).hexdigest()[:8], 16) / 16**8
    return "test" if draw < test_fraction else "val" if draw < test_fraction + val_fraction else "train"
