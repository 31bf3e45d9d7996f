"""Importers of user annotation formats: each format gives the normalized sample, and a hostile file costs only its
bad rows, each reported with the line and the field to fix."""
import json

import pytest

from stages.data.formats import FORMATS, VIDEO, detect_format, read_annotations


def write_lines(path, rows):
    """One row per line: dicts as JSON, strings as written (to plant broken lines); line n is rows[n - 1]."""
    path.write_text("".join((row if isinstance(row, str) else json.dumps(row)) + "\n" for row in rows))
    return path


def by_line(errors):
    """{line: (field, reason)}, checking that every error names its file."""
    found = {}
    for error in errors:
        file, line = error["source"].rsplit(":", 1)
        assert file.endswith((".json", ".jsonl"))
        found[int(line)] = (error["field"], error["reason"])
    return found


def assert_errors(errors, expected):
    """`expected`: {line: (field, fragment of the reason)}; no other errors."""
    found = by_line(errors)
    assert sorted(found) == sorted(expected), errors
    for line, (field, fragment) in expected.items():
        assert found[line][0] == field, (line, found[line])
        assert fragment in found[line][1], (line, found[line])


def test_triplets_json_array_reports_the_line_where_each_element_starts(tmp_path):
    path = tmp_path / "clips.json"
    path.write_text("""[
  {"id": "cat-1", "video": "https://cdn.example.com/cat.mp4", "question": " What does the cat do? ",
   "caption": "The cat jumps onto the sofa.", "split": "train", "meta": {"title": "cat", "duration": 12.5}},
  {"video": ["clips/a.mp4", "clips/b.mp4"],
   "question": "How do the two clips differ?",
   "caption": "The second one is at night.", "source": "phone"},
  {"video": "clips/c.mp4", "question": 7, "caption": "x"},
  {"video": "clips/d.mp4", "question": "Describe the clip."}
]
""")
    samples, errors = read_annotations(path)
    assert_errors(errors, {7: ("question", "expected a string, got int")})
    cat, pair, uncaptioned = samples
    assert cat == {"id": "cat-1", "videos": ["https://cdn.example.com/cat.mp4"],
                   "messages": [{"role": "user", "content": f"{VIDEO}\nWhat does the cat do?"},
                                {"role": "assistant", "content": "The cat jumps onto the sofa."}],
                   "question": "What does the cat do?", "caption": "The cat jumps onto the sofa.",
                   "meta": {"title": "cat", "duration": 12.5}, "split": "train"}
    assert pair["id"] == "clips-2" and pair["videos"] == ["clips/a.mp4", "clips/b.mp4"]
    assert pair["messages"][0]["content"] == f"{VIDEO}\n{VIDEO}\nHow do the two clips differ?"
    assert pair["meta"] == {"source": "phone"} and "split" not in pair
    assert uncaptioned["id"] == "clips-4" and uncaptioned["caption"] is None
    assert [m["role"] for m in uncaptioned["messages"]] == ["user"]


def test_triplets_jsonl_default_ids_are_stem_and_row_position(tmp_path):
    path = write_lines(tmp_path / "batch.jsonl", [{"video": "a.mp4", "question": "Q?", "caption": "A."}, "",
                                                  {"video": "b.mp4", "question": "Q?", "caption": "B."}])
    samples, errors = read_annotations(path, "triplets")
    assert errors == [] and [s["id"] for s in samples] == ["batch-1", "batch-2"]   # the blank line is no row


