"""Benchmark: our frame sampler against the decoders of the tools users run today, each peer installed from PyPI in
its own venv (bench/.peers/<peer>/), on the same files: N uniform frames at 224 x 224 px.

Decoders (the same frame indices for every one, where the peer takes indices):
- ours: stages.data.video.sample (PyAV, a packet index, seeks past GOPs, never decodes a frame that is neither wanted
  nor referred to, swscale on threads of its own), with a thread per core (far apart frames decoded at once);
- ours on one thread, as `extract` decodes each video when there are more videos than cores;
- torchcodec's VideoDecoder, seek_mode "exact" and "approximate", get_frames_at(indices), then resized, each on one
  thread (its default) and on FFmpeg's choice of threads (num_ffmpeg_threads=0: frame threads on every core);
- qwen-vl-utils' fetch_video (nframes=N, resized 224 x 224), with the decord reader it recommends;
- LLaMA-Factory's PyAV loop, from the installed llamafactory package (its plugin's _regularize_videos: decode
  every frame, keep the sampled ones).
torchcodec needs FFmpeg's shared libraries, which this machine lacks: the bench links the ones PyAV's wheel ships
(FFmpeg 8) under their plain names in bench/.peers/ffmpeg-libs and hands torchcodec that folder. A peer that fails
to install or to run is recorded with the reason, never skipped silently.

Each decoder, ours included, runs in a fresh process of its own for each round (a warm-up call, then one timed pass
over the videos, one at a time), and the rounds go round-robin over the decoders, so that a drift in the machine's
speed falls on every decoder alike; the median of ROUNDS rounds counts. Only the ratios mean something across
machines: `decode.<kind>.ratio_vs_fastest_peer` is the fastest peer's time divided by ours (goal: >= 1.5 on every
kind).

Training (`--part train`): our train_vlm against TRL's SFTTrainer (what the Qwen2.5-VL multi-video trainer we
replace uses) and LLaMA-Factory's trainer, each in its own venv, on the same tiny Qwen2-VL saved by path, the same
samples (in the same order for TRL: sequential sampling), the same optimizer settings (our training_arguments,
copied into SFTConfig and LLaMA-Factory's arguments) and one logged loss a step:
- the samples are a mixed set, 1-8 videos of 2-16 frames each at 32 px, as in bench/packing.py;
- TRL takes them through the collator of its vision-language recipe (the processor on each batch's chats and
  videos, labels on the assistant answer only, the end-of-turn token included), as video trainers built on it do;
- ours is train_vlm's own parts: the ManifestDataset and DataLoader workers of params.yaml, vlm.collate, padded and
  packed (`train_vlm.packing`).
TRL runs twice: with its default of no DataLoader workers, and with as many as ours (params.yaml's data_workers,
prefetch_batches). Step time is the median time between optimizer steps after a warm-up; peak memory is the larger
of the process's and its data workers' maximum RSS. `train.step_ratio_vs_fastest_peer` is our padded step time
divided by the fastest peer's (goal <= 1.0), `train.packed_speedup` the fastest peer's step time divided by ours
packed (goal >= 1.5), and `train.losses_agree` whether our loss curve follows TRL's: a mean relative difference
over the steps of at most 1 % (`loss_mean_rel_diff`, `loss_max_rel_diff` beside it). TRL computes its loss from the
log-probabilities of its own fused head (`SFTTrainer.compute_loss`), not from the model's cross-entropy: the first
steps agree to about 1e-4.
LLaMA-Factory's trainer (`run_exp`, full SFT) takes the same samples as ShareGPT rows in a dataset registry, each
video a list of frame images (PNG), through its own qwen2_vl template (our tiny model's layout) and preprocessing,
which tokenizes the set before training and shuffles it: its steps are timed like the others, its losses are not
compared.

    python bench/peers.py [--quick] [--part decode|train|all]   prints tables, writes bench/results/peers.json
"""
import argparse
import hashlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import av
import imageio_ffmpeg
import numpy as np
import transformers

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from packing import mixed_samples  # noqa: E402 (bench/packing.py, beside this script)
from safetensors.numpy import save_file  # noqa: E402
from transformers import AutoProcessor  # noqa: E402

