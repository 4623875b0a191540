"""train.py: the loop learns, freezing holds, resume is exact, stages and bad inputs behave."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from PIL import Image

import train
from model import LlavaStyleModel

COLOURS = {"red": (220, 30, 30), "green": (30, 200, 60), "blue": (30, 60, 220), "yellow": (230, 220, 40)}


@pytest.fixture(scope="module")
def colour_data(tmp_path_factory):
    """A LLaVA-format file: solid-colour images, "What colour is the image?" -> the colour name."""
    root = tmp_path_factory.mktemp("colours")
    records = []
    for i, (name, rgb) in enumerate(list(COLOURS.items()) * 2):
        Image.new("RGB", (32, 32), rgb).save(root / f"{i}.png")
        records.append({"id": str(i), "image": f"{i}.png", "conversations": [
            {"from": "human", "value": "<image>\nWhat colour is the image?"}, {"from": "gpt", "value": name}]})
    (root / "llava.json").write_text(json.dumps(records))
    text = [{"id": f"t{i}", "conversations": [{"from": "human", "value": "Say yes."}, {"from": "gpt", "value": "yes"}]}
            for i in range(4)]
    (root / "text.json").write_text(json.dumps(text))
    return root


def args(tiny, data_root, out, *extra):
    return ["--vision-model", tiny["clip"], "--language-model", tiny["llama"], "--data", f"{data_root}/llava.json:1",
            "--media-root", str(data_root), "--out", str(out), "--lora-r", "8", "--lora-alpha", "16",
            "--lora-dropout", "0.1", "--batch-size", "4", "--grad-accum", "1", "--lr", "3e-3",
            "--projector-lr", "3e-3", "--vision-lr", "1e-3", "--num-workers", "0", "--warmup-ratio", "0",
            *extra]


def losses(out):
    return [json.loads(line)["loss"] for line in open(os.path.join(out, "metrics.jsonl"))]


def test_loss_decreases_and_frozen_parameters_stay(tiny, colour_data, tmp_path):
    result = train.main(args(tiny, colour_data, tmp_path, "--max-steps", "30", "--trainable-vision-layers", "1",
                             "--lm-training", "full"))
    curve = losses(tmp_path)
    assert result["step"] == 30 and len(curve) == 30
    assert sum(curve[-5:]) / 5 < 0.5 * sum(curve[:5]) / 5
    record = json.loads(open(tmp_path / "metrics.jsonl").readline())
    assert set(record) >= {"step", "loss", "lr", "grad_norm", "tokens_per_s", "padded_fraction", "peak_memory_gb"}
    # The final checkpoint holds exactly the trained tensors; everything else equals the base weights.
    trained = LlavaStyleModel.from_pretrained(str(tmp_path / "final"), device="cpu")
    base = train.load_model(*train.parse_args(args(tiny, colour_data, tmp_path, "--trainable-vision-layers", "1",
                                                   "--lm-training", "full")),
                            "cpu")
    base_params, trained_params = dict(base.named_parameters()), dict(trained.named_parameters())
    changed = {name: not torch.equal(p, base_params[name]) for name, p in trained_params.items()}
    assert not any(changed[n] for n, p in trained_params.items() if not p.requires_grad)  # frozen: bit-identical
    assert all(changed[n] for n, p in trained_params.items() if p.requires_grad)  # trained: all moved


def test_sigterm_then_resume_gives_the_same_losses(tiny, colour_data, tmp_path):
    """A run stopped by SIGTERM mid-way saves a checkpoint; --resume then reproduces the uninterrupted losses."""
    common = ("--max-steps", "8", "--save-every", "100", "--trainable-vision-layers", "1")
    train.main(args(tiny, colour_data, tmp_path / "straight", *common))
    cmd = [sys.executable, "train.py", *args(tiny, colour_data, tmp_path / "stopped", *common)]
    proc = subprocess.Popen(cmd, cwd=os.path.dirname(os.path.dirname(__file__)), stderr=subprocess.PIPE, text=True)
    metrics = tmp_path / "stopped" / "metrics.jsonl"
    while proc.poll() is None and not (metrics.exists() and len(metrics.read_text().splitlines()) >= 2):
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=120) == 0 and "--resume continues" in proc.stderr.read()
    stopped_at = len(losses(tmp_path / "stopped"))
    assert 2 <= stopped_at < 8 and train.latest_checkpoint(str(tmp_path / "stopped"))
    train.main(args(tiny, colour_data, tmp_path / "stopped", *common, "--resume"))
    straight, resumed = losses(tmp_path / "straight"), losses(tmp_path / "stopped")
    assert len(resumed) == 8
    assert max(abs(a - b) for a, b in zip(straight, resumed)) <= 1e-5


def test_stages_and_sequential_tuning(tiny, colour_data, tmp_path):
    train.main(args(tiny, colour_data, tmp_path / "text", "--stage", "align", "--max-steps", "2",
                    "--data", f"{colour_data}/text.json:1"))
    align = json.load(open(tmp_path / "text" / "config.json"))["model"]
    assert (align["lm_training"], align["trainable_vision_layers"]) == ("frozen", 0)
    # MultiInstruct's sequential tuning: a later stage starts from the earlier run's weights.
    train.main(args(tiny, colour_data, tmp_path / "sft", "--stage", "sft", "--max-steps", "2",
                    "--init-from", str(tmp_path / "text" / "final")))
    sft = json.load(open(tmp_path / "sft" / "config.json"))["model"]
    assert (sft["lm_training"], sft["trainable_vision_layers"]) == ("lora", 0)


def test_4bit_lora_steps(tiny, colour_data, tmp_path):
    result = train.main(args(tiny, colour_data, tmp_path, "--max-steps", "2", "--load-in-4bit"))
    assert result["step"] == 2 and all(map(lambda x: x == x, losses(tmp_path)))


def test_bad_inputs_fail_before_any_model_is_loaded(tmp_path, colour_data):
    with pytest.raises(SystemExit, match="does not exist"):
        train.parse_args(["--data", str(tmp_path / "missing.json:0.5")])
    with pytest.raises(SystemExit, match="not a number"):
        train.parse_args(["--data", f"{colour_data}/llava.json:half"])
    with pytest.raises(SystemExit, match="--stage must be one of"):
        train.parse_args(["--stage", "pretrain"])


def test_two_process_run(tiny, colour_data, tmp_path):
    """DDP on CPU through accelerate (gloo), launched as accelerate/torchrun would."""
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "train.py",
           *args(tiny, colour_data, tmp_path, "--max-steps", "2")]
    run = subprocess.run(cmd, cwd=os.path.dirname(os.path.dirname(__file__)), env=env, capture_output=True,
                         text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    assert len(losses(tmp_path)) == 2 and os.path.exists(tmp_path / "final" / "trained.safetensors")
