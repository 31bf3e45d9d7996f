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
bench/results/reproducibility.json, with the tolerance it suggests: 1.5 x the largest deviation under the lower
instruction sets, rounded up, and at least one test sample's worth of accuracy. The seeds are reported beside it, not
folded in: a seed can land a model in another basin (at seed 2 the seq2seq model misses most shapes), and a tolerance
that admitted that would pass a broken model. `--summarize` recomputes the table from the JSON without training.

`--pin t2v` does the same for the text-to-video model (train_t2v and evaluate_t2v, eval/t2v/metrics.json) into
bench/results/reproducibility_t2v.json; eval/metrics.tolerance.json holds the tolerances of both pins, and each run
rewrites its pin's.

`--repin NAME` is for a pin that moves machines: after `dvc repro` on the new machine, the committed metrics there
become the pin, and the old pin joins the measured runs as `machine_NAME` (the machine it came from), which sets the
tolerance as the lower instruction sets do: a real other CPU, with its own BLAS and oneDNN kernels.

    python bench/reproducibility.py [--pin t2v] [--summarize | --repin NAME]
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
from typing import NamedTuple

from ruamel.yaml import YAML

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
       "DVC_NO_ANALYTICS": "1"}
MARGIN = 1.5


class Pin(NamedTuple):
    metrics: str          # the committed metrics it checks
    stages: tuple         # the stages that train and evaluate its models
    results: str          # its file under bench/results
    scored: str           # a line per scored sample (in clips.jsonl, the trained model's lines count)


PINS = {"default": Pin("eval/metrics.json", ("train_seq2seq", "train_vlm", "evaluate"), "reproducibility.json",
                       "data/manifest/test.jsonl"),
        "t2v": Pin("eval/t2v/metrics.json", ("train_t2v", "evaluate_t2v"), "reproducibility_t2v.json",
                   "eval/t2v/clips.jsonl")}


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


def train_and_evaluate(clone: Path, variant: dict, pin: Pin) -> dict:
    yaml = YAML()
    params = yaml.load((clone / "params.yaml").read_text())
    params["base"]["seed"] = variant.get("seed", 0)
    with open(clone / "params.yaml", "w") as f:
        yaml.dump(params, f)
    env = {**ENV, **variant.get("env", {})}
    for stage in pin.stages:
        run([sys.executable, "-m", f"stages.{stage}"], clone, env)
    run(["git", "checkout", "--", "params.yaml"], clone, ENV)
    return json.loads((clone / pin.metrics).read_text())


def suggested(deviation: float, metric: str, test_samples: int) -> float:
    """MARGIN x the deviation, rounded up to the metric's scale; accuracies at least one test sample's worth."""
    if metric.endswith(("accuracy", "exact_match")):
        return max(math.ceil(MARGIN * deviation * 100) / 100, math.ceil(100 / test_samples) / 100)
    step = {"cider_d": 10.0, "frechet_distance": 0.05}.get(metric, 0.5)
    return max(round(math.ceil(MARGIN * deviation / step) * step, 6), step)


def admit_a_perfect_meteor(tolerance: dict, pinned: dict) -> dict:
    """METEOR 1.5's corpus score is 100 when every caption is exact and drops by about 15 points at the first one
    that is not (its fragmentation penalty, 0.6 x (chunks / matches)^0.2 over the whole corpus, counts an exact
    caption as zero chunks, and x^0.2 is steep near 0). So where the exact-match tolerance admits a model that gets
    every test caption right, the METEOR tolerance must admit its 100, or the pin would fail a better model."""
    for model, scores in pinned.items():
        if "meteor" in scores and scores["exact_match"] + tolerance[f"{model}.exact_match"] >= 1:
            key = f"{model}.meteor"
            tolerance[key] = max(tolerance[key], math.ceil((100 - scores["meteor"]) / 0.5) * 0.5)
    return tolerance


