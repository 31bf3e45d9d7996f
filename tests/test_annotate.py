"""The annotation pipelines on tiny random-init models saved to a folder and loaded back by path, the way a hub id
is loaded: a tiny Whisper with a real feature extractor and an offline byte-level tokenizer, and the tiny LLaVA."""
import numpy as np
import pytest
import torch
from tokenizers import pre_tokenizers
from transformers import (
    AutoTokenizer,
    GenerationConfig,
    LlavaForConditionalGeneration,
    WhisperConfig,
    WhisperFeatureExtractor,
    WhisperForConditionalGeneration,
    WhisperProcessor,
    WhisperTokenizer,
    pipeline,
)

from stages.data import annotate
from stages.data.annotate import captioner, transcriber
from stages.models.vlm import llava

RATE = 16_000
SPECIAL = ["<|endoftext|>", "<|startoftranscript|>", "<|en|>", "<|translate|>", "<|transcribe|>", "<|startoflm|>",
           "<|startofprev|>", "<|nocaptions|>", "<|notimestamps|>"]   # Whisper's order: <|notimestamps|> last
LLAVA = {"vision_hidden": 32, "vision_layers": 1, "patch_size": 8, "text_hidden": 32, "text_layers": 1, "heads": 2,
         "vocab_size": 300}


def build_whisper(out):
    """A random-init Whisper (1 + 1 layers, width 32) with the real feature extractor and a byte-level tokenizer
    (the 256 byte symbols, no merges, plus Whisper's special tokens), saved to `out`.

    The generation config mirrors a multilingual hub checkpoint's (language detection among lang_to_id, then
    <|notimestamps|>). It is built afresh: the one the model derives from its config is flagged `_from_model_config`,
    and loading such a config drops the Whisper-only keys (lang_to_id, task_to_id, no_timestamps_token_id).
    max_length caps generation at the decoder's positions, as Whisper's 448 does; without it the pipeline adds
    max_new_tokens=256, more than the decoder has.
    """
    tokenizer = WhisperTokenizer(vocab={c: i for i, c in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))},
                                 merges=[])
    tokenizer.add_special_tokens({"additional_special_tokens": SPECIAL[1:]})
    ids = {token: tokenizer.convert_tokens_to_ids(token) for token in SPECIAL}
    end, start = ids["<|endoftext|>"], ids["<|startoftranscript|>"]
    config = WhisperConfig(vocab_size=len(tokenizer), d_model=32, encoder_layers=1, decoder_layers=1,
                           encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=64,
                           decoder_ffn_dim=64, num_mel_bins=80, max_source_positions=1500, max_target_positions=16,
                           pad_token_id=end, bos_token_id=end, eos_token_id=end, decoder_start_token_id=start,
                           begin_suppress_tokens=[end], suppress_tokens=[])
    torch.manual_seed(0)   # the same random weights, hence the same decoding work, on every run
    model = WhisperForConditionalGeneration(config)
    model.generation_config = GenerationConfig(
        decoder_start_token_id=start, bos_token_id=end, eos_token_id=end, pad_token_id=end, max_length=16,
        begin_suppress_tokens=[end], suppress_tokens=[], is_multilingual=True, lang_to_id={"<|en|>": ids["<|en|>"]},
        task_to_id={"transcribe": ids["<|transcribe|>"], "translate": ids["<|translate|>"]},
        no_timestamps_token_id=ids["<|notimestamps|>"])
    model.save_pretrained(out)
    WhisperProcessor(feature_extractor=WhisperFeatureExtractor(), tokenizer=tokenizer).save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def whisper(tmp_path_factory):
    return str(build_whisper(tmp_path_factory.mktemp("whisper") / "model"))


@pytest.fixture(scope="module")
def tiny_llava(tmp_path_factory):
    texts = ["a red circle moves left", "a blue square moves right", "Describe the video."] * 20
    return str(llava.build_tiny(LLAVA, texts, 32, tmp_path_factory.mktemp("llava") / "model"))


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
