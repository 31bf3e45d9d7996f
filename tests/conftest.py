"""Shared fixtures: a small real workspace (params.yaml + collected, extracted, indexed videos) in a temp folder.

Stages read params.yaml and write data/, models/, ... relative to the working directory, so a test runs a stage's
real `main()` inside such a folder, exactly as `dvc repro` runs it inside the repository.
"""
import contextlib
import os
import shutil
from pathlib import Path

import pytest
from ruamel.yaml import YAML

REPO = Path(__file__).resolve().parents[1]

# Small enough for seconds-long tests, big enough to cover every split and attribute value.
SMALL = {
    "collect": {"colors": ["red", "blue"], "shapes": ["circle", "square"], "directions": ["left", "right"],
                "clips_per_combo": 3, "test_fraction": 0.25, "val_fraction": 0.25},
    "train_seq2seq": {"max_steps": 8, "batch_size": 4},
    "train_vlm": {"max_steps": 8, "batch_size": 4},
    "evaluate": {"batch_size": 8, "max_new_tokens": 8},
}


def write_params(folder: Path, overrides: dict) -> None:
    """params.yaml of the repository with `overrides` merged in, block by block."""
    yaml = YAML()
    params = yaml.load((REPO / "params.yaml").read_text())
    for block, values in overrides.items():
        params[block].update(values)
    with open(folder / "params.yaml", "w") as f:
        yaml.dump(params, f)


@contextlib.contextmanager
def inside(folder: Path):
    previous = Path.cwd()
    os.chdir(folder)
    try:
        yield folder
    finally:
        os.chdir(previous)


@pytest.fixture(scope="session")
def small_data(tmp_path_factory) -> Path:
    """A folder with params.yaml and the outputs of collect, extract and manifest on the SMALL set."""
    from stages import collect, extract, manifest

    folder = tmp_path_factory.mktemp("small")
    write_params(folder, SMALL)
    with inside(folder):
        collect.main()
        extract.main()
        manifest.main()
    return folder


@pytest.fixture
def workspace(small_data, tmp_path):
    """A private copy of the small workspace, entered as the working directory."""
    folder = tmp_path / "ws"
    shutil.copytree(small_data, folder)
    with inside(folder):
        yield folder


@pytest.fixture(scope="session")
def trained(small_data, tmp_path_factory) -> Path:
    """The small workspace after both trainers (a few steps each) and evaluate."""
    from stages import evaluate, train_seq2seq, train_vlm

    folder = tmp_path_factory.mktemp("trained") / "ws"
    shutil.copytree(small_data, folder)
    with inside(folder):
        train_seq2seq.main()
        train_vlm.main()
        evaluate.main()
    return folder
