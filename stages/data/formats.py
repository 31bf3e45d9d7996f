"""formats: read the video-annotation files our users already have into our normalized sample dicts.

Users arrive with question/caption triplets, LLaVA, ShareGPT or OpenAI chat exports, or our older frame manifests;
preference pairs (a chosen and a rejected answer) as LLaMA-Factory's ShareGPT rows or TRL's prompt/chosen/rejected.
Asking them to convert by hand loses rows silently; here every row either becomes a sample (the shape stages.collect
writes to data/raw/samples.jsonl) or an error {"source": "<file>:<line>", "field": "<json path>", "reason": ...}, and
the other rows go on: one bad row among 100 000 costs that row, and the report says where to fix it. Files are read
streaming, one row at a time (a JSON array through a window over the file), so memory does not grow with their size,
and a line or array item longer than collect.max_line_bytes is a reject of its own, read past without being kept.

Video references are checked before anything opens or downloads them (extract does, later): only http(s) URLs and
relative paths that stay inside the annotation file's folder pass, so a hostile file cannot point us at /etc/passwd,
../../secrets or a file:// URL.
"""
import codecs
import json
import re
import sys
from pathlib import Path
from urllib.parse import urlsplit

FORMATS = ("triplets", "llava", "sharegpt", "manifest_v1", "openai", "trl")
VIDEO = "<video>"  # the placeholder of one video in a user turn, for every stage downstream
SPLITS = ("train", "val", "test")
URL_SCHEMES = ("http", "https")
MANIFEST_QUESTION = "Describe the video."  # manifest_v1 rows carry a caption but no question
VIDEO_LINE = VIDEO + "\n"
_VIDEO_AS_WRITTEN = re.compile(re.escape(VIDEO) + r"[ \t]*\n?")  # as users write it: "<video>", "<video> ", "<video>\n"
_BLANK = re.compile(r"\s*")
_EXPECTED = {str: "a string", int: "an integer", list: "a list", dict: "an object"}
_COMMON_KEYS = {"id", "split", "meta"}  # every format may have them; they never go into meta as extras

# Identifying key -> format, in this order: a ShareGPT row also has "video", a LLaVA row without its conversation
# still has "video_url", a triplet without its video still has "question".
_SIGNATURES = (("conversations", "sharegpt"), ("conversation", "llava"), ("messages", "openai"), ("prompt", "trl"),
               ("frames_dir", "manifest_v1"), ("video_url", "llava"), ("video", "triplets"), ("question", "triplets"))
_LLAVA_ROLES = {"user": "user", "assistant": "assistant", "system": "system"}
_SHAREGPT_ROLES = {"human": "user", "gpt": "assistant", "system": "system", "user": "user", "assistant": "assistant"}
_OPENAI_ROLES = {"user": "user", "assistant": "assistant", "system": "system", "developer": "system"}


class RowError(ValueError):
    """One problem of one row: the JSON path of the field at fault ("" for the whole row) and why."""

    def __init__(self, field: str, reason: str):
        super().__init__(f"{field}: {reason}")
        self.field, self.reason = field, reason


# ---------------------------------------------------------------------------------------------------- field checks

def _kind(value) -> str:
    return "null" if value is None else type(value).__name__


def _typed(value, types, field: str):
    """Return `value` if it has one of `types`, else raise naming both (True is no integer here)."""
    types = types if isinstance(types, tuple) else (types,)
    if not isinstance(value, types) or isinstance(value, bool):
        raise RowError(field, f"expected {' or '.join(_EXPECTED[t] for t in types)}, got {_kind(value)}")
    return value


def _required(row: dict, key: str, types, prefix: str = ""):
    if key not in row:
        raise RowError(prefix + key, "missing required key")
    return _typed(row[key], types, prefix + key)


def _optional(row: dict, key: str, types, prefix: str = ""):
    """A missing key and an explicit null both mean 'not given'."""
    return None if row.get(key) is None else _typed(row[key], types, prefix + key)


def _text(value, field: str) -> str:
    if not _typed(value, str, field).strip():
        raise RowError(field, "empty text")
    return value


def _plain_text(value, field: str) -> str:
    """Text where we place the placeholders ourselves: a literal <video> in it would be a video with no reference."""
    if VIDEO in _text(value, field):
        raise RowError(field, f"text contains the {VIDEO} placeholder; give the video as its own field or part")
    return value


