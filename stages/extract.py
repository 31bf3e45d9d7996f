"""extract: decode every collected video once into frames (and optionally audio, transcripts and captions).

Which frames: `extract.num_frames` spread evenly over the video, or `extract.fps` per second within
min_frames..max_frames. Their size: frame_size x frame_size, or the Qwen rule under `extract.max_pixels`.
Frames come from decoding the collected files (never from the generator), so the model sees what a real video gives;
each is read in place from its pack in data/raw/videos/ (a pack missing or cut short stops the stage, naming it and
its videos: a checkout gone wrong, not a bad video).
Output: one safetensors shard per video (uint8 frames, timestamps, frame numbers, 16 kHz audio when asked), inside
packs of at most `extract.pack_megabytes` (stages/data/packs.py: tar files grouped by sha256 prefix, so DVC tracks a
few hundred files, not one per video); data/frames/index.json, where each shard lies in them (pack, offset, length);
and data/frames/report.json: per video its shard's name and sha256, what was decoded and the optional transcript and
auto-caption, or why it was quarantined.

Where it runs: `extract.engine: local` decodes on this machine's cores; `ray` hands the videos to a Ray cluster (the
one RAY_ADDRESS names, or a local Ray when it is unset), one task per pack group of videos (sharing a sha256 prefix:
a stable key, so one changed video changes one group). Each task runs the same decoder under the same limits and
writes the same packs, so the outputs are the same bytes whichever engine ran them; a task whose worker dies is retried
by Ray. On a cluster of several machines, data/ must be on a file system every node mounts. Either way, each group
is packed as soon as it is decoded, and a rerun after a kill keeps the groups finished by a run of the same inputs.

Hostile or broken videos cannot stall or sink the stage: a video whose header claims more than
`extract.max_source_pixels` or `max_source_frames` is quarantined before decoding, and each video has
`extract.decode_timeout` seconds in its worker. The pool (pebble's) kills a worker past that limit and starts a fresh
one, so a decoder hung in C code (which no Python exception can reach) holds one worker for the limit and no longer;
a decoder that crashes its worker costs that video too, not the run.
"""
import hashlib
import io
import json
import os
from concurrent.futures import TimeoutError as FutureTimeout
from itertools import groupby
from pathlib import Path

from pebble import CONSTS, ProcessExpired, ProcessPool
from safetensors.numpy import save_file
from tqdm import tqdm

from stages.common.files import atomic_dir, read_jsonl, sha256_file, write_json
from stages.common.params import load
from stages.data import packs
from stages.data.frames import INDEX, load_shard
from stages.data.video import AUDIO_RATE, VideoError, read_audio, sample, sample_images

RAW = Path("data/raw")
VIDEOS = RAW / "videos"   # collect's packs and their index
OUT = Path("data/frames")
# Limits decide whether a video is quarantined, never what a decoded one gives, and the engine decides where it is
# decoded: report.json's params leave them out, so that its bytes (pinned in dvc.lock) do not move when a limit or the
# engine does. Each quarantine names the limit it hit.
NOT_REPORTED = ("decode_timeout", "max_source_pixels", "max_source_frames", "engine")
DONE = ".done.json"     # a packed group's report entries and locators, beside its packs until the stage ends
TASK_RETRIES = 3       # ray: restarts of a decoder whose process died (a crash, a lost node), and tries of its task


def check(p: dict) -> None:
    if bool(p["num_frames"]) == bool(p["fps"]):
        raise SystemExit("extract: set exactly one of extract.num_frames and extract.fps (the other to 0)")
    if bool(p["frame_size"]) == bool(p["max_pixels"]):
        raise SystemExit("extract: set exactly one of extract.frame_size and extract.max_pixels (the other to 0)")
    if p["transcribe_model"] and not p["audio"]:
        raise SystemExit("extract: extract.transcribe_model needs extract.audio: true (the audio it transcribes)")


def extract_one(video: str, stored: dict, audio: dict | None, duration: float | None, p: dict, out: Path,
                threads: int = 1) -> dict:
    """Decode one video (`stored`: its locator in collect's packs; `audio`: that of a separate sound file) into its
    shard in `out` (packed later), on `threads` threads; the report entry, or the quarantine reason."""
    key = Path(video).name.split(".")[0]
    try:
        if video.endswith(".tar"):   # frames another tool extracted, packed by collect
            with io.BufferedReader(packs.Member(VIDEOS, stored)) as archive:
                sampled = sample_images(archive, p, duration)
        else:
            sampled = sample(packs.url(VIDEOS, stored), p, threads)
        arrays = {"frames": sampled.frames, "timestamps": sampled.timestamps, "indices": sampled.indices}
        if p["audio"]:
            arrays["audio"] = read_audio(packs.url(VIDEOS, audio or stored), AUDIO_RATE)
    except VideoError as error:
        return {"status": "quarantined", "reason": str(error)}
    # written aside, then renamed: a worker killed at its time limit leaves no half shard under the final name
    save_file(arrays, str(out / f"{key}.safetensors.partial"))
    os.replace(out / f"{key}.safetensors.partial", out / f"{key}.safetensors")
    entry = {"status": "ok", "shard": f"{key}.safetensors", "shard_sha256": sha256_file(out / f"{key}.safetensors"),
             "frames": int(len(sampled.frames)),
             "timestamps": [round(t, 4) for t in sampled.timestamps.tolist()], **sampled.info}
    if p["audio"]:
        entry["audio_seconds"] = round(len(arrays["audio"]) / AUDIO_RATE, 3)
    return entry


