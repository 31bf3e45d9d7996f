import io
from hashlib import sha256

import av

from stages.common.files import read_jsonl, sha256_file
from stages.data import packs
from stages.data.synthetic import assign_splits, caption, swapped_caption


def test_videos_are_h264_mp4_content_addressed_and_packed_by_sha256_prefix(small_data):
    samples = read_jsonl(small_data / "data/raw/samples.jsonl")
    assert len(samples) == 2 * 2 * 2 * 3
    folder = small_data / "data/raw/videos"
    index = packs.read_index(folder)
    assert sorted(p.name for p in folder.iterdir()) == sorted({f"{name[:2]}-0.tar" for name in index} | {packs.INDEX})
    assert sorted(index) == sorted(sample["videos"][0].removeprefix("videos/") for sample in samples)
    for sample in samples:
        (video,) = sample["videos"]
        data = packs.read(folder, index[video.removeprefix("videos/")])
        assert video == f"videos/{sha256(data).hexdigest()}.mp4"
        with av.open(io.BytesIO(data)) as container:
            stream = container.streams.video[0]
            assert stream.codec_context.name == "h264"
            assert (stream.codec_context.width, stream.codec_context.height) == (64, 64)
            assert sum(1 for _ in container.decode(stream)) == 16     # 2 s at 8 fps


def test_samples_carry_caption_question_metadata_and_split(small_data):
    samples = read_jsonl(small_data / "data/raw/samples.jsonl")
    for sample in samples:
        attributes = sample["attributes"]
        assert sample["caption"] == caption(attributes["color"], attributes["shape"], attributes["direction"])
        assert sorted(sample["meta"]["tags"]) == sorted(attributes.values())
        assert sample["question"].endswith("?") or sample["question"].endswith(".")
    assert {s["split"] for s in samples} == {"train", "val", "test"}
    assert len({s["id"] for s in samples}) == len(samples)
    # every combination is present; clips differ in geometry, so no two videos are the same file
    assert len({s["caption"] for s in samples}) == 8
    assert len({s["videos"][0] for s in samples}) == len(samples)


def test_collect_is_deterministic(small_data, tmp_path):
    from stages import collect
    from tests.helpers import inside

    (tmp_path / "params.yaml").write_text((small_data / "params.yaml").read_text())
    with inside(tmp_path):
        collect.main()
    assert (tmp_path / "data/raw/samples.jsonl").read_bytes() == (small_data / "data/raw/samples.jsonl").read_bytes()
    again = {p.name: sha256_file(p) for p in (tmp_path / "data/raw/videos").iterdir()}
    assert again == {p.name: sha256_file(p) for p in (small_data / "data/raw/videos").iterdir()}   # the packs too


def test_split_fractions():
    splits = assign_splits(100, 0.1, 0.2, seed=3)
    assert (splits.count("val"), splits.count("test"), splits.count("train")) == (10, 20, 70)
    assert splits == assign_splits(100, 0.1, 0.2, seed=3) != assign_splits(100, 0.1, 0.2, seed=4)


def test_every_clip_has_a_rejected_caption_wrong_in_exactly_one_attribute(small_data):
    samples = read_jsonl(small_data / "data/raw/samples.jsonl")
    swapped = []
    for sample in samples:
        truth, rejected = sample["caption"].split(), sample["rejected"].split()
        (position,) = [i for i, (a, b) in enumerate(zip(truth, rejected)) if a != b]
        swapped.append(position)
    assert set(swapped) == {1, 2, 4}     # color, shape and direction are each the swapped one for some clips


def test_no_rejected_caption_when_every_attribute_has_one_value():
    one = {"colors": ["red"], "shapes": ["circle"], "directions": ["left"]}
    assert swapped_caption({"color": "red", "shape": "circle", "direction": "left"}, one, 0) is None
    two_shapes = {**one, "shapes": ["circle", "square"]}
    assert swapped_caption({"color": "red", "shape": "circle", "direction": "left"}, two_shapes, 0) == (
        "a red square moves left")
