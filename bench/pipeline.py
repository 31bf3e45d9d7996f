"""Time each stage of a full `dvc repro` on the embedded default, then the no-op rerun.

Runs in a fresh `git clone` of this repository (the committed state), one `dvc repro -s <stage>` per stage in
pipeline order, so each time includes DVC's own per-command overhead, as a user's run does. Prints a table and
writes bench/results/pipeline.json. `--in-place` times the stages in this checkout instead, which refreshes its
dvc.lock and outputs: the run that pins a change's results then measures it too.
"""
import argparse
import contextlib
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
STAGES = list(yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"])   # in pipeline order
ENV = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
       "DVC_NO_ANALYTICS": "1"}


def timed(command: list[str], cwd: Path) -> float:
    start = time.perf_counter()
    result = subprocess.run(command, cwd=cwd, env=ENV, capture_output=True, text=True)
    if result.returncode:
        sys.exit(f"{' '.join(command)} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    return time.perf_counter() - start


@contextlib.contextmanager
def fresh_clone():
    with tempfile.TemporaryDirectory() as scratch:
        clone = Path(scratch) / "repo"
        subprocess.run(["git", "clone", "-q", str(REPO), str(clone)], check=True)
        yield clone


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--in-place", action="store_true", help="run in this checkout, not in a fresh clone")
    in_place = parser.parse_args().in_place
    with contextlib.nullcontext(REPO) if in_place else fresh_clone() as clone:
        seconds = {stage: timed(["dvc", "repro", "-s", stage], clone) for stage in STAGES}
        seconds["full run (sum)"] = sum(seconds.values())
        seconds["no-op dvc repro"] = timed(["dvc", "repro"], clone)
        metrics = json.loads((clone / "eval/metrics.json").read_text())
    result = {"seconds": {k: round(v, 2) for k, v in seconds.items()}, "cores": os.cpu_count(),
              "machine": platform.machine(), "python": platform.python_version(),
              "vlm_attribute_accuracy": metrics["vlm"]["attribute_accuracy"],
              "vlm_meteor": metrics["vlm"]["meteor"], "seq2seq_bleu": metrics["seq2seq"]["bleu"],
              "where": "this checkout" if in_place else "a fresh clone"}
    print(f"{'stage':<18}{'seconds':>10}")
    for name, value in result["seconds"].items():
        print(f"{name:<18}{value:>10.1f}")
    out = REPO / "bench/results/pipeline.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"-> {out.relative_to(REPO)}")


if __name__ == "__main__":
    main()
