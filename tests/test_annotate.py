"""The annotation pipelines on tiny random-init models saved to a folder and loaded back by path, the way a hub id
is loaded: a tiny Whisper with a real feature extractor and an offline byte-level tokenizer, and the tiny LLaVA."""
import json
import os
import pickle
import re
from pathlib import Path

import numpy as np
import pytest
from transformers import AutoTokenizer, LlavaForConditionalGeneration, WhisperForConditionalGeneration, pipeline

from stages.data import annotate
from stages.data.annotate import captioner, transcriber
from stages.models.vlm import llava
from tests.helpers import REPO, TINY_VLM, build_whisper

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


# ---------------------------------------------------------------- a model is data, never code

class RunsCode:
    """Unpickled, this creates a folder: the stand-in for any code a pickle can run."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.mkdir, (str(self.marker),)


def test_a_model_folder_whose_weights_are_a_pickle_is_refused_unrun(whisper, tmp_path):
    """The real Whisper config and processor beside a pytorch_model.bin that would run code: refused, and the code
    never ran (safetensors only; torch's weights-only unpickler would refuse it too)."""
    folder, marker = tmp_path / "evil", tmp_path / "ran"
    folder.mkdir()
    for path in Path(whisper).iterdir():
        if path.suffix != ".safetensors":
            (folder / path.name).write_bytes(path.read_bytes())
    (folder / "pytorch_model.bin").write_bytes(pickle.dumps({"model.encoder.conv1.weight": RunsCode(marker)}))
    refused = r"(?s)could not load the automatic-speech-recognition model .*model\.safetensors"
    with pytest.raises(OSError, match=refused):
        transcriber(str(folder))
    assert not marker.exists()


def test_a_model_folder_that_ships_its_own_code_is_refused_unrun(tmp_path):
    folder, marker = tmp_path / "remote", tmp_path / "ran"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "evil", "auto_map": {
        "AutoConfig": "configuration_evil.EvilConfig", "AutoModelForSpeechSeq2Seq": "modeling_evil.EvilModel"}}))
    for name in ("configuration_evil.py", "modeling_evil.py"):
        (folder / name).write_text(f"import os\nos.mkdir({str(marker)!r})\n")
    with pytest.raises((ValueError, OSError), match="trust_remote_code"):
        transcriber(str(folder))
    assert not marker.exists()


def test_no_stage_asks_for_remote_code_or_unpickles():
    """The loading rule of README's Security section, for every module under stages/: no trust_remote_code=True,
    no weights_only=False, no pickle."""
    risky = re.compile(r"trust_remote_code\s*=\s*True|weights_only\s*=\s*False|\bimport pickle\b|pickle\.loads?\(")
    found = [f"{path.relative_to(REPO)}:{n}" for path in sorted((REPO / "stages").rglob("*.py"))
             for n, line in enumerate(path.read_text().splitlines(), 1) if risky.search(line)]
    assert found == []