def _video_ref(value, field: str) -> str:
    """Accept an http(s) URL or a relative path that stays inside the annotation file's folder, exactly as written."""
    ref = _typed(value, str, field)
    if not ref.strip():
        raise RowError(field, "empty video reference")
    if "\x00" in ref:
        raise RowError(field, "NUL character in video reference")
    if ref.startswith(("/", "\\", "~")) or re.match(r"[A-Za-z]:[\\/]", ref):
        raise RowError(field, f"absolute path {ref!r}: path escapes the source folder")
    scheme = re.match(r"([A-Za-z][A-Za-z0-9+.-]*):", ref)
    if scheme:
        if scheme[1].lower() not in URL_SCHEMES:
            raise RowError(field, f"refused URL scheme {scheme[1].lower()} in {ref!r} (only http, https)")
        try:
            host = urlsplit(ref).hostname
        except ValueError as error:  # e.g. an unbalanced [ in the host
            raise RowError(field, f"malformed URL {ref!r}: {error}") from None
        if not host:
            raise RowError(field, f"URL without a host: {ref!r}")
    elif ".." in re.split(r"[\\/]", ref):
        raise RowError(field, f"{ref!r}: path escapes the source folder")
    return ref


def _videos(value, field: str) -> list[str]:
    """One reference or a list of them (many videos in one sample)."""
    if isinstance(_typed(value, (str, list), field), str):
        return [_video_ref(value, field)]
    if not value:
        raise RowError(field, "empty list: expected at least one video")
    return [_video_ref(ref, f"{field}/{index}") for index, ref in enumerate(value)]


def _role(value: str, roles: dict, field: str) -> str:
    if value not in roles:
        raise RowError(field, f"unknown role {value!r} (expected one of {', '.join(roles)})")
    return roles[value]


def _meta(row: dict, own_keys: set) -> dict:
    """Keep what the format does not map to a sample field: top-level extras (duration, title, ...), then row meta."""
    meta = {key: value for key, value in row.items() if key not in own_keys | _COMMON_KEYS}
    meta.update(_optional(row, "meta", dict) or {})
    return meta


def _join(pieces: list[str]) -> str:
    """Content parts on their own lines; a placeholder already ends with one."""
    joined = ""
    for piece in pieces:
        joined += piece if not joined or joined.endswith("\n") else "\n" + piece
    return joined


# ---------------------------------------------------------------------------------------------------- one per format
# Each returns a body: videos, turns as (role, content, field of the content), the field that names the whole
# conversation (for errors about it), meta, and extra sample keys. _finish does what is common to all formats.

def _triplets(row: dict) -> dict:
    videos = _videos(_required(row, "video", (str, list)), "video")
    question = _plain_text(_required(row, "question", str), "question").strip()
    turns = [("user", VIDEO_LINE * len(videos) + question, "question")]
    caption = _optional(row, "caption", str)
    if caption is not None:
        turns.append(("assistant", _plain_text(caption, "caption").strip(), "caption"))
    return {"videos": videos, "turns": turns, "conversation": "question",
            "meta": _meta(row, {"video", "question", "caption"})}


def _llava_content(content, field: str) -> str:
    """A run of image parts is the frames of the one video, so it becomes one placeholder, as a video part does."""
    if isinstance(content, str):
        return _plain_text(content, field)
    if not content:
        raise RowError(field, "empty content")
    pieces, previous = [], None
    for index, part in enumerate(content):
        at = f"{field}/{index}"
        kind = _required(_typed(part, dict, at), "type", str, at + "/")
        if kind == "text":
            pieces.append(_plain_text(_required(part, "text", str, at + "/"), at + "/text"))
        elif kind == "video" or (kind == "image" and previous != "image"):
            pieces.append(VIDEO_LINE)
        elif kind != "image":
            raise RowError(at + "/type", f"unknown part type {kind!r} (expected text, image or video)")
        previous = kind
    return _join(pieces)


def _llava(row: dict) -> dict:
    video = _video_ref(_required(row, "video_url", str), "video_url")
    meta = _meta(row, {"conversation", "video_url", "num_frames"})
    num_frames = _optional(row, "num_frames", int)
    if num_frames is not None:
        if num_frames < 1:
            raise RowError("num_frames", f"expected at least 1, got {num_frames}")
        meta["num_frames"] = num_frames
    turns = []
    for index, turn in enumerate(_required(row, "conversation", list)):
        at = f"conversation/{index}"
        role = _role(_required(_typed(turn, dict, at), "role", str, at + "/"), _LLAVA_ROLES, at + "/role")
        content = _llava_content(_required(turn, "content", (str, list), at + "/"), at + "/content")
        turns.append((role, content, at + "/content"))
    return {"videos": [video], "turns": turns, "conversation": "conversation", "meta": meta}


