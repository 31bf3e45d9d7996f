"""Step time with the vision-feature cache (train_vlm.cache_vision) against without it, on the same model, batch and
frozen tower, and the cache's size on disk against the frames'.

Two models, each with its vision tower frozen:
- `tiny`: the default train_vlm model (tiny LLaVA, params.yaml's `train_vlm.tiny`, 32 px frames), trained in full;
- `smolvlm`: SmolVLM2-500M-Video-Instruct's architecture at its real sizes (bench/vlm_memory.py's; SigLIP-B/16 at its
  512 px), trained with LoRA: the setup the cache is for.

Each batch is `--batch` samples of one `--frames`-frame video (random pixels: time does not depend on them), encoded by
the family's real processor. `embed`'s code (stages.models.vision_cache.record / write) caches their features; then
the same model trains `--steps` steps on them, alternating a step through the tower and a step from the cache, so
that both see the same machine state; the first pair warms up and is not counted. Medians.

    python bench/vision_cache.py                      # both models
    python bench/vision_cache.py --models tiny --steps 8

Prints a table and writes bench/results/vision_cache.json (`<model>.step_speedup` = uncached / cached step time,
`<model>.cache_bytes_per_video` beside `<model>.frame_bytes_per_video`, the frames as extract's shards hold them).
"""
import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from ruamel.yaml import YAML
from safetensors.numpy import save_file

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from stages.common.console import quiet_libraries  # noqa: E402
from stages.models import vision_cache, vlm  # noqa: E402
from stages.training import finetune  # noqa: E402

COMMON = {"freeze_vision": True, "train_projector": True, "merge_lora": False, "attn_implementation": "sdpa",
          "bf16": False, "finetune": "full", "lora": {"r": 16, "alpha": 32, "dropout": 0.0, "target_modules": "auto"},
          "deepspeed": {"enabled": False, "zero_stage": 2}}
MODELS = {   # family, how it trains, frame side, frames per video and samples per batch (defaults)
    "tiny": {"family": "llava", "finetune": "full", "frame_size": 32, "frames": 4, "batch": 16},   # train_vlm's
    "smolvlm": {"family": "smolvlm", "finetune": "lora", "frame_size": 512, "frames": 8, "batch": 1},
}


def build(name: str, folder: Path) -> Path:
    if name == "smolvlm":
        import vlm_memory
        return vlm_memory.build(folder, MODELS[name]["frame_size"])
    tiny = YAML(typ="safe").load((REPO / "params.yaml").read_text())["train_vlm"]["tiny"]
    return vlm.family("llava").build_tiny(tiny, ["a red circle moves left", "a blue square moves up"] * 100,
                                          MODELS[name]["frame_size"], folder)


