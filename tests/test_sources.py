"""Bringing the user's data in: stored references, and (e2e) every source kind and every annotation format through
`dvc repro`, beside a corpus of hostile inputs and a URL server on 127.0.0.1 that answers 404, 429 and slowly."""
import hashlib
import json
import os
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from PIL import Image
from ruamel.yaml import YAML

from stages.common.files import read_jsonl, sha256_file
from stages.data import packs, sources
from tests.helpers import copy_repository, dvc, ffmpeg, make_video, ran


def frame_folder(folder: Path, count: int = 6) -> Path:
    folder.mkdir(parents=True)
    for index in range(count):
        Image.new("RGB", (40, 30), (index * 40, 80, 0)).save(folder / f"frame_{index:03d}.png")
    return folder


def test_frame_folders_pack_into_the_same_tar_whatever_their_timestamps(tmp_path):
    frames = frame_folder(tmp_path / "frames")
    (tmp_path / "a").mkdir(), (tmp_path / "b").mkdir()
    first = sources.store_frames(frames, tmp_path / "a")
    os.utime(frames / "frame_000.png", (1, 1))
    assert sources.store_frames(frames, tmp_path / "b") == first
    assert first == f"videos/{sha256_file(tmp_path / 'b' / Path(first).name)}.tar"
    with pytest.raises(sources.SourceError, match="no frame images"):
        sources.store_frames(tmp_path / "a", tmp_path / "b")


def test_references_cannot_leave_the_source_folder(tmp_path):
    folder = tmp_path / "source"
    folder.mkdir()
    (tmp_path / "secret.mp4").write_bytes(b"x")
    (folder / "link.mp4").symlink_to(tmp_path / "secret.mp4")
    for reference in ("../secret.mp4", "link.mp4"):
        with pytest.raises(sources.SourceError, match="escapes the source folder"):
            sources.resolve(reference, folder)
    with pytest.raises(sources.SourceError, match="no such file"):
        sources.resolve("missing.mp4", folder)


def split(rows) -> tuple[list[dict], list[dict]]:
    """(samples, rejects) of url_rows' (sample, reject) pairs."""
    rows = list(rows)
    return [sample for sample, _ in rows if sample], [reject for _, reject in rows if reject]


def test_url_lists_with_checksums_comments_and_refused_schemes(tmp_path):
    (tmp_path / "urls.txt").write_text("# clips\nhttps://example.com/a.mp4 " + "0" * 64 + "\n\n"
                                       "file:///etc/passwd\nhttp://example.com/b.webm\n")
    samples, rejects = split(sources.url_rows({"kind": "urls", "file": "urls.txt"}, tmp_path))
    assert [s["videos"] for s in samples] == [["https://example.com/a.mp4"], ["http://example.com/b.webm"]]
    assert samples[0]["meta"]["sha256"] == "0" * 64 and samples[0]["caption"] is None
    assert rejects == [{"id": None, "source": f"{tmp_path / 'urls.txt'}:4", "field": "url",
                        "reason": "refused URL scheme file: only http and https are fetched"}]


def test_url_lists_are_read_line_by_line_and_a_line_over_the_limit_is_a_reject(tmp_path):
    (tmp_path / "urls.txt").write_bytes(b"https://example.com/a.mp4\n" + b"https://example.com/" + b"x" * 5000
                                        + b".mp4\n" + b"https://example.com/caf\xe9.mp4\nhttps://example.com/b.mp4\n")
    samples, rejects = split(sources.url_rows({"kind": "urls", "file": "urls.txt"}, tmp_path, max_line_bytes=1024))
    assert [s["videos"] for s in samples] == [["https://example.com/a.mp4"], ["https://example.com/b.mp4"]]
    assert [(r["source"].rsplit(":", 1)[1], r["field"]) for r in rejects] == [("2", "url"), ("3", "url")]
    assert rejects[0]["reason"] == "line longer than collect.max_line_bytes=1024 bytes, or not UTF-8"


DOWNLOAD = {"timeout": 1, "retries": 1, "backoff": 0.01, "parallel": 1, "max_megabytes": 1, "allow_private": []}


