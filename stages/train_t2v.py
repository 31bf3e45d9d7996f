"""train_t2v: a text-to-video diffusion model trained on the same clips and captions, through diffusers.

`train_t2v.family` picks the family (stages/models/t2v/<family>.py): animatediff (a UNet with a motion adapter) or wan
(a video transformer with flow matching). `train_t2v.model: tiny` builds that family's tiny pipeline from its config
classes, trains its small VAE first (`vae_steps`), saves it and loads it back by path; any other value is a local
path or hub id of a diffusers pipeline and takes the same `from_pretrained` path. The text encoder and the VAE stay
frozen: each clip is encoded once into latents, each caption once into the pipeline's own prompt embeddings, and the
denoiser trains on the scheduler's target (stages/training/diffusion.py): every weight, LoRA adapters, or
AnimateDiff's motion modules only. The Trainer, its schedule, checkpoints and resume, DeepSpeed and the launchers are
the ones the other trainers use.

Clips: each train/val row's video, `num_frames` frames spread evenly over what extract stored. A video with fewer
frames, more than one video, or another frame size is left out with its reason in models/t2v/rejects.jsonl.
Output: models/t2v/{pipeline/ (the trained pipeline, diffusers layout), base/ (tiny only: the untrained twin, its
VAE trained), adapter/ (lora), rejects.jsonl, training.json}; curves in dvclive/train_t2v/.
"""
from pathlib import Path

from stages.common.console import quiet_libraries  # isort: skip  (first: quiets what libraries print on import)
import numpy as np
import torch
from peft import LoraConfig

from stages.common.files import read_jsonl, write_jsonl
from stages.common.params import load, seed_everything
from stages.data.frames import FRAMES
from stages.models import t2v
from stages.models.tiny import train_tokenizer
from stages.training import diffusion, distributed, schedule
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

MANIFEST = Path("data/manifest")
OUT = Path("models/t2v")


def build_tiny(fam, p: dict, rows: list[dict], clips: np.ndarray, seed: int, out: Path) -> Path:
    """The tiny pipeline with its VAE trained on the training clips, saved to `out`: the untrained twin."""
    tiny = p["tiny"]
    tokenizer = train_tokenizer([row["target"] for row in rows], tiny["vocab_size"])
    tokenizer.model_max_length = tiny["max_text_tokens"]
    pipe = fam.PIPELINE(**fam.build_tiny(tiny, tokenizer, clips.shape[2], clips.shape[1]))
    check_shape(fam, pipe, clips)   # before the VAE trains on clips it would misread
    losses = diffusion.train_vae(pipe, fam, clips, tiny["vae_steps"], tiny["vae_batch_size"],
                                 tiny["vae_learning_rate"], tiny["vae_foreground_weight"], seed)
    pipe.save_pretrained(out)
    print(f"train_t2v: tiny VAE, {tiny['vae_steps']} steps, reconstruction loss {losses[0]} -> {losses[-1]}")
    return out


def check_shape(fam, pipe, clips: np.ndarray) -> None:
    try:
        fam.check_shape(pipe, *clips.shape[1:4])
    except ValueError as error:
        raise SystemExit(f"train_t2v: {error}") from None


def prepare(fam, pipe, p: dict):
    """The denoiser, trainable as `finetune` says: every weight, the motion modules only, or LoRA adapters."""
    denoiser = getattr(pipe, fam.DENOISER)
    denoiser.train()
    if p["finetune"] == "lora":
        denoiser.requires_grad_(False)
        denoiser.add_adapter(LoraConfig(r=p["lora"]["r"], lora_alpha=p["lora"]["alpha"],
                                        lora_dropout=p["lora"]["dropout"], init_lora_weights="gaussian",
                                        target_modules=fam.LORA_TARGETS))
    elif p["finetune"] == "motion_only":
        if not hasattr(denoiser, "freeze_unet2d_params"):
            raise SystemExit(f"train_t2v: finetune=motion_only trains the motion modules of a UNet with a motion "
                             f"adapter; family {p['family']!r} has none")
        denoiser.freeze_unet2d_params()
    return denoiser


