"""Benchmark: what DVC and the trainers pay for `extract`'s output at 10k and 100k videos, packed against one file per
video (the layout before packs), in the same run.

For each count, N distinct frame shards (4 frames of 32 px, as the default extracts them; cheap to make, no video is
decoded) are laid out both ways under `data/frames/` of a fresh git + DVC repository, as the output of a stage:
- `files`: one `<sha256>.safetensors` per video;
- `packs`: the same shards in `<prefix>-<n>.tar` packs (stages/data/packs.py, what `extract` writes now).
Timed per layout (medians of ROUNDS): a no-op `dvc repro`, `dvc status`, `dvc push` to a local remote and `dvc pull`
into an emptied cache and workspace, and reading RANDOM_READS random shards (a training epoch's access pattern:
`frames.load_shard`, against opening each file).

Extraction throughput: in a clone of this repository, after `dvc repro collect` (the default's synthetic clips), the
`extract` stage's own command runs from an empty `data/frames/` with `extract.engine: local` (the process pool) and
`ray` (a local Ray: no RAY_ADDRESS, as many workers as cores), medians of ROUNDS, in videos per second. Ray's start
and stop are inside the time, as a user pays them.

    python bench/scale.py [--counts 10000 100000] [--only layouts|extraction]

Prints tables and writes bench/results/scale.json; `--only` keeps the other part's results from the last run.
"""
import argparse
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file, save_file

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from stages.data.frames import INDEX, load_shard  # noqa: E402