def test_listings_name_each_video_by_path_or_url_and_sha256_and_a_bad_line_is_a_reject_with_its_line(tmp_path):
    digest = "ab" * 32
    (tmp_path / "list.txt").write_text(f"# a million of these\n/data/a.mp4 {digest}\nclips/b.mp4 {digest.upper()}\n"
                                       f"s3://bucket/c.mp4 {digest}\nhttps://example.com/d.mp4 {digest}\n"
                                       f"/data/e.mp4\n/data/f.mp4 xyz\nfile:///data/g.mp4 {digest}\n"
                                       f"nosuch://x/h.mp4 {digest}\n")
    samples, rejects = split(sources.url_rows({"kind": "listing", "file": "list.txt"}, tmp_path))
    assert [s["videos"][0] for s in samples] == ["/data/a.mp4", "clips/b.mp4", "s3://bucket/c.mp4",
                                                 "https://example.com/d.mp4", "file:///data/g.mp4"]
    assert all(s["meta"]["sha256"] == digest and s["meta"]["listed"] and s["id"].startswith("listed-")
               for s in samples)
    assert [(r["source"].rsplit(":", 1)[1], r["field"]) for r in rejects] == [("6", "line"), ("7", "sha256"),
                                                                              ("9", "path")]
    assert rejects[0]["reason"] == 'expected "<path or URL> <sha256>", got 1 fields'
    assert rejects[2]["reason"] == "nosuch://x/h.mp4: no fsspec protocol 'nosuch'"


def test_a_listed_video_is_stored_by_its_checked_bytes_through_fsspec_or_the_file_system(tmp_path):
    import fsspec
    data = b"\x00\x00\x00\x18ftypmp42 a video's bytes"
    digest = hashlib.sha256(data).hexdigest()
    with fsspec.open("memory://bucket/clip.mp4", "wb") as f:   # fsspec's in-memory file system, a real backend
        f.write(data)
    (tmp_path / "local.mp4").write_bytes(data)
    videos = tmp_path / "videos"
    videos.mkdir()
    assert sources.store_listed("memory://bucket/clip.mp4", digest, tmp_path, videos, DOWNLOAD) == \
        f"videos/{digest}.mp4"
    assert (videos / f"{digest}.mp4").read_bytes() == data
    (videos / f"{digest}.mp4").unlink()
    assert sources.store_listed("local.mp4", digest, tmp_path, videos, DOWNLOAD) == f"videos/{digest}.mp4"
    with pytest.raises(sources.SourceError, match=f"local.mp4: sha256 mismatch: the listing says {'0' * 64}, "
                                                  f"the file's bytes give {digest}"):
        sources.store_listed("local.mp4", "0" * 64, tmp_path, videos, DOWNLOAD)
    with pytest.raises(sources.SourceError, match="missing.mp4: FileNotFoundError"):
        sources.store_listed("missing.mp4", "1" * 64, tmp_path, videos, DOWNLOAD)
    assert sorted(path.name for path in videos.iterdir()) == [f"{digest}.mp4"]   # no partial file left behind


def test_splits_follow_the_id_not_the_order():
    drawn = [sources.assign_split(f"clip-{i}", 0.1, 0.2) for i in range(2000)]
    assert abs(drawn.count("test") / 2000 - 0.2) < 0.03 and abs(drawn.count("val") / 2000 - 0.1) < 0.03
    assert sources.assign_split("clip-7", 0.1, 0.2) == drawn[7]


# ---------------------------------------------------------------- e2e: every kind and format through `dvc repro`

class Server(BaseHTTPRequestHandler):
    """Serves the corpus folder; /busy/* answers 429 twice first, /slow/* stalls past the timeout, others 404."""

    def do_GET(self):
        counts = self.server.counts
        counts[self.path] = counts.get(self.path, 0) + 1
        name = self.path.rsplit("/", 1)[-1]
        if self.path.startswith("/busy/") and counts[self.path] <= 2:
            return self.reply(429, b"slow down", {"Retry-After": "0"})
        if self.path.startswith("/slow/"):
            time.sleep(3)
        path = self.server.folder / name
        if not path.is_file():
            return self.reply(404, b"not found")
        self.reply(200, path.read_bytes())

    def reply(self, status, body, headers=None):
        try:
            self.send_response(status)
            for key, value in {**(headers or {}), "Content-Length": str(len(body))}.items():
                self.send_header(key, value)
            self.end_headers()
            self.wfile.write(body)
        except (BrokenPipeError, ConnectionResetError):
            pass   # the client timed out first, on purpose

    def log_message(self, *args):
        pass


@pytest.fixture
def server(tmp_path):
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Server)
    httpd.folder, httpd.counts = tmp_path / "served", {}
    httpd.folder.mkdir()
    httpd.base = f"http://127.0.0.1:{httpd.server_address[1]}"
    threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    yield httpd
    httpd.shutdown()
    httpd.server_close()