# One valid row without an id per format, each of which a JSON array can hold.
ROW_OF = {
    "triplets": lambda n: {"video": f"v{n}.mp4", "question": "What?", "caption": f"Clip {n}."},
    "llava": lambda n: {"conversation": [
        {"role": "user", "content": [{"type": "video"}, {"type": "text", "text": "?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": f"Clip {n}."}]}], "video_url": f"v{n}.mp4"},
    "sharegpt": lambda n: {"video": f"v{n}.mp4", "conversations": [{"from": "human", "value": f"{VIDEO}\nWhat?"},
                                                                  {"from": "gpt", "value": f"Clip {n}."}]},
    "manifest_v1": lambda n: {"frames_dir": f"frames/{n}", "meta": {"caption": f"Clip {n}."}},
    "openai": lambda n: {"messages": [
        {"role": "user", "content": [{"type": "video_url", "video_url": {"url": f"v{n}.mp4"}},
                                     {"type": "text", "text": "What?"}]},
        {"role": "assistant", "content": f"Clip {n}."}]},
    "trl": lambda n: {"prompt": [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": "What?"}]}],
                      "chosen": [{"role": "assistant", "content": f"Clip {n}."}], "rejected": "Not it.",
                      "videos": [f"v{n}.mp4"]},
}


@pytest.mark.parametrize("fmt", sorted(ROW_OF))
def test_a_json_array_on_one_line_keeps_every_row(tmp_path, fmt):
    """json.dump writes the whole array on one line: ids come from each row's position, so none collide."""
    path = tmp_path / "data.json"
    path.write_text(json.dumps([ROW_OF[fmt](n) for n in range(1, 4)] + ["not an object"]))
    samples, errors = read_annotations(path)
    assert [s["id"] for s in samples] == ["data-1", "data-2", "data-3"]
    assert [s["caption"] for s in samples] == ["Clip 1.", "Clip 2.", "Clip 3."]
    assert errors == [{"source": f"{path}:1", "field": "", "reason": "item 4: expected a JSON object, got str"}]


def test_llava_multi_turn_with_a_run_of_frames_or_a_video_part(tmp_path):
    frames = [{"type": "image"}] * 8
    rows = [
        {"conversation": [
            {"role": "system", "content": [{"type": "text", "text": "You describe videos."}]},
            {"role": "user", "content": [{"type": "text", "text": "Why is this video funny?"}, {"type": "video"}]},
            {"role": "assistant", "content": [{"type": "text", "text": "A cat misses its jump."}]},
            {"role": "user", "content": [{"type": "text", "text": "What color is the cat?"}]},
            {"role": "assistant", "content": [{"type": "text", "text": "Orange."}]}],
         "video_url": "https://huggingface.co/datasets/acme/clips/resolve/main/cat.mp4", "num_frames": 8},
        {"id": "frames", "conversation": [
            {"role": "user", "content": frames + [{"type": "text", "text": "Describe the clip."}]},
            {"role": "assistant", "content": [{"type": "text", "text": "A dog runs."}]}],
         "video_url": "videos/dog.mp4", "num_frames": 8, "split": "val"},
        # two runs of frames are two videos, but a LLaVA row has one
        {"conversation": [{"role": "user", "content": frames[:2] + [{"type": "text", "text": "and"}] + frames[:2]},
                          {"role": "assistant", "content": "x"}], "video_url": "v.mp4", "num_frames": 4},
        {"conversation": [{"role": "user", "content": [{"type": "video"}]},
                          {"role": "assistant", "content": [{"type": "video"}]}], "video_url": "v.mp4"},
        {"conversation": [{"role": "user", "content": [{"type": "video"}]}], "video_url": "v.mp4", "num_frames": "8"},
    ]
    samples, errors = read_annotations(write_lines(tmp_path / "llava.jsonl", rows))
    assert_errors(errors, {3: ("conversation", f"2 {VIDEO} placeholders in user turns for 1 video"),
                           4: ("conversation/1/content", "assistant turn with a video"),
                           5: ("num_frames", "expected an integer, got str")})
    funny, dog = samples
    assert funny["videos"] == ["https://huggingface.co/datasets/acme/clips/resolve/main/cat.mp4"]
    assert funny["messages"] == [
        {"role": "system", "content": "You describe videos."},
        {"role": "user", "content": f"Why is this video funny?\n{VIDEO}\n"},
        {"role": "assistant", "content": "A cat misses its jump."},
        {"role": "user", "content": "What color is the cat?"},
        {"role": "assistant", "content": "Orange."}]
    assert funny["question"] == "Why is this video funny?" and funny["caption"] == "Orange."
    assert funny["meta"] == {"num_frames": 8}
    assert dog["messages"][0]["content"] == f"{VIDEO}\nDescribe the clip." and dog["split"] == "val"


def test_sharegpt_with_32_videos_in_one_sample(tmp_path):
    videos = [f"episode/{index:02d}.mp4" for index in range(32)]
    rows = [
        {"id": "long", "video": videos, "system": "Answer briefly.", "conversations": [
            {"from": "human", "value": VIDEO * 32 + "Summarize the episode."},
            {"from": "gpt", "value": "A heist, told out of order."},
            {"from": "human", "value": "Who wins?"},
            {"from": "gpt", "value": "Nobody."}]},
        {"id": "inline", "video": ["a.mp4", "b.mp4"], "conversations": [
            {"from": "system", "value": "You compare videos."},
            {"from": "human", "value": f"Is {VIDEO} longer than {VIDEO}?"},
            {"from": "gpt", "value": "Yes."}]},
        {"id": "short", "video": "one.mp4", "conversations": [{"from": "human", "value": f"{VIDEO}\nWhat?"},
                                                              {"from": "gpt", "value": "Rain."}]},
    ]
    samples, errors = read_annotations(write_lines(tmp_path / "sharegpt.jsonl", rows), "sharegpt")
    assert errors == []
    long, inline, short = samples
    assert long["videos"] == videos
    assert long["messages"][0] == {"role": "system", "content": "Answer briefly."}
    assert long["messages"][1]["content"] == f"{VIDEO}\n" * 32 + "Summarize the episode."
    assert long["messages"][1]["content"].count(VIDEO) == 32
    assert [m["role"] for m in long["messages"]] == ["system"] + ["user", "assistant"] * 2
    assert long["question"] == "Summarize the episode." and long["caption"] == "Nobody."
    assert inline["messages"][:2] == [{"role": "system", "content": "You compare videos."},
                                      {"role": "user", "content": f"Is {VIDEO}\nlonger than {VIDEO}\n?"}]
    assert long["meta"] == inline["meta"] == {}
    assert short["videos"] == ["one.mp4"] and short["question"] == "What?"


def test_manifest_v1_rows_point_at_extracted_frames(tmp_path):
    rows = [{"id": "m-1", "frames_dir": "frames/m-1", "audio": "audio/m-1.wav",
             "meta": {"caption": "A man cooks pasta.", "transcript": "first boil the water", "duration": 31.0,
                      "source_path": "/mnt/archive/cooking/0001.mp4"}},
            {"id": "m-2", "frames_dir": "frames/m-2", "meta": {"duration": 4.0}},
            {"id": "m-3", "frames_dir": "../frames/m-3"}]
    samples, errors = read_annotations(write_lines(tmp_path / "old_manifest.jsonl", rows))
    assert_errors(errors, {3: ("frames_dir", "path escapes the source folder")})
    cooked, silent = samples
    assert cooked == {"id": "m-1", "videos": [], "frames_dir": "frames/m-1", "audio": "audio/m-1.wav",
                      "messages": [{"role": "user", "content": f"{VIDEO}\nDescribe the video."},
                                   {"role": "assistant", "content": "A man cooks pasta."}],
                      "question": "Describe the video.", "caption": "A man cooks pasta.",
                      "meta": {"transcript": "first boil the water", "duration": 31.0,
                               "source_path": "/mnt/archive/cooking/0001.mp4"}}
    assert silent["caption"] is None and "audio" not in silent and silent["meta"] == {"duration": 4.0}


def test_openai_parts_become_placeholders_where_they_stand(tmp_path):
    rows = [
        {"messages": [
            {"role": "system", "content": "You are a video assistant."},
            {"role": "user", "content": [
                {"type": "text", "text": "Compare these clips:"},
                {"type": "video_url", "video_url": {"url": "https://cdn.example.com/a.mp4"}},
                {"type": "text", "text": "and"},
                {"type": "video", "video": "clips/b.mp4"}]},
            {"role": "assistant", "content": "The first is longer."},
            {"role": "user", "content": "Which one is brighter?"},
            {"role": "assistant", "content": [{"type": "text", "text": "The second."}]}]},
        {"id": "bad-part", "messages": [
            {"role": "user", "content": [{"type": "video_url", "video_url": {"url": "https://x.test/a.mp4"}},
                                         {"type": "input_audio", "input_audio": {}}]}]},
        {"messages": [{"role": "user", "content": [{"type": "video", "video": "a.mp4"}]},
                      {"role": "tool", "content": "42"}]},
        {"messages": [{"role": "system", "content": "Only a prompt."},
                      {"role": "assistant", "content": [{"type": "video", "video": "a.mp4"}]}]},
    ]
    samples, errors = read_annotations(write_lines(tmp_path / "chat.jsonl", rows), "openai")
    assert_errors(errors, {2: ("messages/0/content/1/type", "unknown part type 'input_audio'"),
                           3: ("messages/1/role", "unknown role 'tool'"),
                           4: ("messages", "no user turn")})
    (chat,) = samples
    assert chat["videos"] == ["https://cdn.example.com/a.mp4", "clips/b.mp4"]
    assert chat["messages"][:2] == [{"role": "system", "content": "You are a video assistant."},
                                    {"role": "user", "content": f"Compare these clips:\n{VIDEO}\nand\n{VIDEO}\n"}]
    assert len(chat["messages"]) == 5 and chat["meta"] == {}
    assert chat["question"] == "Compare these clips:\nand" and chat["caption"] == "The second."


@pytest.mark.parametrize("fmt, row", [
    ("triplets", {"video": "a.mp4", "question": "q"}),
    ("llava", {"conversation": [], "video_url": "a.mp4"}),
    ("sharegpt", {"video": ["a.mp4"], "conversations": []}),
    ("manifest_v1", {"id": "x", "frames_dir": "f"}),
    ("openai", {"messages": []}),
    ("trl", {"prompt": [], "chosen": "a", "rejected": "b"}),
])
def test_detect_format(fmt, row):
    assert fmt in FORMATS and detect_format(row) == fmt


def test_detect_format_names_the_keys_it_saw():
    with pytest.raises(ValueError, match=r"\['clip', 'text'\]"):
        detect_format({"text": "hi", "clip": "a.mp4"})


def test_auto_detects_from_the_first_object_row_and_refuses_other_shapes(tmp_path):
    rows = ["not json at all", [1, 2], {"clip": "a.mp4", "text": "no known format"},
            {"video_url": "a.mp4", "num_frames": 4,
             "conversation": [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": "What?"}]},
                              {"role": "assistant", "content": [{"type": "text", "text": "Snow."}]}]},
            {"video": "b.mp4", "question": "What?", "caption": "Rain."},
            {"video_url": "c.mp4", "conversation": [{"role": "user", "content": [{"type": "video"}]}]}]
    samples, errors = read_annotations(write_lines(tmp_path / "mixed.jsonl", rows))
    assert_errors(errors, {1: ("", "invalid JSON"), 2: ("", "expected a JSON object, got list"),
                           3: ("", "no known format matches the keys ['clip', 'text']"),
                           5: ("", "a triplets row in a llava file")})
    assert [s["videos"] for s in samples] == [["a.mp4"], ["c.mp4"]]
    assert samples[0]["caption"] == "Snow." and samples[1]["caption"] is None


def test_a_hostile_file_costs_only_its_bad_rows(tmp_path):
    def row(sample_id, video, *turns):
        return {"id": sample_id, "video": video,
                "conversations": [{"from": role, "value": value} for role, value in zip(["human", "gpt"] * 9, turns)]}

    rows = [
        row("good-1", ["a.mp4", "https://cdn.example.com/b.mp4"], f"{VIDEO}\n{VIDEO}\nCompare.", "Same scene."),
        '{"id": "broken", "video": "a.mp4", "conversations": [',
        '["good-1", "a.mp4"]',
        row("wrong-type", "a.mp4", f"{VIDEO}\nWhat?", 42),
        {"id": "no-turns", "video": "a.mp4"},
        {"id": "no-from", "video": "a.mp4", "conversations": [{"value": f"{VIDEO}\nWhat?"}]},
        row("dotdot", "../private/a.mp4", f"{VIDEO}\nWhat?", "x"),
        row("absolute", ["a.mp4", "/etc/passwd"], f"{VIDEO}\n{VIDEO}\nWhat?", "x"),
        row("file-url", "file:///etc/shadow", f"{VIDEO}\nWhat?", "x"),
        row("ftp-url", ["ftp://mirror.example.com/a.mp4"], f"{VIDEO}\nWhat?", "x"),
        "",
        row("good-2", "clips/c.mp4", f"{VIDEO}\nWhat falls?", "Snow.", "How fast?", "Slowly."),
        row("too-many-tags", "a.mp4", f"{VIDEO}\n{VIDEO}\nWhat?", "x"),
        row("too-few-tags", ["a.mp4", "b.mp4", "c.mp4"], f"{VIDEO}\nWhat?", "x"),
        row("video-in-answer", "a.mp4", f"{VIDEO}\nWhat?", f"{VIDEO} this"),
        {"id": "bad-role", "video": "a.mp4", "conversations": [{"from": "human", "value": f"{VIDEO}\nQ"},
                                                               {"from": "bot", "value": "A"}]},
        {"id": "gpt-only", "video": "a.mp4", "conversations": [{"from": "gpt", "value": "A"}]},
        row("empty-answer", "a.mp4", f"{VIDEO}\nWhat?", "  "),
        row("good-1", "a.mp4", f"{VIDEO}\nAgain?", "x"),
        row("bad-video-type", 3, f"{VIDEO}\nWhat?", "x"),
        {"id": "triplet", "video": "a.mp4", "question": "What?", "caption": "x"},
        row("bad-split", "a.mp4", f"{VIDEO}\nWhat?", "x") | {"split": "dev"},
        row(["list-id"], "a.mp4", f"{VIDEO}\nWhat?", "x"),
        row("good-3", "d.mp4", f"{VIDEO}\nWhat?", "Fog.") | {"split": "test"},
    ]
    samples, errors = read_annotations(write_lines(tmp_path / "hostile.jsonl", rows))
    assert_errors(errors, {
        2: ("", "invalid JSON"),
        3: ("", "expected a JSON object, got list"),
        4: ("conversations/1/value", "expected a string, got int"),
        5: ("conversations", "missing required key"),
        6: ("conversations/0/from", "missing required key"),
        7: ("video", "path escapes the source folder"),
        8: ("video/1", "absolute path '/etc/passwd'"),
        9: ("video", "refused URL scheme file"),
        10: ("video/0", "refused URL scheme ftp"),
        13: ("conversations", f"2 {VIDEO} placeholders in user turns for 1 video"),
        14: ("conversations", f"1 {VIDEO} placeholders in user turns for 3 videos"),
        15: ("conversations/1/value", "assistant turn with a video"),
        16: ("conversations/1/from", "unknown role 'bot'"),
        17: ("conversations", "no user turn"),
        18: ("conversations/1/value", "empty text"),
        19: ("id", "duplicate id 'good-1' (first at row 1, line 1)"),
        20: ("video", "expected a string or a list, got int"),
        21: ("", "a triplets row in a sharegpt file"),
        22: ("split", "unknown split 'dev'"),
        23: ("id", "expected a string or an integer, got list"),
    })
    assert [s["id"] for s in samples] == ["good-1", "good-2", "good-3"]
    assert samples[1]["messages"][-1] == {"role": "assistant", "content": "Slowly."}
    assert samples[2]["split"] == "test"


@pytest.mark.parametrize("ref", ["clips/a.mp4", "a b/c..mp4", "https://cdn.example.com/x.mp4?t=1",
                                 "HTTP://example.com/a.mp4"])
def test_accepted_video_references(tmp_path, ref):
    path = write_lines(tmp_path / "refs.jsonl", [{"video": ref, "question": "What?"}])
    assert read_annotations(path)[0][0]["videos"] == [ref]


@pytest.mark.parametrize("ref, reason", [
    ("/etc/passwd", "absolute path"), ("C:\\videos\\a.mp4", "absolute path"), ("~/a.mp4", "absolute path"),
    ("clips/../../a.mp4", "path escapes the source folder"), ("..\\a.mp4", "path escapes the source folder"),
    ("file:///etc/passwd", "refused URL scheme file"), ("ftp://example.com/a.mp4", "refused URL scheme ftp"),
    ("data:video/mp4;base64,AAAA", "refused URL scheme data"), ("https:///a.mp4", "URL without a host"),
    ("", "empty video reference"),
])
def test_refused_video_references(tmp_path, ref, reason):
    path = write_lines(tmp_path / "refs.jsonl", [{"video": ref, "question": "What?"}])
    samples, errors = read_annotations(path)
    assert samples == [] and errors[0]["field"] == "video" and reason in errors[0]["reason"]


def test_a_syntax_error_in_a_json_array_keeps_the_elements_before_it(tmp_path):
    path = tmp_path / "cut.json"
    path.write_text('[\n {"video": "a.mp4", "question": "Q"},\n {"video": "b.mp4", "question": }\n]\n')
    samples, errors = read_annotations(path)
    assert [s["videos"] for s in samples] == [["a.mp4"]]
    assert_errors(errors, {3: ("", "item 2: invalid JSON")})


def test_odd_bytes_are_row_errors_too(tmp_path):
    good = json.dumps({"video": "a.mp4", "question": "What?"}).encode()
    path = tmp_path / "odd.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + good + b"\n" + good.replace(b"a.mp4", b"caf\xe9.mp4") + b"\n"
                     + b"[" * 100_000 + b"\n" + good.replace(b"a.mp4", b"b.mp4") + b"\n")
    samples, errors = read_annotations(path)
    assert_errors(errors, {2: ("", "not UTF-8 text"), 3: ("", "nested too deeply")})
    assert [s["id"] for s in samples] == ["odd-1", "odd-4"]       # the BOM of the first line is no error
    (tmp_path / "lines.json").write_bytes(good + b"\n" + good + b"\n")  # JSON Lines misnamed .json
    assert len(read_annotations(tmp_path / "lines.json")[0]) == 2


