"""Packs: many small files in a few plain tar files, each file found again by a locator {pack, offset, length}.

DVC's costs (a no-op `dvc repro`, status, push and pull) grow with the number of files it tracks, so a stage that
writes one file per video writes them into packs instead (README: Frames in packs):
- A file goes to the group named by the first GROUP_KEY hex digits of its name (a sha256): a stable key, so one
  changed video rewrites the packs of its group only. Within a group, files go in name order into `<group>-<n>.tar`,
  a new pack whenever the next file would take the current one past the size limit.
- The format is a POSIX (ustar) tar, what webdataset and every tar tool read. Each pack is written byte for byte
  reproducibly: members in name order, no times, owners or modes of this machine.
- A reader never scans a pack: the locator points at a member's bytes, one seek and one read, so samples are read in
  any order (shuffling, DataLoader workers).
"""
import os
import tarfile
from itertools import groupby
from pathlib import Path

GROUP_KEY = 2          # hex digits of the sha256 that name a file's group: 256 groups at most


class PackError(Exception):
    """A member that cannot be read back from its pack."""


def group(name: str) -> str:
    return name[:GROUP_KEY]


def write(folder: Path, files: list[Path], limit: int) -> dict[str, dict]:
    """Move `files` into packs in `folder`, each at most `limit` bytes unless one file alone is larger;
    {file name: locator}. Each pack is written aside and renamed, so no half pack is ever under its name."""
    locators = {}
    for key, members in groupby(sorted(files, key=lambda path: path.name), key=lambda path: group(path.name)):
        batches, batch_bytes = [[]], 0
        for path in members:
            size = member_bytes(path.stat().st_size)
            if batches[-1] and batch_bytes + size + END > limit:
                batches.append([])
                batch_bytes = 0
            batches[-1].append(path)
            batch_bytes += size
        for number, batch in enumerate(batches):
            locators.update(write_pack(folder, f"{key}-{number}.tar", batch))
    for path in files:
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