def write_jsonl(path: Path, rows: list) -> None:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))


def build_corpus(folder: Path, served: Path, base: str) -> dict:
    """Good videos in several codecs and shapes, hostile files, and one annotation file per format.
    Returns {sample id: expected fate}."""
    good = {"h264.mp4": {}, "vp9.webm": {"codec": "libvpx-vp9", "extra": ("-deadline", "realtime")},
            "mpeg4.avi": {"codec": "mpeg4"}, "hevc.mkv": {"codec": "libx265", "extra": ("-x265-params",
                                                                                          "log-level=error")},
            "odd.mkv": {"size": "33x17", "source": "testsrc=", "extra": ("-pix_fmt", "yuv444p")},
            "big.mp4": {"size": "4000x3000", "seconds": 0.5}}
    for name, how in good.items():
        make_video(folder / name, seconds=how.get("seconds", 1), size=how.get("size", "64x48"),
                   codec=how.get("codec", "libx264"), extra=how.get("extra", ()), source=how.get("source", "testsrc2="))
    ffmpeg("-display_rotation", "90", "-i", str(folder / "h264.mp4"), "-c", "copy", str(folder / "rotated.mp4"))
    ffmpeg("-i", str(folder / "h264.mp4"), "-vf", "select='lt(n,4)+not(mod(n,3))'", "-fps_mode", "vfr",
           str(folder / "vfr.mp4"))
    ffmpeg("-f", "lavfi", "-i", "sine=frequency=300", "-t", "1", str(folder / "audio_only.m4a"))
    (folder / "zero.mp4").write_bytes(b"")
    (folder / "text.mp4").write_text("this is a text file, renamed\n" * 20)
    data = (folder / "h264.mp4").read_bytes()
    (folder / "truncated.mp4").write_bytes(data[: len(data) // 3])
    frame_folder(folder / "frames_a")
    ffmpeg("-f", "lavfi", "-i", "sine=frequency=500", "-t", "2", "-ar", "16000", str(folder / "speech.wav"))
    make_video(served / "remote1.mp4", seconds=1)
    make_video(served / "remote2.mp4", seconds=1, size="48x48")

    q, c = "What is shown?", "a test pattern"
    write_jsonl(folder / "triplets.jsonl", [
        {"id": "t-h264", "video": "h264.mp4", "question": q, "caption": c},
        {"id": "t-url", "video": f"{base}/remote1.mp4", "question": q, "caption": c},
        {"id": "t-rotated", "video": "rotated.mp4", "question": q, "caption": c},
        {"id": "t-vfr", "video": "vfr.mp4", "question": q, "caption": c},
        {"id": "t-big", "video": "big.mp4", "question": q, "caption": c},
        {"id": "t-zero", "video": "zero.mp4", "question": q, "caption": c},
        {"id": "t-text", "video": "text.mp4", "question": q, "caption": c},
        {"id": "t-truncated", "video": "truncated.mp4", "question": q, "caption": c},
        {"id": "t-audio", "video": "audio_only.m4a", "question": q, "caption": c},
        {"id": "t-escape", "video": "../outside.mp4", "question": q, "caption": c},
        {"id": "t-file-url", "video": "file:///etc/passwd", "question": q, "caption": c},
        {"id": "t-type", "video": "h264.mp4", "question": 3, "caption": c},
        '{"id": "t-broken", "video": ',
        {"id": "t-missing", "video": "not_there.mp4", "question": q, "caption": c},
        {"id": "t-404", "video": f"{base}/gone.mp4", "question": q, "caption": c},
    ])
    (folder / "llava.json").write_text(json.dumps([
        {"id": "l-vp9", "video_url": "vp9.webm", "num_frames": 4, "conversation": [
            {"role": "user", "content": [{"type": "image"}, {"type": "image"}, {"type": "text", "text": q}]},
            {"role": "assistant", "content": [{"type": "text", "text": c}]}]}], indent=1))
    write_jsonl(folder / "sharegpt.jsonl", [
        {"id": "s-three", "video": ["hevc.mkv", "mpeg4.avi", "odd.mkv"], "conversations": [
            {"from": "human", "value": "<video>\n<video>\n<video>\nCompare the clips."},
            {"from": "gpt", "value": "three test patterns"}]},
        {"id": "s-mismatch", "video": ["hevc.mkv"], "conversations": [
            {"from": "human", "value": "<video>\n<video>\nCompare."}, {"from": "gpt", "value": "x"}]}])
    write_jsonl(folder / "manifest_v1.jsonl", [
        {"id": "m-frames", "frames_dir": "frames_a", "audio": "speech.wav",
         "meta": {"caption": c, "transcript": "hello there", "duration": 3.0, "source_path": "/old/a.mp4"}}])
    write_jsonl(folder / "openai.jsonl", [
        {"id": "o-url", "messages": [
            {"role": "system", "content": "You describe videos."},
            {"role": "user", "content": [{"type": "video_url", "video_url": {"url": f"{base}/busy/remote2.mp4"}},
                                         {"type": "text", "text": q}]},
            {"role": "assistant", "content": c}]}])
    (folder / "urls.txt").write_text(f"{base}/remote2.mp4\n{base}/slow/remote1.mp4\nftp://example.com/a.mp4\n")
    survive = ["t-h264", "t-url", "t-rotated", "t-vfr", "t-big", "l-vp9", "s-three", "m-frames", "o-url"]
    quarantined = ["t-zero", "t-text", "t-truncated", "t-audio"]
    return {"survive": survive, "quarantined": quarantined}


@pytest.mark.e2e
def test_every_source_kind_and_format_through_dvc_repro(tmp_path_factory, server):
    repo = copy_repository(tmp_path_factory.mktemp("sources"))
    folder = repo / "data/sources/corpus"
    folder.mkdir()
    expected = build_corpus(folder, server.folder, server.base)
    yaml = YAML()
    params = yaml.load((repo / "params.yaml").read_text())
    corpus = {"kind": "local", "folder": "data/sources/corpus"}
    params["collect"]["sources"] = [
        {**corpus, "annotations": "triplets.jsonl", "format": "triplets"}, {**corpus, "annotations": "llava.json"},
        {**corpus, "annotations": "sharegpt.jsonl"}, {**corpus, "annotations": "manifest_v1.jsonl"},
        {**corpus, "annotations": "openai.jsonl"}, {"kind": "urls", "folder": "data/sources/corpus",
                                                    "file": "urls.txt"},
        {"kind": "listing", "folder": "data/sources/corpus", "file": "listing.txt"}]
    # a listing names videos outside the repository (and outside DVC's sight) by path, file:// or http URL + sha256
    outside = tmp_path_factory.mktemp("elsewhere")
    for name in ("h264.mp4", "vp9.webm"):
        (outside / name).write_bytes((folder / name).read_bytes())
    sha = {name: sha256_file(outside / name) for name in ("h264.mp4", "vp9.webm")}
    (folder / "listing.txt").write_text(
        f"{outside / 'h264.mp4'} {sha['h264.mp4']}\nfile://{outside / 'vp9.webm'} {sha['vp9.webm']}\n"
        f"{server.base}/remote1.mp4 {sha256_file(server.folder / 'remote1.mp4')}\n"   # fetched as URL lists are
        f"{outside / 'gone.mp4'} {sha['h264.mp4']}\n{outside / 'vp9.webm'} {sha['h264.mp4']}\n"
        f"{outside / 'h264.mp4'} not-a-sha\ns3://bucket/clip.mp4 {sha['h264.mp4']}\n")
    # the test server's own port is listed: 127.0.0.1 is refused unless collect.download.allow_private names it
    params["collect"]["download"].update(timeout=1, retries=2, backoff=0.05,
                                         allow_private=[f"127.0.0.1:{server.server_address[1]}"])
    params["extract"].update(max_bad_fraction=0.5, audio=True)
    with open(repo / "params.yaml", "w") as f:
        yaml.dump(params, f)

    output = dvc(repo, "repro", "manifest")
    assert ran(output) == {"collect", "extract", "manifest"}

    # collect: every bad row and URL recorded with file, line and field; ids that never reached samples
    collected = {s["id"]: s for s in read_jsonl(repo / "data/raw/samples.jsonl")}
    rejects = read_jsonl(repo / "data/raw/rejects.jsonl")
    reasons = {r["source"].rsplit("/", 1)[-1]: (r["field"], r["reason"]) for r in rejects}
    assert reasons["triplets.jsonl:10"][0] == "video" and "escapes the source folder" in reasons["triplets.jsonl:10"][1]
    assert "refused URL scheme file" in reasons["triplets.jsonl:11"][1]
    assert reasons["triplets.jsonl:12"][0] == "question"
    assert "invalid JSON" in reasons["triplets.jsonl:13"][1] or "JSON" in reasons["triplets.jsonl:13"][1]
    assert "sharegpt.jsonl:2" in reasons and reasons["sharegpt.jsonl:2"][0] == "conversations"
    assert "refused URL scheme ftp" in reasons["urls.txt:3"][1]
    by_id = {r["id"]: r["reason"] for r in rejects if r["id"]}
    assert "no such file" in by_id["t-missing"] and "HTTP 404" in by_id["t-404"]
    slow = [r for r in rejects if r["id"] and r["id"].startswith("url-") and "timed out" in r["reason"]]
    assert len(slow) == 1
    assert server.counts["/busy/remote2.mp4"] == 3          # two 429s, then the file
    stored = packs.read_index(repo / "data/raw/videos")
    for name in collected["s-three"]["videos"] + collected["m-frames"]["videos"]:
        data = packs.read(repo / "data/raw/videos", stored[name.removeprefix("videos/")])
        assert name.removeprefix("videos/").split(".")[0] == hashlib.sha256(data).hexdigest()
    listed = [s for s in collected.values() if s["id"].startswith("listed-")]
    remote = sha256_file(server.folder / "remote1.mp4")
    assert sorted(s["videos"][0] for s in listed) == sorted(
        [f"videos/{sha[name]}{Path(name).suffix}" for name in sha] + [f"videos/{remote}.mp4"])
    assert reasons["listing.txt:6"] == ("sha256", "'not-a-sha' is not a sha256 (64 hex digits)")
    listed_rejects = [reason for r in rejects if (r["id"] or "").startswith("listed-") for reason in [r["reason"]]]
    assert len(listed_rejects) == 3
    assert any("gone.mp4: FileNotFoundError" in reason for reason in listed_rejects)
    assert any("vp9.webm: sha256 mismatch" in reason for reason in listed_rejects)
    assert any("s3://bucket/clip.mp4: ImportError" in reason and "s3fs" in reason for reason in listed_rejects)

    # extract: hostile videos quarantined with their reason, good ones decoded
    report = json.loads((repo / "data/frames/report.json").read_text())["videos"]
    for sample_id in expected["quarantined"]:
        (video,) = collected[sample_id]["videos"]
        assert report[video]["status"] == "quarantined" and report[video]["reason"]
    assert "no video stream" in report[collected["t-audio"]["videos"][0]]["reason"]
    assert report[collected["t-rotated"]["videos"][0]]["rotation"] == 90
    assert report[collected["m-frames"]["videos"][0]]["codec"] == "images"

    # manifest: every good sample survives, every other one is counted by kind
    rows = {r["id"]: r for split in ("train", "val", "test") for r in read_jsonl(repo / f"data/manifest/{split}.jsonl")}
    assert set(expected["survive"]) <= set(rows)
    assert len(rows["s-three"]["videos"]) == 3 and rows["s-three"]["messages"][0]["content"].count("<video>") == 3
    assert "transcript: hello there" in rows["m-frames"]["source"]
    assert rows["o-url"]["messages"][0] == {"role": "system", "content": "You describe videos."}   # trained with
    stats = json.loads((repo / "data/manifest/stats.json").read_text())
    by_kind = stats["rejected_by_reason"]
    assert sum(n for kind, n in by_kind.items() if kind.startswith("video quarantined: ")) == 4
    assert by_kind["video quarantined: no video stream"] == 1 and by_kind["video quarantined: cannot open"] == 3
    assert stats["rejected"] == stats["samples"] - len(rows)
    assert sum(stats["rejected_by_reason"].values()) == stats["rejected"]
    assert "url-" in " ".join(r["id"] or "" for r in read_jsonl(repo / "data/manifest/rejects.jsonl"))  # no caption

    # a changed annotation file reruns collect; nothing changed reruns nothing, and the listed videos outside are
    # not DVC's to watch: their sha256 in the listing is (a changed video is a changed listing line)
    assert ran(dvc(repo, "repro", "manifest")) == set()
    (outside / "h264.mp4").write_bytes(b"changed")
    assert ran(dvc(repo, "repro", "manifest")) == set()
    with open(folder / "triplets.jsonl", "a") as f:
        f.write(json.dumps({"id": "t-new", "video": "h264.mp4", "question": "Again?", "caption": "again"}) + "\n")
    assert "collect" in ran(dvc(repo, "repro", "manifest"))
    assert "t-new" in {s["id"] for s in read_jsonl(repo / "data/raw/samples.jsonl")}
    assert server.counts["/remote1.mp4"] == 1    # downloaded once: the rerun took it from .downloads/