def _sharegpt(row: dict) -> dict:
    key = "videos" if "videos" in row and "video" not in row else "video"  # LLaMA-Factory spells it "videos"
    videos = _videos(_required(row, key, (str, list)), key)
    system = _optional(row, "system", str)   # LLaMA-Factory's system column
    turns = [("system", _text(system, "system"), "system")] if system else []
    for index, turn in enumerate(_required(row, "conversations", list)):
        at = f"conversations/{index}"
        role = _role(_required(_typed(turn, dict, at), "from", str, at + "/"), _SHAREGPT_ROLES, at + "/from")
        value = _text(_required(turn, "value", str, at + "/"), at + "/value")
        turns.append((role, _VIDEO_AS_WRITTEN.sub(VIDEO_LINE, value), at + "/value"))
    body = {"videos": videos, "turns": turns, "conversation": "conversations",
            "meta": _meta(row, {"video", "videos", "system", "conversations", "chosen", "rejected"})}
    if "chosen" in row or "rejected" in row:   # LLaMA-Factory's preference rows: the last answer is a pair
        turns.append(("assistant", _sharegpt_answer(row, "chosen"), "chosen/value"))
        body["rejected"] = _sharegpt_answer(row, "rejected")
    return body


def _sharegpt_answer(row: dict, key: str) -> str:
    """One side of a LLaMA-Factory preference pair: {"from": "gpt", "value": ...}."""
    answer = _required(row, key, dict)
    if _role(_required(answer, "from", str, key + "/"), _SHAREGPT_ROLES, key + "/from") != "assistant":
        raise RowError(key + "/from", f"a preference answer comes from the assistant (gpt), not {answer['from']!r}")
    return _plain_text(_required(answer, "value", str, key + "/"), key + "/value").strip()


def _manifest_v1(row: dict) -> dict:
    """Frames already extracted: the frames folder stands for the one video, so `videos` stays empty."""
    frames_dir = _video_ref(_required(row, "frames_dir", str), "frames_dir")
    meta = _meta(row, {"frames_dir", "audio"})
    caption = _optional(_optional(row, "meta", dict) or {}, "caption", str, "meta/")
    meta.pop("caption", None)  # it is the sample's caption now
    turns = [("user", VIDEO_LINE + MANIFEST_QUESTION, "frames_dir")]
    if caption is not None:
        turns.append(("assistant", _plain_text(caption, "meta/caption").strip(), "meta/caption"))
    body = {"videos": [], "turns": turns, "conversation": "frames_dir", "meta": meta, "frames_dir": frames_dir}
    if _optional(row, "audio", str) is not None:
        body["audio"] = _video_ref(row["audio"], "audio")
    return body


def _openai_content(content, field: str, videos: list) -> str:
    """Each video part becomes a placeholder where it stands, and its reference is appended to `videos`."""
    if isinstance(content, str):
        return _plain_text(content, field)
    if not content:
        raise RowError(field, "empty content")
    pieces = []
    for index, part in enumerate(content):
        at = f"{field}/{index}"
        kind = _required(_typed(part, dict, at), "type", str, at + "/")
        if kind == "text":
            pieces.append(_plain_text(_required(part, "text", str, at + "/"), at + "/text"))
            continue
        if kind == "video_url":
            url = _required(_required(part, "video_url", dict, at + "/"), "url", str, at + "/video_url/")
            videos.append(_video_ref(url, at + "/video_url/url"))
        elif kind == "video":
            videos.append(_video_ref(_required(part, "video", str, at + "/"), at + "/video"))
        else:
            raise RowError(at + "/type", f"unknown part type {kind!r} (expected text, video_url or video)")
        pieces.append(VIDEO_LINE)
    return _join(pieces)


def _openai(row: dict) -> dict:
    videos, turns = [], []
    for index, message in enumerate(_required(row, "messages", list)):
        at = f"messages/{index}"
        role = _role(_required(_typed(message, dict, at), "role", str, at + "/"), _OPENAI_ROLES, at + "/role")
        content = _openai_content(_required(message, "content", (str, list), at + "/"), at + "/content", videos)
        turns.append((role, content, at + "/content"))
    if not videos:
        raise RowError("messages", "no video part in any message")
    return {"videos": videos, "turns": turns, "conversation": "messages", "meta": _meta(row, {"messages"})}


