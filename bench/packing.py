"""Multimodal packing (`train_vlm.packing`) against padded batches: the same samples, the same model, the same
optimizer steps, on a mixed set where samples differ as real video data does (1-8 videos per sample, 2-16 frames per
video, even counts, so every family takes them).

Each batch is trained once padded (`vlm.collate`) and once packed into rows of at most the longest sample's length
(`vlm.collate(..., pack_length)`), alternating, from the same weights (an optimizer step on a copy), for `--repeats`
rounds; medians are reported. Tokens/s counts real tokens (not padding) over forward + backward + optimizer step.
Padding fraction is the share of pad positions in the batch tensors. Each packed batch's loss is checked against the
padded one's (atol 1e-4). The models load as train_vlm loads them (`vlm.load_model`): a family whose vision tower
attends by cu_seqlens (Qwen2-VL) runs it on varlen SDPA, and is also timed packed with its tower on transformers' own
sdpa loop (`varlen_tower_speedup`).

The models are the families' tiny ones with a wider text model (`--text-hidden`, `--text-layers`), so that the
language model, where packing saves work, carries a realistic share of the step; the vision tower sees the same
frames either way.

    python bench/packing.py                        # qwen2_vl, llava and smolvlm; 6 batches of 8, 3 repeats
    python bench/packing.py --families qwen2_vl --repeats 1

Prints a table and writes bench/results/packing.json.
"""
import argparse
import copy
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
from transformers import AutoProcessor

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.chdir(REPO)

from stages.common.console import quiet_libraries  # noqa: E402 (after the path set-up above)
from stages.common.params import load  # noqa: E402
from stages.models import vlm  # noqa: E402

ANSWERS = ["a red circle moves left", "the second one", "a blue square moves up then stops", "none of them"]


def mixed_samples(count: int, seed: int) -> list[tuple[dict, list[np.ndarray]]]:
    """`count` manifest-like rows with random 32 px frames: 1-8 videos each, 2-16 frames per video."""
    rng = np.random.default_rng(seed)
    samples = []
    for index in range(count):
        videos = [rng.integers(0, 255, (2 * rng.integers(1, 9), 32, 32, 3), dtype=np.uint8)
                  for _ in range(rng.integers(1, 9))]
        question = " ".join([vlm.VIDEO] * len(videos)) + "\nWhich clip shows a red circle?"
        row = {"id": f"mixed-{index}", "videos": [{"num_frames": len(v), "frames": "-"} for v in videos],
               "messages": [{"role": "user", "content": question},
                            {"role": "assistant", "content": ANSWERS[index % len(ANSWERS)]}]}
        samples.append((row, videos))
    return samples


def timed_step(model, batch: dict, vision_attention: str | None = None) -> tuple[float, float]:
    """Seconds for forward + backward + an AdamW step on a copy of `model` (so every variant starts from the same
    weights), and the loss; `vision_attention` sets the copy's vision tower's attention implementation."""
    model = copy.deepcopy(model)
    if vision_attention:
        model.set_attn_implementation({"vision_config": vision_attention})
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    start = time.perf_counter()
    loss = model(**batch).loss
    loss.backward()
    optimizer.step()
    return time.perf_counter() - start, loss.item()


