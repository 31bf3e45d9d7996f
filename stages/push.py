"""push: publish each trained model. Always writes export/<model>/ in Hugging Face Hub layout: safetensors shards of
at most `push.max_shard_size`, config, tokenizer/processor, and a README.md model card that names the base model, the
params that trained it, its test metrics and plots (PNG, rendered offline), the git commit, and the dvc.lock hashes
of the data it was trained on.
`push.target: hf` then uploads each folder (and with `push.dataset`, the manifest and frames) as one commit per repo.

The text-to-video model goes to export/t2v/ in the diffusers layout (model_index.json and one folder per component),
which `DiffusionPipeline.from_pretrained` loads, with a card of the same lineage format.

Output: export/seq2seq/, export/vlm/, export/t2v/, export/push.json (the receipt: target, repo, commit id, content
hash, and whether anything was uploaded; a rerun with unchanged content uploads nothing).
"""
import json
import os
import shutil
import subprocess
from pathlib import Path

from stages.common.console import quiet_libraries  # isort: skip  (first: quiets what libraries print on import)
import numpy as np
import yaml
from ruamel.yaml import YAML  # as DVC reads params.yaml (YAML 1.2)
from transformers import AutoModelForSeq2SeqLM, AutoProcessor

from stages.ask import SAMPLING_FILE, sampling_record
from stages.common.files import atomic_dir, read_jsonl, write_json
from stages.common.params import PARAMS_FILE, load
from stages.models import t2v, vlm
from stages.results import hub
from stages.results.plots import render_card_plots
from stages.training.trainer import final_output, trained_path

MODELS = Path("models")
DATA = Path("data")
OUT = Path("export")
LOCK = Path("dvc.lock")
TASKS = {"seq2seq": ("text2text-generation", "AutoTokenizer"), "vlm": ("image-text-to-text", "AutoProcessor")}
T2V_STRIPS = Path("eval/t2v/strips")
T2V_METRICS = Path("eval/t2v/metrics.json")
STRIPS_ON_CARD = 4
HUB_METRICS = {"bleu": "bleu", "rouge_l": "rouge", "cider_d": "cider", "meteor": "meteor", "exact_match": "exact_match"}


def lineage(stage: str) -> list[dict]:
    """The data deps of `stage` as recorded in dvc.lock: path and md5 (a `.dir` md5 for folders)."""
    if not LOCK.exists():
        raise SystemExit(f"push: {LOCK} not found; run the pipeline with `dvc repro` so the lineage is recorded")
    deps = yaml.safe_load(LOCK.read_text())["stages"][stage]["deps"]
    return [{"path": d["path"], "md5": d["md5"]} for d in deps if d["path"].startswith("data/")]


def git_state() -> dict:
    """The commit the pipeline ran from, and whether tracked files (dvc.lock aside, which repro itself rewrites)
    differed from it."""
    def git(*args):
        return subprocess.run(["git", *args], capture_output=True, text=True, check=True).stdout.strip()
    try:
        return {"commit": git("rev-parse", "HEAD"),
                "dirty": bool(git("status", "--porcelain", "--untracked-files=no", "--", ".", ":!dvc.lock"))}
    except (OSError, subprocess.CalledProcessError):
        return {"commit": None, "dirty": None}


def export_model(name: str, output: Path, training: dict, target: Path, max_shard_size: str) -> None:
    """The trained folder of a trainer's `output`, its weights re-saved in shards of at most `max_shard_size` (a LoRA
    adapter, which is small, as it is)."""
    source = trained_path(output)
    if (source / "adapter_config.json").exists():
        shutil.copytree(source, target)
        return
    shutil.copytree(source, target, ignore=shutil.ignore_patterns("*.safetensors", "*.safetensors.index.json"))
    model = (vlm.load_model(vlm.family(training["family"]), str(source)) if name == "vlm"
             else AutoModelForSeq2SeqLM.from_pretrained(source))
    model.save_pretrained(target, max_shard_size=max_shard_size)


