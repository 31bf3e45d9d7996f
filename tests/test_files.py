import pytest

from stages.common.files import atomic_dir, atomic_files, read_jsonl, sha256_file, write_jsonl


def test_atomic_dir_replaces_the_output_only_on_success(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old")
    with atomic_dir(out) as partial:
        (partial / "new.txt").write_text("new")
        assert (out / "old.txt").exists()          # the previous output stays until the new one is complete
    assert sorted(p.name for p in out.iterdir()) == ["new.txt"]
    assert not (tmp_path / "out.partial").exists()


def test_atomic_dir_leaves_nothing_half_written_on_failure(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(RuntimeError):
        with atomic_dir(out) as partial:
            (partial / "half.txt").write_text("half")
            raise RuntimeError("stage failed")
    assert not out.exists() and not (tmp_path / "out.partial").exists()


def test_jsonl_round_trip_and_line_numbered_errors(tmp_path):
    path = tmp_path / "rows.jsonl"
    write_jsonl(path, [{"a": 1}, {"b": [2]}])
    assert read_jsonl(path) == [{"a": 1}, {"b": [2]}]
    path.write_text('{"a": 1}\n\n{"a": \n')
    with pytest.raises(ValueError, match=r"rows\.jsonl:3: invalid JSON"):
        read_jsonl(path)
    path.write_text('{"a": 1}\n[1, 2]\n')
    with pytest.raises(ValueError, match=r"rows\.jsonl:2: expected a JSON object, got list"):
        read_jsonl(path)


def test_sha256_file(tmp_path):
    path = tmp_path / "x"
    path.write_bytes(b"abc")
    assert sha256_file(path) == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"


def test_atomic_files_replace_their_namesakes_and_keep_the_rest(tmp_path):
    folder = tmp_path / "eval"
    folder.mkdir()
    (folder / "metrics.json").write_text("old")
    (folder / "committed.json").write_text("kept")
    with pytest.raises(RuntimeError):
        with atomic_files(folder) as partial:
            (partial / "metrics.json").write_text("half")
            raise RuntimeError("stage failed")
    assert (folder / "metrics.json").read_text() == "old"
    with atomic_files(folder) as partial:
        (partial / "metrics.json").write_text("new")
    assert {p.name: p.read_text() for p in folder.iterdir()} == {"metrics.json": "new", "committed.json": "kept"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["eval"]
