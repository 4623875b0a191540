"""train.py (and model.py's loaders, demo.py) under bad input and faults (issue 32, items 15 and 16): each test
breaks one thing a real run meets (a corrupt image, a kill mid-write, a full disk, a typo in a path) and checks
that the message names the file and that the work done so far survives."""
import contextlib
import errno
import io
import json
import os
import shutil

import pytest
import torch

import demo
import test_train
import train
from model import LlavaStyleModel, missing_folder
from test_train import args, losses

colour_data = test_train.colour_data  # its module fixture: the solid-colour images, shared


def metrics(out):
    return [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]


def question(sample_id, key, path):
    return {"id": sample_id, key: path, "conversations": [
        {"from": "human", "value": "<image>\nWhat colour is the image?"}, {"from": "gpt", "value": "red"}]}


@pytest.fixture(scope="module")
def bad_data(request):
    """colour_data plus bad.json: its 8 images, a corrupt one and one cut short (2 bad samples of 10); and
    bad_videos.json: the 8 images, a video cut short and an empty frame folder."""
    root = request.getfixturevalue("colour_data")
    (root / "corrupt.png").write_bytes(b"not a png")
    (root / "cut.png").write_bytes((root / "0.png").read_bytes()[:60])
    clip = os.path.join(os.path.dirname(__file__), "data", "rotated", "video_0.mov")
    (root / "cut.mov").write_bytes(open(clip, "rb").read()[:3000])
    (root / "empty_video").mkdir(exist_ok=True)
    good = json.load(open(root / "llava.json"))
    (root / "bad.json").write_text(json.dumps(
        good + [question("corrupt", "image", "corrupt.png"), question("cut", "image", "cut.png")]))
    (root / "bad_videos.json").write_text(json.dumps(
        good + [question("cut_video", "video", "cut.mov"), question("empty", "video", "empty_video")]))
    return root


def bad_args(tiny, root, out, *extra, data="bad.json"):
    """test_train's arguments over `data` instead of llava.json."""
    common = args(tiny, root, out, *extra)
    return [f"{root}/{data}:1" if a == f"{root}/llava.json:1" else a for a in common]


RUN = ("--max-steps", "4", "--save-every", "1", "--max-bad-fraction", "0.5")


@pytest.fixture(scope="module")
def base_run(tiny, bad_data, tmp_path_factory):
    """One uninterrupted 4-step run over bad.json, a checkpoint each step, and what it wrote to stderr."""
    out, err = tmp_path_factory.mktemp("base") / "run", io.StringIO()
    with contextlib.redirect_stderr(err):
        train.main(bad_args(tiny, bad_data, out, *RUN))
    return out, err.getvalue()


def copy_run(base, to, keep_step):
    """What a run killed after `keep_step`'s checkpoint leaves: later checkpoints gone, metrics.jsonl as written."""
    shutil.copytree(base, to)
    for name in os.listdir(to):
        if name.startswith("checkpoint-") and int(name.split("-")[1]) > keep_step:
            shutil.rmtree(to / name)
    shutil.rmtree(to / "final")
    return to


def test_16_bad_media_are_skipped_counted_and_stop_the_run_past_max_bad_fraction(tiny, bad_data, base_run, tmp_path):
    out, err = base_run
    rows = metrics(out)
    assert [r["step"] for r in rows] == [1, 2, 3, 4] and (out / "final" / "trained.safetensors").exists()
    skipped = [r["skipped"] for r in rows]
    assert skipped == sorted(skipped) and 0 < skipped[-1] == err.count("skipped sample ")  # one warning per skip
    assert "corrupt.png: cannot read this image" in err and "cut.png: cannot read this image" in err
    # a video cut short or an empty frame folder: skipped too, and the default --max-bad-fraction (1%; see
    # too_many_skipped) stops the run at the first one in this small file, naming it
    with pytest.raises(SystemExit, match=r"samples skipped of \d+ read, over --max-bad-fraction 0.01; "
                                         r"the last: .*(cut.mov: cannot decode this video|empty_video: 0 frames)"):
        train.main(bad_args(tiny, bad_data, tmp_path / "stopped", "--max-steps", "64", data="bad_videos.json"))
    # allowed that many, a step whose samples were all unreadable passes without an update (length grouping puts
    # the long videos together) and the run ends with its final weights
    train.main(bad_args(tiny, bad_data, tmp_path / "allowed", "--max-steps", "8", "--max-bad-fraction", "1",
                        data="bad_videos.json"))
    rows = metrics(tmp_path / "allowed")
    assert len(rows) == 8 and any(r["tokens_per_s"] == 0 for r in rows) and (tmp_path / "allowed" / "final").exists()


def test_15_resume_drops_a_cut_metrics_line_ignores_checkpoint_final_and_repeats_the_run(tiny, bad_data, base_run,
                                                                                        tmp_path, caplog):
    out, _ = base_run
    assert metrics(out)[2]["skipped"] > 0  # checkpoint-3 holds a count of skips to restore
    killed = copy_run(out, tmp_path / "killed", keep_step=3)
    (killed / "checkpoint-final").mkdir()  # a folder of the user's own
    with open(killed / "metrics.jsonl", "a") as f:
        f.write('{"step": 5, "lo')  # the kill cut the line being written
    train.main(bad_args(tiny, bad_data, killed, *RUN, "--resume"))
    assert "metrics.jsonl:5: not valid JSON" in caplog.text  # named, then dropped
    assert [(r["step"], r["skipped"]) for r in metrics(killed)] == [(r["step"], r["skipped"]) for r in metrics(out)]
    assert losses(killed) == pytest.approx(losses(out), abs=1e-5)