def test_an_unknown_format_name_is_a_caller_error(tmp_path):
    with pytest.raises(ValueError, match="unknown annotation format 'csv'"):
        read_annotations(write_lines(tmp_path / "x.jsonl", []), "csv")


# ---------------------------------------------------------------- bounded memory: files are read streaming

ROW = {"video": "a.mp4", "question": "What?", "caption": "A [tricky] {caption} with \"quotes\" and \\ slashes"}
BIG_ROW = {**ROW, "caption": "a long caption, " * 640}   # 10 kB


def test_a_line_over_max_line_bytes_is_a_reject_with_its_line_and_the_next_lines_go_on(tmp_path):
    huge = json.dumps({**ROW, "caption": "x" * 5000})
    path = write_lines(tmp_path / "long.jsonl", [ROW, huge, ROW | {"id": "after"}, huge + " ", ROW | {"id": "last"}])
    samples, errors = read_annotations(path, max_line_bytes=4096)
    assert_errors(errors, {2: ("", "line longer than collect.max_line_bytes=4096 bytes"),
                           4: ("", "line longer than collect.max_line_bytes=4096 bytes")})
    assert [s["id"] for s in samples] == ["long-1", "after", "last"]
    assert len(read_annotations(path, max_line_bytes=len(huge) + 1)[0]) == 5   # the limit is the limit: no less