from stages.common.files import write_json  # noqa: E402
from stages.common.params import load, seed_everything  # noqa: E402
from stages.data import packs  # noqa: E402
from stages.data.frames import INDEX, load_frames  # noqa: E402
from stages.data.video import open_video, pick_frames, probe  # noqa: E402
from stages.models import vlm  # noqa: E402
from stages.training.trainer import training_arguments  # noqa: E402

FFMPEG = imageio_ffmpeg.get_ffmpeg_exe()
PEERS_DIR = REPO / "bench/.peers"
FRAMES, SIDE, ROUNDS = 16, 224, 5
TORCH = ["torch==2.14.1", "torchvision==0.29.1"]   # the project's pins, from this machine's disk
PEERS = {   # peer -> what its venv installs
    "torchcodec": [*TORCH, "torchcodec"],
    "qwen-vl-utils": [*TORCH, "qwen-vl-utils", "decord"],
    "llamafactory": [*TORCH, "llamafactory"],
    # the same transformers as ours, so that both sides run the same model code and only the trainers differ
    "trl": [*TORCH, f"transformers=={transformers.__version__}", "trl"],
}


def encode(path: Path, seconds: float, size: str, rate: int = 30, gop: int | None = None) -> Path:
    """A test-pattern H.264 video that changes every frame; gop None keeps x264's default keyframe interval (250)."""
    subprocess.run([FFMPEG, "-y", "-loglevel", "error", "-f", "lavfi", "-i", f"testsrc2=size={size}:rate={rate}",
                    "-t", str(seconds), "-c:v", "libx264", "-preset", "veryfast", "-pix_fmt", "yuv420p",
                    *(["-g", str(gop)] if gop else []), str(path)], check=True)
    return path


def corpus(folder: Path, quick: bool) -> dict[str, list[Path]]:
    """The kinds of video of the issue's first look, plus the short clips users train on most."""
    scale = 0.2 if quick else 1
    return {
        "short clips (10 s, 360p)": [encode(folder / f"short{i}.mp4", 10, "640x360") for i in range(2 if quick else 8)],
        "60 s 720p": [encode(folder / "hd.mp4", 60 * scale, "1280x720")],
        "5 min 360p": [encode(folder / "sd.mp4", 300 * scale, "640x360")],
        "25 min 128x72": [encode(folder / "tiny_long.mp4", 1500 * scale, "128x72")],
    }


def indices_of(path: Path) -> list[int]:
    container, stream = open_video(path)
    with container:
        return pick_frames(probe(container, stream).times, FRAMES).tolist()


