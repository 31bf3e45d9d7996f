"""Plain helpers and constants shared by several test modules; the shared fixtures are in conftest.py.

Test modules import from here, never from each other, so that each test module holds only its own tests.
"""
import contextlib
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import imageio_ffmpeg
import numpy as np
from ruamel.yaml import YAML

from stages.common.files import read_jsonl, write_json, write_jsonl
from stages.data import packs
from stages.data.formats import VIDEO

REPO = Path(__file__).resolve().parents[1]

# ---------------------------------------------------------------- workspaces

# Small enough for seconds-long tests, big enough to cover every split and attribute value.
SMALL = {
    "collect": {"colors": ["red", "blue"], "shapes": ["circle", "square"], "directions": ["left", "right"],
                "clips_per_combo": 3, "test_fraction": 0.25, "val_fraction": 0.25},
    "train_seq2seq": {"max_steps": 8, "batch_size": 4},
    "train_vlm": {"max_steps": 8, "batch_size": 4},
    "evaluate": {"batch_size": 8, "max_new_tokens": 8},
    "train_t2v": {"max_steps": 8, "batch_size": 4, "eval_every": 4, "save_steps": 4,
                  "tiny": {**YAML().load((REPO / "params.yaml").read_text())["train_t2v"]["tiny"], "vae_steps": 20}},
    "evaluate_t2v": {"samples_per_caption": 1, "steps": 2, "batch_size": 8},
}


def write_params(folder: Path, overrides: dict) -> None:
    """params.yaml of the repository with `overrides` merged in, block by block."""
    yaml = YAML()
    params = yaml.load((REPO / "params.yaml").read_text())
    for block, values in overrides.items():
        params[block].update(values)
    with open(folder / "params.yaml", "w") as f:
        yaml.dump(params, f)


@contextlib.contextmanager
def inside(folder: Path):
    """`folder` as the working directory for the duration, as `dvc repro` runs a stage in the repository."""
    previous = Path.cwd()
    os.chdir(folder)
    try:
        yield folder
    finally:
        os.chdir(previous)


# ---------------------------------------------------------------- videos

FFMPEG = imageio_ffmpeg.get_ffmpeg_exe()


def ffmpeg(*args: str) -> None:
    """Run the ffmpeg that imageio-ffmpeg ships, overwriting outputs, quiet unless it fails."""
    subprocess.run([FFMPEG, "-y", "-hide_banner", "-loglevel", "error", *args], check=True)


def make_video(path, seconds=2, size="64x48", rate=8, codec="libx264", extra=(), source="testsrc2="):
    """A real encoded video from an ffmpeg source filter (by default a test pattern that changes every frame)."""
    ffmpeg("-f", "lavfi", "-i", f"{source}size={size}:rate={rate}", "-t", str(seconds), "-c:v", codec, *extra,
           str(path))
    return path


def add_collected(workspace, files: list[Path]) -> list[str]:
    """`files` stored as collect stores videos, in a pack (of their own) of data/raw/videos/ and in its index; their
    names as samples.jsonl gives them."""
    folder = workspace / "data/raw/videos"
    index = packs.read_index(folder) | packs.write_pack(folder, f"added-{files[0].name}.tar", files)
    write_json(folder / packs.INDEX, index)
    return [f"videos/{path.name}" for path in files]


def add_hanging(workspace, name: str) -> str:
    """A collected file whose pack is a named pipe nobody writes: opening it blocks in the kernel, out of Python's
    reach, as a hung decoder would; its name as samples.jsonl gives it."""
    folder = workspace / "data/raw/videos"
    os.mkfifo(folder / f"{name}.fifo")
    write_json(folder / packs.INDEX, {**packs.read_index(folder), name: {"pack": f"{name}.fifo", "offset": 0,
                                                                        "length": 4096}})
    return f"videos/{name}"


def add_broken_video(workspace, name="f" * 64 + ".mp4"):
    """A collected sample whose video file is not a video; returns that video's path as samples.jsonl names it."""
    with tempfile.TemporaryDirectory() as scratch:
        (Path(scratch) / name).write_bytes(b"not a video")
        add_collected(workspace, [Path(scratch) / name])
    samples = read_jsonl(workspace / "data/raw/samples.jsonl")
    broken = {**samples[0], "id": "broken-0", "videos": [f"videos/{name}"]}
    write_jsonl(workspace / "data/raw/samples.jsonl", samples + [broken])
    return f"videos/{name}"


