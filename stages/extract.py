"""extract: decode `extract.num_frames` uniform frames from every collected video, resized to `extract.frame_size`.

Frames come from decoding the mp4 files (never from the generator), so the model sees what a real video gives.
Output: data/frames/<sha256>.safetensors per video (uint8 frames + timestamps), one shard per video to keep DVC's
no-op fast, and data/frames/report.json: per video what was decoded, or why it was quarantined.
"""
from pathlib import Path

from safetensors.numpy import save_file

from stages.files import atomic_dir, read_jsonl, write_json
from stages.params import load
from stages.video import VideoError, sample_uniform

RAW = Path("data/raw")
OUT = Path("data/frames")


def main() -> None:
    # Load
    p = load("extract")["extract"]
    videos = sorted({video for sample in read_jsonl(RAW / "samples.jsonl") for video in sample["videos"]})

    # Decode
    report = {"params": p, "videos": {}}
    with atomic_dir(OUT) as out:
        for video in videos:
            key = Path(video).stem
            try:
                sampled = sample_uniform(RAW / video, p["num_frames"], p["frame_size"])
            except VideoError as error:
                report["videos"][video] = {"status": "quarantined", "reason": str(error)}
                continue
            save_file({"frames": sampled.frames, "timestamps": sampled.timestamps, "indices": sampled.indices},
                      str(out / f"{key}.safetensors"))
            report["videos"][video] = {"status": "ok", "shard": f"{key}.safetensors",
                                       "frames": int(len(sampled.frames)),
                                       "timestamps": [round(t, 4) for t in sampled.timestamps.tolist()],
                                       **sampled.info}
        bad = sorted(v for v, r in report["videos"].items() if r["status"] != "ok")
        report["summary"] = {"videos": len(videos), "ok": len(videos) - len(bad), "quarantined": len(bad)}
        if videos and len(bad) / len(videos) > p["max_bad_fraction"]:
            raise SystemExit(f"extract: {len(bad)} of {len(videos)} videos failed, above extract.max_bad_fraction="
                             f"{p['max_bad_fraction']}; first: {bad[0]}: {report['videos'][bad[0]]['reason']}")
        # Save
        write_json(out / "report.json", report)
    print(f"extract: {report['summary']} -> {OUT}/")


if __name__ == "__main__":
    main()
