"""Packs: many small files in a few plain tar files, each file found again by a locator {pack, offset, length}.

DVC's costs (a no-op `dvc repro`, status, push and pull) grow with the number of files it tracks, so a stage that
writes one file per video writes them into packs instead, with an index beside them ({file name: locator}): `collect`
its videos (data/raw/videos/), `extract` their frames (data/frames/) (README: Frames in packs):
- A file goes to the group named by the first GROUP_KEY hex digits of its name (a sha256): a stable key, so one
  changed video rewrites the packs of its group only. Within a group, files go in name order into `<group>-<n>.tar`,
  a new pack whenever the next file would take the current one past the size limit.
- The format is a POSIX (ustar) tar, what webdataset and every tar tool read. Each pack is written byte for byte
  reproducibly: members in name order, no times, owners or modes of this machine.
- A reader never scans a pack: the locator points at a member's bytes, one seek and one read, so samples are read in
  any order (shuffling, DataLoader workers). A video is decoded in place, through libav's subfile protocol (`url`),
  with the seeks and the frames its own file would give.
"""
import io
import json
import os
import stat
import tarfile
from itertools import groupby
from pathlib import Path

GROUP_KEY = 2          # hex digits of the sha256 that name a file's group: 256 groups at most
INDEX = "index.json"   # {member name: locator}, beside the packs it points into


class PackError(Exception):
    """A member that cannot be read back from its pack."""


def group(name: str) -> str:
    return name[:GROUP_KEY]


def write(folder: Path, files: list[Path], limit: int) -> dict[str, dict]:
    """Move `files` into packs in `folder`, each at most `limit` bytes unless one file alone is larger;
    {file name: locator}. Each pack is written aside and renamed, so no half pack is ever under its name."""
    locators = {}
    for key, grouped in groupby(sorted(files, key=lambda path: path.name), key=lambda path: group(path.name)):
        members, batches, batch_bytes = list(grouped), [[]], 0
        for path in members:
            size = member_bytes(path.stat().st_size)
            if batches[-1] and batch_bytes + size + END > limit:
                batches.append([])
                batch_bytes = 0
            batches[-1].append(path)
            batch_bytes += size
        for number, batch in enumerate(batches):
            locators.update(write_pack(folder, f"{key}-{number}.tar", batch))
        for path in members:   # group by group: packing a million videos never holds two copies of them all
            path.unlink()
    return locators


def read(folder: Path, locator: dict) -> bytes:
    """The bytes of one member; PackError naming the pack when they are not all there."""
    path = Path(folder) / locator["pack"]
    with open(path, "rb") as pack:
        pack.seek(locator["offset"])
        data = pack.read(locator["length"])
    if len(data) != locator["length"]:
        raise PackError(f"{path}: {len(data)} of the {locator['length']} bytes at offset {locator['offset']} "
                        f"(the pack is truncated or not the one this locator was written for)")
    return data


def read_index(folder: Path) -> dict[str, dict]:
    """The index beside the packs of `folder`; PackError when it cannot be read."""
    try:
        return json.loads((Path(folder) / INDEX).read_text())
    except (OSError, ValueError) as error:
        raise PackError(f"{Path(folder) / INDEX}: cannot read the index of the packs: {error}") from error


def check(folder: Path, members: dict[str, dict]) -> None:
    """PackError naming each pack of `members` ({name: locator}) that is missing or too short for its members, and
    those members: a checkout that went wrong, never a reason to quarantine the videos in it. (A pack that is not a
    regular file, such as a named pipe, has no length to check before it is read.)"""
    needs = {}
    for name, locator in members.items():
        pack = needs.setdefault(locator["pack"], {"end": 0, "members": []})
        pack["end"] = max(pack["end"], locator["offset"] + locator["length"])
        pack["members"].append(name)
    for name, pack in sorted(needs.items()):
        try:
            info = (Path(folder) / name).stat()
        except OSError as error:
            problem = f"cannot be read ({error.strerror})"
        else:
            if not stat.S_ISREG(info.st_mode) or info.st_size >= pack["end"]:
                continue
            problem = f"holds {info.st_size} bytes, its members need {pack['end']}"
        shown = ", ".join(sorted(pack["members"])[:5]) + (", ..." if len(pack["members"]) > 5 else "")
        raise PackError(f"{Path(folder) / name} {problem}: the pack of {len(pack['members'])} member(s): {shown}")


def url(folder: Path, locator: dict) -> str:
    """libav's name for one member's bytes (the subfile protocol): a video in a pack opens, seeks and decodes as its
    own file would (tested: the same frames)."""
    start = locator["offset"]
    return f"subfile,,start,{start},end,{start + locator['length']},,:{Path(folder) / locator['pack']}"


class Member(io.RawIOBase):
    """One member's bytes as a read-only, seekable file (what tarfile and PIL read), never past its end."""

    def __init__(self, folder: Path, locator: dict):
        super().__init__()
        self.pack = open(Path(folder) / locator["pack"], "rb")
        self.start, self.length, self.position = locator["offset"], locator["length"], 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        self.pack.seek(self.start + self.position)
        data = self.pack.read(max(min(len(buffer), self.length - self.position), 0))
        buffer[:len(data)] = data
        self.position += len(data)
        return len(data)

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        origin = {io.SEEK_SET: 0, io.SEEK_CUR: self.position, io.SEEK_END: self.length}[whence]
        self.position = max(origin + offset, 0)
        return self.position

    def tell(self) -> int:
        return self.position

    def close(self) -> None:
        self.pack.close()
        super().close()


BLOCK = tarfile.BLOCKSIZE
END = 2 * BLOCK + tarfile.RECORDSIZE   # an upper bound of a tar's end blocks and its padding to a whole record


def member_bytes(size: int) -> int:
    """A member's bytes in a tar: its header block and its data padded to whole blocks."""
    return BLOCK + -(-size // BLOCK) * BLOCK


def write_pack(folder: Path, name: str, files: list[Path]) -> dict[str, dict]:
    partial = folder / f"{name}.partial"
    locators = {}
    try:
        with tarfile.open(partial, "w", format=tarfile.USTAR_FORMAT) as tar:
            for path in files:
                info = tarfile.TarInfo(path.name)
                info.size, info.mode, info.mtime = path.stat().st_size, 0o644, 0
                with open(path, "rb") as data:
                    tar.addfile(info, data)
                locators[path.name] = {"pack": name, "offset": tar.offset - (member_bytes(info.size) - BLOCK),
                                       "length": info.size}
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    os.replace(partial, folder / name)
    return locators