# ---------------------------------------------------------------- tiny models and their inputs

# The architecture of the tiny VLMs the unit tests build (any family), and of the tiny LLaVA captioner.
TINY_VLM = {"vision_hidden": 32, "vision_layers": 1, "patch_size": 8, "text_hidden": 32, "text_layers": 1,
            "heads": 2, "vocab_size": 300}

WHISPER_SPECIAL = ["<|endoftext|>", "<|startoftranscript|>", "<|en|>", "<|translate|>", "<|transcribe|>",
                   "<|startoflm|>", "<|startofprev|>", "<|nocaptions|>",
                   "<|notimestamps|>"]   # Whisper's order: <|notimestamps|> last


def row_with(turns, videos=1, frames=4):
    """A manifest row with the given (role, text) turns and `videos` videos of `frames` frames each."""
    messages = [{"role": role, "content": text} for role, text in turns]
    return {"id": "t", "videos": [{"num_frames": frames, "frames": "x"}] * videos, "messages": messages}


def frames(videos=1, count=4):
    """Random 32 x 32 RGB frames, `count` per video, the same on every call."""
    return [np.random.default_rng(i).integers(0, 255, (count, 32, 32, 3), dtype=np.uint8) for i in range(videos)]


def build_whisper(out):
    """A random-init Whisper (1 + 1 layers, width 32) with the real feature extractor and a byte-level tokenizer
    (the 256 byte symbols, no merges, plus Whisper's special tokens), saved to `out`.

    The generation config mirrors a multilingual hub checkpoint's (language detection among lang_to_id, then
    <|notimestamps|>). It is built afresh: the one the model derives from its config is flagged `_from_model_config`,
    and loading such a config drops the Whisper-only keys (lang_to_id, task_to_id, no_timestamps_token_id).
    max_length caps generation at the decoder's positions, as Whisper's 448 does; without it the pipeline adds
    max_new_tokens=256, more than the decoder has.
    """
    # imported here: conftest imports this module, and every test run need not load torch and transformers
    import torch
    from tokenizers import pre_tokenizers
    from transformers import (
        GenerationConfig,
        WhisperConfig,
        WhisperFeatureExtractor,
        WhisperForConditionalGeneration,
        WhisperProcessor,
        WhisperTokenizer,
    )

    tokenizer = WhisperTokenizer(vocab={c: i for i, c in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))},
                                 merges=[])
    tokenizer.add_special_tokens({"additional_special_tokens": WHISPER_SPECIAL[1:]})
    ids = {token: tokenizer.convert_tokens_to_ids(token) for token in WHISPER_SPECIAL}
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


# ---------------------------------------------------------------- training runs

def read_curve(path):
    """A dvclive .tsv plot as (step, value) pairs."""
    lines = path.read_text().splitlines()[1:]
    return [(int(step), float(value)) for step, value in (line.split("\t") for line in lines)]


def kill_after_checkpoint(stage: str, workspace: Path, after: int = 0) -> int:
    """Run `python -m stages.<stage>` in `workspace`, kill -9 it (and every process it started) once it has saved a
    complete checkpoint past step `after`, and return that checkpoint's step."""
    process = subprocess.Popen([sys.executable, "-m", f"stages.{stage}"], cwd=workspace,
                               env={**os.environ, "PYTHONPATH": str(REPO)}, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL, start_new_session=True)
    saved = wait_for_checkpoint(process, workspace / "checkpoints" / stage, after=after)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    return saved


def wait_for_checkpoint(process, folder: Path, timeout: float = 120, after: int = 0) -> int:
    """The step of the first complete checkpoint past step `after` (trainer_state.json is written last)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        steps = [int(state.parent.name.removeprefix("checkpoint-"))
                 for state in folder.glob("*/checkpoint-*/trainer_state.json")]
        if any(step > after for step in steps):
            return min(step for step in steps if step > after)
        assert process.poll() is None, "training ended before it saved a checkpoint"
        time.sleep(0.05)
    raise AssertionError(f"no checkpoint in {folder} after {timeout} s")


# ---------------------------------------------------------------- the real `dvc` CLI in a copy of the repository

# The venv's bin first, so that `dvc` and the `python` of dvc.yaml's commands are this environment's.
ENV = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
       "DVC_NO_ANALYTICS": "1"}


def copy_repository(target: Path) -> Path:
    """A fresh git repository with this working tree's tracked and untracked-but-not-ignored files, committed."""
    listed = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=REPO, check=True,
                            capture_output=True, text=True).stdout.split("\0")
    for name in filter(None, listed):
        if (REPO / name).is_file():
            (target / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, target / name)
    git(target, "init", "-q")
    git(target, "add", "-A")
    git(target, "commit", "-qm", "copy")
    return target


