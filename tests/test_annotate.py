"""The annotation pipelines on tiny random-init models saved to a folder and loaded back by path, the way a hub id
is loaded: a tiny Whisper with a real feature extractor and an offline byte-level tokenizer, and the tiny LLaVA."""
import numpy as np
import pytest
from transformers import AutoTokenizer, LlavaForConditionalGeneration, WhisperForConditionalGeneration, pipeline

from stages.data import annotate
from stages.data.annotate import captioner, transcriber
from stages.models.vlm import llava
from tests.helpers import TINY_VLM, build_whisper

RATE = 16_000


@pytest.fixture(scope="module")
def whisper(tmp_path_factory):
    return str(build_whisper(tmp_path_factory.mktemp("whisper") / "model"))


@pytest.fixture(scope="module")
def tiny_llava(tmp_path_factory):
    texts = ["a red circle moves left", "a blue square moves right", "Describe the video."] * 20
    return str(llava.build_tiny(TINY_VLM, texts, 32, tmp_path_factory.mktemp("llava") / "model"))


def spy_generate(monkeypatch, model_class) -> list[dict]:
    """Record the inputs and output of every `generate` call of `model_class`."""
    calls, generate = [], model_class.generate

    def spy(self, *args, **kwargs):
        output = generate(self, *args, **kwargs)
        calls.append({**kwargs, "output": output})
        return output

    monkeypatch.setattr(model_class, "generate", spy)
    return calls


def test_transcriber_runs_whisper_on_log_mel_features_of_the_audio(whisper, monkeypatch):
    calls = spy_generate(monkeypatch, WhisperForConditionalGeneration)
    loads = []
    monkeypatch.setattr(annotate, "pipeline", lambda *args, **kwargs: loads.append(args) or pipeline(*args, **kwargs))
    transcribe = transcriber(whisper)
    audio = np.random.default_rng(0).normal(0, 0.1, 3 * RATE).astype(np.float32)
    text = transcribe(audio)
    assert isinstance(text, str)   # random weights: any text
    assert [tuple(call["input_features"].shape) for call in calls] == [(1, 80, 3000)]  # 30 s of 80-bin log-mel
    assert transcribe(audio) == text and len(loads) == 1   # loaded once, reused call after call


def test_transcriber_chunks_long_audio(whisper, monkeypatch):
    calls = spy_generate(monkeypatch, WhisperForConditionalGeneration)
    audio = np.random.default_rng(1).normal(0, 0.1, 70 * RATE).astype(np.float32)
    assert isinstance(transcriber(whisper)(audio), str)
    assert len(calls) == 3   # 30 s chunks, 5 s overlap each side: 0-30, 20-50, 40-70 s


def test_captioner_shows_every_frame_with_the_prompt_and_returns_only_new_text(tiny_llava, monkeypatch):
    calls = spy_generate(monkeypatch, LlavaForConditionalGeneration)
    caption = captioner(tiny_llava, "Describe the video.", 8)
    frames = list(np.random.default_rng(2).integers(0, 256, (4, 32, 32, 3), dtype=np.uint8))
    text = caption(frames)
    assert isinstance(text, str)
    (call,) = calls
    assert call["pixel_values"].shape[0] == 4                        # one image per frame
    prompt = call["input_ids"][0]
    tokenizer = AutoTokenizer.from_pretrained(tiny_llava)
    rendered = tokenizer.decode(prompt)
    assert rendered.count("<|user|>") == 1 and rendered.rstrip().endswith("<|assistant|>")
    assert "Describe the video." in rendered
    new_tokens = call["output"][0, len(prompt):]
    assert len(new_tokens) <= 8 and call["do_sample"] is False and call["num_beams"] == 1
    assert text == tokenizer.decode(new_tokens, skip_special_tokens=True).strip()   # the prompt is not echoed
    assert caption(frames) == text   # greedy: the same frames give the same caption


def test_a_missing_model_is_an_error_naming_it(tmp_path):
    missing = str(tmp_path / "no-such-model")
    with pytest.raises(OSError, match="no-such-model"):
        transcriber(missing)
    with pytest.raises(OSError, match="no-such-model"):
        captioner(missing, "Describe the video.", 8)
