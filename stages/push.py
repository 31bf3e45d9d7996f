"""push: publish each trained model. Always writes export/<model>/ in Hugging Face Hub layout: safetensors shards of
at most `push.max_shard_size`, config, tokenizer/processor, and a README.md model card that names the base model, the
params that trained it, its test metrics and plots (PNG, rendered offline), the git commit, and the dvc.lock hashes
of the data it was trained on.
`push.target: hf` then uploads each folder (and with `push.dataset`, the manifest and frames) as one commit per repo.

Output: export/seq2seq/, export/vlm/, export/push.json (the receipt: target, repo, commit id, content hash, and
whether anything was uploaded; a rerun with unchanged content uploads nothing).
"""
import json
import os
import shutil
import subprocess
from pathlib import Path

from stages.common.console import quiet_libraries  # isort: skip  (first: quiets what libraries print on import)
import yaml
from transformers import AutoModelForSeq2SeqLM

from stages.common.files import atomic_dir, write_json
from stages.common.params import load
from stages.models import vlm
from stages.results import hub
from stages.results.plots import render_card_plots
from stages.training.trainer import trained_path

MODELS = Path("models")
DATA = Path("data")
OUT = Path("export")
LOCK = Path("dvc.lock")
TASKS = {"seq2seq": ("text2text-generation", "AutoTokenizer"), "vlm": ("image-text-to-text", "AutoProcessor")}
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


def export_model(name: str, training: dict, target: Path, max_shard_size: str) -> None:
    """The trained folder, its weights re-saved in shards of at most `max_shard_size` (a LoRA adapter, which is
    small, as it is)."""
    source = trained_path(MODELS / name)
    if (source / "adapter_config.json").exists():
        shutil.copytree(source, target)
        return
    shutil.copytree(source, target, ignore=shutil.ignore_patterns("*.safetensors", "*.safetensors.index.json"))
    model_class = vlm.family(training["family"]).MODEL_CLASS if name == "vlm" else AutoModelForSeq2SeqLM
    model_class.from_pretrained(source).save_pretrained(target, max_shard_size=max_shard_size)


def model_card(name: str, training: dict, metrics: dict, data: list[dict], git: dict, dataset: str | None,
               plots: list[Path]) -> str:
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
    rows = "\n".join(f"| {metric} | {value} | {metrics.get(name + '_untrained', {}).get(metric, '')} |"
                     for metric, value in scores.items())
    data_rows = "\n".join(f"| `{d['path']}` | `{d['md5']}` |" for d in data)
    commit = f"`{git['commit']}`" + (" (with uncommitted changes)" if git["dirty"] else "") if git["commit"] else "none"
    images = "\n\n".join(f"![{plot.stem.replace('_', ' ')}](plots/{plot.name})" for plot in plots)
    return f"""---
{yaml.safe_dump(front, sort_keys=False)}---
# {name}

Fine-tuned from {base_text} by the `train_{name}` stage of this DVC pipeline ({training['global_step']} steps,
final training loss {training['train_loss']:.4f}).

```python
from transformers import {model_class}, {processor_class}
model = {model_class}.from_pretrained("<this folder or repo>")
processor = {processor_class}.from_pretrained("<this folder or repo>")
```

## Test metrics

| metric | this model | untrained base |
|---|---|---|
{rows}

{images}

## Params

```yaml
{yaml.safe_dump(training['params'], sort_keys=False).strip()}
```

## Lineage

Git commit: {commit}. Data, with its hashes from `dvc.lock`:

| path | md5 |
|---|---|
{data_rows}
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
            training = json.loads((MODELS / name / "training.json").read_text())
            target = out / name
            export_model(name, training, target, p["max_shard_size"])
            plots = render_card_plots(target / "plots")   # the card shows them; the Hub renders its own links
            (target / "README.md").write_text(
                model_card(name, training, metrics, lineage(f"train_{name}"), git, dataset_repo, plots))
            folders[name] = {f.relative_to(target).as_posix(): f for f in sorted(target.rglob("*")) if f.is_file()}
            receipt["models"][name] = {"path": str(OUT / name), "content_sha256": hub.content_sha256(folders[name])}

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