# Each peer's decoder, run in its own venv: reads {"videos": [[path, indices]], "rounds"} on stdin, prints
# {"seconds": [per round], "shape": [...]} or {"error": ...}.
RUNNERS = {
    "ours": """
        import os, sys
        sys.path.insert(0, REPO)
        from pathlib import Path
        from stages.data.video import sample
        def decode(path, indices, threads):   # "cores": one video on every core, as `ask` samples one
            out = sample(Path(path), {"num_frames": len(indices), "fps": 0, "frame_size": SIDE, "max_pixels": 0},
                         threads=os.cpu_count() if threads == "cores" else 1)
            assert out.indices.tolist() == indices
            return out.frames
    """,
    "torchcodec": """
        import torch
        from torchcodec.decoders import VideoDecoder
        from torchvision.transforms.v2.functional import resize
        def decode(path, indices, mode):   # "exact" or "approximate", then ":1" (its default) or ":0" (FFmpeg's choice)
            seek_mode, threads = mode.split(":")
            decoder = VideoDecoder(path, seek_mode=seek_mode, num_ffmpeg_threads=int(threads))
            frames = decoder.get_frames_at(indices=indices).data   # uint8 [n, 3, h, w]
            return resize(frames, [SIDE, SIDE], antialias=True)
    """,
    "qwen-vl-utils": """
        import os
        os.environ["FORCE_QWENVL_VIDEO_READER"] = "decord"
        from qwen_vl_utils import fetch_video
        def decode(path, indices, mode):
            return fetch_video({"type": "video", "video": path, "nframes": len(indices), "resized_height": SIDE,
                                "resized_width": SIDE})
    """,
    "llamafactory": """
        from llamafactory.data.mm_plugin import get_mm_plugin
        plugin = get_mm_plugin("qwen2_vl", image_token="<|image_pad|>", video_token="<|video_pad|>")
        def decode(path, indices, mode):
            # its own sampler: video_fps frames a second, at most video_maxlen; the fps asks for more than N, so
            # the cap gives N uniform frames, as the others decode
            out = plugin._regularize_videos([path], image_max_pixels=SIDE * SIDE, image_min_pixels=SIDE * SIDE,
                                            video_max_pixels=SIDE * SIDE, video_min_pixels=SIDE * SIDE,
                                            video_fps=1000.0, video_maxlen=len(indices))
            return out["videos"][0] if isinstance(out, dict) else out[0]
    """,
}
HARNESS = """
import json, statistics, sys, time
SIDE, REPO = {side}, {repo!r}
{runner}
job = json.load(sys.stdin)
try:
    decode(*job["videos"][0], job["mode"])   # warm-up: imports, codec initialisation
    seconds, shape = [], None
    for _ in range(job["rounds"]):
        start = time.perf_counter()
        for path, indices in job["videos"]:
            out = decode(path, indices, job["mode"])
        seconds.append(time.perf_counter() - start)
        shape = list(getattr(out, "shape", None) or [len(out)])
    print(json.dumps({{"seconds": seconds, "shape": shape}}))
except Exception as error:
    print(json.dumps({{"error": f"{{type(error).__name__}}: {{str(error)[-800:]}}"}}))
"""


def ffmpeg_libs() -> Path:
    """PyAV's bundled FFmpeg libraries under the sonames torchcodec looks for (libavutil.so.60, ...)."""
    folder = PEERS_DIR / "ffmpeg-libs"
    folder.mkdir(parents=True, exist_ok=True)
    bundled = Path(av.__file__).parent.parent / "av.libs"
    for lib in bundled.iterdir():
        name = lib.name.split("-")[0] + ".so." + lib.name.split(".so.")[1].split(".")[0]
        link = folder / name
        if not link.exists():
            link.symlink_to(lib)
    return folder


def setup(peer: str) -> dict:
    """The peer's venv, created and installed when missing: {"python": path} or {"error": the reason}."""
    venv = PEERS_DIR / peer
    python = venv / "bin/python"
    if not (venv / ".installed").exists():
        subprocess.run([sys.executable, "-m", "venv", "--clear", str(venv)], check=True)
        out = subprocess.run([str(python), "-m", "pip", "install", "-q", *PEERS[peer]], capture_output=True,
                             text=True)
        if out.returncode:
            return {"error": f"pip install {' '.join(PEERS[peer])} failed: {out.stderr.strip()[-600:]}"}
        (venv / ".installed").write_text(subprocess.run([str(python), "-m", "pip", "freeze"], capture_output=True,
                                                        text=True).stdout)
    return {"python": str(python)}


def run_peer(peer: str, python: str, videos: list, mode: str | None, rounds: int) -> dict:
    code = HARNESS.format(side=SIDE, repo=str(REPO), runner=textwrap.dedent(RUNNERS[peer]))
    bundled = Path(av.__file__).parent.parent / "av.libs"   # what the linked libraries themselves link to
    env = {**os.environ, "LD_LIBRARY_PATH": f"{ffmpeg_libs()}:{bundled}"} if peer == "torchcodec" else dict(os.environ)
    job = json.dumps({"videos": videos, "rounds": rounds, "mode": mode})
    out = subprocess.run([python, "-c", code], input=job, capture_output=True, text=True, env=env)
    lines = [line for line in out.stdout.splitlines() if line.startswith("{")]
    if not lines:
        return {"error": f"exit {out.returncode}: {out.stderr.strip()[-600:]}"}
    return json.loads(lines[-1])


