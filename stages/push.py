"""push: publish each trained model. `push.target: dir` writes export/<model>/ in Hugging Face Hub layout:
safetensors weights, config, tokenizer/processor, and a README.md model card that names the base model, the params
that trained it, its test metrics, and the dvc.lock hashes of the data it was trained on.
"""
import json
import shutil
from pathlib import Path

import yaml

from stages import vlm
from stages.files import atomic_dir
from stages.params import load

MODELS = Path("models")
OUT = Path("export")
LOCK = Path("dvc.lock")
TASKS = {"seq2seq": ("text2text-generation", "AutoTokenizer"), "vlm": ("image-text-to-text", "AutoProcessor")}


def lineage(stage: str) -> list[dict]:
    """The data deps of `stage` as recorded in dvc.lock: path and md5 (a `.dir` md5 for folders)."""
    if not LOCK.exists():
        raise SystemExit(f"push: {LOCK} not found; run the pipeline with `dvc repro` so the lineage is recorded")
    deps = yaml.safe_load(LOCK.read_text())["stages"][stage]["deps"]
    return [{"path": d["path"], "md5": d["md5"]} for d in deps if d["path"].startswith("data/")]


def model_card(name: str, training: dict, metrics: dict, data: list[dict]) -> str:
    task, processor_class = TASKS[name]
    model_class = vlm.family(training["family"]).MODEL_CLASS.__name__ if name == "vlm" else "AutoModelForSeq2SeqLM"
    base = training["base_model"]
    tiny = base.startswith(str(MODELS))
    front = {"library_name": "transformers", "pipeline_tag": task, "tags": ["video-language", "dvc", name],
             "model-index": [{"name": name, "results": [{"task": {"type": task}, "dataset": {
                 "name": "manifest test split", "type": "local"}, "metrics": [
                 {"type": metric, "value": value} for metric, value in metrics.get(name, {}).items()]}]}]}
    if not tiny:
        front["base_model"] = base
    base_text = (f"a tiny model built offline from its config class (random init, saved at `{base}`)" if tiny
                 else f"[`{base}`](https://huggingface.co/{base})")
    rows = "\n".join(f"| {metric} | {value} | {metrics.get(name + '_untrained', {}).get(metric, '')} |"
                     for metric, value in metrics.get(name, {}).items())
    data_rows = "\n".join(f"| `{d['path']}` | `{d['md5']}` |" for d in data)
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

## Params

```yaml
{yaml.safe_dump(training['params'], sort_keys=False).strip()}
```

## Data lineage (from dvc.lock)

| path | md5 |
|---|---|
{data_rows}
"""


def main() -> None:
    # Load
    p = load("push")["push"]
    metrics = json.loads(Path("eval/metrics.json").read_text())

    # Export
    with atomic_dir(OUT) as out:
        for name in TASKS:
            training = json.loads((MODELS / name / "training.json").read_text())
            target = out / name
            shutil.copytree(MODELS / name / "model", target)
            (target / "README.md").write_text(model_card(name, training, metrics, lineage(f"train_{name}")))
    print(f"push: {', '.join(TASKS)} -> {OUT}/ (target: {p['target']})")


if __name__ == "__main__":
    main()