def pool_timeout(limit: float) -> float:
    """What to ask pebble for so that a worker is killed within `limit`: it looks at its tasks' clocks every
    CONSTS.sleep_unit (0.1 s), so a kill lands up to that much after the timeout; two units less keeps it inside."""
    return max(limit - 2 * CONSTS.sleep_unit, CONSTS.sleep_unit)


def outcome(future, p: dict, shard: Path) -> dict:
    """The report entry of one scheduled video: its own, or a quarantine when its worker was killed at the time
    limit or died (a crash in the decoder); then no shard of it, whole or half, stays behind."""
    try:
        return future.result()
    except FutureTimeout:
        reason = f"decode timed out (over extract.decode_timeout={p['decode_timeout']:g} s)"
    except ProcessExpired as error:
        reason = f"decoder crashed (worker exit code {error.exitcode})"
    for path in (shard, shard.with_name(shard.name + ".partial")):
        path.unlink(missing_ok=True)
    return {"status": "quarantined", "reason": reason}


def add_annotations(report: dict, samples: list[dict], p: dict, out: Path) -> None:
    """Transcripts of every video with audio, and captions for the samples that came without one."""
    from stages.common.console import quiet_libraries  # before annotate imports transformers (and bitsandbytes)
    from stages.data import annotate  # transformers is only imported when a model is asked for

    quiet_libraries()
    ok = {video: entry for video, entry in report.items() if entry["status"] == "ok"}
    if p["transcribe_model"]:
        transcribe = annotate.transcriber(p["transcribe_model"])
        for entry in tqdm(ok.values(), desc="transcribe", unit="video", mininterval=2):
            audio = load_shard(entry["shard"], out).get("audio")
            if audio is not None and len(audio):
                entry["transcript"] = transcribe(audio)
    if p["caption_model"]:
        describe = annotate.captioner(p["caption_model"], p["caption_prompt"], p["caption_max_tokens"])
        uncaptioned = sorted({s["videos"][0] for s in samples if not s.get("caption") and s["videos"]} & set(ok))
        for video in tqdm(uncaptioned, desc="caption", unit="video", mininterval=2):
            ok[video]["auto_caption"] = describe(list(load_shard(ok[video]["shard"], out)["frames"]))


def decode_local(jobs: list[tuple], p: dict, out: Path, pool: ProcessPool, progress=None, threads: int = 1) -> dict:
    """{"entries": {video: report entry}, "locators": {shard: locator}} of every (video, its locator, its audio's,
    duration) job (sorted by video), on the processes of `pool`, `threads` threads each. Each group's shards are
    packed as soon as the group is decoded, so unpacked shards never pile up, and the group's entries and locators
    are then recorded beside its packs: a rerun after a kill takes them instead of decoding the group again."""
    groups = [(key, list(group)) for key, group in groupby(jobs, key=lambda job: packs.group(Path(job[0]).name))]
    done, todo = {"entries": {}, "locators": {}}, []
    for key, group in groups:
        if (out / f"{key}{DONE}").exists():
            merge(done, json.loads((out / f"{key}{DONE}").read_text()))
            if progress is not None:
                progress.update(len(group))
        else:
            todo.append((key, group))
    futures = {job[0]: pool.schedule(extract_one, (*job, p, out, threads), timeout=pool_timeout(p["decode_timeout"]))
               for _, group in todo for job in group}
    for key, group in todo:
        decoded = {}
        for video, *_ in group:
            decoded[video] = outcome(futures[video], p, out / f"{Path(video).name.split('.')[0]}.safetensors")
            if progress is not None:
                progress.update()
        shards = [out / entry["shard"] for entry in decoded.values() if entry["status"] == "ok"]
        group_done = {"entries": decoded, "locators": packs.write(out, shards, p["pack_megabytes"] << 20)}
        write_json(out / f"{key}{DONE}.partial", group_done)
        os.replace(out / f"{key}{DONE}.partial", out / f"{key}{DONE}")
        merge(done, group_done)
    return done


def merge(done: dict, group_done: dict) -> None:
    """Add one group's entries and locators to those of the groups done before it."""
    for part, values in group_done.items():
        done[part].update(values)


class Decoder:
    """A Ray actor: one decoding process (a pool of one, for the time limit) that lives as long as the actor, working
    from `root` (the repository), so that every path, and every quarantine reason that names one, reads as it does
    on the local engine."""

    def __init__(self, root: Path):
        os.chdir(root)
        self.pool = ProcessPool(max_workers=1)

    def decode(self, jobs: list[tuple], p: dict, out: Path) -> dict:
        return decode_local(jobs, p, out, self.pool)