# ---------------------------------------------------------------- training

TRAIN_STEPS, TRAIN_BATCH, TRAIN_WARMUP = 24, 8, 4
# Shared by both sides: times each optimizer step and keeps each logged loss.
CLOCK = """
import json, resource, sys, time
from transformers import TrainerCallback
class Clock(TrainerCallback):
    def __init__(self):
        self.marks, self.losses = [], []
    def on_step_end(self, args, state, control, **kwargs):
        self.marks.append(time.perf_counter())
    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "loss" in logs:
            self.losses.append(logs["loss"])
    def report(self):
        rss = max(resource.getrusage(who).ru_maxrss for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN))
        steps = [b - a for a, b in zip(self.marks, self.marks[1:])]
        print(json.dumps({"step_seconds": steps, "losses": self.losses, "peak_rss_mb": rss / 1024}))
clock = Clock()
job = json.load(sys.stdin)
"""
TRAIN_RUNNERS = {
    "ours": """
        import dataclasses, tempfile
        from pathlib import Path
        from transformers import AutoProcessor, Trainer
        from stages.common.console import quiet_libraries
        from stages.common.params import load, seed_everything
        from stages.models import vlm
        from stages.training import finetune
        from stages.training.trainer import training_arguments
        quiet_libraries()
        p = {**load("train_vlm")["train_vlm"], **job["params"]}
        seed_everything(0)
        fam = vlm.family("qwen2_vl")
        processor = AutoProcessor.from_pretrained(job["base"])
        model = finetune.prepare(finetune.load(fam, job["base"], p), fam, p)
        rows = json.loads(Path(job["rows"]).read_text())
        dataset = vlm.ManifestDataset(rows, processor, fam, p["max_length"], frames_dir=Path(job["frames"]))
        with tempfile.TemporaryDirectory() as scratch:
            args = dataclasses.replace(training_arguments(p, 0, scratch, remove_unused_columns=False), **job["args"])
            Trainer(model=model, args=args, train_dataset=dataset, callbacks=[clock],
                    data_collator=vlm.collator(processor, model, p["packing"], p["max_length"])).train()
        clock.report()
    """,
    "trl": """
        import tempfile
        from pathlib import Path
        import torch
        from datasets import Dataset
        from stages.data.frames import load_frames   # the packs' reader (the repository is the cwd)
        from transformers import AutoProcessor, Qwen2VLForConditionalGeneration
        from trl import SFTConfig, SFTTrainer
        torch.manual_seed(0)
        processor = AutoProcessor.from_pretrained(job["base"])
        model = Qwen2VLForConditionalGeneration.from_pretrained(job["base"])
        rows = json.loads(Path(job["rows"]).read_text())
        def chat(row, answers=True):
            messages = []
            for message in row["messages"]:
                if message["role"] == "assistant" and not answers:
                    break
                parts = []
                for index, text in enumerate(message["content"].split("<video>")):
                    if index:
                        parts.append({"type": "video"})
                    if text:
                        parts.append({"type": "text", "text": text})
                messages.append({"role": message["role"], "content": parts})
            return messages
        def collate(examples):
            # the vision-language recipe: render the chats, run the processor on the batch with its videos, and
            # label the assistant answer only (the tokens after the prompt, but the template's last newline)
            rows_ = [rows[example["index"]] for example in examples]
            frames = [load_frames(row, Path(job["frames"])) for row in rows_]
            texts = [processor.apply_chat_template(chat(row), tokenize=False) for row in rows_]
            batch = processor(text=texts, videos=[v for row in frames for v in row], padding=True,
                              return_tensors="pt", do_sample_frames=False)
            labels = torch.full_like(batch["input_ids"], -100)
            for i, (row, videos) in enumerate(zip(rows_, frames)):
                prompt = processor.apply_chat_template(chat(row, answers=False), tokenize=False,
                                                       add_generation_prompt=True)
                start = processor(text=[prompt], videos=videos, return_tensors="pt",
                                  do_sample_frames=False)["input_ids"].shape[1]
                end = int(batch["attention_mask"][i].sum()) - 1
                labels[i, start:end] = batch["input_ids"][i, start:end]
            batch["labels"] = labels
            return batch
        with tempfile.TemporaryDirectory() as scratch:
            config = SFTConfig(output_dir=scratch, **job["args"], remove_unused_columns=False,
                               dataset_kwargs={"skip_prepare_dataset": True})
            SFTTrainer(model=model, args=config, processing_class=processor, data_collator=collate, callbacks=[clock],
                       train_dataset=Dataset.from_list([{"index": i} for i in range(len(rows))])).train()
        clock.report()
    """,
    "llamafactory": """
        import tempfile
        from pathlib import Path
        import numpy as np
        from PIL import Image
        from stages.data.frames import load_frames   # the packs' reader (the repository is the cwd)
        from llamafactory.train.tuner import run_exp
        rows = json.loads(Path(job["rows"]).read_text())
        with tempfile.TemporaryDirectory() as scratch:
            data = Path(scratch)
            # its data format: ShareGPT rows in a dataset registry, each video a list of frame images;
            # its qwen2_vl template is the layout of our tiny model's (no system turn)
            samples = []
            for row in rows:
                videos = []
                for video in row["videos"]:
                    frames = load_frames({"videos": [video]}, Path(job["frames"]))[0]
                    names = []
                    for i, frame in enumerate(frames):
                        name = data / f"{video['sha256']}-{i}.png"
                        Image.fromarray(frame).save(name)
                        names.append(str(name))
                    videos.append(names)
                samples.append({"messages": row["messages"], "videos": videos})
            (data / "mixed.json").write_text(json.dumps(samples))
            (data / "dataset_info.json").write_text(json.dumps({"mixed": {
                "file_name": "mixed.json", "formatting": "sharegpt",
                "columns": {"messages": "messages", "videos": "videos"},
                "tags": {"role_tag": "role", "content_tag": "content", "user_tag": "user",
                         "assistant_tag": "assistant"}}}))
            args = {key: value for key, value in job["args"].items()
                    if key not in ("train_sampling_strategy", "use_cpu", "gradient_checkpointing")}
            run_exp({**args, "model_name_or_path": job["base"], "template": "qwen2_vl", "stage": "sft",
                     "do_train": True, "finetuning_type": "full", "dataset": "mixed", "dataset_dir": str(data),
                     "output_dir": str(data / "out"), "cutoff_len": 100000, "overwrite_output_dir": True,
                     "default_system": "", "video_fps": 1.0, "video_maxlen": 64,
                     "image_max_pixels": 32 * 32, "image_min_pixels": 32 * 32,
                     "video_max_pixels": 32 * 32, "video_min_pixels": 32 * 32,
                     "dataloader_num_workers": 0, "preprocessing_num_workers": 1},
                    callbacks=[clock])
        clock.report()
    """,
}


