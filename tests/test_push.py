import shutil

import pytest
import yaml
from transformers import AutoModelForSeq2SeqLM, AutoProcessor, AutoTokenizer, LlavaForConditionalGeneration

from stages import push, vlm
from stages.files import read_jsonl
from tests.conftest import inside

LOCK = {"schema": "2.0", "stages": {
    "train_seq2seq": {"cmd": "python -m stages.train_seq2seq", "deps": [
        {"path": "data/manifest/train.jsonl", "md5": "1" * 32, "size": 1},
        {"path": "stages/train_seq2seq.py", "md5": "2" * 32, "size": 1}]},
    "train_vlm": {"cmd": "python -m stages.train_vlm", "deps": [
        {"path": "data/frames", "md5": "3" * 32 + ".dir", "size": 1, "nfiles": 2},
        {"path": "data/manifest/train.jsonl", "md5": "1" * 32, "size": 1}]}}}


@pytest.fixture
def exported(trained, tmp_path):
    folder = tmp_path / "ws"
    shutil.copytree(trained, folder)
    (folder / "dvc.lock").write_text(yaml.safe_dump(LOCK))
    with inside(folder):
        push.main()
    return folder / "export"


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
    assert f"`data/frames` | `{'3' * 32}.dir`" in card             # lineage from dvc.lock, data deps only
    assert "stages/train_seq2seq.py" not in (exported / "seq2seq" / "README.md").read_text()
    metrics = {m["type"]: m["value"] for m in meta["model-index"][0]["results"][0]["metrics"]}
    assert 0 <= metrics["attribute_accuracy"] <= 1


def test_exported_models_load_and_generate_as_from_the_hub(exported, trained):
    tokenizer = AutoTokenizer.from_pretrained(exported / "seq2seq")
    model = AutoModelForSeq2SeqLM.from_pretrained(exported / "seq2seq")
    assert model.generate(**tokenizer(["a red"], return_tensors="pt"), max_new_tokens=3).shape[0] == 1

    processor = AutoProcessor.from_pretrained(exported / "vlm")
    model = LlavaForConditionalGeneration.from_pretrained(exported / "vlm")
    row = read_jsonl(trained / "data/manifest/test.jsonl")[0]
    frames = list(vlm.load_frames(row, trained / "data/frames")[0])
    messages = [{"role": "user", "content": [{"type": "image"}] * len(frames) + [{"type": "text", "text": "Describe."}]}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
    inputs = processor(text=prompt, images=frames, return_tensors="pt")
    assert model.generate(**inputs, max_new_tokens=4).shape[1] > inputs["input_ids"].shape[1]


def test_push_without_a_lock_says_how_to_get_one(trained, tmp_path):
    folder = tmp_path / "ws"
    shutil.copytree(trained, folder)
    with inside(folder), pytest.raises(SystemExit, match="dvc.lock not found"):
        push.main()
    assert not (folder / "export").exists()
