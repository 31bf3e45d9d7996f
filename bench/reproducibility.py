"""How far the trained models' metrics move on another CPU, measured on this one: the spread that
eval/metrics.tolerance.json must cover.

The data stages give the same bytes on every x86-64 CPU (tests/test_reproducible.py), so what can move across
machines is training and evaluation, through torch's CPU kernels, which differ by instruction set. In a fresh clone
of the committed state, after `dvc repro manifest`, both trainers and evaluate run once per variant:
- torch's lower kernel paths, `ATEN_CPU_CAPABILITY=default` (no vector instructions) and `avx2` (where the CPU's
  native path is avx512; on an AVX2 machine avx2 is the native path and is skipped);
- other training seeds (`base.seed` 1 and 2, set for the trainers only, so the data stays the committed data), the
  yardstick of how far a perturbed run of this schedule can land.
Each metric's deviation from the committed eval/metrics.json is printed and written to
bench/results/reproducibility.json, with the tolerance it suggests: 1.5 x the largest deviation, rounded up, and at
least one test sample's worth of accuracy.
"""
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from ruamel.yaml import YAML

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
       "DVC_NO_ANALYTICS": "1"}
MARGIN = 1.5


def run(command: list[str], cwd: Path, env: dict) -> None:
    result = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True)
    if result.returncode:
        sys.exit(f"{' '.join(command)} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")


def native_capability() -> str:
    flags = Path("/proc/cpuinfo").read_text().split()
    return "avx512" if "avx512f" in flags else "avx2" if "avx2" in flags else "default"


def variants() -> dict[str, dict]:
    found = {"isa_default": {"env": {"ATEN_CPU_CAPABILITY": "default"}}}
    if native_capability() == "avx512":
        found["isa_avx2"] = {"env": {"ATEN_CPU_CAPABILITY": "avx2"}}
    found |= {f"seed{seed}": {"seed": seed} for seed in (1, 2)}
    return found


def train_and_evaluate(clone: Path, variant: dict) -> dict:
    yaml = YAML()
    params = yaml.load((clone / "params.yaml").read_text())
    params["base"]["seed"] = variant.get("seed", 0)
    with open(clone / "params.yaml", "w") as f:
        yaml.dump(params, f)
    env = {**ENV, **variant.get("env", {})}
    for stage in ("train_seq2seq", "train_vlm", "evaluate"):
        run([sys.executable, "-m", f"stages.{stage}"], clone, env)
    run(["git", "checkout", "--", "params.yaml"], clone, ENV)
    return json.loads((clone / "eval/metrics.json").read_text())


def suggested(deviation: float, metric: str, test_samples: int) -> float:
    """MARGIN x the deviation, rounded up to the metric's scale; accuracies at least one test sample's worth."""
    if metric.endswith(("accuracy", "exact_match")):
        return max(math.ceil(MARGIN * deviation * 100) / 100, math.ceil(100 / test_samples) / 100)
    step = 10.0 if metric == "cider_d" else 0.5
    return max(math.ceil(MARGIN * deviation / step) * step, step)


def main() -> None:
    pinned = json.loads((REPO / "eval/metrics.json").read_text())
    measured, seconds = {}, {}
    with tempfile.TemporaryDirectory() as scratch:
        clone = Path(scratch) / "repo"
        subprocess.run(["git", "clone", "-q", str(REPO), str(clone)], check=True)
        run(["dvc", "repro", "manifest"], clone, ENV)
        test_samples = sum(1 for _ in open(clone / "data/manifest/test.jsonl"))
        for name, variant in variants().items():
            start = time.perf_counter()
            measured[name] = train_and_evaluate(clone, variant)
            seconds[name] = round(time.perf_counter() - start, 1)
            print(f"{name}: {seconds[name]} s", flush=True)
    deviation = {f"{model}.{metric}": max(abs(run_[model][metric] - value) for run_ in measured.values())
                 for model, scores in pinned.items() for metric, value in scores.items()}
    tolerance = {key: suggested(value, key.split(".")[1], test_samples) for key, value in deviation.items()}
    result = {"native_capability": native_capability(), "machine": platform.machine(), "cores": os.cpu_count(),
              "pinned": pinned, "measured": measured, "seconds": seconds, "max_deviation": deviation,
              "suggested_tolerance": tolerance, "margin": MARGIN, "test_samples": test_samples}
    names = list(measured)
    print(f"{'metric':<30}{'pinned':>10}" + "".join(f"{name:>12}" for name in names) + f"{'max dev':>10}{'tol':>8}")
    for key in deviation:
        model, metric = key.split(".")
        row = "".join(f"{measured[name][model][metric]:>12.4g}" for name in names)
        print(f"{key:<30}{pinned[model][metric]:>10.4g}{row}{deviation[key]:>10.4g}{tolerance[key]:>8.4g}")
    out = REPO / "bench/results/reproducibility.json"
    out.write_text(json.dumps(result, indent=2, sort_keys=True) + "\n")
    print(f"-> {out.relative_to(REPO)}")


if __name__ == "__main__":
    main()
