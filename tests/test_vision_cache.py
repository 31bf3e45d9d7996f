import copy

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoProcessor

from stages import embed
from stages.common.files import read_jsonl
from stages.data.frames import load_frames
from stages.models import vision_cache, vlm
from stages.training import finetune
from tests.helpers import TINY_VLM

CACHEABLE = [name for name, fam in vlm.FAMILIES.items() if not hasattr(fam, "CANNOT_CACHE")]
FROZEN = {"freeze_vision": True, "deepspeed": {"enabled": False, "zero_stage": 2}}


def frames_of(fam, rows):
    """How many frames the tower sees for `rows`: Qwen's take video frames in pairs (TEMPORAL), one patch of each."""
    per = getattr(fam, "TEMPORAL", 1)
    return sum(-(-video["num_frames"] // per) for row in rows for video in row["videos"])


def record_into(folder, model, fam, processor, rows, frames_dir, per_batch=3):
    """embed's work in small: the rows' features, recorded in batches of `per_batch` rows, written to `folder`."""
    samples = vlm.ManifestDataset(rows, processor, fam, 4096, frames_dir)
    batches = [vlm.collate([samples[j] for j in range(i, min(i + per_batch, len(rows)))],
                           processor.tokenizer.pad_token_id) for i in range(0, len(rows), per_batch)]
    return vision_cache.write(folder, vision_cache.record(model, fam, batches),
                              tower=vision_cache.digest(vision_cache.tower(model, fam), fam))


@pytest.fixture(scope="module", params=CACHEABLE)
def recorded(request, small_data, tmp_path_factory):
    """A tiny model of each family that can cache, and a cache of its tower's features for 6 training rows."""
    fam, frames_dir = vlm.family(request.param), small_data / "data/frames"
    rows = read_jsonl(small_data / "data/manifest/train.jsonl")[:6]
    texts = [m["content"].replace(vlm.VIDEO, "") for row in rows for m in row["messages"]]
    path = fam.build_tiny(TINY_VLM, texts * 20, 32, tmp_path_factory.mktemp(request.param) / "base")
    processor, model = AutoProcessor.from_pretrained(path), fam.MODEL_CLASS.from_pretrained(path).eval()
    finetune.prepare(model, fam, {"finetune": "full", "freeze_vision": True, "train_projector": True})
    folder = tmp_path_factory.mktemp(request.param) / "cache"
    index = record_into(folder, model, fam, processor, rows, frames_dir)
    assert index["frames"] == frames_of(fam, rows)
    return fam, processor, model, rows, folder, frames_dir


def loss_and_gradients(model, batch):
    model.zero_grad()
    loss = model(**batch).loss
    loss.backward()
    return loss.detach(), {name: w.grad.clone() for name, w in model.named_parameters() if w.grad is not None}


def test_each_family_gets_the_same_loss_and_gradients_from_cached_features_without_running_its_tower(recorded):
    fam, processor, model, rows, folder, frames_dir = recorded
    # rows 2-5: a batch that mixes two of the recording batches, so a frame's features cannot depend on its batch
    examples = [vlm.encode(row, load_frames(row, frames_dir), processor, fam, 4096) for row in rows[2:6]]
    batch = vlm.collate(examples, processor.tokenizer.pad_token_id)
    loss, gradients = loss_and_gradients(model, batch)

    module = vision_cache.tower(model, fam)
    ran = []
    watch = next(module.children()).register_forward_hook(lambda *_: ran.append(True))
    cache = vision_cache.VisionCache(folder)
    vision_cache.attach(model, fam, cache)
    try:
        cached_loss, cached_gradients = loss_and_gradients(model, batch)
    finally:
        del module.forward
        watch.remove()
    assert not ran, "the tower ran although the cache holds every frame"
    assert cache.summary() == {"frames_from_cache": frames_of(fam, rows[2:6]), "frames_through_tower": 0}
    assert torch.allclose(loss, cached_loss, atol=1e-5)
    assert any(name.startswith(fam.PROJECTOR) for name in gradients)   # the projector does train on the features
    assert gradients.keys() == cached_gradients.keys()
    for name, gradient in gradients.items():
        assert torch.allclose(gradient, cached_gradients[name], atol=1e-5), name


@pytest.mark.parametrize("recorded", ["llava"], indirect=True)   # shown once, on the default family
def test_a_frame_the_cache_lacks_goes_through_the_real_tower_and_is_counted(recorded):
    fam, processor, model, rows, folder, frames_dir = recorded
    row = rows[0]
    videos = [video[:, ::-1].copy() for video in load_frames(row, frames_dir)]   # frames it has never seen
    batch = vlm.collate([vlm.encode(row, videos, processor, fam, 4096)], processor.tokenizer.pad_token_id)
    with torch.no_grad():
        expected = model(**batch).loss
        cache = vision_cache.VisionCache(folder)
        vision_cache.attach(model, fam, cache)
        try:
            assert torch.allclose(model(**batch).loss, expected, atol=1e-6)
        finally:
            del vision_cache.tower(model, fam).forward
    assert cache.summary() == {"frames_from_cache": 0, "frames_through_tower": row["videos"][0]["num_frames"]}


def test_a_cache_of_other_tower_weights_is_refused(recorded):
    fam, _, model, _, folder, _ = recorded
    other = copy.deepcopy(model)
    next(vision_cache.tower(other, fam).parameters()).data.add_(1e-3)
    with pytest.raises(ValueError, match="features of another vision tower"):
        vision_cache.attach(other, fam, vision_cache.VisionCache(folder))


@pytest.mark.parametrize("recorded", ["llava"], indirect=True)   # shown once, on the default family
def test_lora_inside_the_tower_is_refused_as_a_tower_that_trains(recorded):
    fam, _, model, _, folder, _ = recorded
    adapted = get_peft_model(copy.deepcopy(model), LoraConfig(target_modules=["q_proj"], r=2))
    with pytest.raises(ValueError, match="vision tower has weights that train"):
        vision_cache.attach(adapted, fam, vision_cache.VisionCache(folder))


@pytest.mark.parametrize("name", [name for name in vlm.FAMILIES if name not in CACHEABLE])
def test_a_family_the_cache_cannot_stand_for_says_why_at_once(name):
    with pytest.raises(ValueError, match=f"{name} cannot cache its vision features: its .*projector"):
        vision_cache.check(vlm.family(name), FROZEN)


def test_a_tower_that_trains_or_is_partitioned_cannot_be_cached():
    with pytest.raises(ValueError, match="needs train_vlm.freeze_vision: true"):
        vision_cache.check(vlm.family("llava"), {**FROZEN, "freeze_vision": False})
    with pytest.raises(ValueError, match="ZeRO-3"):
        vision_cache.check(vlm.family("llava"), {**FROZEN, "deepspeed": {"enabled": True, "zero_stage": 3}})


def test_the_index_of_a_cache_that_is_off_is_refused_naming_the_switch(workspace):
    embed.main()    # with the cache off, as params.yaml ships
    with pytest.raises(ValueError, match="the cache is empty .train_vlm.cache_vision is false.*cache_vision: true"):
        vision_cache.VisionCache(workspace / "data/vision_cache")


@pytest.mark.parametrize("recorded", ["llava"], indirect=True)
def test_features_stream_into_packs_of_bounded_size_and_each_frame_is_stored_once(recorded, tmp_path, monkeypatch):
    fam, processor, model, rows, _, frames_dir = recorded
    monkeypatch.setattr(vision_cache, "PACK_BYTES", 1)    # every frame fills a pack
    index = record_into(tmp_path / "cache", model, fam, processor, rows[:2] + rows[:2], frames_dir, per_batch=2)
    frames = sum(video["num_frames"] for row in rows[:2] for video in row["videos"])
    assert index["frames"] == len(index["packs"]) == frames
    cache = vision_cache.VisionCache(tmp_path / "cache")
    assert len(cache.where) == frames     # one tensor per frame: the one hidden state llava reads
