"""align_vlm: preference or reward tuning of the SFT model from train_vlm, through trl.

`align_vlm.method`:
- `none` (the default): nothing trains; evaluate and push take train_vlm's model.
- `dpo`: trl's DPOTrainer on the manifest's preference pairs (a row's last assistant turn is the chosen answer, its
  `rejected` field the other one); the reference is the SFT model.
- `grpo`: trl's GRPOTrainer: for each training prompt the model samples `num_generations` answers, `rewards` score
  them (stages/training/rewards.py), and advantages are normalised within each prompt's group; the KL to the SFT
  model is weighted by `beta`.
How trl sees our videos is stages/training/align.py's. Fine-tuning mode (full, LoRA, QLoRA), DeepSpeed, launchers,
checkpoints, the schedule and dvclive logging are train_vlm's own machinery, with this stage's params block.
Output: models/vlm_aligned/{model/ and/or adapter/, training.json (method, and the SFT model it started from),
rejects.jsonl}; curves in dvclive/align_vlm/ (DPO: rewards/margins and rewards/accuracies, the held-out preference
accuracy at each evaluation; GRPO: each reward's mean, and kl).
"""
import json
from pathlib import Path

from stages.common.files import atomic_dir, read_jsonl, write_json, write_jsonl
from stages.common.params import load, seed_everything

MANIFEST = Path("data/manifest")
SFT = Path("models/vlm")
OUT = Path("models/vlm_aligned")
LIVE = Path("dvclive/align_vlm")


def pairs_only(rows: list[dict], split: str) -> list[dict]:
    """DPO's rows: those with a rejected answer; none at all is an error that says where pairs come from."""
    pairs = [row for row in rows if "rejected" in row]
    if not pairs:
        raise SystemExit(f"align_vlm: method dpo needs preference pairs, and {MANIFEST}/{split}.jsonl has none: "
                         f"import them (sharegpt rows with chosen/rejected, or trl prompt/chosen/rejected rows) or use "
                         f"the synthetic source, which pairs every clip")
    return pairs


def method_arguments(p: dict, model_config) -> tuple[type, dict]:
    """The trl config class and its method-specific keys (`model_config`: the SFT model's, for its media tokens)."""
    from trl import DPOConfig, GRPOConfig

    from stages.training import align
    if p["method"] == "dpo":
        return DPOConfig, {"beta": p["beta"], "loss_type": p["dpo"]["loss_type"],
                           "loss_weights": p["dpo"]["loss_weights"] or None, "max_length": None}
    grpo = p["grpo"]
    return GRPOConfig, {"beta": p["beta"], "num_generations": grpo["num_generations"],
                        "temperature": grpo["temperature"], "max_completion_length": grpo["max_new_tokens"],
                        "mask_truncated_completions": grpo["mask_truncated"],
                        "reward_weights": grpo["reward_weights"] or None,
                        "generation_kwargs": {"suppress_tokens": align.media_token_ids(model_config)}}


def main() -> None:
    # Load
    params = load("align_vlm")
    p, seed = params["align_vlm"], params["base"]["seed"]
    if p["method"] == "none":   # the record evaluate and push read; dvclive's folder says why it has no curves
        with atomic_dir(OUT) as out, atomic_dir(LIVE) as live:
            write_json(out / "training.json", {"method": "none", "params": p})
            write_json(live / "metrics.json", {"method": "none"})
        print(f"align_vlm: method none, evaluate and push take {SFT}/")
        return
    train(p, seed)


