"""Property-based fuzzing (hypothesis) of what hostile data sets reach first: the five annotation formats, read as
JSON Lines and as JSON arrays (streamed, across chunk boundaries), and mutated bytes of real videos and frame archives.

Invariants: no exception escapes; every input row becomes a sample or exactly one reject naming its line; the counts
add up; a JSON array gives what the same rows give as JSON Lines. The `ci` profile (default) runs in seconds;
`make fuzz` runs the `long` one (HYPOTHESIS_PROFILE=long) and writes its figures with FUZZ_STATS=<file>.
"""
import io
import json
import os
import re
import tarfile
from collections import Counter
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from stages.common.files import read_jsonl
from stages.data.formats import FORMATS, VIDEO, read_annotations
from stages.data.video import VideoError, sample, sample_images
from tests.helpers import SMALL, inside, make_video, write_params

settings.register_profile("ci", max_examples=30, deadline=None, derandomize=True, database=None,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                                 HealthCheck.function_scoped_fixture])
settings.register_profile("long", parent=settings.get_profile("ci"), max_examples=300, derandomize=False)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

LIMIT = 2048          # max_line_bytes of the fuzzed files: small, so that long lines and items occur
STATS = Counter()     # what was tried, for `make fuzz`'s figures

# ---------------------------------------------------------------- rows: valid pieces, wrong types, hostile values

junk = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
                    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner, max_size=3),
                    max_leaves=6)
HOSTILE_REFS = ["a.mp4", "clips/b.webm", "https://example.com/v.mp4", "HTTP://EXAMPLE.com/a", "../up.mp4",
                "clips/../../up.mp4", "/etc/passwd", "file:///etc/passwd", "http://", "http://[::1", "C:\\w.mp4",
                "~/x.mp4", "a\x00.mp4", "", " ", "ftp://h/x", "javascript:alert(1)", "\\\\server\\share\\x.mp4",
                "http://169.254.169.254/latest/meta-data/", "a.mp4" * 200]
refs = st.sampled_from(HOSTILE_REFS) | st.text(max_size=16)
texts = st.lists(st.sampled_from([VIDEO, VIDEO + "\n", "hello", " ", "\n", "é", "\u2028", "\ud800", "x" * 300]),
                 max_size=5).map("".join) | st.text(max_size=24)
ids = st.sampled_from(["x", "y", " ", ""]) | st.integers(-1, 3) | st.booleans()


def maybe(strategy):
    """The right kind of value, or any JSON value at all."""
    return st.one_of(strategy, strategy, junk)


def record(required: dict, optional: dict | None = None):
    """An object whose keys may each be missing (hence `optional=` for all of them) or of the wrong type."""
    return st.fixed_dictionaries({}, optional={key: maybe(value) for key, value in {**required, **(optional or {})}
                                               .items()})


common = {"id": ids, "split": st.sampled_from(["train", "val", "test", "dev"]), "meta": st.dictionaries(
    st.sampled_from(["caption", "title", "duration"]), texts | st.floats(allow_nan=False), max_size=2)}


sharegpt_answer = record({"from": st.sampled_from(["gpt", "human", "bot"]), "value": texts})
trl_answer = texts | st.lists(record({"role": st.sampled_from(["assistant", "user"]), "content": texts}), max_size=2)


def row_strategies(refs) -> dict:
    """A strategy of rows per format whose video references come from `refs`."""
    llava_part = record({"type": st.sampled_from(["text", "image", "video", "audio"]), "text": texts})
    openai_part = record({"type": st.sampled_from(["text", "video_url", "video", "image_url"]), "text": texts,
                          "video_url": record({"url": refs}), "video": refs})
    return {
        "triplets": record({"video": refs | st.lists(refs, max_size=3), "question": texts, "caption": texts}, common),
        "llava": record({"video_url": refs, "num_frames": st.integers(-2, 64), "conversation": st.lists(record({
            "role": st.sampled_from(["user", "assistant", "system", "bot"]),
            "content": texts | st.lists(llava_part, max_size=4)}), max_size=4)}, common),
        "sharegpt": record({"video": refs | st.lists(refs, max_size=3), "videos": st.lists(refs, max_size=2),
                            "system": texts, "conversations": st.lists(record({
                                "from": st.sampled_from(["human", "gpt", "system", "user", "bot"]), "value": texts}),
                                max_size=4)}, {**common, "chosen": sharegpt_answer, "rejected": sharegpt_answer}),
        "manifest_v1": record({"frames_dir": refs, "audio": refs, "meta": record({
            "caption": texts, "transcript": texts, "duration": st.floats(allow_nan=False)})}, {"id": ids}),
        "openai": record({"messages": st.lists(record({"role": st.sampled_from(["user", "assistant", "system",
                                                                               "developer", "tool"]),
                                                       "content": texts | st.lists(openai_part, max_size=3)}),
                                               max_size=4)}, {"id": ids, "split": common["split"]}),
        "trl": record({"prompt": st.lists(record({"role": st.sampled_from(["user", "system", "assistant", "bot"]),
                                                  "content": texts | st.lists(openai_part, max_size=3)}), max_size=3),
                       "chosen": trl_answer, "rejected": trl_answer, "videos": st.lists(refs, max_size=3)},
                      {"id": ids, "split": common["split"]}),
    }