@pytest.mark.parametrize("indent", [None, 1])
def test_a_json_array_item_over_the_limit_is_a_reject_and_the_next_items_go_on(tmp_path, indent):
    """The oversize item is read past by its brackets, with brackets, quotes and escapes inside its strings."""
    rows = [ROW | {"id": "first"}, {**ROW, "id": "big", "caption": '[{"\\' * 3000}, ROW | {"id": "next"},
            {**ROW, "id": "deep", "meta": {"a": [[{"b": "]}"}] * 500]}}, ROW | {"id": "last"}]
    path = tmp_path / "items.json"
    path.write_text(json.dumps(rows, indent=indent))
    samples, errors = read_annotations(path, max_line_bytes=4096)
    assert [s["id"] for s in samples] == ["first", "next", "last"]
    assert [e["reason"] for e in errors] == ["item 2: longer than collect.max_line_bytes=4096 bytes",
                                             "item 4: longer than collect.max_line_bytes=4096 bytes"]
    if indent:   # the line where each of them starts
        starts = [n for n, line in enumerate(path.read_text().splitlines(), 1) if line == " {"]
        assert [int(e["source"].rsplit(":", 1)[1]) for e in errors] == [starts[1], starts[3]]


def test_a_file_that_ends_inside_an_oversize_item_says_so(tmp_path):
    path = tmp_path / "cut.json"
    path.write_text('[{"video": "a.mp4", "question": "Q"}, {"video": "' + "x" * 10_000)
    samples, errors = read_annotations(path, max_line_bytes=4096)
    assert len(samples) == 1
    assert [e["reason"] for e in errors] == ["item 2: longer than collect.max_line_bytes=4096 bytes",
                                             "invalid JSON: the file ends inside item 2"]