def mixed_set(folder: Path, count: int) -> Path:
    """bench/packing.py's mixed samples (1-8 videos x 2-16 frames, 32 px), their frames as extract shards packed in
    `folder`/frames, as extract packs them; returns the rows file."""
    (folder / "frames").mkdir(parents=True, exist_ok=True)
    rows, shards = [], []
    for row, videos in mixed_samples(count, seed=0):
        for video, frames in zip(row["videos"], videos):
            video["sha256"] = hashlib.sha256(frames.tobytes()).hexdigest()
            video["frames"] = f"{video['sha256']}.safetensors"
            shards.append(folder / "frames" / video["frames"])
            save_file({"frames": frames}, str(shards[-1]))
        rows.append(row)
    write_json(folder / "frames" / INDEX, packs.write(folder / "frames", sorted(set(shards)), 256 << 20))
    (folder / "rows.json").write_text(json.dumps(rows))
    return folder / "rows.json"


def train_job(folder: Path) -> dict:
    """The model, samples and settings both sides train with."""
    rows_file = mixed_set(folder, TRAIN_STEPS * TRAIN_BATCH)
    rows = json.loads(rows_file.read_text())
    fam = vlm.family("qwen2_vl")
    texts = [m["content"].replace(vlm.VIDEO, "") for row in rows for m in row["messages"]] * 20
    seed_everything(0)   # the same random-init model on every run of the bench
    base = fam.build_tiny({**train_vlm_params()["tiny"], "text_hidden": 256, "text_layers": 4}, texts, 32,
                          folder / "base")
    processor = AutoProcessor.from_pretrained(base)
    longest = max(len(vlm.encode(row, load_frames(row, folder / "frames"), processor, fam, 100_000)["input_ids"])
                  for row in rows)
    # a rate below train_vlm's default: at that one this wider model's loss spikes, which turns float-level
    # differences between the trainers into visible ones
    params = {"family": "qwen2_vl", "max_steps": TRAIN_STEPS, "batch_size": TRAIN_BATCH, "save_steps": 0,
              "eval_every": TRAIN_STEPS, "max_length": longest, "packing": False, "learning_rate": 2e-4}
    ours = training_arguments({**train_vlm_params(), **params}, 0, str(folder / "scratch"))
    # what both trainers share: train_vlm's optimizer and schedule, one loss logged a step, samples in order, no
    # activation checkpointing (SFTConfig's default turns it on; train_vlm's leaves it off)
    shared = {key: getattr(ours, key) for key in ("learning_rate", "weight_decay", "warmup_steps", "max_grad_norm",
                                                   "adam_beta1", "adam_beta2", "adam_epsilon", "seed", "max_steps",
                                                   "per_device_train_batch_size", "use_cpu")}
    shared |= {"lr_scheduler_type": str(ours.lr_scheduler_type.value), "logging_steps": 1, "eval_strategy": "no",
               "save_strategy": "no", "report_to": "none", "train_sampling_strategy": "sequential",
               "disable_tqdm": True, "gradient_checkpointing": False, "load_best_model_at_end": False}
    return {"base": str(base), "rows": str(rows_file), "frames": str(folder / "frames"), "params": params,
            "args": shared, "longest": longest, "params_workers": ours.dataloader_num_workers,
            "params_prefetch": ours.dataloader_prefetch_factor}