def bench_family(name: str, p: dict, args) -> dict:
    fam = vlm.family(name)
    samples = mixed_samples(args.batches * args.batch_size, seed=0)
    with tempfile.TemporaryDirectory() as scratch:
        texts = [m["content"].replace(vlm.VIDEO, "") for row, _ in samples for m in row["messages"]] * 20
        base = fam.build_tiny(p, texts, 32, Path(scratch) / "base")
        processor = AutoProcessor.from_pretrained(base)
        model = vlm.load_model(fam, str(base)).train()   # as train_vlm loads it
    examples = [vlm.encode(row, videos, processor, fam, 100_000) for row, videos in samples]
    capacity = max(len(example["input_ids"]) for example in examples)
    vlm.take_packed_rows(model)
    pad = processor.tokenizer.pad_token_id
    # a family whose tower train_vlm runs on varlen SDPA (stages/models/attention.py) is also timed packed with the
    # tower on transformers' sdpa loop, which is what the varlen attention saves
    variants = {"padded": (0, None), "packed": (capacity, None)}
    if getattr(fam, "VARLEN_VISION", False):
        variants["packed, tower on the sdpa loop"] = (capacity, "sdpa")
    runs = {variant: [] for variant in variants}
    for _ in range(args.repeats):
        for start in range(0, len(examples), args.batch_size):
            chunk = examples[start:start + args.batch_size]
            tokens = sum(len(example["input_ids"]) for example in chunk)
            losses = {}
            for variant, (length, vision_attention) in variants.items():
                batch = vlm.collate(chunk, pad, pack_length=length)
                seconds, losses[variant] = timed_step(model, batch, vision_attention)
                runs[variant].append({"seconds": seconds, "tokens_per_second": tokens / seconds,
                                      "padding_fraction": 1 - tokens / batch["input_ids"].numel(),
                                      "rows": batch["input_ids"].shape[0]})
            for variant, loss in losses.items():
                if abs(losses["padded"] - loss) > 1e-4:
                    raise SystemExit(f"{name}: {variant} loss {loss} differs from padded {losses['padded']}")
    median = {variant: {key: statistics.median(run[key] for run in results) for key in results[0]}
              for variant, results in runs.items()}
    result = {"packed_speedup": median["packed"]["tokens_per_second"] / median["padded"]["tokens_per_second"],
              "losses_agree": True, "pack_length": capacity, "median": median, "runs": runs}
    if "packed, tower on the sdpa loop" in median:
        result["varlen_tower_speedup"] = (median["packed"]["tokens_per_second"]
                                          / median["packed, tower on the sdpa loop"]["tokens_per_second"])
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--families", nargs="+", default=["qwen2_vl", "llava", "smolvlm"])
    parser.add_argument("--batches", type=int, default=6)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--text-hidden", type=int, default=256)
    parser.add_argument("--text-layers", type=int, default=4)
    args = parser.parse_args()
    quiet_libraries()
    torch.manual_seed(0)

    p = {**load("train_vlm")["train_vlm"]["tiny"], "text_hidden": args.text_hidden, "text_layers": args.text_layers}
    results = {name: bench_family(name, p, args) for name in args.families}
    print(f"{'family':<12}{'padded tok/s':>14}{'packed tok/s':>14}{'speedup':>9}{'pad (padded)':>14}"
          f"{'pad (packed)':>14}{'rows':>10}")
    for name, r in results.items():
        m = r["median"]
        print(f"{name:<12}{m['padded']['tokens_per_second']:>14.0f}{m['packed']['tokens_per_second']:>14.0f}"
              f"{r['packed_speedup']:>9.2f}{m['padded']['padding_fraction']:>14.3f}"
              f"{m['packed']['padding_fraction']:>14.3f}{m['padded']['rows']:>5.0f}->{m['packed']['rows']:<4.0f}")
        if "varlen_tower_speedup" in r:
            print(f"{'':<12}packed with the tower on transformers' sdpa loop instead of varlen SDPA: "
                  f"{m['packed, tower on the sdpa loop']['tokens_per_second']:.0f} tok/s "
                  f"(varlen: {r['varlen_tower_speedup']:.2f}x)")
    result = {"families": results,
              "setup": {"batches": args.batches, "batch_size": args.batch_size, "repeats": args.repeats,
                        "videos_per_sample": "1-8", "frames_per_video": "2-16 (even)", "frame_px": 32,
                        "tiny": p, "attn_implementation": "sdpa (Qwen2-VL's tower: varlen SDPA, as train_vlm)",
                        "torch_threads": torch.get_num_threads(),
                        "cpus": os.cpu_count(), "cuda": torch.cuda.is_available(), "machine": platform.machine()}}
    out = REPO / "bench/results/packing.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"-> {out.relative_to(REPO)}")


if __name__ == "__main__":
    main()