@pytest.mark.parametrize("name, write", [
    ("one_line.jsonl", lambda f: f.write(b'{"video": "a.mp4", "question": "' + b"x" * (1 << 20) * 48 + b'"}\n')),
    ("array.json", lambda f: [f.write((b"[" if i == 0 else b",\n") + json.dumps(BIG_ROW).encode()) for i in range(4000)]
     and f.write(b"]")),
])
def test_reading_holds_one_row_not_the_file(tmp_path, name, write):
    """A 48 MB line, and a 40 MB array of 4,000 rows of 10 kB: peak Python memory stays a few MB while streaming (the
    old reader held the whole file). bench/annotations.py measures the resident memory of a 1M-row file."""
    import tracemalloc

    from stages.data.formats import iter_annotations
    path = tmp_path / name
    with open(path, "wb") as f:
        write(f)
    tracemalloc.start()
    try:
        counts = [0, 0]
        for sample, _ in iter_annotations(path, max_line_bytes=1 << 20):
            counts[sample is None] += 1
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert counts == ([0, 1] if name == "one_line.jsonl" else [4000, 0])
    assert peak < 4 * 2**20, f"peak {peak / 2**20:.1f} MB for a file of {path.stat().st_size / 2**20:.0f} MB"


def test_an_oversize_number_item_is_read_past_to_its_own_end(tmp_path):
    """A number has no brackets to count: the skip stops at the comma, so the next item is not swallowed."""
    path = tmp_path / "numbers.json"
    path.write_text("[1." + "7" * 10_000 + ", " + json.dumps(ROW | {"id": "after"}) + "]")
    samples, errors = read_annotations(path, max_line_bytes=4096)
    assert [s["id"] for s in samples] == ["after"]
    assert [e["reason"] for e in errors] == ["item 1: longer than collect.max_line_bytes=4096 bytes"]


