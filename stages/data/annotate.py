"""Optional annotations `extract` adds to each video: a transcript of its audio and a caption of its frames.

Both go through transformers pipelines, loaded by name or path, so a hub checkpoint (openai/whisper-small,
HuggingFaceTB/SmolVLM2-..., llava-hf/...) runs exactly the code the tiny test models run. Each factory loads its
pipeline once and returns a callable that `extract` reuses for every video.
"""
import numpy as np
import torch
from PIL import Image
from transformers import pipeline

from stages.data.video import AUDIO_RATE  # the rate of the audio `extract` hands over (Whisper's)

CHUNK_SECONDS = 30       # Whisper's window: longer audio goes in as overlapping 30 s chunks, stitched back together


def transcriber(model: str):
    """A callable: mono float32 audio at 16 kHz -> its transcript (str). Decoding follows the model's generation
    config (Whisper: language detection, then transcription), else the pipeline's defaults (5 beams)."""
    asr = _load("automatic-speech-recognition", model)

    def transcribe(audio: np.ndarray) -> str:
        # the rate goes with the samples: a model wanting another one gets them resampled (needs torchaudio);
        # ignore_warning silences the note that chunking seq2seq models is experimental: we chunk deliberately
        result = asr({"raw": np.asarray(audio, dtype=np.float32), "sampling_rate": AUDIO_RATE},
                     chunk_length_s=CHUNK_SECONDS, ignore_warning=True)
        return result["text"].strip()

    return transcribe


def captioner(model: str, prompt: str, max_new_tokens: int):
    """A callable: a video's frames (uint8 [h, w, 3] arrays) -> a caption (str), the frames going in as images of
    one user turn followed by `prompt`, decoded greedily."""
    vlm = _load("image-text-to-text", model)

    def caption(frames: list[np.ndarray]) -> str:
        content = [{"type": "image", "image": Image.fromarray(np.asarray(frame, dtype=np.uint8))} for frame in frames]
        messages = [{"role": "user", "content": content + [{"type": "text", "text": prompt}]}]
        result = vlm(text=messages, return_full_text=False,
                     generate_kwargs={"max_new_tokens": max_new_tokens, "do_sample": False, "num_beams": 1})
        return result[0]["generated_text"].strip()

    return caption


def _load(task: str, model: str):
    """The pipeline for `task` from a hub id or a local folder, on the first GPU when there is one.

    A model is data, never code: weights load from safetensors only (a pickled .bin can run code when unpickled),
    and a checkpoint that ships its own modeling code is refused rather than run (trust_remote_code=False)."""
    device = "cuda:0" if torch.cuda.is_available() else "cpu"
    try:
        return pipeline(task, model=model, device=device, trust_remote_code=False,
                        model_kwargs={"use_safetensors": True})
    # OSError: e.g. a path that is not there, reported as a bad hub id or a failed download; ValueError: the pipeline
    # tried every model class and each refused (no model.safetensors, or code it will not run)
    except (OSError, ValueError) as error:
        raise OSError(f"could not load the {task} model {model!r}: {error}") from error