ROWS = row_strategies(refs)
GARBAGE = [b"{", b"\xff\xfe{}", b"[" * 5000, b"null", b'"text"', b"{}" + b" " * (LIMIT + 10), b"\xef\xbb\xbf{}",
           b'{"video": "a.mp4", "question": "' + b"q" * (3 * LIMIT) + b'"}', b"[1, 2]", b"\x00\x01", b"1e999999",
           b'{"n": ' + b"9" * 4400 + b"}"]   # over Python's int digits limit (and LIMIT): json raises ValueError


def lines_of(rows: list) -> list[bytes]:
    return [row if isinstance(row, bytes) else json.dumps(row).encode() for row in rows]


def check_sample(sample: dict) -> None:
    """What every stage after collect relies on."""
    json.dumps(sample)
    users = [m for m in sample["messages"] if m["role"] == "user"]
    assert users and isinstance(sample["id"], str) and sample["id"].strip()
    found = sum(m["content"].count(VIDEO) for m in users)
    assert found == len(sample["videos"]) + ("frames_dir" in sample)
    assert all(m["role"] in ("system", "user", "assistant") for m in sample["messages"])


def check_accounting(samples: list, errors: list, path, rows: int, lines: set[int]) -> None:
    """Every row: a sample or exactly one reject on one of its lines; nothing else, nothing lost."""
    assert len(samples) + len(errors) == rows
    error_lines = [int(e["source"].rsplit(":", 1)[1]) for e in errors]
    assert all(e["source"].startswith(f"{path}:") for e in errors)
    assert set(error_lines) <= lines
    assert not [e for e in errors if e["reason"].startswith("internal error")]   # a bug caught is still a bug
    for one in samples:
        check_sample(one)


# ---------------------------------------------------------------- the five formats, as JSON Lines and as arrays

@pytest.mark.parametrize("fmt", FORMATS)
@given(data=st.data())
def test_fuzzed_json_lines_cost_only_their_bad_rows(tmp_path_factory, fmt, data):
    rows = data.draw(st.lists(ROWS[fmt] | ROWS[data.draw(st.sampled_from(FORMATS))], min_size=30, max_size=100))
    garbage = data.draw(st.lists(st.sampled_from(GARBAGE), max_size=4))
    for line in garbage:   # anywhere in the file
        rows.insert(data.draw(st.integers(0, len(rows))), line)
    path = tmp_path_factory.mktemp("fuzz") / "rows.jsonl"
    path.write_bytes(b"\n".join(lines_of(rows)) + b"\n")
    samples, errors = read_annotations(path, data.draw(st.sampled_from([fmt, "auto"])), max_line_bytes=LIMIT)
    # one line per row (json.dumps escapes every newline): line n is rows[n - 1], and none is blank
    check_accounting(samples, errors, path, len(rows), set(range(1, len(rows) + 1)))
    errors_by_line = Counter(int(e["source"].rsplit(":", 1)[1]) for e in errors)
    assert max(errors_by_line.values(), default=1) == 1                                # exactly one reject per row
    for number, line in enumerate(lines_of(rows), 1):
        if len(line) > LIMIT:
            assert errors_by_line[number] == 1
    STATS[f"{fmt} rows"] += len(rows)
    STATS["rejects"] += len(errors)