def decode_ray(jobs: list[tuple], p: dict, out: Path, progress) -> dict:
    """decode_local on a Ray cluster: one task per group of videos that share a sha256 prefix, spread over one Decoder
    actor per CPU; an actor whose process dies is restarted and its task run again by Ray."""
    # Decoder is imported by its module name: run as `python -m stages.extract`, this module is __main__, whose
    # classes Ray would pickle by value, and then the pool inside could not pickle extract_one by reference
    import ray
    from ray.util import ActorPool

    import stages
    from stages.extract import Decoder as decoder_class
    cluster = os.environ.get("RAY_ADDRESS")
    # the `stages` package travels to the workers (py_modules)
    ray.init(address=cluster, num_cpus=None if cluster else p["workers"] or os.cpu_count(),
             runtime_env={"py_modules": [stages]}, include_dashboard=False, log_to_driver=False,
             logging_level="ERROR")
    try:
        groups = {}
        for job in jobs:
            groups.setdefault(packs.group(Path(job[0]).name), []).append(job)
        actor = ray.remote(num_cpus=1, max_restarts=TASK_RETRIES, max_task_retries=TASK_RETRIES)(decoder_class)
        decoders = ActorPool([actor.remote(Path.cwd()) for _ in range(max(int(ray.cluster_resources()["CPU"]), 1))])
        done = {"entries": {}, "locators": {}}
        for group_done in decoders.map_unordered(lambda decoder, group: decoder.decode.remote(group, p, out),
                                                 list(groups.values())):
            merge(done, group_done)
            progress.update(len(group_done["entries"]))
        return done
    finally:
        ray.shutdown()


def stored_files(names: list[str]) -> dict[str, dict]:
    """{name as samples.jsonl gives it: its locator in collect's packs}; the stage stops, before any work, on an index
    that cannot be read or lacks a name, or a pack that is missing or cut short."""
    try:
        index = packs.read_index(VIDEOS)
        missing = sorted(name for name in names if Path(name).name not in index)
        if missing:
            raise packs.PackError(f"{VIDEOS / packs.INDEX} lacks {len(missing)} of the files that "
                                  f"{RAW / 'samples.jsonl'} names, first {missing[0]}: data/raw is not one collect's")
        stored = {name: index[Path(name).name] for name in names}
        packs.check(VIDEOS, stored)
    except packs.PackError as error:
        raise SystemExit(f"extract: {error}") from None
    return stored


def resume_key(params: dict, jobs: list[tuple]) -> str:
    """What a killed run's finished packs must share with this run to be kept: the params, the videos (named by their
    sha256) and the code that decodes and packs them."""
    digest = hashlib.sha256(json.dumps([params, jobs]).encode())
    for module in (__file__, packs.__file__, sample.__code__.co_filename):
        digest.update(Path(module).read_bytes())
    return digest.hexdigest()


def main() -> None:
    # Load
    p = load("extract")["extract"]
    check(p)
    samples = read_jsonl(RAW / "samples.jsonl")
    videos = sorted({video for sample in samples for video in sample["videos"]})
    audio = {s["videos"][0]: s["audio"] for s in samples if s.get("audio") and s["videos"]}
    duration = {video: s.get("meta", {}).get("duration") for s in samples for video in s["videos"]}
    stored = stored_files([*videos, *audio.values()])

    # Decode, on every core of this machine or of the Ray cluster: each worker writes its own shards
    report = {"params": {key: value for key, value in p.items() if key not in NOT_REPORTED}, "videos": {}}
    jobs = [(video, stored[video], stored.get(audio.get(video)), duration[video]) for video in videos]
    with atomic_dir(OUT, resume=resume_key(report["params"], jobs)) as out:   # keeps what a killed run finished
        with tqdm(total=len(jobs), desc="extract", unit="video", mininterval=2) as progress:
            if p["engine"] == "ray":
                done = decode_ray(jobs, p, out, progress)
            else:   # fewer videos than workers: the cores are shared out, each video on threads (sample's)
                cores = p["workers"] or os.cpu_count()
                workers = max(min(cores, len(jobs)), 1)
                with ProcessPool(max_workers=workers) as pool:
                    done = decode_local(jobs, p, out, pool, progress, threads=max(cores // workers, 1))
        report["videos"] = {video: done["entries"][video] for video in videos}
        write_json(out / INDEX, done["locators"])
        for group_done in out.glob(f"*{DONE}"):
            group_done.unlink()
        bad = sorted(v for v, r in report["videos"].items() if r["status"] != "ok")
        report["summary"] = {"videos": len(videos), "ok": len(videos) - len(bad), "quarantined": len(bad)}
        if videos and len(bad) / len(videos) > p["max_bad_fraction"]:
            raise SystemExit(f"extract: {len(bad)} of {len(videos)} videos failed, above extract.max_bad_fraction="
                             f"{p['max_bad_fraction']}; first: {bad[0]}: {report['videos'][bad[0]]['reason']}")
        if p["transcribe_model"] or p["caption_model"]:
            add_annotations(report["videos"], samples, p, out)
        # Save
        write_json(out / "report.json", report)
    print(f"extract: {report['summary']} -> {OUT}/")


if __name__ == "__main__":
    main()