def record_sampling(target: Path, family: str, max_new_tokens: int, max_length: int) -> dict:
    """Write beside the exported VLM how it was fed in training (video_sampling.json: the extract params it was
    trained on, the prompt layout, evaluate's greedy token limit), which `stages.ask` and the card's snippet read;
    where the family's processor has a video processor that can take it, also set its own frame sampling to the
    same count or rate (the record says whether it took it)."""
    extract = json.loads((DATA / "frames" / "report.json").read_text())["params"]
    row = read_jsonl(DATA / "manifest" / "train.jsonl")[0]
    record = sampling_record(family, extract, row, max_new_tokens, max_length)
    processor = AutoProcessor.from_pretrained(target)
    record["video_processor"] = set_video_sampling(processor, record["sampling"])
    if record["video_processor"] == "set":
        processor.save_pretrained(target)
    write_json(target / SAMPLING_FILE, record)
    return record


def set_video_sampling(processor, sampling: dict) -> str:
    """Set the processor's own frame sampling (transformers' video path, used when a video is given whole) to
    `sampling`'s count or rate: "set" when its sampler then runs on a longer clip and, by count, keeps that many
    frames; otherwise the reason, with the processor left as it was. Which frames it picks and how it resizes stay
    its own: only stages.ask gives the very frames of training."""
    video = getattr(processor, "video_processor", None)
    if video is None:
        return "none: the family's processor takes frames as images"
    before = dict(vars(video))
    video.do_sample_frames = True
    if sampling["num_frames"]:
        video.num_frames, video.fps = sampling["num_frames"], None
    else:
        video.num_frames, video.fps = None, sampling["fps"]
        video.min_frames, video.max_frames = sampling["min_frames"], sampling["max_frames"]
    count = 4 * max(sampling["num_frames"], sampling["min_frames"], 1)   # a clip longer than what is kept, 8 fps
    clip = np.zeros((count, 32, 32, 3), np.uint8)
    try:
        out = video(videos=[clip], video_metadata=[{"fps": 8.0, "total_num_frames": count, "duration": count / 8}],
                    return_metadata=True)
        kept = len(out["video_metadata"][0].frames_indices)
    except (TypeError, ValueError) as error:
        kept, reason = None, f"unchanged: its sampler cannot take this setting ({error})"
    if kept is not None and (not sampling["num_frames"] or kept == sampling["num_frames"]):
        return "set"
    if kept is not None:
        reason = f"unchanged: its sampler kept {kept} of {count} frames, not {sampling['num_frames']}"
    vars(video).clear()
    vars(video).update(before)
    return reason


def ask_snippet(model: str) -> str:
    """The card's code that, pasted verbatim into a file, answers a question about a video file as `evaluate` did."""
    return f"""```python
# pip install "git+<the repository of this pipeline>"   (its README: "Ask the exported model")
# python ask_video.py clip.mp4 "What does the clip show?"
import sys

from stages.ask import answer

print(answer(sys.argv[1], sys.argv[2], model="{model}"))
```"""