@pytest.mark.parametrize("name", ["ints.jsonl", "ints.json"])
def test_an_integer_of_more_digits_than_python_converts_is_a_reject_not_a_crash(tmp_path, name):
    """json raises ValueError, not JSONDecodeError, past Python's 4300-digit limit: once, that escaped the reader."""
    rows = [{**ROW, "id": "huge", "meta": {"n": "__N__"}}, ROW | {"id": "after"}, [[[1]]] * 3]
    text = json.dumps(rows) if name.endswith(".json") else "\n".join(json.dumps(r) for r in rows)
    (tmp_path / name).write_text(text.replace('"__N__"', "9" * 5000))
    samples, errors = read_annotations(tmp_path / name)
    assert [s["id"] for s in samples] == ["after"]
    assert errors[0]["reason"].endswith("invalid JSON: an integer of more than 4300 digits")
    assert len(errors) == 2 and "expected a JSON object, got list" in errors[1]["reason"]


@pytest.mark.parametrize("number", ["1.5e-07", "-12.25", "1234567", "1E+300"])
def test_a_number_item_cut_by_a_chunk_boundary_is_read_whole(tmp_path, number):
    """Padding puts the chunk boundary (64 kB) inside the number, at every place in it: "1.5e" parses too."""
    from stages.data.formats import _CHUNK
    kind = type(json.loads(number)).__name__
    for cut in range(1, len(number)):
        path = tmp_path / "cut.json"
        path.write_bytes(b"[" + b" " * (_CHUNK - 1 - cut) + number.encode() + b', {"video": "a.mp4"}]')
        samples, errors = read_annotations(path, "triplets")
        assert [e["reason"] for e in errors] == [f"item 1: expected a JSON object, got {kind}",
                                                 "missing required key"], (cut, errors)


