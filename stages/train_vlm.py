"""train_vlm: a vision-language model that sees the decoded frames and answers in text.

`train_vlm.family` picks the model family (stages/models/vlm/<family>.py); `train_vlm.model: tiny` builds that family's
tiny model with a real processor and a tokenizer trained on our text, saves it, and loads it back by path; any other
value is a local path or hub id and takes the same `from_pretrained` path. `train_vlm.finetune` trains every weight or
LoRA adapters (stages/training/finetune.py). The loss is on the assistant answers only (stages.models.vlm.encode).
`train_vlm.distributed` runs it on many processes through torchrun, accelerate or deepspeed, and `train_vlm.deepspeed`
through DeepSpeed ZeRO (stages/training/distributed.py); DataLoader workers encode the samples, and with
`train_vlm.packing` pack each batch into rows (stages.models.vlm.collate); with `train_vlm.cache_vision` the frozen
vision tower answers from the features `embed` cached (stages/models/vision_cache.py). The schedule (epochs
or steps, evaluations, the kept weights, early stopping) is stages/training/schedule.py's. Output:
models/vlm/{model/ (full or merged) and/or adapter/, base/ (tiny only), rejects.jsonl (samples over max_length),
training.json, deepspeed.json (with DeepSpeed)}; curves in dvclive/train_vlm/."""
from pathlib import Path

from stages.common.console import quiet_libraries  # isort: skip  (first: quiets what libraries print on import)
from transformers import AutoProcessor

from stages.common.files import read_jsonl, write_jsonl
from stages.common.params import load, seed_everything
from stages.data.frames import FRAMES
from stages.models import vision_cache, vlm
from stages.training import distributed, finetune, schedule
from stages.training.trainer import (
    LiveCallback,
    ProgressBar,
    StepTimer,
    checkpoint_folder,
    last_checkpoint,
    one_storage,
    remove_checkpoints,
    training_arguments,
    write_record,
)

MANIFEST = Path("data/manifest")
CACHE = Path("data/vision_cache")
OUT = Path("models/vlm")


def main() -> None:
    quiet_libraries()
    # Load
    params = load("train_vlm")
    p, seed = params["train_vlm"], params["base"]["seed"]
    distributed.launch("stages.train_vlm", p)   # under torchrun / accelerate / deepspeed, when configured
    seed_everything(seed)
    fam = vlm.family(p["family"])
    if p["packing"]:
        vlm.check_packing(fam)
    if p["cache_vision"]:
        vision_cache.check(fam, p)
    train_rows, val_rows = read_jsonl(MANIFEST / "train.jsonl"), read_jsonl(MANIFEST / "val.jsonl")
    schedule.check("train_vlm", p, val_rows)

    with distributed.output_dir(OUT) as out:
        # Build (the main process builds the tiny model before any process joins the group, where ZeRO-3 would
        # partition it; the others wait for it below)
        base = p["model"]
        if base == "tiny":
            if distributed.is_main_process():
                vlm.build_tiny_base(fam, p, train_rows, out / "base")
            base = str(out / "base")
        # checkpoints of this very run, if a crash or a kill left some; the arguments join the process group
        checkpoints = checkpoint_folder("train_vlm", p, seed, [MANIFEST / "train.jsonl", MANIFEST / "val.jsonl",
                                                               FRAMES])
        args = training_arguments(p, seed, str(checkpoints), remove_unused_columns=False,
                                  activation_checkpointing=p["gradient_checkpointing"],
                                  activation_checkpointing_kwargs={"use_reentrant": False})
        distributed.barrier()
        processor = AutoProcessor.from_pretrained(base)
        model = finetune.prepare(finetune.load(fam, base, p), fam, p)
        cache = vision_cache.VisionCache(CACHE) if p["cache_vision"] else None
        if cache:   # the tower answers from embed's features; the model and its export are unchanged
            vision_cache.attach(model, fam, cache)

        # Keep the samples that fit max_length whole (media tokens are never cut); record the others
        rejects = vlm.over_budget(train_rows + val_rows, processor, fam, p["max_length"])
        rejected = {reject["id"] for reject in rejects}
        train_rows, val_rows = ([row for row in rows if row["id"] not in rejected] for rows in (train_rows, val_rows))
        if distributed.is_main_process():
            write_jsonl(out / "rejects.jsonl", rejects)
        if not train_rows or not val_rows:
            shortest = min(reject["tokens"] for reject in rejects)
            raise SystemExit(f"train_vlm: every train or val sample is longer than train_vlm.max_length="
                             f"{p['max_length']} tokens (the shortest has {shortest}); raise max_length or extract "
                             f"fewer frames")

        # Train (DataLoader workers read the frame shards and encode the samples ahead of the model; each evaluation
        # also scores greedy answers to a few val rows when best_metric asks for it)
        datasets = [vlm.ManifestDataset(rows, processor, fam, p["max_length"]) for rows in (train_rows, val_rows)]
        scored = schedule.scored_rows(p, val_rows)
        timer = StepTimer()
        trainer = schedule.ScoredTrainer(
            model=model, args=args, train_dataset=datasets[0], eval_dataset=datasets[1],
            data_collator=one_storage(vlm.collator(processor, model, p["packing"], p["max_length"])),
            callbacks=[timer, LiveCallback("dvclive/train_vlm"), *schedule.callbacks(p)],
            metric=p["best_metric"], rows=scored, answer=vlm.answerer(processor, fam, p["batch_size"], scored))
        ProgressBar.replace_printer(trainer, "train_vlm")
        resume = last_checkpoint(checkpoints)
        result = trainer.train(resume_from_checkpoint=resume)

        # Save
        finetune.save(trainer, processor, out, base.replace(str(out), str(OUT)), p, fam)
        write_record(trainer, out, OUT, base, p, result, family=p["family"], rejected=len(rejects),
                     resumed_from=resume and Path(resume).name, vision_cache=cache and cache.summary(),
                     **timer.summary())
    remove_checkpoints("train_vlm")
    if distributed.is_main_process():
        print(f"train_vlm: {result.global_step} steps, train loss {result.training_loss:.3f}, "
              f"{schedule.describe(trainer.state, trainer.args)}, {len(rejects)} samples over the token "
              f"budget -> {OUT}/")
    distributed.finish()


if __name__ == "__main__":
    main()