def model_card(name: str, training: dict, metrics: dict, data: list[dict], git: dict, dataset: str | None,
               plots: list[Path], where: str = "<this folder or repo>", sampling: dict | None = None) -> str:
    task, processor_class = TASKS[name]
    model_class = vlm.family(training["family"]).MODEL_CLASS.__name__ if name == "vlm" else "AutoModelForSeq2SeqLM"
    base = training["base_model"]
    local = Path(base).exists()              # a tiny model built in models/, or a folder the user named
    scores = metrics.get(name, {})
    adapter = training["params"].get("finetune", "full") != "full" and not training["params"]["merge_lora"]
    front = {"library_name": "peft" if adapter else "transformers", "pipeline_tag": task,
             "tags": ["video-language", "dvc", name],
             "metrics": [HUB_METRICS[m] for m in scores if m in HUB_METRICS],
             "model-index": [{"name": name, "results": [{"task": {"type": task}, "dataset": {
                 "name": "manifest test split", "type": dataset or "local"}, "metrics": [
                 {"type": metric, "value": value} for metric, value in scores.items()]}]}]}
    if not local:
        front["base_model"] = base
    if dataset:
        front["datasets"] = [dataset]
    base_text = (f"[`{base}`](https://huggingface.co/{base})" if not local
                 else f"a tiny model built offline from its config class (random init, saved at `{base}`)"
                 if base.startswith(str(MODELS)) else f"the local model `{base}`")
    sft = metrics.get(f"{name}_sft")   # the model an alignment started from, when one ran
    rows = "\n".join(f"| {metric} | {value} |" + (f" {sft.get(metric, '')} |" if sft else "")
                     + f" {metrics.get(name + '_untrained', {}).get(metric, '')} |" for metric, value in scores.items())
    images = "\n\n".join(f"![{plot.stem.replace('_', ' ')}](plots/{plot.name})" for plot in plots)
    return f"""---
{yaml.safe_dump(front, sort_keys=False)}---
# {name}

{origin_text(name, training, base_text)} ({training['global_step']} steps, final training loss
{training['train_loss']:.4f}). {kept_text(training["selection"])}

```python
from transformers import {model_class}, {processor_class}
model = {model_class}.from_pretrained("{where}")
processor = {processor_class}.from_pretrained("{where}")
```
{ask_section(where, sampling) if sampling else ""}
## Test metrics

| metric | this model |{" before alignment (SFT) |" if sft else ""} untrained base |
|---|---|{"---|" if sft else ""}---|
{rows}

{images}

{params_and_lineage(training['params'], git, data)}"""


def export_t2v(target: Path, training: dict, max_shard_size: str) -> dict:
    """The trained pipeline, re-saved by its own class in shards of at most `max_shard_size`, and its card's strips.
    Returns the keyword arguments a generation needs to condition as training did (the card's snippet shows them)."""
    fam = t2v.family(training["family"])
    pipe = t2v.load_pipeline(fam, MODELS / "t2v" / "pipeline")
    pipe.save_pretrained(target, max_shard_size=max_shard_size)
    (target / "plots").mkdir()
    for strip in sorted(T2V_STRIPS.glob("*.png"))[:STRIPS_ON_CARD]:
        shutil.copy(strip, target / "plots" / strip.name)
    return fam.generation_arguments(pipe)


def t2v_card(training: dict, metrics: dict, data: list[dict], git: dict, where: str, generation: dict) -> str:
    """The text-to-video model's card: the lineage format of `model_card`, with diffusers' loading code."""
    base, num_frames, side = training["base_model"], *training["clip_shape"][:2]
    local = Path(base).exists()
    front = {"library_name": "diffusers", "pipeline_tag": "text-to-video",
             "tags": ["text-to-video", "dvc", training["family"]], **({} if local else {"base_model": base})}
    base_text = (f"[`{base}`](https://huggingface.co/{base})" if not local else
                 f"a tiny {training['family']} pipeline built offline from its config classes (random denoiser, "
                 f"its VAE trained first, saved at `{base}`)")
    def cell(model: str, metric: str) -> str:
        value = metrics.get(model, {}).get(metric)
        return "" if value is None else f"{value:.3g}"
    rows = "\n".join(f"| {metric} | {cell('t2v', metric)} | {cell('t2v_untrained', metric)} |"
                     for metric in metrics["t2v"])
    images = "\n\n".join(f"![{p.stem.replace('_', ' ')}](plots/{p.name})"
                          for p in sorted(T2V_STRIPS.glob("*.png"))[:STRIPS_ON_CARD])
    extra = "".join(f", {key}={value!r}" for key, value in generation.items())
    return f"""---
{yaml.safe_dump(front, sort_keys=False)}---
# t2v

Fine-tuned from {base_text} by the `train_t2v` stage of this DVC pipeline ({training['global_step']} steps, final
training loss {training['train_loss']:.4f}). {kept_text(training["selection"])}

```python
from diffusers import DiffusionPipeline
pipe = DiffusionPipeline.from_pretrained("{where}")
frames = pipe("a red circle moves left", num_frames={num_frames}, height={side}, width={side}{extra}).frames[0]
```

## Test metrics

Colour and direction read from clips generated for the test captions (`evaluate_t2v`), and a Fréchet distance on
8x8 frame thumbnails against the real test frames.

| metric | this model | untrained twin |
|---|---|---|
{rows}

{images}

{params_and_lineage(training['params'], git, data)}"""


