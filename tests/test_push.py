import json
import shutil

import numpy as np
import pytest
import torch
import yaml
from transformers import AutoModelForSeq2SeqLM, AutoProcessor, AutoTokenizer, LlavaForConditionalGeneration

from stages import evaluate, push, train_vlm
from stages.common.files import read_jsonl
from stages.data.frames import load_frames
from stages.models import vlm
from tests.fake_hub import FakeHub
from tests.helpers import SMALL, TINY_VLM, inside, read_curve, run_card_snippet, write_params

TOKEN = "hf_push_test_token"

LOCK = {"schema": "2.0", "stages": {
    "train_seq2seq": {"cmd": "python -m stages.train_seq2seq", "deps": [
        {"path": "data/manifest/train.jsonl", "md5": "1" * 32, "size": 1},
        {"path": "stages/train_seq2seq.py", "md5": "2" * 32, "size": 1}]},
    "train_vlm": {"cmd": "python -m stages.train_vlm", "deps": [
        {"path": "data/frames", "md5": "3" * 32 + ".dir", "size": 1, "nfiles": 2},
        {"path": "data/manifest/train.jsonl", "md5": "1" * 32, "size": 1}]},
    "train_t2v": {"cmd": "python -m stages.train_t2v", "deps": [
        {"path": "data/frames/report.json", "md5": "4" * 32, "size": 1},
        {"path": "stages/train_t2v.py", "md5": "5" * 32, "size": 1}]}}}


def workspace_with_lock(trained, tmp_path, push_params=None):
    folder = tmp_path / "ws"
    shutil.copytree(trained, folder)
    (folder / "dvc.lock").write_text(yaml.safe_dump(LOCK))
    if push_params:
        write_params(folder, {"push": push_params})
    return folder


@pytest.fixture
def exported(trained, tmp_path):
    folder = workspace_with_lock(trained, tmp_path)
    with inside(folder):
        push.main()
    return folder / "export"


@pytest.fixture
def fake_hub(monkeypatch):
    server = FakeHub()
    monkeypatch.setenv("HF_ENDPOINT", server.url)
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    monkeypatch.setenv("HF_USER_ID", "alice")
    yield server
    server.close()


def front_matter(card: str) -> dict:
    return yaml.safe_load(card.split("---\n")[1])


def test_export_is_in_hub_layout_with_a_model_card(exported):
    for name in ("seq2seq", "vlm"):
        files = {p.name for p in (exported / name).iterdir()}
        assert {"model.safetensors", "config.json", "tokenizer.json", "README.md"} <= files
        assert "training_args.bin" not in files
    assert {"processor_config.json", "chat_template.jinja"} & {p.name for p in (exported / "vlm").iterdir()}
    card = (exported / "vlm" / "README.md").read_text()
    meta = front_matter(card)
    assert meta["pipeline_tag"] == "image-text-to-text" and "base_model" not in meta   # tiny: no hub base
    assert "tiny model built offline" in card and "models/vlm/base" in card
    assert "learning_rate: 0.001" in card                         # the params that trained it
    assert "Git commit: none" in card                              # the workspace copy is not a git repository
    assert f"`data/frames` | `{'3' * 32}.dir`" in card             # lineage from dvc.lock, data deps only
    assert "stages/train_seq2seq.py" not in (exported / "seq2seq" / "README.md").read_text()
    metrics = {m["type"]: m["value"] for m in meta["model-index"][0]["results"][0]["metrics"]}
    assert 0 <= metrics["attribute_accuracy"] <= 1
    for plot in ("training_loss", "selection", "comparison", "cider_d"):  # the card shows its plots, rendered offline
        assert f"(plots/{plot}.png)" in card
        assert (exported / "vlm" / "plots" / f"{plot}.png").read_bytes().startswith(b"\x89PNG\r\n\x1a\n")
    kept = json.loads((exported.parent / "models/vlm/training.json").read_text())["selection"]
    assert f"These are the weights of the best evaluation: step {kept['step']}, validation loss" in card