def _trl(row: dict) -> dict:
    """TRL's conversational preference rows: `prompt` messages (video parts as in openai rows, or bare
    {"type": "video"} parts that take the row's `videos` in order), then `chosen` and `rejected`, each the assistant's
    message(s) or a plain string."""
    listed = _videos(row["videos"], "videos") if row.get("videos") is not None else []
    videos, turns, taken = [], [], 0
    for index, message in enumerate(_required(row, "prompt", list)):
        at = f"prompt/{index}"
        role = _role(_required(_typed(message, dict, at), "role", str, at + "/"), _OPENAI_ROLES, at + "/role")
        content = _required(message, "content", (str, list), at + "/")
        if isinstance(content, list):
            filled = []
            for part in content:
                if _is_bare_video(part):   # takes the next listed video
                    if taken == len(listed):
                        raise RowError("videos", f"more bare video parts in the prompt than the {len(listed)} "
                                                 f"listed videos")
                    part, taken = {**part, "video": listed[taken]}, taken + 1
                filled.append(part)
            content = filled
        turns.append((role, _openai_content(content, at + "/content", videos), at + "/content"))
    if taken < len(listed):
        raise RowError("videos", f"{len(listed)} videos listed for {taken} bare video parts in the prompt")
    if not videos:
        raise RowError("prompt", "no video part in any prompt message")
    turns.append(("assistant", _trl_answer(row, "chosen"), "chosen"))
    return {"videos": videos, "turns": turns, "conversation": "prompt", "rejected": _trl_answer(row, "rejected"),
            "meta": _meta(row, {"prompt", "chosen", "rejected", "videos"})}


def _is_bare_video(part) -> bool:
    return isinstance(part, dict) and part.get("type") == "video" and "video" not in part


def _trl_answer(row: dict, key: str) -> str:
    """One side of a TRL pair: a string, or messages of which the last is the assistant's answer (text only)."""
    answer = _required(row, key, (str, list))
    if isinstance(answer, str):
        return _plain_text(answer, key).strip()
    if not answer:
        raise RowError(key, "empty list: expected the assistant's message")
    at = f"{key}/{len(answer) - 1}"
    message = _typed(answer[-1], dict, at)
    if _role(_required(message, "role", str, at + "/"), _OPENAI_ROLES, at + "/role") != "assistant":
        raise RowError(at + "/role", f"the answer's message comes from the assistant, not {message['role']!r}")
    no_videos = []
    text = _openai_content(_required(message, "content", (str, list), at + "/"), at + "/content", no_videos)
    if no_videos:
        raise RowError(at + "/content", "assistant turn with a video (videos belong in the prompt)")
    return text.strip()


CONVERTERS = {"triplets": _triplets, "llava": _llava, "sharegpt": _sharegpt, "manifest_v1": _manifest_v1,
              "openai": _openai, "trl": _trl}


# ---------------------------------------------------------------------------------------------------- common checks

def _check_turns(turns: list, expected_videos: int, conversation: str) -> None:
    if not any(role == "user" for role, _, _ in turns):
        raise RowError(conversation, "no user turn")
    for role, content, field in turns:
        if role != "user" and VIDEO in content:
            raise RowError(field, f"{role} turn with a video (videos belong in user turns)")
    found = sum(content.count(VIDEO) for role, content, _ in turns if role == "user")
    if found != expected_videos:
        plural = "s" if expected_videos != 1 else ""
        raise RowError(conversation, f"{found} {VIDEO} placeholders in user turns for {expected_videos} video{plural}")


def _row_id(row: dict, default: str) -> str:
    if row.get("id") is None:
        return default
    value = _typed(row["id"], (str, int), "id")  # integer ids are common in exports; ours are strings
    if not str(value).strip():
        raise RowError("id", "empty id")
    return str(value)