def params_and_lineage(params: dict, git: dict, data: list[dict]) -> str:
    """Every card's last sections: the params that trained it, the git commit, and the data's hashes from dvc.lock."""
    commit = f"`{git['commit']}`" + (" (with uncommitted changes)" if git["dirty"] else "") if git["commit"] else "none"
    rows = "\n".join(f"| `{d['path']}` | `{d['md5']}` |" for d in data)
    return f"""## Params

```yaml
{yaml.safe_dump(params, sort_keys=False).strip()}
```

## Lineage

Git commit: {commit}. Data, with its hashes from `dvc.lock`:

| path | md5 |
|---|---|
{rows}
"""


def origin_text(name: str, training: dict, base_text: str) -> str:
    """Which stage made the weights, from what."""
    if "method" in training:
        return (f"Aligned with {training['method'].upper()} (trl) by the `align_vlm` stage of this DVC pipeline, from "
                f"the supervised model of `train_vlm` (`{training['base_model']}`)")
    return f"Fine-tuned from {base_text} by the `train_{name}` stage of this DVC pipeline"


def kept_text(selection: dict) -> str:
    """Which weights these are: the best evaluation's (and its score), or the last step's."""
    score = "" if selection["score"] is None else f", validation {selection['metric']} {selection['score']:.4g}"
    which = "the best evaluation" if selection["keep"] == "best" else "the last step"
    stopped = ", where early stopping ended the run" if selection["stopped_early"] else ""
    return f"These are the weights of {which}: step {selection['step']}{score}{stopped}."


def ask_section(where: str, sampling: dict) -> str:
    frames = (f"{sampling['sampling']['num_frames']} frames spread evenly" if sampling["sampling"]["num_frames"]
              else f"{sampling['sampling']['fps']} frames per second")
    size = (f"{sampling['sampling']['frame_size']} px square" if sampling["sampling"]["frame_size"]
            else f"at most {sampling['sampling']['max_pixels']} pixels, sides multiples of 28")
    return f"""
## Ask it about a video

It was trained on {frames} over each video, {size}, laid out as `{json.dumps(sampling['prompt'])}`
(`{SAMPLING_FILE}`). Saved as `ask_video.py`, this answers exactly as the pipeline's `evaluate` did, with the same
frame sampler, prompt and greedy decoding:

{ask_snippet(where)}
"""


def dataset_files(card: str) -> dict[str, Path | bytes]:
    files: dict[str, Path | bytes] = {"README.md": card.encode()}
    files |= {f"manifest/{path.name}": path for path in sorted((DATA / "manifest").glob("*.jsonl"))}
    files |= {f"frames/{path.name}": path for path in sorted((DATA / "frames").iterdir()) if path.is_file()}
    return files


def dataset_card(data: list[dict]) -> str:
    rows = "\n".join(f"| `{d['path']}` | `{d['md5']}` |" for d in data)
    return f"""---
tags: [video-language, dvc]
---
# Training data

`manifest/*.jsonl`: chat-format rows (manifest v1) of the train/val/test splits, with the rejected rows and their
reasons; `frames/<video sha256>.safetensors`: the extracted frames, one shard per video.

| path | md5 (dvc.lock) |
|---|---|
{rows}
"""


def evaluate_token_limit() -> int:
    """evaluate.max_new_tokens, which the export records so that it answers as evaluate did. Read, not validated:
    validating is evaluate's (its schema is no dep of push, so a new evaluate knob does not rerun push)."""
    return YAML(typ="safe").load(PARAMS_FILE.read_text())["evaluate"]["max_new_tokens"]