def measure(name: str, scratch: Path, frames: int, batch_size: int, steps: int) -> dict:
    setup = MODELS[name]
    fam, p = vlm.family(setup["family"]), {**COMMON, "finetune": setup["finetune"]}
    folder = build(name, scratch / name)
    from transformers import AutoProcessor
    processor = AutoProcessor.from_pretrained(folder)
    model = finetune.prepare(finetune.load(fam, str(folder), p), fam, p)
    side = setup["frame_size"]
    rng = np.random.default_rng(0)
    videos = [rng.integers(0, 255, (frames, side, side, 3), dtype=np.uint8) for _ in range(batch_size)]
    row = {"id": "bench", "videos": [{"num_frames": frames, "timestamps": list(np.arange(frames) / 2.0)}],
           "messages": [{"role": "user", "content": vlm.VIDEO + "\nDescribe what happens in the video."},
                        {"role": "assistant", "content": "a red circle moves left, then a blue square moves up"}]}
    batch = vlm.collate([vlm.encode(row, [video], processor, fam, 100_000) for video in videos],
                        processor.tokenizer.pad_token_id)

    # Embed: what the embed stage does, timed; the cache on disk against the frames as extract stores them
    start = time.perf_counter()
    tower = vision_cache.tower(model, fam)
    index = vision_cache.write(scratch / f"{name}-cache", vision_cache.record(model, fam, [batch]),
                               tower=vision_cache.digest(tower, fam))
    embed_seconds = time.perf_counter() - start
    save_file({"frames": videos[0]}, str(scratch / "shard.safetensors"))
    frame_bytes = (scratch / "shard.safetensors").stat().st_size
    cache = vision_cache.VisionCache(scratch / f"{name}-cache")

    # The same loss either way, at the same weights
    losses = []
    with torch.no_grad():
        for cached in (False, True):
            if cached:
                vision_cache.attach(model, fam, cache)
            losses.append(model(**batch).loss.item())
        del tower.forward

    # Train: alternate a step through the tower and one from the cache
    optimizer = torch.optim.AdamW([w for w in model.parameters() if w.requires_grad], lr=1e-5)
    times = {False: [], True: []}
    for _ in range(steps + 1):
        for cached in (False, True):
            if cached:
                vision_cache.attach(model, fam, cache)
            start = time.perf_counter()
            model(**batch).loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            times[cached].append(time.perf_counter() - start)
            if cached:
                del tower.forward
    uncached, cached = (statistics.median(times[c][1:]) for c in (False, True))
    return {"family": setup["family"], "finetune": setup["finetune"], "frame_size": side, "frames_per_video": frames,
            "batch_size": batch_size, "steps": steps, "sequence_tokens": int(batch["input_ids"].shape[1]),
            "uncached_step_seconds": round(uncached, 4), "cached_step_seconds": round(cached, 4),
            "step_speedup": round(uncached / cached, 3),
            "embed_seconds_per_video": round(embed_seconds / batch_size, 4),
            "cache_bytes_per_video": index["bytes"] // batch_size, "frame_bytes_per_video": frame_bytes,
            "cache_to_frames": round(index["bytes"] / batch_size / frame_bytes, 2),
            "frames_from_cache": cache.hits, "frames_through_tower": cache.misses,
            "loss_difference": abs(losses[0] - losses[1])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--frames", type=int, help="frames per video (default: each model's)")
    parser.add_argument("--batch", type=int, help="samples per batch (default: each model's)")
    parser.add_argument("--steps", type=int, default=4, help="timed steps each way, after one warm-up pair")
    args = parser.parse_args()
    quiet_libraries()
    torch.manual_seed(0)
    results = {}
    with tempfile.TemporaryDirectory() as scratch:
        for name in args.models:
            results[name] = measure(name, Path(scratch), args.frames or MODELS[name]["frames"],
                                    args.batch or MODELS[name]["batch"], args.steps)
    print(f"{'model':<9}{'frames':>8}{'px':>5}{'uncached s':>12}{'cached s':>10}{'speed-up':>10}{'cache/video':>13}"
          f"{'frames/video':>14}")
    for name, r in results.items():
        print(f"{name:<9}{r['frames_per_video']:>8}{r['frame_size']:>5}{r['uncached_step_seconds']:>12.3f}"
              f"{r['cached_step_seconds']:>10.3f}{r['step_speedup']:>9.2f}x"
              f"{r['cache_bytes_per_video'] / 2**20:>10.2f} MiB"
              f"{r['frame_bytes_per_video'] / 2**20:>11.2f} MiB")
    summary = {**results, "device": "cuda" if torch.cuda.is_available() else "cpu", "cores": os.cpu_count(),
               "machine": platform.machine(), "torch": torch.__version__,
               "goal": "smolvlm.step_speedup >= 2 (the second experiment on the same frames)"}
    out = REPO / "bench/results/vision_cache.json"
    previous = json.loads(out.read_text()) if out.exists() else {}
    out.write_text(json.dumps({**previous, **summary}, indent=2) + "\n")
    print(f"-> {out.relative_to(REPO)}")


if __name__ == "__main__":
    main()