def _finish(row: dict, body: dict, default_id: str) -> dict:
    """What every format shares: turn checks, one leading system turn, question and caption, id and split."""
    turns, videos = body.pop("turns"), body.pop("videos")
    _check_turns(turns, len(videos) + ("frames_dir" in body), body.pop("conversation"))
    # the system prompt is trained with, as the model will be prompted; its turns join into one that comes first,
    # where every chat template expects it
    system = "\n\n".join(content for role, content, _ in turns if role == "system")
    messages = [{"role": "system", "content": system}] if system else []
    messages += [{"role": role, "content": content} for role, content, _ in turns if role != "system"]
    user = next(m["content"] for m in messages if m["role"] == "user")
    answers = [m["content"] for m in messages if m["role"] == "assistant"]
    sample = {"id": _row_id(row, default_id), "videos": videos, "messages": messages,
              "question": _VIDEO_AS_WRITTEN.sub("", user).strip(), "caption": answers[-1].strip() if answers else None,
              "meta": body.pop("meta")}
    if "rejected" in body and body["rejected"] == sample["caption"]:
        raise RowError("rejected", "the rejected answer equals the chosen one: a pair must differ")
    split = _optional(row, "split", str)
    if split is not None:
        if split not in SPLITS:
            raise RowError("split", f"unknown split {split!r} (expected one of {', '.join(SPLITS)})")
        sample["split"] = split
    return sample | body  # frames_dir and audio of manifest_v1


def detect_format(row: dict) -> str:
    """The format whose identifying key the row has; ValueError naming the keys seen when none has one."""
    if not isinstance(row, dict):
        raise ValueError(f"expected a JSON object, got {_kind(row)}")
    for key, fmt in _SIGNATURES:
        if key in row:
            return fmt
    known = ", ".join(f"{key} ({fmt})" for key, fmt in _SIGNATURES)
    raise ValueError(f"no known format matches the keys {sorted(row)}; expected one of: {known}")


def _convert(row: dict, fmt: str, default_id: str) -> dict:
    try:
        body = CONVERTERS[fmt](row)
    except RowError:
        # a row of another format fails on its first key; saying which format it is helps more than that key
        # ("video" alone is no evidence: ShareGPT rows have it too)
        other = next((f for key, f in _SIGNATURES if key in row and key != "video"), fmt)
        if other != fmt:
            raise RowError("", f"a {other} row in a {fmt} file") from None
        raise
    return _finish(row, body, default_id)


# ---------------------------------------------------------------------------------------------------- reading files

MAX_LINE_BYTES = 1 << 20   # collect.max_line_bytes' default: the longest line, or JSON array item, that is read
_CHUNK = 1 << 16           # bytes read at a time from an annotation file
_ANY = re.compile(r'["\\\[\]{}]')   # outside strings: what changes the nesting of a skipped item
_IN_STRING = re.compile(r'["\\]')
_PRIMITIVE_END = re.compile(r"[,\]\s]")
_HUGE_INT = f"an integer of more than {sys.get_int_max_str_digits()} digits"


def bounded_lines(f, limit: int = MAX_LINE_BYTES):
    """Yield (line number, bytes) per line of a binary file, the bytes None for a line longer than `limit` bytes
    (its newline not counted). Holds at most `limit` + 1 bytes: a longer line is read past, never kept."""
    number = 0
    while line := f.readline(limit + 1):
        number += 1
        if len(line) > limit and not line.endswith(b"\n"):
            while (rest := f.readline(_CHUNK)) and not rest.endswith(b"\n"):
                pass
            line = None
        yield number, line


def _too_long(limit: int) -> str:
    return f"longer than collect.max_line_bytes={limit} bytes"


def _line_rows(f, limit: int):
    """Yield (line, row, problem) per non-empty line; a bad line is a problem and the lines after it go on."""
    for number, raw in bounded_lines(f, limit):
        if raw is None:
            yield number, None, f"line {_too_long(limit)}"
            continue
        if not raw.strip():
            continue
        try:
            row = json.loads(raw.decode("utf-8-sig" if number == 1 else "utf-8"))
        except UnicodeDecodeError:
            yield number, None, "not UTF-8 text"
            continue
        except json.JSONDecodeError as error:
            yield number, None, f"invalid JSON: {error.msg} (column {error.colno})"
            continue
        except RecursionError:  # "[[[[..." a few thousand deep
            yield number, None, "invalid JSON: nested too deeply"
            continue
        except ValueError:      # not a JSONDecodeError (caught above): int() refused a number of too many digits
            yield number, None, f"invalid JSON: {_HUGE_INT}"
            continue
        yield number, row, None if isinstance(row, dict) else f"expected a JSON object, got {_kind(row)}"