@pytest.mark.parametrize("fmt", FORMATS)
@given(data=st.data())
def test_fuzzed_json_arrays_stream_to_what_the_same_rows_give_as_lines(tmp_path_factory, fmt, data):
    """Whitespace of random length between the items moves the 64 kB chunk boundaries to anywhere in an item."""
    rows = data.draw(st.lists(ROWS[fmt] | junk, min_size=10, max_size=60))
    gaps = data.draw(st.lists(st.integers(0, 40_000), min_size=len(rows) + 1, max_size=len(rows) + 1))
    folder = tmp_path_factory.mktemp("fuzz")
    array = b"[" + b"".join(b" " * gap + b"\n" * (gap % 3) + (b"," if i else b"") + line
                            for i, (gap, line) in enumerate(zip(gaps, lines_of(rows)))) + b" " * gaps[-1] + b"]"
    (folder / "rows.json").write_bytes(array)
    (folder / "rows.jsonl").write_bytes(b"\n".join(lines_of(rows)) + b"\n")
    from_array = read_annotations(folder / "rows.json", fmt, max_line_bytes=LIMIT)
    from_lines = read_annotations(folder / "rows.jsonl", fmt, max_line_bytes=LIMIT)
    check_accounting(*from_array, folder / "rows.json", len(rows), set(range(1, array.count(b"\n") + 2)))
    assert from_array[0] == from_lines[0]                                      # the same samples, ids included

    def reasons(errors):   # less what differs by design: "item n" or "line", and lines ("first at row 9, line 1")
        return [(e["field"], re.sub(r"^(item \d+: |line )|, line \d+\)$", "", e["reason"])) for e in errors]
    assert reasons(from_array[1]) == reasons(from_lines[1])
    STATS[f"{fmt} rows"] += len(rows)
    STATS["array bytes"] += len(array)


# ---------------------------------------------------------------- mutated bytes of real videos and frame archives

P = {"num_frames": 4, "frame_size": 16, "max_source_pixels": 4096 * 4096, "max_source_frames": 10_000}


@pytest.fixture(scope="module")
def real_media(tmp_path_factory) -> Path:
    """A folder of small real files: three codecs and containers, and a frame archive as collect packs it."""
    folder = tmp_path_factory.mktemp("media")
    for name, codec, extra in [("h264.mp4", "libx264", ()), ("vp9.webm", "libvpx-vp9", ("-deadline", "realtime")),
                               ("mpeg4.avi", "mpeg4", ())]:
        make_video(folder / name, seconds=1, size="32x24", codec=codec, extra=extra)
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for index in range(3):
            image = io.BytesIO()
            Image.new("RGB", (12, 10), (index * 80, 40, 0)).save(image, "PNG")
            info = tarfile.TarInfo(f"{index:06d}.png")
            info.size = len(image.getvalue())
            tar.addfile(info, io.BytesIO(image.getvalue()))
    (folder / "frames.tar").write_bytes(buffer.getvalue())
    return folder


def mutate(data: bytes, draw) -> bytes:
    """Flip, overwrite, insert, delete or cut bytes: at random offsets, and often in the first kilobyte (headers)."""
    data = bytearray(data)
    for _ in range(draw(st.integers(1, 8))):
        where = draw(st.integers(0, max(len(data) - 1, 0)) | st.integers(0, min(1023, max(len(data) - 1, 0))))
        how = draw(st.sampled_from(["flip", "byte", "insert", "delete", "cut", "zero"]))
        if how == "flip" and data:
            data[where] ^= 1 << draw(st.integers(0, 7))
        elif how == "byte" and data:
            data[where] = draw(st.sampled_from([0x00, 0xFF, 0x7F, 0x80]))
        elif how == "insert":
            data[where:where] = draw(st.binary(min_size=1, max_size=64))
        elif how == "delete":
            del data[where:where + draw(st.integers(1, 256))]
        elif how == "cut":
            del data[where:]
        elif how == "zero":
            data[where:where + 64] = bytes(len(data[where:where + 64]))
    return bytes(data)


@pytest.mark.parametrize("name", ["h264.mp4", "vp9.webm", "mpeg4.avi", "frames.tar"])
@given(data=st.data())
def test_mutated_videos_decode_or_are_quarantined_never_crash(tmp_path_factory, real_media, name, data):
    path = tmp_path_factory.mktemp("mutated") / name
    path.write_bytes(mutate((real_media / name).read_bytes(), data.draw))
    try:
        if name.endswith(".tar"):
            with open(path, "rb") as archive:
                sampled = sample_images(archive, P, None)
        else:
            sampled = sample(path, P)
    except VideoError as error:
        assert str(error)   # a quarantine always says why
        STATS["videos quarantined"] += 1
    else:
        assert sampled.frames.shape == (4, 16, 16, 3) and sampled.frames.dtype == "uint8"
        STATS["videos decoded"] += 1
    STATS["videos mutated"] += 1


# ---------------------------------------------------------------- through collect, extract and manifest

PIPELINE_REFS = ["h264.mp4", "vp9.webm", "broken.mp4", "missing.mp4", "../h264.mp4", "/etc/passwd", "frames",
                 "link.mp4", "file:///etc/passwd", "http://127.0.0.1:9/x.mp4"]


