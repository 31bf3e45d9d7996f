"""Shared fixtures: a small real workspace (params.yaml + collected, extracted, indexed videos) in a temp folder.

Stages read params.yaml and write data/, models/, ... relative to the working directory, so a test runs a stage's
real `main()` inside such a folder, exactly as `dvc repro` runs it inside the repository. Plain helpers and
constants are in helpers.py.
"""
import shutil
from pathlib import Path

import pytest

from tests.helpers import SMALL, inside, write_params


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


def entered_copy(source: Path, tmp_path: Path):
    """A private copy of the workspace `source`, entered as the working directory (a fixture yields from it)."""
    folder = tmp_path / "ws"
    shutil.copytree(source, folder)
    with inside(folder):
        yield folder


@pytest.fixture
def workspace(small_data, tmp_path):
    """A private copy of the small workspace, entered as the working directory."""
    yield from entered_copy(small_data, tmp_path)


@pytest.fixture(scope="session")
def trained(small_data, tmp_path_factory) -> Path:
    """The small workspace after the three trainers (a few steps each) and both evaluations."""
    from stages import evaluate, evaluate_t2v, train_seq2seq, train_t2v, train_vlm

    folder = tmp_path_factory.mktemp("trained") / "ws"
    shutil.copytree(small_data, folder)
    with inside(folder):
        train_seq2seq.main()
        train_vlm.main()
        evaluate.main()
        train_t2v.main()
        evaluate_t2v.main()
    return folder


@pytest.fixture
def trained_workspace(trained, tmp_path):
    """A private copy of the trained workspace, entered as the working directory."""
    yield from entered_copy(trained, tmp_path)