# ---------------------------------------------------------------- preference pairs

def test_llamafactory_sharegpt_preference_rows_keep_the_chosen_answer_and_the_rejected_one(tmp_path):
    path = write_lines(tmp_path / "pairs.jsonl", [
        {"conversations": [{"from": "human", "value": f"{VIDEO}{VIDEO}Which clip has the red circle?"}],
         "chosen": {"from": "gpt", "value": "the first"}, "rejected": {"from": "gpt", "value": "the second"},
         "videos": ["a.mp4", "b.mp4"]},
        {"conversations": [{"from": "human", "value": f"{VIDEO}What moves?"}],
         "chosen": {"from": "gpt", "value": "a cat"}, "videos": ["a.mp4"]},
        {"conversations": [{"from": "human", "value": f"{VIDEO}What moves?"}],
         "chosen": {"from": "gpt", "value": "a cat"}, "rejected": {"from": "gpt", "value": "a cat"},
         "videos": ["a.mp4"]},
        {"conversations": [{"from": "human", "value": f"{VIDEO}What moves?"}],
         "chosen": {"from": "gpt", "value": "a cat"}, "rejected": {"from": "gpt", "value": "a dog"},
         "videos": ["a.mp4", "b.mp4"]},
        {"conversations": [{"from": "human", "value": f"{VIDEO}What moves?"}],
         "chosen": {"from": "human", "value": "a cat"}, "rejected": {"from": "gpt", "value": "a dog"},
         "videos": ["a.mp4"]},
    ])
    samples, errors = read_annotations(path)
    assert [s["messages"] for s in samples] == [[
        {"role": "user", "content": f"{VIDEO}\n{VIDEO}\nWhich clip has the red circle?"},
        {"role": "assistant", "content": "the first"}]]
    assert (samples[0]["caption"], samples[0]["rejected"], samples[0]["videos"]) == ("the first", "the second",
                                                                                     ["a.mp4", "b.mp4"])
    assert_errors(errors, {2: ("rejected", "missing required key"),
                           3: ("rejected", "the rejected answer equals the chosen one"),
                           4: ("conversations", "1 <video> placeholders in user turns for 2 videos"),
                           5: ("chosen/from", "comes from the assistant (gpt), not 'human'")})


