import json

import pytest

from stages.common.params import ParamsError, load
from tests.helpers import REPO, write_params


def test_every_block_of_the_shipped_params_is_valid():
    for stage in ("collect", "extract", "manifest", "train_seq2seq", "train_vlm", "evaluate", "push"):
        params = load(stage, REPO / "params.yaml")
        assert set(params) == {"base", stage}


def test_unknown_key_is_named(tmp_path):
    write_params(tmp_path, {"train_vlm": {"learning_rat": 0.1}})
    with pytest.raises(ParamsError, match=r"unknown key `train_vlm\.learning_rat`"):
        load("train_vlm", tmp_path / "params.yaml")


def test_wrong_type_is_named(tmp_path):
    write_params(tmp_path, {"extract": {"num_frames": "four"}})
    with pytest.raises(ParamsError, match=r"`extract\.num_frames`: 'four' is not of type 'integer'"):
        load("extract", tmp_path / "params.yaml")


def test_nested_key_and_bad_enum_value_are_named(tmp_path):
    write_params(tmp_path, {"train_seq2seq": {"tiny": {"d_model": 64, "layers": 2, "heads": 4, "ffn_dim": 128,
                                                       "vocab_size": 512, "dropout": 0.1}},
                            "collect": {"colors": ["red", "mauve"]}})
    with pytest.raises(ParamsError, match=r"unknown key `train_seq2seq\.tiny\.dropout`"):
        load("train_seq2seq", tmp_path / "params.yaml")
    with pytest.raises(ParamsError, match=r"`collect\.colors\.1`: 'mauve' is not one of"):
        load("collect", tmp_path / "params.yaml")


def test_other_blocks_do_not_stop_a_stage(tmp_path):
    write_params(tmp_path, {"train_vlm": {"learning_rat": 0.1}})
    assert load("extract", tmp_path / "params.yaml")["extract"]["num_frames"] >= 1


def test_scientific_notation_is_a_number(tmp_path):
    (tmp_path / "params.yaml").write_text((REPO / "params.yaml").read_text().replace(
        "learning_rate: 0.001", "learning_rate: 1e-3"))
    assert load("train_vlm", tmp_path / "params.yaml")["train_vlm"]["learning_rate"] == 0.001


def test_missing_block_is_named(tmp_path):
    (tmp_path / "params.yaml").write_text("base:\n  seed: 0\n")
    with pytest.raises(ParamsError, match="missing block `extract`"):
        load("extract", tmp_path / "params.yaml")


def test_no_param_is_named_like_a_dvc_metadata_field():
    """DVC (3.67) leaves `size` and `nfiles` out of its run-cache key, at any depth: a param of that name would make
    `dvc repro` restore the outputs of another value. The e2e extract test caught exactly that."""

    from stages.common.params import SCHEMA_DIR

    def names(schema):
        for name, sub in schema.get("properties", {}).items():
            yield name
            yield from names(sub)
    for path in SCHEMA_DIR.glob("*.json"):
        assert not {"size", "nfiles"} & set(names(json.loads(path.read_text()))), path


def test_each_stage_depends_on_its_own_schema_base_and_the_shared_ones_it_refers_to_only():
    """A new knob in one block must not rerun the other stages: dvc.yaml lists exactly the schemas a stage reads
    (schedule.json: the trainers' shared keys; finetune.json: the VLM trainers')."""
    import yaml

    from stages.common.params import SCHEMA_DIR

    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    # the block a stage loads: its own, except embed's (train_vlm's knobs decide the cache it writes)
    blocks = {**{name: name for name in stages}, "embed": "train_vlm"}
    assert {p.split(".")[0] for p in stages["embed"]["params"]} == {"base", "train_vlm"}
    assert {p.stem for p in SCHEMA_DIR.glob("*.json")} == {"base", "schedule", "finetune", *blocks.values()}
    for name, stage in stages.items():
        schema = json.loads((SCHEMA_DIR / f"{blocks[name]}.json").read_text())
        shared = {f"stages/schema/params/{part['$ref']}" for part in schema.get("allOf", [])}
        schemas = {d for d in stage["deps"] if d.startswith("stages/schema/params")}
        assert schemas == {"stages/schema/params/base.json", f"stages/schema/params/{blocks[name]}.json", *shared}, \
            name
    assert {"train_seq2seq", "train_vlm", "align_vlm"} <= {name for name, stage in stages.items()
                                                           if "stages/schema/params/schedule.json" in stage["deps"]}
    assert {"train_vlm", "align_vlm"} <= {name for name, stage in stages.items()
                                          if "stages/schema/params/finetune.json" in stage["deps"]}


def docstring_only(path) -> bool:
    """A package's __init__.py that only describes it (stages/, stages/data/, ...): it runs no code a stage uses."""
    import ast

    body = ast.parse(path.read_text()).body
    return len(body) == 1 and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant)


def test_each_stage_depends_on_every_module_it_imports():
    """A stage module and the stages.* modules it imports (transitively, anywhere in their code: a function's lazy
    import runs in the stage too) are all in its deps, so that a change to shared code reruns every stage that runs
    it. Read from the source: importing each stage in an interpreter of its own took 45 s of torch imports."""
    import yaml

    stages, missing = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"], {}
    for name, stage in stages.items():
        todo, seen = [stage["cmd"].split("-m ")[1].split()[0]], set()
        while todo:
            module = todo.pop()
            seen.add(module)
            todo += stages_imports(module) - seen
        files = {str(module_file(module).relative_to(REPO)) for module in seen}
        missing[name] = sorted(f for f in files if not docstring_only(REPO / f)
                               and not any(f == dep or f.startswith(dep + "/") for dep in stage["deps"]))
    assert missing == {name: [] for name in stages}, "imported by the stage but not in its dvc.yaml deps"
    # the reader sees lazy and relative imports: align_vlm loads its trainers only when a method is set
    assert {"stages.training.align", "stages.training.rewards"} <= stages_imports("stages.align_vlm")


def module_file(name: str):
    """The file of module `name` in the repository (a module's .py or a package's __init__.py), or None."""
    path = REPO / name.replace(".", "/")
    return next((f for f in (path.with_suffix(".py"), path / "__init__.py") if f.exists()), None)


def stages_imports(name: str) -> set[str]:
    """The stages.* modules that module `name` imports anywhere in its code, with the packages above them."""
    import ast

    file, found = module_file(name), set()
    package = name if file.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(file.read_text())):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:                          # from . import x, from ..y import z
                base = ".".join([package.rsplit(".", node.level - 1)[0], base]).rstrip(".")
            targets = [base] + [f"{base}.{alias.name}" for alias in node.names]     # a name may be a submodule
        else:
            continue
        for parts in (target.split(".") for target in targets if target.startswith("stages.") and module_file(target)):
            found |= {".".join(parts[:i]) for i in range(1, len(parts) + 1)}
    return found


def test_the_collect_schema_names_every_annotation_format_the_importers_read():
    from stages.common.params import SCHEMA_DIR
    from stages.data.formats import FORMATS

    schema = json.loads((SCHEMA_DIR / "collect.json").read_text())
    enums = [node["enum"] for node in walk(schema) if isinstance(node, dict) and "auto" in node.get("enum", [])]
    assert enums == [["auto", *FORMATS]]


def walk(node):
    yield node
    for child in (node.values() if isinstance(node, dict) else node if isinstance(node, list) else []):
        yield from walk(child)