DVC = str(Path(sys.executable).with_name("dvc"))
# this venv's tools first; no RAY_ADDRESS, so that engine ray starts a local Ray here
ENV = {**{k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"},
       "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
ROUNDS = 3
RANDOM_READS = 2000
PACK_BYTES = 256 << 20      # extract.pack_megabytes' default
GOAL_NO_OP_S = 2.0


def shards(folder: Path, count: int) -> list[Path]:
    """`count` distinct shards as extract writes them (frames, timestamps, indices), named by a sha256."""
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    paths = []
    for index in range(count):
        name = f"{index:064x}"[::-1]         # distinct, and spread over the sha256 prefixes like real ones
        frames = rng.integers(0, 256, (4, 32, 32, 3), dtype=np.uint8)
        save_file({"frames": frames, "timestamps": np.arange(4, dtype=np.float64) / 2,
                   "indices": np.arange(4, dtype=np.int64) * 5}, str(folder / f"{name}.safetensors"))
        paths.append(folder / f"{name}.safetensors")
    return paths


def run(repo: Path, *args: str) -> float:
    start = time.perf_counter()
    subprocess.run([DVC, *args], cwd=repo, check=True, capture_output=True, env=ENV)
    return time.perf_counter() - start


def repository(root: Path, layout: str) -> Path:
    """A git + DVC repository whose one stage lays out the shards of `root`/shards in `layout` as data/frames (with
    the packs, index.json holds each shard's locator, as extract's does)."""
    repo = root / layout
    repo.mkdir()
    subprocess.run(["git", "init", "-q"], cwd=repo, check=True)
    run(repo, "init", "-q")
    run(repo, "remote", "add", "-d", "local", str(root / f"remote-{layout}"))
    pack = "" if layout == "files" else f"""
import json, sys
sys.path.insert(0, {str(REPO)!r})
from stages.data import packs
(out / {INDEX!r}).write_text(json.dumps(packs.write(out, sorted(out.iterdir()), {PACK_BYTES})))"""
    (repo / "make.py").write_text(f"""import shutil
from pathlib import Path
out = Path("data/frames")
shutil.copytree({str(root / "shards")!r}, out){pack}
""")
    (repo / "dvc.yaml").write_text("stages:\n  extract:\n    cmd: python make.py\n    deps: [make.py]\n"
                                   "    outs: [data/frames]\n")
    return repo


def random_reads(repo: Path, layout: str) -> float:
    """Shards read per second in a random order."""
    folder = repo / "data/frames"
    if layout == "files":
        targets = sorted(folder.iterdir())
        read = lambda path: load_file(str(path))                                      # noqa: E731
    else:
        targets = sorted(json.loads((folder / INDEX).read_text()))
        read = lambda name: load_shard(name, folder)                                 # noqa: E731
    picks = random.Random(0).sample(targets, min(RANDOM_READS, len(targets)))
    start = time.perf_counter()
    for target in picks:
        read(target)
    return len(picks) / (time.perf_counter() - start)


def measure(root: Path, layout: str) -> dict:
    repo = repository(root, layout)
    result = {"first_repro_s": run(repo, "repro", "-q")}
    result["files_tracked"] = sum(1 for _ in (repo / "data/frames").iterdir())
    result["no_op_repro_s"] = statistics.median(run(repo, "repro", "-q") for _ in range(ROUNDS))
    result["status_s"] = statistics.median(run(repo, "status", "-q") for _ in range(ROUNDS))
    result["push_s"] = run(repo, "push", "-q")
    shutil.rmtree(repo / ".dvc/cache")
    shutil.rmtree(repo / "data/frames")
    result["pull_s"] = run(repo, "pull", "-q")
    result["random_reads_per_s"] = random_reads(repo, layout)
    shutil.rmtree(repo)
    shutil.rmtree(root / f"remote-{layout}")
    return result


def extraction() -> dict:
    """`extract`'s videos per second on the default's clips, engine local against ray, in the same run."""
    with tempfile.TemporaryDirectory() as scratch:
        clone = Path(scratch) / "repo"
        subprocess.run(["git", "clone", "-q", str(REPO), str(clone)], check=True)
        run(clone, "repro", "-q", "collect")
        result = {"cores": os.cpu_count()}
        for engine in ("local", "ray"):
            params = (clone / "params.yaml").read_text()
            assert "\n  engine: local " in params, "params.yaml: extract.engine is not where this bench sets it"
            (clone / "params.yaml").write_text(params.replace("\n  engine: local ", f"\n  engine: {engine} ", 1))
            seconds = []
            for _ in range(ROUNDS):
                for folder in ("data/frames", "data/frames.partial"):
                    shutil.rmtree(clone / folder, ignore_errors=True)
                start = time.perf_counter()
                subprocess.run([sys.executable, "-m", "stages.extract"], cwd=clone, env=ENV, check=True,
                               capture_output=True)
                seconds.append(time.perf_counter() - start)
            summary = json.loads((clone / "data/frames/report.json").read_text())["summary"]
            assert summary["quarantined"] == 0, summary   # every clip decoded, on both engines
            videos = result["videos"] = summary["videos"]
            median = statistics.median(seconds)
            result[engine] = {"seconds": seconds, "median_s": median, "videos_per_s": videos / median}
            print(f"extract, engine {engine:>5}: {videos} videos in {median:.1f} s, {videos / median:.0f} videos/s",
                  flush=True)
    return result


def layouts(counts: list[int], results: dict) -> None:
    """The DVC and random-read costs of both layouts at each count, into `results`."""
    print(f"{'videos':>8} {'layout':>6} {'files':>7} {'first repro':>12} {'no-op repro':>12} {'status':>8} "
          f"{'push':>8} {'pull':>8} {'reads/s':>9}")
    results["counts"] = {}
    with tempfile.TemporaryDirectory() as scratch:
        for count in counts:
            shards(Path(scratch) / "shards", count)
            results["counts"][str(count)] = {}
            for layout in ("files", "packs"):
                row = measure(Path(scratch), layout)
                results["counts"][str(count)][layout] = row
                print(f"{count:>8} {layout:>6} {row['files_tracked']:>7} {row['first_repro_s']:>11.1f}s "
                      f"{row['no_op_repro_s']:>11.2f}s "
                      f"{row['status_s']:>7.2f}s {row['push_s']:>7.1f}s {row['pull_s']:>7.1f}s "
                      f"{row['random_reads_per_s']:>9.0f}", flush=True)
            shutil.rmtree(Path(scratch) / "shards")
    packed = [results["counts"][str(count)]["packs"]["no_op_repro_s"] for count in counts]
    results["packs_no_op_growth"] = max(packed) / min(packed)
    results["packs_no_op_goal_met"] = max(packed) <= GOAL_NO_OP_S and results["packs_no_op_growth"] <= 1.2
    print(f"no-op growth with packs {counts[0]} -> {counts[-1]}: {results['packs_no_op_growth']:.2f}x "
          f"(goal <= 1.2x, <= {GOAL_NO_OP_S} s: {'met' if results['packs_no_op_goal_met'] else 'missed'})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--counts", type=int, nargs="+", default=[10_000, 100_000])
    parser.add_argument("--only", choices=["layouts", "extraction"],
                        help="run one part; the other's results stay as the last run wrote them")
    args = parser.parse_args()
    out = REPO / "bench/results/scale.json"
    results = json.loads(out.read_text()) if args.only else {}
    results |= {"rounds": ROUNDS, "goal_no_op_repro_s": GOAL_NO_OP_S}
    if args.only != "extraction":
        layouts(args.counts, results)
    if args.only != "layouts":
        results["extraction"] = extraction()
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"-> {out}")


if __name__ == "__main__":
    main()