def test_trl_prompt_chosen_rejected_rows_with_listed_or_inline_videos(tmp_path):
    path = tmp_path / "trl.json"
    path.write_text(json.dumps([
        {"prompt": [{"role": "system", "content": "Answer briefly."},
                    {"role": "user", "content": [{"type": "video"}, {"type": "text", "text": "What moves?"}]}],
         "chosen": [{"role": "assistant", "content": "a red circle"}],
         "rejected": [{"role": "assistant", "content": [{"type": "text", "text": "a red square"}]}],
         "videos": ["a.mp4"]},
        {"prompt": [{"role": "user", "content": [{"type": "video", "video": "b.mp4"},
                                                 {"type": "text", "text": "And now?"}]}],
         "chosen": "a blue square", "rejected": "a blue circle"},
        {"prompt": [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": "What?"}]}],
         "chosen": "x", "videos": ["a.mp4"]},
        {"prompt": [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": "What?"}]}],
         "chosen": "x", "rejected": "y", "videos": ["a.mp4", "b.mp4"]},
        {"prompt": [{"role": "user", "content": [{"type": "video"}, {"type": "video"}, {"type": "text", "text": "?"}]}],
         "chosen": "x", "rejected": "y", "videos": ["a.mp4"]},
        {"prompt": [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": "What?"}]}],
         "chosen": [{"role": "user", "content": "x"}], "rejected": "y", "videos": ["a.mp4"]},
    ]))
    samples, errors = read_annotations(path)
    assert [(s["id"], s["videos"], s["caption"], s["rejected"]) for s in samples] == [
        ("trl-1", ["a.mp4"], "a red circle", "a red square"), ("trl-2", ["b.mp4"], "a blue square", "a blue circle")]
    assert samples[0]["messages"][0] == {"role": "system", "content": "Answer briefly."}
    assert len(errors) == 4 and [e["field"] for e in errors] == ["rejected", "videos", "videos", "chosen/0/role"]
    assert "2 videos listed for 1 bare video parts" in errors[1]["reason"]
    assert "more bare video parts in the prompt than the 1 listed videos" in errors[2]["reason"]
