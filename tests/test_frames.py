import numpy as np
import pytest
from safetensors.numpy import save_file

from stages.data.frames import load_frames


def test_a_rows_videos_come_back_in_order_from_their_shards(tmp_path):
    clips = [np.full((n, 8, 8, 3), n, dtype=np.uint8) for n in (2, 5)]
    for index, clip in enumerate(clips):
        save_file({"frames": clip, "timestamps": np.arange(len(clip), dtype=np.float64)},
                  str(tmp_path / f"v{index}.safetensors"))
    row = {"videos": [{"frames": "v1.safetensors"}, {"frames": "v0.safetensors"}]}
    loaded = load_frames(row, tmp_path)
    assert [frames.shape for frames in loaded] == [(5, 8, 8, 3), (2, 8, 8, 3)]
    assert loaded[0].dtype == np.uint8 and np.array_equal(loaded[1], clips[0])


def test_a_missing_shard_is_an_error_naming_it(tmp_path):
    with pytest.raises(FileNotFoundError, match="gone.safetensors"):
        load_frames({"videos": [{"frames": "gone.safetensors"}]}, tmp_path)
