"""train_vlm: a vision-language model that sees the decoded frames and answers in text.

`train_vlm.model: tiny` builds the family's tiny model (LLaVA: CLIP vision + Llama text) with a real processor and
a tokenizer trained on our text, saves it, and loads it back by path; any other value is a local path or hub id and
takes the same `from_pretrained` path. The loss is on the assistant answers only (stages.vlm.encode).
Output: models/vlm/{model/, base/ (tiny only), training.json}; curves in dvclive/train_vlm/.
"""
import functools
import tempfile
from pathlib import Path

from transformers import AutoProcessor, Trainer

from stages import vlm
from stages.files import atomic_dir, read_jsonl
from stages.params import load, seed_everything
from stages.training import LiveCallback, save_trained, training_arguments

MANIFEST = Path("data/manifest")
OUT = Path("models/vlm")


def main() -> None:
    # Load
    params = load("train_vlm")
    p, seed = params["train_vlm"], params["base"]["seed"]
    seed_everything(seed)
    fam = vlm.family(p["family"])
    train_rows, val_rows = read_jsonl(MANIFEST / "train.jsonl"), read_jsonl(MANIFEST / "val.jsonl")

    with atomic_dir(OUT) as out:
        # Build
        base = p["model"]
        if base == "tiny":
            texts = [m["content"].replace(vlm.VIDEO, "") for row in train_rows for m in row["messages"]]
            frame_size = vlm.load_frames(train_rows[0])[0].shape[1]
            base = str(fam.build_tiny(p["tiny"], texts, frame_size, out / "base"))
        processor = AutoProcessor.from_pretrained(base)
        model = fam.MODEL_CLASS.from_pretrained(base)

        # Train
        datasets = [vlm.ManifestDataset(rows, processor, fam, p["max_length"]) for rows in (train_rows, val_rows)]
        with tempfile.TemporaryDirectory() as scratch:
            args = training_arguments(p, seed, scratch, remove_unused_columns=False)
            trainer = Trainer(
                model=model, args=args, train_dataset=datasets[0], eval_dataset=datasets[1],
                data_collator=functools.partial(vlm.collate, pad_token_id=processor.tokenizer.pad_token_id),
                callbacks=[LiveCallback("dvclive/train_vlm")])
            result = trainer.train()

        # Save
        save_trained(trainer, result, out, OUT, base, p, family=p["family"])
        processor.save_pretrained(out / "model")
    print(f"train_vlm: {result.global_step} steps, train loss {result.training_loss:.3f} -> {OUT}/")


if __name__ == "__main__":
    main()
