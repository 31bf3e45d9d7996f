"""embed: the vision-feature cache that train_vlm reads when `train_vlm.cache_vision` is on (with freeze_vision).

It shows every train and val sample's frames, through the same processor, to the same frozen vision tower train_vlm
will load (the tiny model is built here the same way, from the same seed), and stores what the tower returns for each
frame, before the projector (stages/models/vision_cache.py). A second experiment on the same frames, processor and
tower then reruns nothing here and skips the tower at every step. With the cache off the stage writes an index that
says so, and nothing else. Output: data/vision_cache/{index.json, pack-*.safetensors}."""
import shutil
import sys
from pathlib import Path

from stages.common.files import atomic_dir, read_jsonl, write_json
from stages.common.params import load, seed_everything
from stages.data.frames import locate

MANIFEST = Path("data/manifest")
OUT = Path("data/vision_cache")
BATCH = 16    # samples per forward: how fast, not what, it computes (so not a param that reruns the stage)


def main() -> None:
    # Load
    params = load("train_vlm")
    p, seed = params["train_vlm"], params["base"]["seed"]
    with atomic_dir(OUT) as out:
        if not p["cache_vision"]:   # vision_cache.INDEX, written here: that module would cost a torch import
            write_json(out / "index.json", {"enabled": False, "reason": "train_vlm.cache_vision is false"})
            print(f"embed: train_vlm.cache_vision is false, nothing cached -> {OUT}/")
            return
        index = build(p, seed, read_jsonl(MANIFEST / "train.jsonl"), read_jsonl(MANIFEST / "val.jsonl"), out)
    print(f"embed: {index['frames']} frames' vision features ({index['bytes'] / 2**20:.1f} MiB, "
          f"{index['bytes'] / index['frame_bytes']:.1f}x their frame shards) in {len(index['packs'])} packs -> {OUT}/")


def build(p: dict, seed: int, train_rows: list[dict], val_rows: list[dict], out: Path) -> dict:
    # (imported here, not at the top: only a cache that is on needs torch and transformers)
    from tqdm import tqdm
    from transformers import AutoProcessor

    from stages.common.console import quiet_libraries
    from stages.models import vision_cache, vlm
    from stages.training import finetune

    # Build: the model train_vlm will load (the tiny one built as train_vlm builds it), its tower frozen
    quiet_libraries()
    seed_everything(seed)
    fam = vlm.family(p["family"])
    vision_cache.check(fam, p)
    base = p["model"]
    if base == "tiny":
        base = str(vlm.build_tiny_base(fam, p, train_rows, out / "base"))
    processor = AutoProcessor.from_pretrained(base)
    model = finetune.load(fam, base, p).eval()
    shutil.rmtree(out / "base", ignore_errors=True)   # train_vlm builds and keeps its own

    # Embed: every train and val sample, encoded and batched as train_vlm does it (however long: train_vlm leaves out
    # the long ones itself), through the model up to its tower
    rows = train_rows + val_rows
    samples = vlm.ManifestDataset(rows, processor, fam, max_length=sys.maxsize)
    pad = processor.tokenizer.pad_token_id
    batches = (vlm.collate([samples[i] for i in range(start, min(start + BATCH, len(rows)))], pad)
               for start in range(0, len(rows), BATCH))
    batches = tqdm(batches, total=-(-len(rows) // BATCH), desc="embed", unit="batch", mininterval=2)

    # Save (pack by pack, as the features come)
    shard_bytes = {video["sha256"]: locate(video["frames"])["length"] for row in rows for video in row["videos"]}
    return vision_cache.write(out, vision_cache.record(model, fam, batches), family=p["family"], model=p["model"],
                              tower=vision_cache.digest(vision_cache.tower(model, fam), fam), videos=len(shard_bytes),
                              frame_bytes=sum(shard_bytes.values()))


if __name__ == "__main__":
    main()
