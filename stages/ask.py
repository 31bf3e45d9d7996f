"""ask: answer a question about any video file with an exported vision-language model, as `evaluate` answered the test
split: the frames sampled by `extract`'s own sampler with the settings the model was trained on, the prompt laid out
as the training rows were, greedy decoding with evaluate's token limit. `push` writes what that takes beside the
model (video_sampling.json); the answer streams to stdout as it is generated, and nothing else goes there.

    python -m stages.ask VIDEO "question" [--model export/vlm]      # or any export folder, or a Hub repo id

`answer()` is the same thing as a function: the model card's snippet calls it (installed with
`pip install git+<this repository>`).
"""
import argparse
import json
import os
import sys
from pathlib import Path

SAMPLING_FILE = "video_sampling.json"
# the extract params that decide which frames a video gives and at what size (stages.data.video.sample)
SAMPLING_KEYS = ("num_frames", "fps", "min_frames", "max_frames", "frame_size", "max_pixels", "min_pixels")
VIDEO = "<video>"              # stages.data.formats.VIDEO, the placeholder of one video in a user turn
QUESTION = "{question}"


class TooLong(ValueError):
    """A prompt longer than the training's max_length: refused, as train_vlm refuses such a sample."""


def sampling_record(family: str, extract_params: dict, row: dict, max_new_tokens: int, max_length: int) -> dict:
    """What an export must carry to answer as `evaluate` did: the family, the frame sampling, the prompt layout of the
    training rows (the turns before the first answer, the question's text replaced by "{question}"), the greedy
    token limit, and the longest sample it was trained on (train_vlm.max_length)."""
    turns = []
    for message in row["messages"]:
        if message["role"] == "assistant":
            break
        turns.append(dict(message))
    question = turns[-1]["content"].replace(VIDEO, "").strip()
    turns[-1]["content"] = turns[-1]["content"].replace(question, QUESTION)
    return {"family": family, "sampler": "stages.data.video.sample",
            "sampling": {key: extract_params[key] for key in SAMPLING_KEYS}, "prompt": turns,
            "max_new_tokens": max_new_tokens, "max_length": max_length}


def model_folder(model: str) -> Path:
    """A local export folder as it is; a Hub repo id downloaded (or found in the Hub cache)."""
    if Path(model).is_dir():
        return Path(model)
    from huggingface_hub import snapshot_download
    return Path(snapshot_download(model))


def load(model: str):
    """(record, family module, processor, model) of an export."""
    from transformers import AutoProcessor

    from stages.models import vlm

    folder = model_folder(model)
    record = json.loads((folder / SAMPLING_FILE).read_text())
    fam = vlm.family(record["family"])
    return record, fam, AutoProcessor.from_pretrained(folder), vlm.load_model(fam, str(folder)).eval()


def sample_video(video, record: dict):
    """The video's frames as `extract` sampled the training videos (stages.data.video.sample, PyAV)."""
    from stages.data.video import sample
    return sample(Path(video), record["sampling"], threads=os.cpu_count())   # one video: every core on it


def prompt(record: dict, question: str, sampled, processor, fam) -> dict:
    """Model inputs for one question about one sampled video, laid out as the training rows were."""
    from stages.models import vlm

    times = [round(t, 4) for t in sampled.timestamps.tolist()]   # as extract writes them into the manifest
    messages = [{**turn, "content": turn["content"].replace(QUESTION, question)} for turn in record["prompt"]]
    row = {"id": "ask", "messages": messages, "videos": [{"num_frames": len(sampled.frames), "timestamps": times}]}
    inputs = vlm.prompt_inputs([row], [[sampled.frames]], processor, fam)
    tokens = inputs["input_ids"].shape[1]
    if tokens > record["max_length"]:
        raise TooLong(f"the video and question make {tokens} tokens, above the {record['max_length']} "
                      f"(train_vlm.max_length) the model was trained on; ask about a shorter video")
    return inputs


def answer(video: str, question: str, model: str = "export/vlm", stream: bool = False, loaded=None) -> str:
    """The model's greedy answer to `question` about the video file `video`; with `stream`, also printed to stdout
    token by token. Raises stages.data.video.VideoError for a file that cannot be decoded."""
    import torch
    from transformers import TextStreamer

    record, fam, processor, net = loaded or load(model)
    inputs = prompt(record, question, sample_video(video, record), processor, fam)
    streamer = TextStreamer(processor.tokenizer, skip_prompt=True, skip_special_tokens=True) if stream else None
    with torch.inference_mode():
        output = net.generate(**inputs, do_sample=False, num_beams=1, max_new_tokens=record["max_new_tokens"],
                              streamer=streamer)
    return processor.batch_decode(output[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)[0].strip()


def main(argv: list[str] | None = None) -> None:
    from stages.common.console import quiet_libraries
    quiet_libraries()
    from stages.data.video import VideoError

    parser = argparse.ArgumentParser(prog="python -m stages.ask", description=__doc__.split("\n\n")[0])
    parser.add_argument("video", help="a video file (any codec FFmpeg decodes)")
    parser.add_argument("question")
    parser.add_argument("--model", default="export/vlm",
                        help="an export folder or a Hub repo id (default: %(default)s)")
    args = parser.parse_args(argv)
    if not Path(args.video).exists():
        raise SystemExit(f"ask: {args.video}: no such file")
    loaded = load(args.model)
    try:
        answer(args.video, args.question, stream=True, loaded=loaded)
    except VideoError as error:
        raise SystemExit(f"ask: cannot read the video {args.video}: {error}") from None
    except TooLong as error:
        raise SystemExit(f"ask: {error}") from None
    sys.stdout.flush()


if __name__ == "__main__":
    main()