def test_15_resume_with_no_checkpoint_says_it_starts_from_step_0(tiny, bad_data, tmp_path, capsys):
    tmp_path.joinpath("metrics.jsonl").write_text('{"step": 1, "loss": 1.0}\n{"st')  # killed before a checkpoint
    train.main(args(tiny, bad_data, tmp_path, "--max-steps", "1", "--resume"))
    assert f"--resume: no checkpoint in {tmp_path}; starting from step 0" in capsys.readouterr().err
    assert [r["step"] for r in metrics(tmp_path)] == [1]  # the old lines went: no step logged twice


def test_15_a_full_disk_during_a_checkpoint_keeps_the_previous_one(tiny, bad_data, base_run, tmp_path, monkeypatch):
    out, _ = base_run
    run = copy_run(out, tmp_path / "run", keep_step=2)
    save = torch.save

    def full_disk(obj, path, *a, **k):  # the weights are written, then the disk fills
        raise OSError(errno.ENOSPC, "No space left on device", path)

    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(SystemExit, match=r"checkpoint-3: not saved, the disk is full .*No space left on device.*"
                                         r"free space, then --resume"):
        train.main(bad_args(tiny, bad_data, run, *RUN, "--resume"))
    assert sorted(n for n in os.listdir(run) if n.startswith("checkpoint")) == ["checkpoint-1", "checkpoint-2"]
    monkeypatch.setattr(torch, "save", save)
    LlavaStyleModel.from_pretrained(str(run / "checkpoint-2"), device="cpu")  # still loads
    train.main(bad_args(tiny, bad_data, run, *RUN, "--resume"))
    assert losses(run) == pytest.approx(losses(out), abs=1e-5)


def test_15_a_corrupt_trained_safetensors_is_named(base_run, tmp_path):
    out, _ = base_run
    folder = shutil.copytree(out / "checkpoint-1", tmp_path / "checkpoint-1")
    weights = folder / "trained.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])  # cut
    with pytest.raises(ValueError, match=f"{weights}: corrupt .*; save it again, or load an earlier checkpoint"):
        LlavaStyleModel.from_pretrained(str(folder), device="cpu")


@pytest.mark.parametrize("flag", ["--init-from", "--llava-checkpoint", "--vision-model", "--language-model"])
def test_15_a_missing_model_folder_is_named_before_anything_loads(bad_data, tmp_path, flag):
    for missing in (str(tmp_path / "typo"), "./typo", "runs/instit/final"):
        with pytest.raises(SystemExit, match=f"^{flag} {missing}: no such folder$"):
            train.parse_args(["--data", f"{bad_data}/llava.json", flag, missing])


def test_15_evaluate_model_path_missing_is_named(tmp_path):
    """evaluate.py's --model goes through LlavaStyleModel.from_pretrained; a hub ID (namespace/name) is not a path."""
    with pytest.raises(FileNotFoundError, match=f"^{tmp_path}/runs/final: no such folder$"):
        LlavaStyleModel.from_pretrained(str(tmp_path / "runs" / "final"))
    assert missing_folder("llava-hf/llava-1.5-7b-hf") is None


def test_15_a_hub_id_is_not_taken_for_a_folder_and_home_is_expanded(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "openai").mkdir()  # a local folder named like the hub namespace
    assert missing_folder("openai/clip-vit-large-patch14") is None  # still the hub's to answer
    monkeypatch.setenv("HOME", str(tmp_path))
    assert missing_folder("~/openai") is None and missing_folder("~/typo") == "~/typo: no such folder"


def test_16_the_stop_rule_waits_for_evidence():
    """One unreadable file early in a long run does not stop it; a source that is all bad stops it at once."""
    assert not train.too_many_skipped(1, read=16, total=10_000, fraction=0.01)  # 6% of what was read, but 1 file
    assert train.too_many_skipped(10, read=16, total=10_000, fraction=0.01)  # 10 of the first 16: a broken source
    assert not train.too_many_skipped(50, read=10_000, total=10_000, fraction=0.01)  # 0.5%: within the fraction
    assert train.too_many_skipped(2, read=8, total=10, fraction=0.01)  # a small file: past 1% of all its data


def test_16_two_processes_keep_in_step_when_one_has_only_unreadable_samples(tiny, bad_data, tmp_path):
    """DDP (gloo, 2 CPU processes, one sample each per micro-batch): a process whose micro-batch held only bad
    samples replays its last batch with weight 0, so both still meet at every gradient all-reduce (it used to
    leave the other process waiting, or mix up the count of skips)."""
    import subprocess
    import sys
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1"}
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "train.py",
           *bad_args(tiny, bad_data, out, "--max-steps", "6", "--batch-size", "1", "--max-bad-fraction", "1")]
    run = subprocess.run(cmd, cwd=os.path.dirname(os.path.dirname(__file__)), env=env, capture_output=True,
                         text=True, timeout=240)
    assert run.returncode == 0, run.stderr[-2000:]
    rows = metrics(out)
    assert len(rows) == 6 and rows[-1]["skipped"] == run.stderr.count("skipped sample ") > 0


def test_15_batch_size_0_and_demo_scenes_0_are_refused_up_front(bad_data, tmp_path):
    with pytest.raises(SystemExit, match="--batch-size must be >= 1, got 0"):
        train.parse_args(["--data", f"{bad_data}/llava.json", "--batch-size", "0"])
    with pytest.raises(SystemExit, match="--scenes must be >= 1, got 0"):
        demo.main(["--scenes", "0", "--out", str(tmp_path / "demo")])
    assert not (tmp_path / "demo").exists()  # nothing was built
