"""Peak memory and step time of one training setup on a SmolVLM2-500M-shaped model: full fine-tuning in float32
(the baseline: what a plain fine-tuning script does) against LoRA + gradient checkpointing + bf16 (the preset).

The model is SmolVLM2-500M-Video-Instruct's architecture at its real sizes (SmolLM2-360M text model, SigLIP-B/16 vision
tower at 512 px, pixel-shuffle 4), random init: no weights can be downloaded here, and memory and time do not depend on
the weights' values. One sample: a 24-frame video, batch 1, encoded by the real SmolVLM processor through
stages.models.vlm.encode. Each setup runs in its own process, so each peak is its own: `torch.cuda.max_memory_allocated`
on a GPU, peak resident memory (ru_maxrss, Python and libraries included) on CPU, where frames are smaller
(--frame-size) to keep the run short. A CPU without bf16 instructions (no AVX512-BF16/AMX) emulates bf16 matmuls, so
there the bf16 step time says nothing about a GPU's; the middle setup (fp32) separates what LoRA and checkpointing save.

    python bench/vlm_memory.py                 # GPU: 512 px frames; CPU: 128 px
    python bench/vlm_memory.py --frame-size 256 --steps 3

Prints a table and writes bench/results/vlm_memory.json.
"""
import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from stages.models import vlm  # noqa: E402
from stages.training import finetune  # noqa: E402

SETUPS = {   # the first is the baseline, the last the preset that the ratios are for
    "full fp32 (baseline)": {"finetune": "full", "gradient_checkpointing": False, "bf16": False},
    "lora + checkpointing, fp32": {"finetune": "lora", "gradient_checkpointing": True, "bf16": False},
    "lora + checkpointing + bf16": {"finetune": "lora", "gradient_checkpointing": True, "bf16": True},
}
COMMON = {"lora": {"r": 16, "alpha": 32, "dropout": 0.05, "target_modules": "auto"}, "freeze_vision": True,
          "train_projector": True, "merge_lora": False, "attn_implementation": "sdpa"}
# SmolVLM2-500M-Video-Instruct (config.json on the Hub): text SmolLM2-360M, vision SigLIP base patch16 at 512 px
TEXT = dict(model_type="llama", vocab_size=49280, hidden_size=960, intermediate_size=2560, num_hidden_layers=32,
            num_attention_heads=15, num_key_value_heads=5, max_position_embeddings=8192, rope_theta=100000.0,
            rms_norm_eps=1e-5, tie_word_embeddings=False)
VISION = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12, image_size=512,
              patch_size=16)
SCALE = 4


