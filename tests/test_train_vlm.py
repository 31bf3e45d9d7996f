import json

from transformers import AutoProcessor, LlavaForConditionalGeneration

from stages import train_vlm
from tests.test_train_seq2seq import read_curve


def test_trains_the_tiny_llava_and_saves_it_loadable_by_path(workspace):
    train_vlm.main()
    training = json.loads((workspace / "models/vlm/training.json").read_text())
    assert training["base_model"] == "models/vlm/base" and training["family"] == "llava"
    assert training["global_step"] == 8
    for path in ("models/vlm/model", training["base_model"]):
        processor = AutoProcessor.from_pretrained(path)
        assert processor.chat_template and processor.tokenizer.eos_token == "<|end|>"
        assert LlavaForConditionalGeneration.from_pretrained(path).config.vision_config.image_size == 32
    curve = read_curve(workspace / "dvclive/train_vlm/plots/metrics/train/loss.tsv")
    assert len(curve) == 8 and curve[-1][1] < curve[0][1]
