"""Benchmark: peak resident memory (RSS) of reading a 1M-row annotation file, as a JSON array and as JSON Lines.

Each measurement runs in a fresh Python process (its VmHWM is the high-water mark of its memory) that imports the reader
and reads the file once:
- `stream`: stages.data.formats.iter_annotations, every row converted and checked, none kept (the reader itself);
- `collect`: the `collect` stage itself (`main()`) on a local source of that file, every row stored as a sample
  (all name the same small real video) and written to samples.jsonl;
- `list`: read_annotations, every sample kept in a list (what collect held before it streamed);
- `json.load`: the whole file parsed at once, what a non-streaming reader holds before converting a single row;
- `baseline`: the interpreter with the reader imported, reading nothing; `collect baseline`: with the stage imported.

    python bench/annotations.py [--rows N]      prints a table, writes bench/results/annotations.json
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
ROW = {"video": "clips/clip.mp4", "question": "What happens in the clip?", "caption": "A person opens a door {n}."}
PROBE = """
import json, sys, time
sys.path.insert(0, {repo!r})
from stages.data.formats import iter_annotations, read_annotations
mode, path = sys.argv[1], sys.argv[2]
started, rows = time.perf_counter(), 0
if mode == "stream":
    rows = sum(1 for _ in iter_annotations(path))
elif mode == "list":
    samples, errors = read_annotations(path)
    rows = len(samples) + len(errors)
elif mode == "collect":
    from stages import collect
    collect.main()
    with open("data/raw/samples.jsonl") as f:
        rows = sum(1 for _ in f)
elif mode == "collect baseline":
    from stages import collect   # noqa: F401 - its imports (PyAV, NumPy, Pillow) and nothing read
elif mode == "json.load":
    rows = len(json.load(open(path)))
# VmHWM, not ru_maxrss: Linux keeps ru_maxrss across exec, so it would carry the parent's peak over
peak = next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM:"))
print(json.dumps({{"rows": rows, "seconds": time.perf_counter() - started, "peak_rss_mb": peak / 1024}}))
"""


def write_files(folder: Path, rows: int) -> dict[str, Path]:
    """The same rows as a JSON array (one item per line, as json.dump(indent=...) users write) and as JSON Lines, each
    in a workspace of its own whose params.yaml imports it, beside the one small real video every row names."""
    from tests.helpers import make_video, write_params

    for name in ("rows.json", "rows.jsonl"):
        source = folder / name.replace(".", "_") / "data/sources/bench"
        (source / "clips").mkdir(parents=True)
        make_video(source / "clips/clip.mp4", seconds=1, size="32x24")
        write_params(source.parents[2], {"collect": {"sources": [
            {"kind": "local", "folder": "data/sources/bench", "annotations": name, "format": "triplets"}]}})
    array, lines = (folder / f"rows_{ext}/data/sources/bench/rows.{ext}" for ext in ("json", "jsonl"))
    with open(array, "w") as a, open(lines, "w") as j:
        a.write("[\n")
        for n in range(rows):
            row = json.dumps({key: value.format(n=n) for key, value in ROW.items()})
            a.write(("" if n == 0 else ",\n") + row)
            j.write(row + "\n")
        a.write("\n]\n")
    return {"json array": array, "jsonl": lines}


def measure(mode: str, path: Path) -> dict:
    """One mode in a fresh process; the collect stage runs in the file's workspace (its params.yaml)."""
    where = path.parents[3] if mode == "collect" else REPO   # <workspace>/data/sources/bench/<file>
    result = subprocess.run([sys.executable, "-c", PROBE.format(repo=str(REPO)), mode, str(path)], check=True,
                            capture_output=True, text=True, cwd=where)
    return json.loads(result.stdout.splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    args = parser.parse_args()
    results = {}
    with tempfile.TemporaryDirectory() as scratch:
        files = write_files(Path(scratch), args.rows)
        for kind, path in files.items():
            size_mb = path.stat().st_size / 2**20
            modes = ["baseline", "collect baseline", "stream", "collect", "list"] + (
                ["json.load"] if kind == "json array" else [])
            results[kind] = {"file_mb": round(size_mb, 1),
                             **{mode: measure(mode, path) for mode in modes}}
    print(f"{'file':<11} {'size MB':>8} {'mode':<10} {'rows':>9} {'peak RSS MB':>12} {'over baseline':>14} {'s':>6}")
    for kind, result in results.items():
        for mode, m in result.items():
            if mode in ("file_mb", "baseline", "collect baseline"):
                continue
            base = result["collect baseline" if mode == "collect" else "baseline"]["peak_rss_mb"]
            print(f"{kind:<11} {result['file_mb']:>8.1f} {mode:<10} {m['rows']:>9} {m['peak_rss_mb']:>12.1f} "
                  f"{m['peak_rss_mb'] - base:>14.1f} {m['seconds']:>6.1f}")
        for mode in ("baseline", "collect baseline"):
            print(f"{kind:<11} {'':>8} {mode:<10} {'':>9} {result[mode]['peak_rss_mb']:>12.1f}")
    out = REPO / "bench/results/annotations.json"
    out.write_text(json.dumps({"rows": args.rows, "cpu_count": os.cpu_count(), "python": sys.version.split()[0],
                               "measured_at": time.strftime("%Y-%m-%d"), "results": results}, indent=2) + "\n")
    print(f"-> {out.relative_to(REPO)}")


if __name__ == "__main__":
    main()