def test_exported_models_load_and_generate_as_from_the_hub(exported, trained):
    tokenizer = AutoTokenizer.from_pretrained(exported / "seq2seq")
    model = AutoModelForSeq2SeqLM.from_pretrained(exported / "seq2seq")
    assert model.generate(**tokenizer(["a red"], return_tensors="pt"), max_new_tokens=3).shape[0] == 1

    processor = AutoProcessor.from_pretrained(exported / "vlm")
    model = LlavaForConditionalGeneration.from_pretrained(exported / "vlm")
    row = read_jsonl(trained / "data/manifest/test.jsonl")[0]
    frames = list(load_frames(row, trained / "data/frames")[0])
    content = [{"type": "image"}] * len(frames) + [{"type": "text", "text": "Describe."}]
    messages = [{"role": "user", "content": content}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
    inputs = processor(text=prompt, images=frames, return_tensors="pt")
    assert model.generate(**inputs, max_new_tokens=4).shape[1] > inputs["input_ids"].shape[1]


def test_the_text_to_video_export_is_a_diffusers_pipeline_whose_card_snippet_generates(exported, trained):
    t2v = exported / "t2v"
    index = json.loads((t2v / "model_index.json").read_text())
    assert index["_class_name"] == "AnimateDiffPipeline"
    assert {"unet", "vae", "text_encoder", "tokenizer", "scheduler"} <= {p.name for p in t2v.iterdir()}
    card = (t2v / "README.md").read_text()
    meta = front_matter(card)
    assert meta["library_name"] == "diffusers" and meta["pipeline_tag"] == "text-to-video"
    assert f"`data/frames/report.json` | `{'4' * 32}`" in card and "stages/train_t2v.py" not in card
    metrics = json.loads((trained / "eval/t2v/metrics.json").read_text())
    assert f"| color_accuracy | {metrics['t2v']['color_accuracy']:.3g} |" in card
    strips = sorted(p.name for p in (t2v / "plots").iterdir())
    assert strips and all(f"(plots/{name})" in card for name in strips)
    snippet = card.split("```python\n")[1].split("```")[0]
    scope = {}
    with inside(exported.parent):                       # the card names the export by its path there
        exec(snippet.replace("num_frames=", "num_inference_steps=2, num_frames="), scope)   # the card's code, 2 steps
    assert np.asarray(scope["frames"]).shape == (4, 32, 32, 3)


def test_push_without_a_lock_says_how_to_get_one(trained, tmp_path):
    folder = tmp_path / "ws"
    shutil.copytree(trained, folder)
    with inside(folder), pytest.raises(SystemExit, match="dvc.lock not found"):
        push.main()
    assert not (folder / "export").exists()


def test_receipt_of_a_dir_export(exported):
    receipt = json.loads((exported / "push.json").read_text())
    assert receipt["target"] == "dir" and set(receipt["models"]) == {"seq2seq", "vlm", "t2v"}
    assert receipt["models"]["vlm"]["path"] == "export/vlm" and len(receipt["models"]["vlm"]["content_sha256"]) == 64


def test_weights_are_split_into_shards_that_load_back(trained, tmp_path):
    folder = workspace_with_lock(trained, tmp_path, {"max_shard_size": "200KB"})
    with inside(folder):
        push.main()
    shards = sorted((folder / "export/vlm").glob("model-*.safetensors"))
    assert len(shards) > 1 and (folder / "export/vlm/model.safetensors.index.json").exists()
    assert not (folder / "export/vlm/model.safetensors").exists()
    exported = LlavaForConditionalGeneration.from_pretrained(folder / "export/vlm").state_dict()
    original = LlavaForConditionalGeneration.from_pretrained(trained / "models/vlm/model").state_dict()
    assert exported.keys() == original.keys() and all(torch.equal(exported[k], original[k]) for k in original)


def test_hf_target_uploads_each_model_and_the_dataset_once(trained, tmp_path, fake_hub):
    folder = workspace_with_lock(trained, tmp_path, {"target": "hf", "dataset": True})
    with inside(folder):
        push.main()
    receipt = json.loads((folder / "export/push.json").read_text())
    for name in ("seq2seq", "vlm", "t2v"):
        entry = receipt["models"][name]
        assert entry["repo"] == f"alice/video-lm-{name}" and entry["uploaded"]
        local = {f.relative_to(folder / "export" / name).as_posix(): f.read_bytes()
                 for f in (folder / "export" / name).rglob("*") if f.is_file()}
        assert {k: v for k, v in fake_hub.files(entry["repo"]).items() if k != ".gitattributes"} == local
    data = fake_hub.files("alice/video-lm-data", "dataset")
    assert "manifest/train.jsonl" in data and any(name.startswith("frames/") for name in data)
    assert receipt["dataset"]["uploaded"]
    assert "alice/video-lm-data" in front_matter((folder / "export/vlm/README.md").read_text())["datasets"]

    with inside(folder):                                      # rerun, nothing changed: nothing is uploaded
        push.main()
    again = json.loads((folder / "export/push.json").read_text())
    assert not any(entry["uploaded"] for entry in again["models"].values()) and not again["dataset"]["uploaded"]
    assert [e["commit"] for e in again["models"].values()] == [e["commit"] for e in receipt["models"].values()]
    assert len(fake_hub.calls("POST", "/commit/")) == 4        # one per model repo and the dataset, once
    assert [r for r in fake_hub.requests if r["authorization"] != f"Bearer {TOKEN}"] == []


def test_what_the_hub_holds_loads_and_generates(trained, tmp_path, fake_hub):
    folder = workspace_with_lock(trained, tmp_path, {"target": "hf"})
    with inside(folder):
        push.main()
    download = tmp_path / "download"
    for name, data in fake_hub.files("alice/video-lm-seq2seq").items():
        (download / name).parent.mkdir(parents=True, exist_ok=True)
        (download / name).write_bytes(data)
    tokenizer, model = AutoTokenizer.from_pretrained(download), AutoModelForSeq2SeqLM.from_pretrained(download)
    assert model.generate(**tokenizer(["a red"], return_tensors="pt"), max_new_tokens=3).shape[0] == 1


def test_hf_target_without_a_token_stops_before_writing(trained, tmp_path, monkeypatch):
    folder = workspace_with_lock(trained, tmp_path, {"target": "hf", "namespace": "alice"})
    monkeypatch.delenv("HF_TOKEN", raising=False)
    with inside(folder), pytest.raises(SystemExit, match="HF_TOKEN"):
        push.main()
    assert not (folder / "export").exists()


def test_hf_target_needs_a_namespace(trained, tmp_path, monkeypatch):
    folder = workspace_with_lock(trained, tmp_path, {"target": "hf"})
    monkeypatch.delenv("HF_USER_ID", raising=False)
    with inside(folder), pytest.raises(SystemExit, match="HF_USER_ID"):
        push.main()


@pytest.mark.parametrize("name", list(vlm.FAMILIES))
def test_every_family_trains_and_its_cards_snippet_pasted_verbatim_answers_a_video_file_as_evaluate_did(
        name, trained, tmp_path):
    """Each family through the VLM half of the pipeline, stage by stage as dvc runs it (test_pipeline.py drives one
    of them through `dvc exp run`): train_vlm learns, evaluate answers, push exports the family's own model type and
    records how the model was fed (frames, size, prompt layout, token limit). The card's snippet, run as a user would
    (PYTHONPATH standing in for `pip install` of this repository), decodes the test video file itself and must print
    the very prediction evaluate wrote from the extracted frames."""
    workspace = workspace_with_lock(trained, tmp_path)
    write_params(workspace, {**SMALL, "train_vlm": {**SMALL["train_vlm"], "family": name, "max_steps": 40}})
    with inside(workspace):
        train_vlm.main()
        evaluate.main()
        push.main()
    losses = [loss for _, loss in read_curve(workspace / "dvclive/train_vlm/plots/metrics/train/loss.tsv")]
    assert losses[-1] < losses[0] / 2, losses
    exported = workspace / "export" / "vlm"
    expected = vlm.family(name).MODEL_CLASS.config_class.model_type   # "instructblipvideo" for instructblip_video
    assert json.loads((exported / "config.json").read_text())["model_type"] == expected
    record = json.loads((exported / "video_sampling.json").read_text())
    assert record["family"] == name and record["max_new_tokens"] == 8 and record["max_length"] == 192
    assert record["sampling"]["num_frames"] == 4 and record["sampling"]["frame_size"] == 32
    if name == "llava":                                 # frames before the question
        assert record["prompt"] == [{"role": "user", "content": "<video>\n{question}"}]
    printed, evaluated = run_card_snippet(workspace, exported, tmp_path)
    assert printed == evaluated


# SmolVLM's sampler keeps min(fps x duration, num_frames) frames and needs its fps: it cannot take a count alone.
OWN_VIDEO_SAMPLING = {"llava": "none", "smolvlm": "unchanged"}


@pytest.mark.parametrize("name", list(vlm.FAMILIES))
def test_the_export_sets_the_processors_own_video_sampling_where_it_can_take_it(name, small_data, tmp_path):
    folder = vlm.family(name).build_tiny(TINY_VLM, ["a red circle moves left"] * 50, 32, tmp_path / "model")
    with inside(small_data):
        record = push.record_sampling(folder, name, max_new_tokens=8, max_length=4096)
    assert json.loads((folder / "video_sampling.json").read_text()) == record
    assert record["video_processor"].startswith(OWN_VIDEO_SAMPLING.get(name, "set")), record["video_processor"]
    if record["video_processor"] == "set":          # transformers' own path, given a whole 16-frame clip, keeps 4
        video = AutoProcessor.from_pretrained(folder).video_processor
        out = video(videos=[np.zeros((16, 32, 32, 3), np.uint8)], return_metadata=True,
                    video_metadata=[{"fps": 8.0, "total_num_frames": 16, "duration": 2.0}])
        assert len(out["video_metadata"][0].frames_indices) == 4
