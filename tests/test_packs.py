import io
import os
import tarfile

import numpy as np
import pytest

from stages.common.files import sha256_file
from stages.data import packs
from stages.data.video import read_audio, sample
from tests.helpers import ffmpeg


def files(folder, sizes: dict[str, int]) -> list:
    """Files named `name` of `size` bytes (distinct contents)."""
    paths = []
    for name, size in sizes.items():
        (folder / name).write_bytes(os.urandom(size))
        paths.append(folder / name)
    return paths


def sha(prefix: str, tail: str) -> str:
    return f"{prefix}{tail * 62}.safetensors"


def test_members_are_grouped_by_prefix_split_at_the_limit_and_found_by_their_locators(tmp_path):
    names = {sha("aa", "1"): 3000, sha("aa", "2"): 3000, sha("aa", "3"): 3000, sha("b0", "1"): 10, sha("aa", "0"): 1}
    contents = {}
    for path in files(tmp_path, names):
        contents[path.name] = path.read_bytes()
    limit = 2 * 3584 + packs.END          # two 3000-byte members fit, a third does not
    locators = packs.write(tmp_path, sorted(tmp_path.iterdir(), reverse=True), limit)
    assert {name: locator["pack"] for name, locator in locators.items()} == {
        sha("aa", "0"): "aa-0.tar", sha("aa", "1"): "aa-0.tar", sha("aa", "2"): "aa-1.tar", sha("aa", "3"): "aa-1.tar",
        sha("b0", "1"): "b0-0.tar"}
    assert sorted(path.name for path in tmp_path.iterdir()) == ["aa-0.tar", "aa-1.tar", "b0-0.tar"]   # files moved
    for name, locator in locators.items():
        assert packs.read(tmp_path, locator) == contents[name]
        assert (tmp_path / locator["pack"]).stat().st_size <= max(limit, 3584 + packs.END)
    with tarfile.open(tmp_path / "aa-1.tar") as tar:         # plain tars that any tool reads, members in order
        assert tar.getnames() == [sha("aa", "2"), sha("aa", "3")]
        member = tar.getmember(sha("aa", "3"))
        assert (member.offset_data, member.size) == (locators[sha("aa", "3")]["offset"], 3000)
        assert (member.mtime, member.uid, member.uname, member.mode) == (0, 0, "", 0o644)


def test_the_same_files_give_the_same_pack_bytes_and_one_changed_file_rewrites_its_group_only(tmp_path):
    def build(folder, changed: bytes = b"") -> dict:
        folder.mkdir()
        contents = {sha("0a", "1"): b"x" * 700, sha("0a", "2"): b"y" * 90, sha("ff", "1"): b"z" + changed}
        for name, data in contents.items():
            (folder / name).write_bytes(data)
            os.utime(folder / name, (12345, 12345 + len(folder.name)))   # a different time on each copy
        packs.write(folder, list(folder.iterdir()), 1 << 20)
        return {path.name: sha256_file(path) for path in folder.iterdir()}

    first, again, changed = build(tmp_path / "a"), build(tmp_path / "bb"), build(tmp_path / "c", b"!")
    assert first == again
    assert first["0a-0.tar"] == changed["0a-0.tar"] and first["ff-0.tar"] != changed["ff-0.tar"]


def test_a_truncated_pack_is_an_error_naming_it(tmp_path):
    locator = packs.write(tmp_path, files(tmp_path, {sha("cc", "1"): 5000}), 1 << 20)[sha("cc", "1")]
    with open(tmp_path / "cc-0.tar", "r+b") as pack:
        pack.truncate(locator["offset"] + 100)
    with pytest.raises(packs.PackError, match=r"cc-0\.tar: 100 of the 5000 bytes at offset 512"):
        packs.read(tmp_path, locator)


def test_a_pack_is_written_aside_and_renamed(tmp_path, monkeypatch):
    """A write that fails halfway leaves no pack under its final name."""
    paths = files(tmp_path, {sha("dd", "1"): 100, sha("dd", "2"): 100})

    def broken(*args, **kwargs):
        raise OSError("disk full")
    monkeypatch.setattr(tarfile.TarFile, "addfile", broken)
    with pytest.raises(OSError, match="disk full"):
        packs.write(tmp_path, paths, 1 << 20)
    assert sorted(path.name for path in tmp_path.iterdir()) == sorted(path.name for path in paths)   # kept, unpacked


def test_a_packed_video_decodes_as_its_own_file_does_through_libavs_subfile_protocol(tmp_path):
    """Seeks, the demuxer's index, the keyframe checks (which reopen the file by its name) and the audio: all read
    the member in place, at an offset past another member."""
    first = files(tmp_path, {sha("aa", "1"): 3000})
    clip = tmp_path / sha("aa", "2").replace(".safetensors", ".mp4")
    ffmpeg("-f", "lavfi", "-i", "testsrc2=size=96x64:rate=25", "-f", "lavfi", "-i", "sine=frequency=300", "-t", "12",
           "-c:v", "libx264", "-g", "50", "-c:a", "aac", "-shortest", str(clip))
    alone = tmp_path / "alone.mp4"
    alone.write_bytes(clip.read_bytes())
    locator = packs.write(tmp_path, [*first, clip], 1 << 20)[clip.name]
    assert locator["offset"] > 3000
    plan = {"num_frames": 6, "fps": 0, "frame_size": 24, "max_pixels": 0}
    packed, own = sample(packs.url(tmp_path, locator), plan), sample(alone, plan)
    assert np.array_equal(packed.frames, own.frames) and packed.info == own.info
    assert packed.info["decoded_frames"] < packed.info["total_frames"] / 2   # it seeked, in the member
    assert np.array_equal(read_audio(packs.url(tmp_path, locator)), read_audio(alone))


def test_a_member_reads_as_a_file_of_its_own_and_never_past_its_end(tmp_path):
    archive = tmp_path / sha("bb", "1").replace(".safetensors", ".tar")
    with tarfile.open(archive, "w", format=tarfile.USTAR_FORMAT) as tar:
        for name in ("000000.png", "000001.png"):
            info = tarfile.TarInfo(name)
            info.size = 700
            tar.addfile(info, io.BytesIO(bytes(700)))
    after = files(tmp_path, {sha("bb", "2"): 2000})
    locators = packs.write(tmp_path, [archive, *after], 1 << 20)
    with io.BufferedReader(packs.Member(tmp_path, locators[archive.name])) as member:
        with tarfile.open(fileobj=member, mode="r:") as tar:
            assert tar.getnames() == ["000000.png", "000001.png"]
        assert member.seek(0, io.SEEK_END) == locators[archive.name]["length"] and member.read() == b""


def test_a_missing_or_short_pack_is_an_error_naming_it_and_its_members(tmp_path):
    locators = packs.write(tmp_path, files(tmp_path, {sha("cc", "1"): 5000, sha("cc", "2"): 10, sha("dd", "1"): 9}),
                           1 << 20)
    packs.check(tmp_path, locators)
    with open(tmp_path / "cc-0.tar", "r+b") as pack:
        pack.truncate(6000)
    with pytest.raises(packs.PackError, match=rf"cc-0\.tar holds 6000 bytes, its members need \d+: the pack of 2 "
                                              rf"member\(s\): {sha('cc', '1')}, {sha('cc', '2')}"):
        packs.check(tmp_path, locators)
    (tmp_path / "dd-0.tar").unlink()
    with pytest.raises(packs.PackError, match=r"dd-0\.tar cannot be read \(No such file or directory\)"):
        packs.check(tmp_path, {name: locator for name, locator in locators.items() if name.startswith("dd")})