@pytest.mark.parametrize("fmt", FORMATS)
@given(data=st.data())
@settings(max_examples=max(settings().max_examples // 6, 1))   # each example runs three stages
def test_every_fuzzed_row_ends_in_the_manifest_or_in_exactly_one_reject(tmp_path_factory, real_media, fmt, data):
    """The stages themselves, on a source folder of real and broken videos: no stage fails, and every row is
    accounted for once, by id in the manifest or in rejects.jsonl, or by its line when it had no id to give."""
    folder = tmp_path_factory.mktemp("pipeline")
    source = folder / "data/sources/fuzz"
    (source / "frames").mkdir(parents=True)
    for name in ("h264.mp4", "vp9.webm"):
        (source / name).write_bytes((real_media / name).read_bytes())
    (source / "broken.mp4").write_text("not a video")
    (source / "link.mp4").symlink_to(real_media / "h264.mp4")     # a symlink out of the source folder
    Image.new("RGB", (12, 10)).save(source / "frames/000.png")
    rows = data.draw(st.lists(plausible(fmt) | plausible(fmt) | PIPELINE_ROWS[fmt] | st.sampled_from(GARBAGE[:4]),
                              min_size=5, max_size=25))
    lines = [dict(row, id=f"row-{n}") if isinstance(row, dict) else row for n, row in enumerate(rows, 1)]
    (source / "rows.jsonl").write_bytes(b"\n".join(lines_of(lines)) + b"\n")
    write_params(folder, {**SMALL, "collect": {"sources": [{"kind": "local", "folder": "data/sources/fuzz",
                                                            "annotations": "rows.jsonl", "format": fmt}],
                                               "download": {**DOWNLOAD}},
                          "extract": {"max_bad_fraction": 1.0, "workers": 2, "decode_timeout": 30}})
    from stages import collect, extract, manifest
    with inside(folder):
        collect.main()
        extract.main()
        manifest.main()
    kept = [r["id"] for split in ("train", "val", "test") for r in read_jsonl(folder / f"data/manifest/{split}.jsonl")]
    rejects = read_jsonl(folder / "data/manifest/rejects.jsonl")
    by_id = Counter(r["id"] for r in rejects if r["id"] is not None)
    by_line = Counter(int(r["source"].rsplit(":", 1)[1]) for r in rejects if r["id"] is None)
    for n, line in enumerate(lines, 1):
        row_id = line.get("id") if isinstance(line, dict) else None
        assert kept.count(row_id) + by_id[row_id] + by_line[n] == 1, (n, line)
    stats = json.loads((folder / "data/manifest/stats.json").read_text())
    assert stats["samples"] == len(lines) and stats["rejected"] == len(rejects) == len(lines) - len(kept)
    assert sum(stats["rejected_by_reason"].values()) == stats["rejected"]
    STATS["rows through the stages"] += len(lines)
    STATS["rows through the stages kept"] += len(kept)


DOWNLOAD = {"max_megabytes": 1, "timeout": 1, "retries": 0, "backoff": 0.0, "parallel": 1, "allow_private": []}


PIPELINE_ROWS = row_strategies(st.sampled_from(PIPELINE_REFS))


def plausible(fmt: str):
    """Rows of the right shape whose reference and caption may still be bad: most of them should get through."""
    ref = st.sampled_from(PIPELINE_REFS) | st.sampled_from(["h264.mp4", "vp9.webm", "frames"])
    caption = st.text(max_size=12) | st.just("a caption")
    return {"triplets": st.builds(lambda v, c: {"video": v, "question": "What?", "caption": c}, ref, caption),
            "llava": st.builds(lambda v, c: {"video_url": v, "conversation": [
                {"role": "user", "content": [{"type": "video"}, {"type": "text", "text": "What?"}]},
                {"role": "assistant", "content": c}]}, ref, caption),
            "sharegpt": st.builds(lambda v, c: {"video": v, "conversations": [
                {"from": "human", "value": "<video>\nWhat?"}, {"from": "gpt", "value": c}]}, ref, caption),
            "manifest_v1": st.builds(lambda v, c: {"frames_dir": v, "meta": {"caption": c}}, ref, caption),
            "openai": st.builds(lambda v, c: {"messages": [
                {"role": "user", "content": [{"type": "video_url", "video_url": {"url": v}}, {"type": "text",
                                                                                            "text": "What?"}]},
                {"role": "assistant", "content": c}]}, ref, caption),
            "trl": st.builds(lambda v, c: {"prompt": [{"role": "user", "content": [
                {"type": "video"}, {"type": "text", "text": "What?"}]}], "chosen": c, "rejected": "not it",
                "videos": [v]}, ref, caption)}[fmt]


@pytest.fixture(scope="module", autouse=True)
def figures():
    """With FUZZ_STATS=<file>, write what was tried there (make fuzz does, for README's figures)."""
    yield
    if os.environ.get("FUZZ_STATS"):
        with open(os.environ["FUZZ_STATS"], "w") as f:
            json.dump(dict(sorted(STATS.items())), f, indent=2)
            f.write("\n")