def build(folder: Path, frame_size: int) -> Path:
    """Save the 500M-shaped model and a processor for it (our own small tokenizer: ids stay within the vocab)."""
    from transformers import SmolVLMConfig, SmolVLMForConditionalGeneration

    fam = vlm.family("smolvlm")
    fam.build_tiny({"vision_hidden": 32, "vision_layers": 1, "patch_size": VISION["patch_size"], "text_hidden": 32,
                    "text_layers": 1, "heads": 2, "vocab_size": 400}, ["a red circle moves left"] * 50,
                   frame_size, folder)      # the processor of the family, sized for these frames
    processor_config = json.loads((folder / "processor_config.json").read_text())
    processor_config["image_seq_len"] = (frame_size // VISION["patch_size"]) ** 2 // SCALE ** 2
    (folder / "processor_config.json").write_text(json.dumps(processor_config))
    image_token = json.loads((folder / "config.json").read_text())["image_token_id"]
    config = SmolVLMConfig(vision_config=VISION, text_config={**TEXT, "pad_token_id": 0}, scale_factor=SCALE,
                           image_token_id=image_token)
    SmolVLMForConditionalGeneration(config).save_pretrained(folder)
    return folder


def measure(folder: Path, setup: str, frames: int, steps: int) -> dict:
    """Train `steps` steps of one setup on one sample; the peak memory and the mean time of the steps after the
    first (which allocates the optimizer state)."""
    from transformers import AutoProcessor

    fam, device = vlm.family("smolvlm"), "cuda" if torch.cuda.is_available() else "cpu"
    p = {**COMMON, **SETUPS[setup]}
    processor = AutoProcessor.from_pretrained(folder)
    model = finetune.prepare(finetune.load(fam, str(folder), p), fam, p).to(device)
    if p["gradient_checkpointing"]:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    side = processor.video_processor.max_image_size["longest_edge"]
    video = np.random.default_rng(0).integers(0, 255, (frames, side, side, 3), dtype=np.uint8)
    row = {"id": "bench", "videos": [{"num_frames": frames, "timestamps": list(np.arange(frames) / 2.0)}],
           "messages": [{"role": "user", "content": vlm.VIDEO + "\nDescribe what happens in the video."},
                        {"role": "assistant", "content": "a red circle moves left, then a blue square moves up"}]}
    batch = vlm.collate([vlm.encode(row, [video], processor, fam, 100_000)], processor.tokenizer.pad_token_id)
    batch = {key: value.to(device) for key, value in batch.items()}
    trainable = [w for w in model.parameters() if w.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-4)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        with torch.autocast(device, dtype=torch.bfloat16, enabled=p["bf16"]):
            loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    peak = (torch.cuda.max_memory_allocated() if device == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    return {"setup": setup, "device": device, "peak_gb": round(peak / 1e9, 3),
            "step_seconds": round(float(np.mean(times[1:] if len(times) > 1 else times)), 3),
            "sequence_tokens": int(batch["input_ids"].shape[1]), "loss": round(float(loss), 4),
            "trainable_parameters": sum(w.numel() for w in trainable),
            "parameters": sum(w.numel() for w in model.parameters())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--frames", type=int, default=24)
    parser.add_argument("--frame-size", type=int, default=512 if torch.cuda.is_available() else 128)
    parser.add_argument("--steps", type=int, default=3, help="the first allocates the optimizer state and is not timed")
    parser.add_argument("--setup", help=argparse.SUPPRESS)          # internal: measure one setup in this process
    parser.add_argument("--model", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.setup:
        print(json.dumps(measure(Path(args.model), args.setup, args.frames, args.steps)))
        return

    with tempfile.TemporaryDirectory() as scratch:
        folder = build(Path(scratch) / "smolvlm2-500m-shaped", args.frame_size)
        results = []
        for setup in SETUPS:
            run = subprocess.run([sys.executable, __file__, "--setup", setup, "--model", str(folder),
                                  "--frames", str(args.frames), "--steps", str(args.steps)],
                                 capture_output=True, text=True, env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
            if run.returncode:
                sys.exit(f"{setup} failed:\n{run.stderr[-3000:]}")
            results.append(json.loads(run.stdout.strip().splitlines()[-1]))
    baseline, preset = results[0], results[-1]
    summary = {"model": "SmolVLM2-500M-shaped (random init)", "frames": args.frames, "frame_size": args.frame_size,
               "batch_size": 1, "steps": args.steps, "device": baseline["device"], "cores": os.cpu_count(),
               "machine": platform.machine(), "torch": torch.__version__, "setups": results,
               "peak_memory_ratio_vs_baseline": round(preset["peak_gb"] / baseline["peak_gb"], 3),
               "step_time_ratio_vs_baseline": round(preset["step_seconds"] / baseline["step_seconds"], 3)}
    print(f"{'setup':<30}{'peak GB':>9}{'step s':>9}{'tokens':>8}{'trainable':>12}")
    for r in results:
        print(f"{r['setup']:<30}{r['peak_gb']:>9.2f}{r['step_seconds']:>9.2f}{r['sequence_tokens']:>8}"
              f"{r['trainable_parameters']:>12,}")
    print(f"peak memory ratio {summary['peak_memory_ratio_vs_baseline']}, "
          f"step time ratio {summary['step_time_ratio_vs_baseline']} ({baseline['device']}, "
          f"{args.frames} frames of {args.frame_size} px)")
    out = REPO / "bench/results/vlm_memory.json"
    out.write_text(json.dumps(summary, indent=2) + "\n")
    print(f"-> {out.relative_to(REPO)}")


if __name__ == "__main__":
    main()