def train(p: dict, seed: int) -> None:
    # (imported here, not at the top: `none`, the default, writes its record in a second, without torch or trl)
    from stages.common.console import quiet_libraries  # isort: skip  (first: quiets what libraries print on import)
    from transformers import AutoConfig, AutoProcessor

    from stages.data.frames import FRAMES
    from stages.models import vlm
    from stages.training import align, distributed, finetune, rewards, schedule
    from stages.training.trainer import (
        LiveCallback,
        ProgressBar,
        StepTimer,
        checkpoint_folder,
        last_checkpoint,
        remove_checkpoints,
        training_arguments,
        write_record,
    )

    quiet_libraries()
    distributed.launch("stages.align_vlm", p)
    seed_everything(seed)
    sft = json.loads((SFT / "training.json").read_text())
    fam, start = vlm.family(sft["family"]), SFT / "model"
    if not start.exists():
        raise SystemExit(f"align_vlm: starts from train_vlm's full model, {start}, and train_vlm saved only a LoRA "
                         f"adapter; set train_vlm.merge_lora: true")
    train_rows, val_rows = read_jsonl(MANIFEST / "train.jsonl"), read_jsonl(MANIFEST / "val.jsonl")
    if p["method"] == "dpo":
        train_rows, val_rows = pairs_only(train_rows, "train"), pairs_only(val_rows, "val")
    schedule.check("align_vlm", p, val_rows)
    if p["method"] == "grpo":
        for name in p["grpo"]["rewards"]:
            rewards.resolve(name)   # an unknown reward stops the stage before any work

    with distributed.output_dir(OUT) as out:
        # Build (the arguments join the process group when an engine launched this stage)
        checkpoints = checkpoint_folder("align_vlm", p, seed, [MANIFEST / "train.jsonl", MANIFEST / "val.jsonl",
                                                               FRAMES, SFT])
        config_class, method = method_arguments(p, AutoConfig.from_pretrained(start))
        # trl's configs default gradient_checkpointing (transformers' deprecated name) to True: None defers to ours
        args = training_arguments(p, seed, str(checkpoints), args_class=config_class, remove_unused_columns=False,
                                  gradient_checkpointing=None, activation_checkpointing=p["gradient_checkpointing"],
                                  activation_checkpointing_kwargs={"use_reentrant": False}, **method)
        distributed.barrier()
        processor = AutoProcessor.from_pretrained(start)
        model = finetune.prepare(finetune.load(fam, str(start), p), fam, p)

        # Keep the samples that fit max_length whole, both answers of a pair; record the others, a pair once (its
        # longer side)
        sides = [row for row in train_rows + val_rows for row in align.pair(row)] if p["method"] == "dpo" else \
            train_rows + val_rows
        over = sorted(vlm.over_budget(sides, processor, fam, p["max_length"]), key=lambda reject: reject["tokens"])
        rejects = list({reject["id"]: reject for reject in over}.values())
        rejected = {reject["id"] for reject in rejects}
        train_rows, val_rows = ([row for row in rows if row["id"] not in rejected] for rows in (train_rows, val_rows))
        if distributed.is_main_process():
            write_jsonl(out / "rejects.jsonl", rejects)
        if not train_rows or not val_rows:
            raise SystemExit(f"align_vlm: every train or val sample is longer than align_vlm.max_length="
                             f"{p['max_length']} tokens; raise it or extract fewer frames")

        # Train (the trainers look rows up by position in one list: the train rows, then the val rows)
        rows, scored, timer = train_rows + val_rows, schedule.scored_rows(p, val_rows), StepTimer()
        common = dict(model=model, args=args, train_dataset=align.row_dataset(train_rows),
                      eval_dataset=align.row_dataset(val_rows, start=len(train_rows)), processing_class=processor,
                      callbacks=[timer, LiveCallback(str(LIVE)), *schedule.callbacks(p)], metric=p["best_metric"],
                      rows=scored, answer=vlm.answerer(processor, fam, p["batch_size"], scored))
        if p["method"] == "dpo":
            trainer = align.VideoDPOTrainer(data_collator=align.PairCollator(rows, processor, fam, p["max_length"]),
                                            **common)
        else:
            trainer = align.VideoGRPOTrainer(reward_funcs=[rewards.RowReward(name, rows) for name in
                                                           p["grpo"]["rewards"]], prompt_rows=rows, fam=fam, **common)
        ProgressBar.replace_printer(trainer, "align_vlm")
        resume = last_checkpoint(checkpoints)
        result = trainer.train(resume_from_checkpoint=resume)

        # Save
        finetune.save(trainer, processor, out, str(start), p, fam)
        write_record(trainer, out, OUT, str(start), p, result, method=p["method"], family=sft["family"],
                     rejected=len(rejects), resumed_from=resume and Path(resume).name, **timer.summary())
    remove_checkpoints("align_vlm")
    if distributed.is_main_process():
        print(f"align_vlm: {p['method']}, {result.global_step} steps, {schedule.describe(trainer.state, trainer.args)}"
              f", {len(rejects)} samples over the token budget -> {OUT}/")
    distributed.finish()


if __name__ == "__main__":
    main()