class _Window:
    """A JSON array's text, read in chunks: `text[pos:]` is what is not parsed yet. Parsed text is dropped when the
    next chunk comes (not per item: that would copy the window once per row), so memory stays near one item (at most
    the limit) plus a chunk, whatever the file's size."""

    def __init__(self, f, limit: int):
        self.f, self.limit, self.decoder = f, limit, codecs.getincrementaldecoder("utf-8-sig")()
        self.text, self.pos, self.eof = "", 0, False
        self.line, self.counted = 1, 0   # the line number at text[counted]: newlines are counted once, in order

    def fill(self) -> None:
        """Drop the parsed text and append the next chunk (UnicodeDecodeError: the caller names the line)."""
        data = self.f.read(_CHUNK)
        self.eof = not data
        self.here()
        self.text, self.pos, self.counted = self.text[self.pos:] + self.decoder.decode(data, final=self.eof), 0, 0

    def here(self, at: int | None = None) -> int:
        """The line number at `at` (default: pos), at or after pos."""
        self.line += self.text.count("\n", self.counted, self.pos)
        self.counted = self.pos
        return self.line + (self.text.count("\n", self.pos, at) if at is not None else 0)

    def blank(self) -> None:
        """Move past whitespace, reading on until something else (or the end) comes."""
        while True:
            self.pos = _BLANK.match(self.text, self.pos).end()
            if self.pos < len(self.text) or self.eof:
                return
            self.fill()

    def startswith(self, char: str) -> bool:
        return self.text.startswith(char, self.pos)

    def value(self):
        """The next JSON value: (value, None), or (None, reason): a JSONDecodeError, "nested too deeply", "too long"
        (not read past yet) or "too long, read"."""
        while True:
            try:
                row, end = _DECODER.raw_decode(self.text, self.pos)
            except json.JSONDecodeError as error:
                if self.eof:
                    return None, error
            except RecursionError:
                return None, "nested too deeply"
            except ValueError:   # a number int() refuses: Python's limit on digits (found by tests/test_formats.py)
                return None, _HUGE_INT
            else:
                # a number cut by the chunk's end ("1.5e" of "1.5e-07") parses too: take the value only once the
                # text after it shows where it ends
                if self.eof or _PRIMITIVE_END.search(self.text, end):
                    start, self.pos = self.pos, end
                    return (None, "too long, read") if end - start > self.limit else (row, None)
            if len(self.text) - self.pos > self.limit:
                return None, "too long"
            self.fill()


_DECODER = json.JSONDecoder()


def _skip_value(window: _Window) -> bool:
    """Read past one JSON value (an item over the limit) without keeping it; False if the file ends first."""
    if not window.text.startswith(('"', "[", "{"), window.pos):   # a number or a word: it ends where the item does
        return _skip_to(window, _PRIMITIVE_END)
    depth, at, pattern = 0, window.pos, _ANY
    while True:
        match = pattern.search(window.text, at)
        if match is None:
            window.pos = len(window.text)
            if window.eof:
                return False
            window.fill()
            at = 0
            continue
        char, at = match[0], match.end()
        if pattern is _IN_STRING:
            if char == "\\":
                if at == len(window.text) and not window.eof:   # the escaped character is in the next chunk
                    window.pos = at - 1
                    window.fill()
                    at = 1
                at += 1
            else:
                pattern = _ANY
        elif char == '"':
            pattern = _IN_STRING
        elif char in "[{":
            depth += 1
        else:
            depth -= 1
        if depth == 0 and pattern is _ANY:
            window.pos = at
            return True


def _skip_to(window: _Window, pattern: re.Pattern) -> bool:
    """Move to the next match of `pattern`, reading on; False if the file ends first."""
    while (match := pattern.search(window.text, window.pos)) is None:
        window.pos = len(window.text)
        if window.eof:
            return False
        window.fill()
    window.pos = match.start()
    return True


