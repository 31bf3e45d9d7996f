import json
import re
import shutil
import subprocess
import sys

import pytest
import torch

from stages import ask, push
from stages.common.files import read_jsonl
from stages.models import vlm
from tests.helpers import ENV, REPO, TINY_VLM, inside, question_of, video_file


@pytest.mark.parametrize("name", list(vlm.FAMILIES))
def test_a_video_file_reaches_each_family_as_the_extracted_frames_reached_evaluate(name, small_data, tmp_path):
    """Frames decoded from the file by the recorded sampling, their times, and the recorded prompt layout give the
    model exactly the inputs evaluate built from the extract shards and the manifest row."""
    fam = vlm.family(name)
    texts = [m["content"].replace(vlm.VIDEO, "") for row in read_jsonl(small_data / "data/manifest/train.jsonl")
             for m in row["messages"]]
    folder = fam.build_tiny(TINY_VLM, texts, 32, tmp_path / "model")
    with inside(small_data):
        push.record_sampling(folder, name, max_new_tokens=8, max_length=4096)
    record, fam, processor, model = ask.load(str(folder))
    for row in read_jsonl(small_data / "data/manifest/test.jsonl")[:2]:
        expected = vlm.generation_inputs([row], processor, fam, small_data / "data/frames")
        with inside(small_data):
            sampled = ask.sample_video(video_file(small_data, row), record)
        asked = ask.prompt(record, question_of(row), sampled, processor, fam)
        assert expected.keys() == asked.keys()
        for key in expected:
            assert torch.equal(expected[key], asked[key]), key


@pytest.fixture(scope="module")
def exported_vlm(trained, tmp_path_factory):
    """The trained tiny LLaVA of the `trained` workspace with the record push writes beside it."""
    folder = tmp_path_factory.mktemp("export") / "vlm"
    shutil.copytree(trained / "models/vlm/model", folder)
    with inside(trained):
        push.record_sampling(folder, "llava", max_new_tokens=8, max_length=192)   # SMALL's evaluate, train_vlm
    return folder


def run_ask(*args, cwd):
    return subprocess.run([sys.executable, "-m", "stages.ask", *args], cwd=cwd, env={**ENV, "PYTHONPATH": str(REPO)},
                          capture_output=True, text=True)


def test_ask_streams_the_answer_evaluate_gave_and_nothing_else(trained, exported_vlm):
    row = read_jsonl(trained / "data/manifest/test.jsonl")[1]
    predicted = next(p["prediction"] for p in read_jsonl(trained / "eval/predictions.jsonl")
                     if p["model"] == "vlm" and p["id"] == row["id"])
    result = run_ask(str(video_file(trained, row)), question_of(row), "--model", str(exported_vlm), cwd=REPO)
    assert result.returncode == 0, result.stderr
    assert result.stdout == predicted + "\n"          # the streamer prints the answer and its final newline only


def test_ask_says_clearly_when_a_video_cannot_be_read(exported_vlm, tmp_path):
    (tmp_path / "clip.mp4").write_text("not a video\n")
    result = run_ask(str(tmp_path / "clip.mp4"), "What moves?", "--model", str(exported_vlm), cwd=tmp_path)
    assert result.returncode == 1 and result.stdout == ""
    assert "ask: cannot read the video" in result.stderr and "Traceback" not in result.stderr
    result = run_ask(str(tmp_path / "missing.mp4"), "What moves?", "--model", str(exported_vlm), cwd=tmp_path)
    assert result.returncode == 1 and "missing.mp4: no such file" in result.stderr



def test_ask_refuses_a_video_longer_than_the_training_allowed_with_its_token_count(trained, exported_vlm, tmp_path):
    folder = tmp_path / "vlm"
    shutil.copytree(exported_vlm, folder)
    record = json.loads((folder / ask.SAMPLING_FILE).read_text())
    (folder / ask.SAMPLING_FILE).write_text(json.dumps({**record, "max_length": 40}))
    row = read_jsonl(trained / "data/manifest/test.jsonl")[0]
    result = run_ask(str(video_file(trained, row)), question_of(row), "--model", str(folder), cwd=REPO)
    assert result.returncode == 1 and result.stdout == ""
    assert re.search(r"ask: the video and question make \d+ tokens, above the 40 \(train_vlm.max_length\)",
                     result.stderr), result.stderr