def measure(pinned: dict, pin: Pin) -> dict:
    measured, seconds = {}, {}
    with tempfile.TemporaryDirectory() as scratch:
        clone = Path(scratch) / "repo"
        subprocess.run(["git", "clone", "-q", str(REPO), str(clone)], check=True)
        run(["dvc", "repro", "manifest"], clone, ENV)
        for name, variant in variants().items():
            start = time.perf_counter()
            measured[name] = train_and_evaluate(clone, variant, pin)
            seconds[name] = round(time.perf_counter() - start, 1)
            print(f"{name}: {seconds[name]} s", flush=True)
        # one test sample's worth of accuracy: a test row, or a clip the trained text-to-video model generated
        rows = [json.loads(line) for line in open(clone / pin.scored)]
        test_samples = sum(1 for row in rows if row.get("model") in (None, "t2v"))
    return {"native_capability": native_capability(), "machine": platform.machine(), "cores": os.cpu_count(),
            "pinned": pinned, "measured": measured, "seconds": seconds, "test_samples": test_samples}


def summarize(result: dict) -> dict:
    """Deviations from the pin, per metric: under the lower instruction sets (which set the tolerance) and across
    seeds (reported)."""
    pinned, measured = result["pinned"], result["measured"]

    def largest(names):
        return {f"{model}.{metric}": max(abs(measured[name][model][metric] - value) for name in names)
                for model, scores in pinned.items() for metric, value in scores.items()}
    isa = [name for name in measured if name.startswith(("isa_", "machine_"))]
    result |= {"margin": MARGIN, "max_deviation_isa": largest(isa),
               "max_deviation_seeds": largest([name for name in measured if name.startswith("seed")])}
    result["suggested_tolerance"] = admit_a_perfect_meteor(
        {key: suggested(value, key.split(".")[1], result["test_samples"])
         for key, value in result["max_deviation_isa"].items()}, pinned)
    return result


def print_table(result: dict) -> None:
    pinned, measured, names = result["pinned"], result["measured"], list(result["measured"])
    width = {name: max(12, len(name) + 2) for name in names}
    print(f"{'metric':<34}{'pinned':>9}" + "".join(f"{name:>{width[name]}}" for name in names)
          + f"{'dev ISA':>9}{'dev seed':>9}{'tol':>7}")
    for key, tolerance in result["suggested_tolerance"].items():
        model, metric = key.split(".")
        row = "".join(f"{measured[name][model][metric]:>{width[name]}.4g}" for name in names)
        print(f"{key:<34}{pinned[model][metric]:>9.4g}{row}{result['max_deviation_isa'][key]:>9.3g}"
              f"{result['max_deviation_seeds'][key]:>9.3g}{tolerance:>7.4g}")


def main() -> None:
    pin = PINS[sys.argv[sys.argv.index("--pin") + 1] if "--pin" in sys.argv else "default"]
    out = REPO / "bench/results" / pin.results
    if "--summarize" in sys.argv[1:]:
        result = json.loads(out.read_text())
    elif "--repin" in sys.argv[1:]:
        result = json.loads(out.read_text())
        result["measured"][f"machine_{sys.argv[sys.argv.index('--repin') + 1]}"] = result["pinned"]
        result["pinned"] = json.loads((REPO / pin.metrics).read_text())
    else:
        result = measure(json.loads((REPO / pin.metrics).read_text()), pin)
    result = summarize(result)
    print_table(result)
    out.write_text(json.dumps(result, indent=2, sort_keys=True) + "\n")
    tolerances = REPO / "eval/metrics.tolerance.json"
    tolerance = {**json.loads(tolerances.read_text()), **result["suggested_tolerance"]}
    tolerances.write_text(json.dumps(dict(sorted(tolerance.items())), indent=2) + "\n")
    print(f"-> {out.relative_to(REPO)}, {tolerances.relative_to(REPO)}")


if __name__ == "__main__":
    main()