def save(fam, pipe, denoiser, p: dict, out: Path) -> None:
    """The trained pipeline in diffusers layout; under LoRA, the adapter too, and the pipeline with it merged in."""
    if p["finetune"] == "lora":
        denoiser.save_lora_adapter(out / "adapter")
        denoiser.fuse_lora()
        denoiser.unload_lora()
    pipe.save_pretrained(out / "pipeline")


def main() -> None:
    quiet_libraries()
    # Load
    params = load("train_t2v")
    p, seed = params["train_t2v"], params["base"]["seed"]
    distributed.launch("stages.train_t2v", p)
    seed_everything(seed)
    fam = t2v.family(p["family"])
    schedule.check("train_t2v", p, [])
    (train_rows, train_clips, train_rejects), (val_rows, val_clips, val_rejects) = (
        t2v.load_clips(read_jsonl(MANIFEST / f"{split}.jsonl"), p["num_frames"]) for split in ("train", "val"))
    if not train_rows or not val_rows:
        raise SystemExit("train_t2v: no train or val clip is usable, for example: "
                         + "; ".join(f"{r['id']} {r['reason']}" for r in (train_rejects + val_rejects)[:3]))

    with distributed.output_dir(OUT) as out:
        # Build
        base = p["model"]
        if base == "tiny":
            base = str(build_tiny(fam, p, train_rows, train_clips, seed, out / "base")
                       if distributed.is_main_process() else out / "base")
        checkpoints = checkpoint_folder("train_t2v", p, seed, [MANIFEST / "train.jsonl", MANIFEST / "val.jsonl",
                                                               FRAMES])
        args = training_arguments(p, seed, str(checkpoints), remove_unused_columns=False)
        distributed.barrier()
        pipe = t2v.load_pipeline(fam, base)
        pipe.set_progress_bar_config(disable=True)
        check_shape(fam, pipe, train_clips)
        t2v.check_captions(pipe, train_rows + val_rows)

        # Encode each clip and each caption once (the VAE and the text encoder are frozen), on this process's GPU
        # where there is one; then they leave it to the denoiser
        captions = [""] + sorted({row["target"] for row in train_rows + val_rows})   # "": the unconditional prompt
        index = {caption: i for i, caption in enumerate(captions)}
        pipe.to(diffusion.device())
        with torch.no_grad():
            embeddings = fam.text_embeddings(pipe, captions).cpu()
        datasets = [diffusion.LatentClips(diffusion.encode_clips(pipe, fam, clips), [index[r["target"]] for r in rows])
                    for rows, clips in ((train_rows, train_clips), (val_rows, val_clips))]
        pipe.to("cpu")

        # Train
        denoiser = prepare(fam, pipe, p)
        objective = diffusion.Objective(fam, denoiser, pipe.scheduler, embeddings, p["caption_dropout"])
        timer = StepTimer()
        trainer = schedule.ScoredTrainer(
            model=objective, args=args, train_dataset=datasets[0], eval_dataset=datasets[1],
            callbacks=[timer, LiveCallback("dvclive/train_t2v"), *schedule.callbacks(p)])
        ProgressBar.replace_printer(trainer, "train_t2v")
        resume = last_checkpoint(checkpoints)
        result = trainer.train(resume_from_checkpoint=resume)

        # Save
        rejects = train_rejects + val_rejects
        if distributed.is_main_process():
            save(fam, pipe, denoiser.eval(), p, out)
            write_jsonl(out / "rejects.jsonl", rejects)
        write_record(trainer, out, OUT, base, p, result, family=p["family"], rejected=len(rejects),
                     clip_shape=list(train_clips.shape[1:4]), resumed_from=resume and Path(resume).name,
                     **timer.summary())
    remove_checkpoints("train_t2v")
    if distributed.is_main_process():
        print(f"train_t2v: {result.global_step} steps, train loss {result.training_loss:.4f}, "
              f"{schedule.describe(trainer.state, trainer.args)}, {len(rejects)} clips left out -> {OUT}/")
    distributed.finish()


if __name__ == "__main__":
    main()
