"""File helpers every stage uses: atomic output folders, JSONL with line-numbered errors, content hashes."""
import contextlib
import hashlib
import json
import shutil
from pathlib import Path


@contextlib.contextmanager
def atomic_dir(path, resume: str | None = None):
    """Yield a temporary sibling folder that replaces `path` only when the block succeeds.

    A stage that fails halfway thus leaves no half-written output for DVC (or a person) to mistake for a result.
    With `resume` (a digest of everything the output depends on), the folder a killed or interrupted run of the same
    inputs left is handed over as it is, for the stage to keep what it finished; one left by other inputs is wiped,
    and a stage that fails with an error still leaves nothing.
    """
    path = Path(path)
    partial = path.with_name(path.name + ".partial")
    stamp = partial / ".resume"
    if resume is None or not stamp.exists() or stamp.read_text() != resume:
        shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True, exist_ok=True)
    if resume is not None:
        stamp.write_text(resume)
    try:
        yield partial
    except BaseException as error:
        if resume is None or not isinstance(error, KeyboardInterrupt):
            shutil.rmtree(partial, ignore_errors=True)
        raise
    stamp.unlink(missing_ok=True)
    shutil.rmtree(path, ignore_errors=True)
    partial.rename(path)


@contextlib.contextmanager
def atomic_files(folder):
    """Like atomic_dir, but the files written replace their namesakes in `folder`, which keeps its other files
    (evaluate's outputs share eval/ with the committed metric tolerances)."""
    folder = Path(folder)
    with atomic_dir(folder.with_name(folder.name + ".new")) as partial:
        yield partial
    folder.mkdir(parents=True, exist_ok=True)
    written = folder.with_name(folder.name + ".new")
    for path in written.iterdir():
        path.replace(folder / path.name)
    written.rmdir()


def write_json(path, data) -> None:
    Path(path).write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def write_jsonl(path, rows) -> None:
    with open(path, "w") as f:
        for row in rows:
            f.write(jsonl_line(row))


def jsonl_line(row) -> str:
    """One JSONL line, as every stage writes them (keys sorted: the same row gives the same bytes)."""
    return json.dumps(row, sort_keys=True) + "\n"


def read_jsonl(path) -> list[dict]:
    """Read a JSONL file; a malformed line raises ValueError naming the file and line."""
    rows = []
    with open(path) as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as error:
                raise ValueError(f"{path}:{number}: invalid JSON: {error.msg}") from None
            if not isinstance(row, dict):
                raise ValueError(f"{path}:{number}: expected a JSON object, got {type(row).__name__}")
            rows.append(row)
    return rows


def sha256_file(path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