def hub_namespace(p: dict) -> str:
    namespace = p["namespace"] or os.environ.get("HF_USER_ID", "")
    if not namespace:
        raise SystemExit("push: push.target is hf but neither push.namespace nor the HF_USER_ID environment "
                         "variable names the Hub user or organisation to publish under")
    return namespace


def main() -> None:
    quiet_libraries()
    # Load
    p = load("push")["push"]
    max_new_tokens = evaluate_token_limit()
    metrics = json.loads(Path("eval/metrics.json").read_text())
    git = git_state()
    namespace = hub_namespace(p) if p["target"] == "hf" else None
    api = hub.client() if p["target"] == "hf" else None
    dataset_repo = f"{namespace}/{p['repo_prefix']}-data" if namespace and p["dataset"] else None
    if p["dataset"] and not namespace:
        print("push: push.dataset uploads to the Hub only (push.target: hf); the dir target leaves the data in data/")

    # Export
    with atomic_dir(OUT) as out:
        receipt, folders = {"target": p["target"], "git": git, "models": {}}, {}
        for name in TASKS:
            output = final_output(MODELS, name)   # the VLM: align_vlm's when it trained one
            training = json.loads((output / "training.json").read_text())
            target = out / name
            export_model(name, output, training, target, p["max_shard_size"])
            sampling = (record_sampling(target, training["family"], max_new_tokens, training["params"]["max_length"])
                        if name == "vlm" else None)
            where = f"{namespace}/{p['repo_prefix']}-{name}" if namespace else str(OUT / name)
            plots = render_card_plots(target / "plots")   # the card shows them; the Hub renders its own links
            stage = "align_vlm" if "method" in training else f"train_{name}"
            (target / "README.md").write_text(model_card(name, training, metrics, lineage(stage), git,
                                                         dataset_repo, plots, where, sampling))
            folders[name] = {f.relative_to(target).as_posix(): f for f in sorted(target.rglob("*")) if f.is_file()}
            receipt["models"][name] = {"path": str(OUT / name), "content_sha256": hub.content_sha256(folders[name])}
        training = json.loads((MODELS / "t2v" / "training.json").read_text())
        generation = export_t2v(out / "t2v", training, p["max_shard_size"])
        where = f"{namespace}/{p['repo_prefix']}-t2v" if namespace else str(OUT / "t2v")
        (out / "t2v" / "README.md").write_text(t2v_card(training, json.loads(T2V_METRICS.read_text()),
                                                        lineage("train_t2v"), git, where, generation))
        folders["t2v"] = {f.relative_to(out / "t2v").as_posix(): f for f in sorted((out / "t2v").rglob("*"))
                          if f.is_file()}
        receipt["models"]["t2v"] = {"path": str(OUT / "t2v"), "content_sha256": hub.content_sha256(folders["t2v"])}

        # Publish
        if api is not None:
            for name, files in folders.items():
                receipt["models"][name] |= hub.publish(
                    api, f"{namespace}/{p['repo_prefix']}-{name}", files, repo_type="model", private=p["private"],
                    title=f"push: {name} from the train_{name} stage", attempts=p["max_attempts"])
            if dataset_repo:
                receipt["dataset"] = hub.publish(
                    api, dataset_repo, dataset_files(dataset_card(lineage("train_vlm"))), repo_type="dataset",
                    private=p["private"], title="push: manifest and frames", attempts=p["max_attempts"])
        write_json(out / "push.json", receipt)

    for name, entry in receipt["models"].items():
        where = entry.get("repo", entry["path"])
        state = "" if "uploaded" not in entry else (" (uploaded)" if entry["uploaded"] else " (already there)")
        print(f"push: {name} -> {where}{state}")
    if "dataset" in receipt:
        print(f"push: data -> {receipt['dataset']['repo']}{' (uploaded)' if receipt['dataset']['uploaded'] else ''}")


if __name__ == "__main__":
    main()
