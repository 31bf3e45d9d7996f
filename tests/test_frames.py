import numpy as np
import pytest
from safetensors.numpy import save_file

from stages.common.files import write_json
from stages.data import packs
from stages.data.frames import INDEX, load_frames


def packed_clips(folder, lengths) -> tuple[list[np.ndarray], dict]:
    """Clips of `lengths` frames, each a shard named like extract's (a sha256), packed and indexed as extract
    packs and indexes them; the clips and {shard name: locator}."""
    clips = [np.full((n, 8, 8, 3), n, dtype=np.uint8) for n in lengths]
    names = [f"{index:02x}{'0' * 62}.safetensors" for index in range(len(clips))]
    for name, clip in zip(names, clips):
        save_file({"frames": clip, "timestamps": np.arange(len(clip), dtype=np.float64)}, str(folder / name))
    locators = packs.write(folder, [folder / name for name in names], 1 << 20)
    write_json(folder / INDEX, locators)
    return clips, locators


def test_a_rows_videos_come_back_in_order_from_their_packs(tmp_path):
    clips, locators = packed_clips(tmp_path, (2, 5))
    first, second = locators
    loaded = load_frames({"videos": [{"frames": second}, {"frames": first}]}, tmp_path)
    assert [frames.shape for frames in loaded] == [(5, 8, 8, 3), (2, 8, 8, 3)]
    assert loaded[0].dtype == np.uint8 and np.array_equal(loaded[1], clips[0])


def test_a_shard_the_index_does_not_know_is_an_error_naming_the_index_and_the_video(tmp_path):
    packed_clips(tmp_path, (3,))
    row = {"id": "s1", "videos": [{"sha256": "abc", "frames": f"ff{'0' * 62}.safetensors"}]}
    with pytest.raises(packs.PackError, match=rf"video abc of sample s1: .*{INDEX}: no shard ff0+\.safetensors"):
        load_frames(row, tmp_path)


def test_a_missing_or_truncated_pack_is_an_error_naming_the_pack_and_the_video(tmp_path):
    _, locators = packed_clips(tmp_path, (3,))
    name, locator = next(iter(locators.items()))
    row = {"id": "s1", "videos": [{"sha256": "abc", "frames": name}]}
    pack = tmp_path / locator["pack"]
    pack.write_bytes(pack.read_bytes()[:locator["offset"] + 10])
    with pytest.raises(packs.PackError, match=rf"video abc of sample s1: .*{locator['pack']}: 10 of the"):
        load_frames(row, tmp_path)
    pack.unlink()
    with pytest.raises(packs.PackError, match=rf"video abc of sample s1: .*{locator['pack']}"):
        load_frames(row, tmp_path)