def git(repo: Path, *args: str) -> None:
    """`git` in `repo`, with an author of its own (the machine may have none configured)."""
    subprocess.run(["git", "-c", "user.name=test", "-c", "user.email=test@localhost", *args], cwd=repo, check=True)


def dvc(repo: Path, *args: str, env: dict | None = None) -> str:
    """`dvc` in `repo`, which must succeed; what it printed."""
    result = subprocess.run(["dvc", *args], cwd=repo, env=env or ENV, capture_output=True, text=True)
    assert result.returncode == 0, f"dvc {' '.join(args)} failed:\n{result.stdout}\n{result.stderr}"
    return result.stdout + result.stderr


def ran(output: str) -> set[str]:
    """The stages that `dvc` output says it ran (not those it restored from the run cache)."""
    return set(re.findall(r"Running stage '([a-z_0-9]+)'", output))


def reset_params(repo: Path) -> None:
    """params.yaml of the repository copy back to its committed version.

    `dvc exp run -S` and direct edits leave their params in the workspace, which the e2e tests share: without this,
    a test would run on the family, finetune mode or push target that an earlier test chose.
    """
    git(repo, "checkout", "--", "params.yaml")


def exp_run(repo: Path, *settings: str, options: tuple[str, ...] = (), env: dict | None = None) -> str:
    """`dvc exp run` with `settings` ("key=value", each passed as -S) on top of the committed params.yaml and
    nothing else; `options` go before them (e.g. --queue, or a target stage)."""
    reset_params(repo)
    return dvc(repo, "exp", "run", *options, *(arg for setting in settings for arg in ("-S", setting)), env=env)


def committed(path: str) -> str:
    """The text of `path` as committed at HEAD of this repository: the pin, whatever a local `make repro` has since
    written over the working-tree file."""
    return subprocess.run(["git", "show", f"HEAD:{path}"], cwd=REPO, check=True, capture_output=True,
                          text=True).stdout


def video_file(workspace: Path, row: dict) -> Path:
    """The collected file of a manifest row's first video, copied out of its pack (as a user's own file would be
    given to a tool)."""
    folder = workspace / "data/raw/videos"
    index = packs.read_index(folder)
    name = next(name for name in index if name.startswith(row["videos"][0]["sha256"] + "."))
    path = Path(tempfile.gettempdir()) / "collected" / name
    if not path.exists():
        path.parent.mkdir(exist_ok=True)
        path.with_suffix(".partial").write_bytes(packs.read(folder, index[name]))
        os.replace(path.with_suffix(".partial"), path)
    return path


def question_of(row: dict) -> str:
    """A manifest row's first user turn without its video placeholder."""
    return row["messages"][0]["content"].replace(VIDEO, "").strip()


def card_snippet(card: str) -> str:
    """The Python block of a model card's "Ask it about a video" section, as a user would copy it."""
    return re.search(r"## Ask it about a video\n.*?```python\n(.*?)```", card, re.S).group(1)


def run_card_snippet(workspace: Path, export: Path, scratch: Path) -> tuple[str, str]:
    """Run the snippet of `export`'s model card as a user would (PYTHONPATH standing in for `pip install` of this
    repository) on the file of the workspace's first test video; return what it printed and the prediction
    evaluate wrote for that video."""
    (scratch / "ask_video.py").write_text(card_snippet((export / "README.md").read_text()))
    predictions = {p["id"]: p["prediction"] for p in read_jsonl(workspace / "eval/predictions.jsonl")
                   if p["model"] == "vlm"}
    row = read_jsonl(workspace / "data/manifest/test.jsonl")[0]
    result = subprocess.run([sys.executable, str(scratch / "ask_video.py"), str(video_file(workspace, row)),
                             question_of(row)], cwd=workspace,
                            env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    return result.stdout.strip(), predictions[row["id"]]