def _array_rows(f, limit: int):
    """Yield (line where the element starts, row, problem) per element of a JSON array, read in chunks.

    raw_decode parses one element at a time from a window over the file, hence the real line numbers and a memory
    bound of about one item. An item longer than `limit` is a problem and is read past; a syntax error inside an
    array cannot be skipped reliably (where would the next element start?), so it ends the file, the elements before
    it kept.
    """
    window, item = _Window(f, limit), 0
    try:
        window.blank()
        window.pos += 1                                  # the "["
        window.blank()
        while not (item == 0 and window.startswith("]")):
            item += 1
            line = window.here()
            row, problem = window.value()
            if isinstance(problem, json.JSONDecodeError):
                yield window.here(problem.pos), None, f"item {item}: invalid JSON: {problem.msg} " \
                    f"(column {problem.colno})"
                return
            elif problem:   # well-formed as far as brackets go: the item is read past, and the next ones go on
                yield line, None, f"item {item}: " + (_too_long(limit) if problem.startswith("too long")
                                                      else f"invalid JSON: {problem}")
                if problem != "too long, read" and not _skip_value(window):
                    yield window.here(), None, f"invalid JSON: the file ends inside item {item}"
                    return
            else:
                yield line, row, None if isinstance(row, dict) else \
                    f"item {item}: expected a JSON object, got {_kind(row)}"
            window.blank()
            if not window.startswith(","):
                break
            window.pos += 1
            window.blank()
        closed = window.startswith("]")
        if closed:
            window.pos += 1
            window.blank()
        if not closed or window.pos < len(window.text):
            yield window.here(), None, f"invalid JSON: expected ',' or a single closing ']' after item {item}"
    except UnicodeDecodeError:
        yield window.here(len(window.text)), None, "not UTF-8 text"


def _rows(path: Path, limit: int):
    with open(path, "rb") as f:   # streamed, whatever the format: annotation files can be gigabytes
        if path.suffix.lower() == ".json" and _first_byte(f) == b"[":
            yield from _array_rows(f, limit)
        else:  # JSON Lines, also when saved as .json (common enough in exported data sets to read as such)
            yield from _line_rows(f, limit)


def _first_byte(f) -> bytes:
    """The first byte that is not a BOM or whitespace; the file is rewound. Reads past blank space in chunks."""
    first = b""
    while not first and (chunk := f.read(_CHUNK)):
        first = chunk.removeprefix(codecs.BOM_UTF8 if f.tell() == len(chunk) else b"").lstrip()[:1]
    f.seek(0)
    return first


def read_annotations(path: Path, fmt: str = "auto",
                     max_line_bytes: int = MAX_LINE_BYTES) -> tuple[list[dict], list[dict]]:
    """Read one annotation file into (samples, errors); a bad row becomes an error and the other rows go on.

    errors: {"source": "<path>:<line>", "field": "<json path like conversations/1/value>", "reason": "..."}.
    With fmt="auto" the format is the one of the first row that parses as an object and matches one.
    """
    samples, errors = [], []
    for sample, error in iter_annotations(path, fmt, max_line_bytes):
        (errors if error else samples).append(error or sample)
    return samples, errors


def iter_annotations(path: Path, fmt: str = "auto", max_line_bytes: int = MAX_LINE_BYTES):
    """read_annotations one row at a time: yields (sample, None) or (None, error), in the file's order. Holds one
    row (at most max_line_bytes of it) and the ids seen so far, whatever the file's size."""
    if fmt != "auto" and fmt not in FORMATS:
        raise ValueError(f"unknown annotation format {fmt!r} (expected auto or one of {', '.join(FORMATS)})")
    path = Path(path)
    first_seen = {}
    # A row's default id is the file's stem and the row's position in it, not its line: a JSON array written on one
    # line (json.dump's default) holds every row on line 1. Errors still name the line, which is where one looks.
    for position, (line, row, problem) in enumerate(_rows(path, max_line_bytes), 1):
        try:
            if problem:
                raise RowError("", problem)
            if fmt == "auto":
                try:
                    fmt = detect_format(row)
                except ValueError as error:
                    raise RowError("", str(error)) from None
            sample = _convert(row, fmt, default_id=f"{path.stem}-{position}")
            if sample["id"] in first_seen:
                row_at, line_at = divmod(first_seen[sample["id"]], 1 << 40)
                raise RowError("id", f"duplicate id {sample['id']!r} (first at row {row_at}, line {line_at})")
        except RowError as error:
            yield None, {"source": f"{path}:{line}", "field": error.field, "reason": error.reason}
            continue
        except Exception as error:  # noqa: BLE001 - a bug on one odd row must cost that row, not the whole import
            yield None, {"source": f"{path}:{line}", "field": "", "reason": f"internal error: {error!r}"}
            continue
        first_seen[sample["id"]] = (position << 40) + line   # one int per id: a million rows cost ~100 MB less
        yield sample, None