def train_vlm_params() -> dict:
    return load("train_vlm")["train_vlm"]


def run_training(name: str, python: str, job: dict) -> dict:
    code = CLOCK + textwrap.dedent(TRAIN_RUNNERS[name])
    out = subprocess.run([python, "-c", code], input=json.dumps(job), capture_output=True, text=True, cwd=REPO,
                         env={**os.environ, "PYTHONPATH": str(REPO)} if name == "ours" else dict(os.environ))
    lines = [line for line in out.stdout.splitlines() if line.startswith("{")]
    if not lines:
        return {"error": f"exit {out.returncode}: {out.stderr.strip()[-800:]}"}
    result = json.loads(lines[-1])
    result["median_step_s"] = statistics.median(result["step_seconds"][TRAIN_WARMUP:])
    return result


def training(installed: dict, repeats: int) -> dict:
    """Our padded and packed runs and each peer's, `repeats` times alternating; the median run of each."""
    with tempfile.TemporaryDirectory() as scratch:
        job = train_job(Path(scratch))
        workers = {"dataloader_num_workers": job["params_workers"], "dataloader_prefetch_factor":
                   job["params_prefetch"], "dataloader_persistent_workers": True}
        ours = {"python": sys.executable}
        setups = {   # name -> (runner, its venv, extra training arguments, extra params)
            "ours (padded)": ("ours", ours, {}, {}), "ours (packed)": ("ours", ours, {}, {"packing": True}),
            "trl": ("trl", installed["trl"], {}, {}),
            f"trl ({job['params_workers']} workers)": ("trl", installed["trl"], workers, {}),
            "llamafactory": ("llamafactory", installed["llamafactory"], {}, {})}
        runs = {name: [] for name in setups}
        for _ in range(repeats):
            for name, (runner, venv, args, params) in setups.items():
                variant = {**job, "args": {**job["args"], **args}, "params": {**job["params"], **params}}
                runs[name].append(run_training(runner, venv["python"], variant) if "python" in venv
                                  else {"error": venv["error"]})
    results = {}
    for name, attempts in runs.items():
        done = [run for run in attempts if "median_step_s" in run]
        if not done:
            results[name] = {"error": attempts[-1]["error"]}
            continue
        middle = sorted(done, key=lambda run: run["median_step_s"])[len(done) // 2]
        results[name] = {**middle, "median_step_s_per_repeat": [run["median_step_s"] for run in done]}
    return {**compare_training(results), "goals": {"step_ratio_vs_fastest_peer": "<= 1.0", "packed_speedup": ">= 1.5"},
            "setup": {"model": "tiny Qwen2-VL, 4-layer 256-wide text", "steps": TRAIN_STEPS, "batch": TRAIN_BATCH,
                      "warmup_steps_not_timed": TRAIN_WARMUP, "samples": "1-8 videos x 2-16 frames, 32 px",
                      "longest_sample_tokens": job["longest"], "repeats": repeats,
                      "ours_data_workers": job["params_workers"]},
            "trainers": results}


def compare_training(results: dict) -> dict:
    """The figures the issue names, from each trainer's median run."""
    peers = {name: r["median_step_s"] for name, r in results.items()
             if not name.startswith("ours") and "median_step_s" in r}
    fastest = min(peers, key=peers.get) if peers else None
    padded, packed = results["ours (padded)"], results["ours (packed)"]
    summary = {"fastest_peer": fastest, "step_ratio_vs_fastest_peer": None, "packed_speedup": None,
               "losses_agree": None}
    if "median_step_s" in padded and "median_step_s" in packed:
        summary["packed_vs_our_padded"] = padded["median_step_s"] / packed["median_step_s"]
    if fastest:
        summary["step_ratio_vs_fastest_peer"] = padded["median_step_s"] / peers[fastest]
        summary["packed_speedup"] = peers[fastest] / packed["median_step_s"]
    if "losses" in results.get("trl", {}):   # the peer that sees the same batches in the same order
        theirs = np.array(results["trl"]["losses"])
        relative = np.abs(np.array(padded["losses"]) - theirs) / theirs
        summary |= {"loss_mean_rel_diff": float(relative.mean()), "loss_max_rel_diff": float(relative.max()),
                    "losses_agree": bool(relative.mean() <= 0.01)}
    return summary


def decoding(installed: dict, quick: bool) -> dict:
    """Each decoder on each kind of video; prints the table."""
    decoders = [("ours", "ours", "cores"), ("ours, one thread", "ours", "one"),
                ("torchcodec exact", "torchcodec", "exact:1"), ("torchcodec exact, threads", "torchcodec", "exact:0"),
                ("torchcodec approximate", "torchcodec", "approximate:1"),
                ("torchcodec approximate, threads", "torchcodec", "approximate:0"),
                ("qwen-vl-utils", "qwen-vl-utils", None), ("llamafactory", "llamafactory", None)]
    peer_of = {name: peer for name, peer, _ in decoders}
    kinds = {}
    with tempfile.TemporaryDirectory() as scratch:
        for kind, paths in corpus(Path(scratch), quick).items():
            videos = [[str(path), indices_of(path)] for path in paths]
            results = {name: installed[peer] for name, peer, _ in decoders if "error" in installed.get(peer, {})}
            for _ in range(ROUNDS):   # round-robin: one round of each decoder in turn
                for name, peer, mode in decoders:
                    if "error" in results.get(name, {}):
                        continue
                    python = sys.executable if peer == "ours" else installed[peer]["python"]
                    one = run_peer(peer, python, videos, mode, rounds=1)
                    results[name] = one if "error" in one else {
                        "seconds": results.get(name, {}).get("seconds", []) + one["seconds"], "shape": one["shape"]}
            for result in results.values():
                if "seconds" in result:
                    result["median_s"] = statistics.median(result["seconds"])
            timed = {name: r["median_s"] for name, r in results.items() if "median_s" in r and peer_of[name] != "ours"}
            fastest = min(timed, key=timed.get) if timed else None
            kinds[kind] = {"videos": len(paths), "decoders": results, "fastest_peer": fastest,
                           "ratio_vs_fastest_peer": timed[fastest] / results["ours"]["median_s"] if fastest else None}
    print(f"{'video kind':<26}" + "".join(f"{name:>33}" for name, _, _ in decoders) + f"{'ratio':>8}")
    for kind, k in kinds.items():
        cells = [f"{k['decoders'][name]['median_s']:.3f} s" if "median_s" in k["decoders"][name] else "failed"
                 for name, _, _ in decoders]
        ratio = f"{k['ratio_vs_fastest_peer']:.2f}x" if k["ratio_vs_fastest_peer"] else "-"
        print(f"{kind:<26}" + "".join(f"{cell:>33}" for cell in cells) + f"{ratio:>8}")
    for name, _, _ in decoders:
        errors = {k["decoders"][name].get("error") for k in kinds.values()} - {None}
        for error in errors:
            print(f"{name}: {error}")
    return kinds


def print_training(train: dict) -> None:
    print(f"{'trainer':<16}{'step (ms)':>12}{'peak RSS (MB)':>15}{'first loss':>12}{'last loss':>12}")
    for name, r in train["trainers"].items():
        if "error" in r:
            print(f"{name:<16}failed: {r['error']}")
            continue
        print(f"{name:<16}{1000 * r['median_step_s']:>12.1f}{r['peak_rss_mb']:>15.0f}{r['losses'][0]:>12.4f}"
              f"{r['losses'][-1]:>12.4f}")
    if train["fastest_peer"]:
        print(f"ours / {train['fastest_peer']} step time: {train['step_ratio_vs_fastest_peer']:.2f} (goal <= 1.0); "
              f"packed speed-up over it: {train['packed_speedup']:.2f}x (goal >= 1.5); losses agree: "
              f"{train['losses_agree']}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="shorter videos, fewer clips, one training repeat")
    parser.add_argument("--part", choices=["decode", "train", "all"], default="all")
    args = parser.parse_args()
    needed = {"decode": ["torchcodec", "qwen-vl-utils", "llamafactory"], "train": ["trl", "llamafactory"]}
    installed = {peer: setup(peer) for peer in PEERS if args.part == "all" or peer in needed[args.part]}
    out = REPO / "bench/results/peers.json"
    result = json.loads(out.read_text()) if out.exists() else {}   # a part run keeps the other part's results
    if args.part in ("decode", "all"):
        result |= {"frames": FRAMES, "side": SIDE, "rounds": ROUNDS, "quick": args.quick, "pyav": av.__version__,
                   "decode": decoding(installed, args.quick)}
    if args.part in ("train", "all"):
        result["train"] = training(installed, repeats=1 if args.quick else 3)
        print_training(result["train"])
    result["cpu_count"] = os.cpu_count()
    result["peers_installed"] = result.get("peers_installed", {}) | {   # each venv's pip freeze, or why not
        peer: (Path(i["python"]).parents[1] / ".installed").read_text() if "python" in i else i["error"]
        for peer, i in installed.items()}
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"-> {out.relative_to(REPO)}")


if __name__ == "__main__":
    main()
