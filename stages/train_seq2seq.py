"""train_seq2seq: a text-only seq2seq model (NLLB / T5 / BART via AutoModelForSeq2SeqLM) that writes the caption
from the video's text metadata and the question; it never sees pixels.

`train_seq2seq.model: tiny` builds an NLLB-architecture model and a tokenizer trained on our text, saves them, and
loads them back by path; any other value is a local path or hub id and takes the same `from_pretrained` path.
`train_seq2seq.distributed` runs it on many processes through torchrun, accelerate or deepspeed, and
`train_seq2seq.deepspeed` through DeepSpeed ZeRO (stages/training/distributed.py). The schedule (epochs or steps,
evaluations, the kept weights, early stopping) is stages/training/schedule.py's.
Output: models/seq2seq/{model/, base/ (tiny only), training.json, deepspeed.json (with DeepSpeed)}; curves in
dvclive/train_seq2seq/.
"""
import functools
from pathlib import Path

from stages.common.console import quiet_libraries  # isort: skip  (first: quiets what libraries print on import)
from transformers import (
    AutoModelForSeq2SeqLM,
    AutoTokenizer,
    DataCollatorForSeq2Seq,
    Seq2SeqTrainingArguments,
)

from stages.common.files import read_jsonl
from stages.common.params import load, seed_everything
from stages.models import tiny
from stages.results.answers import greedy_answers, source_prompts
from stages.training import distributed, schedule
from stages.training.trainer import (
    LiveCallback,
    ProgressBar,
    StepTimer,
    checkpoint_folder,
    last_checkpoint,
    remove_checkpoints,
    save_model,
    training_arguments,
    write_record,
)

MANIFEST = Path("data/manifest")
OUT = Path("models/seq2seq")


def encode(rows, tokenizer, p) -> list[dict]:
    """Tokenize (source, target) pairs; a pair over the length budget is an error naming the sample, never cut."""
    examples = []
    for row in rows:
        source = tokenizer(row["source"])["input_ids"]
        target = tokenizer(text_target=row["target"])["input_ids"]
        for name, ids, limit in (("source", source, "max_source_length"), ("target", target, "max_target_length")):
            if len(ids) > p[limit]:
                raise SystemExit(f"{MANIFEST}: sample {row['id']}: {name} has {len(ids)} tokens, above "
                                 f"train_seq2seq.{limit}={p[limit]}")
        examples.append({"input_ids": source, "attention_mask": [1] * len(source), "labels": target})
    return examples


def main() -> None:
    quiet_libraries()
    # Load
    params = load("train_seq2seq")
    p, seed = params["train_seq2seq"], params["base"]["seed"]
    distributed.launch("stages.train_seq2seq", p)   # under torchrun / accelerate / deepspeed, when configured
    seed_everything(seed)
    train_rows, val_rows = read_jsonl(MANIFEST / "train.jsonl"), read_jsonl(MANIFEST / "val.jsonl")
    schedule.check("train_seq2seq", p, val_rows)

    with distributed.output_dir(OUT) as out:
        # Build (the main process builds the tiny model before any process joins the group, where ZeRO-3 would
        # partition it; the others wait for it below)
        base = p["model"]
        if base == "tiny":
            if distributed.is_main_process():
                texts = [text for row in train_rows for text in (row["source"], row["target"])]
                tiny.build_seq2seq(p["tiny"], texts, out / "base")
            base = str(out / "base")
        # checkpoints of this very run, if a crash or a kill left some; the arguments join the process group
        checkpoints = checkpoint_folder("train_seq2seq", p, seed, [MANIFEST / "train.jsonl", MANIFEST / "val.jsonl"])
        args = training_arguments(p, seed, str(checkpoints), Seq2SeqTrainingArguments)
        distributed.barrier()
        tokenizer = AutoTokenizer.from_pretrained(base)
        model = AutoModelForSeq2SeqLM.from_pretrained(base)
        # NLLB, T5 and BART average their loss over their own tokens inside forward, though forward takes **kwargs:
        # without this the Trainer multiplies that mean by the number of processes and skips the division by the
        # accumulation steps, both meant for a loss summed over tokens (transformers 5.23)
        model.accepts_loss_kwargs = False

        # Train (each evaluation also scores greedy captions of a few val rows when best_metric asks for it)
        timer = StepTimer()
        trainer = schedule.ScoredSeq2SeqTrainer(
            model=model, args=args, train_dataset=encode(train_rows, tokenizer, p),
            eval_dataset=encode(val_rows, tokenizer, p), processing_class=tokenizer,
            data_collator=DataCollatorForSeq2Seq(tokenizer, model=model),
            callbacks=[timer, LiveCallback("dvclive/train_seq2seq"), *schedule.callbacks(p)],
            metric=p["best_metric"], rows=schedule.scored_rows(p, val_rows),
            answer=lambda model, rows: greedy_answers(model, tokenizer, functools.partial(source_prompts, tokenizer),
                                                      rows, p["batch_size"], p["max_target_length"]))
        ProgressBar.replace_printer(trainer, "train_seq2seq")
        resume = last_checkpoint(checkpoints)
        result = trainer.train(resume_from_checkpoint=resume)

        # Save
        save_model(trainer, out / "model")
        write_record(trainer, out, OUT, base, p, result, resumed_from=resume and Path(resume).name, **timer.summary())
    remove_checkpoints("train_seq2seq")
    if distributed.is_main_process():
        print(f"train_seq2seq: {result.global_step} steps, train loss {result.training_loss:.3f}, "
              f"{schedule.describe(trainer.state, trainer.args)} -> {OUT}/")
    distributed.finish()


if __name__ == "__main__":
    main()
