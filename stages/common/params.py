"""Load one stage's block of params.yaml and validate it against stages/schema/params/<block>.json.

A stage calls `load("<stage>")` first thing: a typo or a wrong type in params.yaml stops it before any work, with a
message naming the key, instead of surfacing later as a silent default or a confusing traceback. One schema file per
block, so that a stage depends (in dvc.yaml) on its own schema and `base.json` only: a new push knob reruns push alone.
Keys that several blocks share live in one schema of their own that those blocks `$ref` (schedule.json: every
trainer's schedule).
No key may be named `size` or `nfiles`: DVC drops those names from its run-cache key.
"""
import json
import random
from pathlib import Path

import jsonschema
from referencing import Registry, Resource
from ruamel.yaml import YAML  # YAML 1.2, as DVC itself reads params: `1e-3` is a float, not a string

PARAMS_FILE = Path("params.yaml")
SCHEMA_DIR = Path(__file__).parents[1] / "schema" / "params"


class ParamsError(SystemExit):
    """Raised for invalid params; exits the stage with the message instead of a traceback."""


def load(stage: str, path: Path = PARAMS_FILE) -> dict:
    """Return {"base": ..., <stage>: ...} from `path`, validated; raise ParamsError naming the offending key."""
    document = YAML(typ="safe").load(Path(path).read_text()) or {}
    params = {}
    for block in ("base", stage):
        if block not in document:
            raise ParamsError(f"{path}: missing block `{block}`")
        schema = json.loads((SCHEMA_DIR / f"{block}.json").read_text())
        validator = jsonschema.Draft202012Validator(schema, registry=_shared_schemas())
        errors = sorted(validator.iter_errors(document[block]), key=lambda e: list(e.absolute_path))
        if errors:
            raise ParamsError(f"{path}: " + "; ".join(_describe(block, e) for e in errors))
        params[block] = document[block]
    return params


def _shared_schemas() -> Registry:
    """Every schema file by its name, so that `{"$ref": "schedule.json"}` finds it offline."""
    return Registry().with_resources(
        (path.name, Resource.from_contents(json.loads(path.read_text()))) for path in SCHEMA_DIR.glob("*.json"))


def _describe(block: str, error: jsonschema.ValidationError) -> str:
    key = ".".join([block, *map(str, error.absolute_path)])
    if error.validator in ("additionalProperties", "unevaluatedProperties"):
        unknown = sorted(set(error.instance) - set(error.schema.get("properties", {})) - _shared_keys(error.schema))
        return "; ".join(f"unknown key `{key}.{name}`" for name in unknown)
    if error.validator == "anyOf":
        forms = " or ".join(json.dumps(sub) for sub in error.validator_value)
        return f"`{key}`: {error.instance!r} is none of {forms}"
    if error.validator == "required":
        return f"missing key `{key}.{error.message.split(chr(39))[1]}`"
    return f"`{key}`: {error.message}"


def _shared_keys(schema: dict) -> set[str]:
    """The keys a block takes from the schemas it `$ref`s."""
    shared = [json.loads((SCHEMA_DIR / part["$ref"]).read_text()) for part in schema.get("allOf", [])]
    return {key for sub in shared for key in sub["properties"]}


def seed_everything(seed: int) -> None:
    """Seed every generator a stage touches and make torch's kernels deterministic, strictly: an op without a
    deterministic implementation raises instead of warning (none of the families' training ops does, on CPU)."""
    import os

    import numpy as np
    import torch

    # cuBLAS is deterministic only with a fixed workspace; without this, strict mode stops the first matmul on a GPU
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(True)
