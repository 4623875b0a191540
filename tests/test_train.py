"""train.py: the loop learns, freezing holds, resume is exact, stages and bad inputs behave."""
import json
import os
import re
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
    return [r["loss"] for r in map(json.loads, open(os.path.join(out, "metrics.jsonl"))) if "loss" in r]


def test_loss_decreases_and_frozen_parameters_stay(tiny, colour_data, tmp_path):
    result = train.main(args(tiny, colour_data, tmp_path, "--max-steps", "30", "--trainable-vision-layers", "2",
                             "--lm-training", "full"))
    curve = losses(tmp_path)
    assert result["step"] == 30 and len(curve) == 30
    assert sum(curve[-5:]) / 5 < 0.5 * sum(curve[:5]) / 5
    record = json.loads(open(tmp_path / "metrics.jsonl").readline())
    assert set(record) >= {"step", "loss", "lr", "grad_norm", "tokens_per_s", "padded_fraction", "peak_memory_gb"}
    # The final checkpoint holds exactly the trained tensors; everything else equals the base weights.
    trained = LlavaStyleModel.from_pretrained(str(tmp_path / "final"), device="cpu")
    from safetensors import safe_open
    with safe_open(str(tmp_path / "final" / "trained.safetensors"), "pt") as f:
        saved = set(f.keys())
    assert saved == {n for n, p in trained.named_parameters() if p.requires_grad}  # projector, LM, vision layer 2
    assert not any(".layers.0." in n or ".layers.1." in n for n in saved if n.startswith("vision"))
    base = train.load_model(*train.parse_args(args(tiny, colour_data, tmp_path, "--trainable-vision-layers", "2",
                                                   "--lm-training", "full")),
                            "cpu")
    base_params, trained_params = dict(base.named_parameters()), dict(trained.named_parameters())
    changed = {name: not torch.equal(p, base_params[name]) for name, p in trained_params.items()}
    assert not any(changed[n] for n, p in trained_params.items() if not p.requires_grad)  # frozen: bit-identical
    assert all(changed[n] for n, p in trained_params.items() if p.requires_grad)  # trained: all moved


def test_sigterm_then_resume_gives_the_same_losses(tiny, colour_data, tmp_path):
    """A run stopped by SIGTERM mid-way saves a checkpoint; --resume then reproduces the uninterrupted losses."""
    common = ("--max-steps", "8", "--save-every", "100", "--trainable-vision-layers", "2")
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
    with pytest.raises(SystemExit, match="positive number"):
        train.parse_args(["--data", f"{colour_data}/llava.json:nan"])
    (tmp_path / "bad.yaml").write_text("lr: fast\n")
    with pytest.raises(SystemExit, match="bad.yaml: lr = 'fast' is not a number"):
        train.parse_args(["--config", str(tmp_path / "bad.yaml")])


def test_config_values_take_their_fields_types_or_are_refused(tmp_path, colour_data):
    config = tmp_path / "run.yaml"
    config.write_text(f"resume: 'no'\nlr: 1\ngradient_checkpointing: 'yes'\ndata: '{colour_data}/llava.json:1'\n")
    cfg, model = train.parse_args(["--config", str(config)])
    assert cfg.resume is False and cfg.lr == 1.0 and model["gradient_checkpointing"] is True
    assert cfg.data == [f"{colour_data}/llava.json:1"]  # one source, not a list of its characters
    for bad, message in [("resume: maybe", "resume = 'maybe' is not bool"), ("batch_size: [2]", "batch_size = [2] is "
                         "not int"), ("batch_size: true", "batch_size = True is not int"),
                         ("lr: fast", "lr = 'fast' is not a number"), ("mark_style: 3", "mark_style = 3 is not dict")]:
        config.write_text(bad + "\n")
        with pytest.raises(SystemExit, match=re.escape(f"run.yaml: {message}")):
            train.parse_args(["--config", str(config)])


def test_ranges_and_paths_are_checked_before_a_model_loads(colour_data):
    data = ["--data", f"{colour_data}/llava.json"]
    for flag, value in [("--batch-size", "0"), ("--grad-accum", "0"), ("--max-steps", "-1"), ("--max-length", "0")]:
        with pytest.raises(SystemExit, match=f"{flag} must be >= "):
            train.parse_args([*data, flag, value])
    with pytest.raises(SystemExit, match="--eval-bench .*nowhere: no such file or folder"):
        train.parse_args([*data, "--eval-bench", "nowhere"])


def test_a_second_run_into_one_out_is_refused_and_all_dropped_steps_stop(tiny, colour_data, tmp_path):
    train.main(args(tiny, colour_data, tmp_path, "--max-steps", "1"))
    with pytest.raises(SystemExit, match="already holds a run: --resume continues it"):
        train.main(args(tiny, colour_data, tmp_path, "--max-steps", "1"))
    assert len(losses(tmp_path)) == 1  # its metrics were not appended to
    with pytest.raises(SystemExit, match="step 1: all samples .* dropped .*--max-length 8"):
        train.main(args(tiny, colour_data, tmp_path / "short", "--max-steps", "2", "--max-length", "8"))
    assert not (tmp_path / "short" / "final").exists()  # no untrained final/


def test_resume_keeps_the_run_as_saved_unless_changes_are_allowed(tiny, colour_data, tmp_path):
    first = args(tiny, colour_data, tmp_path, "--max-steps", "2", "--save-every", "1")
    train.main(first)
    for extra, said in [(["--lora-r", "16"], "--lora-r 8; resume it with the same, not --lora-r 16$"),
                        (["--data", f"{colour_data}/text.json"], "--data .*; resume it with the same, not --data .*text.json"),
                        (["--lr", "0.5"], "--lr 0.003; .* not --lr 0.5 \\(or allow that with --resume-changes\\)")]:
        with pytest.raises(SystemExit, match="checkpoint-2 was saved with " + said):
            train.main([*first, "--resume", *extra])
    train.main([*first, "--resume", "--resume-changes", "--lr", "0.5", "--weight-decay", "0.1", "--max-steps", "3"])
    last = json.loads(open(tmp_path / "metrics.jsonl").read().splitlines()[-1])
    assert last["step"] == 3 and last["lr"] == pytest.approx(0.5 * train.cosine_with_warmup(2, 3, 0))  # applied
    saved = json.load(open(tmp_path / "config.json"))["train"]
    assert (saved["lr"], saved["weight_decay"], saved["max_steps"]) == (0.5, 0.1, 3)  # and recorded
    state = torch.load(tmp_path / "checkpoint-3" / "train_state.pt", weights_only=False)["optimizer"]
    assert {g["weight_decay"] for g in state["param_groups"]} == {0.1}


def test_yaml_config_with_flags_overriding_it(tmp_path, colour_data):
    (tmp_path / "run.yaml").write_text(f"lr: 2e-5\nmax_steps: '7'\nstage: sft\nlora_r: 4\n"
                                       f"data: ['{colour_data}/llava.json:0.7', '{colour_data}/text.json:0.3']\n")
    cfg, model_overrides = train.parse_args(["--config", str(tmp_path / "run.yaml"), "--lora-r", "16"])
    assert (cfg.lr, cfg.max_steps, cfg.stage, len(cfg.data)) == (2e-5, 7, "sft", 2)  # YAML's "2e-5" is a string
    assert model_overrides["lora_r"] == 16 and model_overrides["trainable_vision_layers"] == 0


def test_evaluation_on_a_bench_during_training(tiny, colour_data, tmp_path):
    options = dict(zip(("choice_a", "choice_b", "choice_c", "choice_d"), COLOURS))
    bench = [{"question_id": f"q{i}", "question": "What colour is the image?", "answer": "ABCD"[i % 4],
              "image": f"{i}.png", **options} for i in range(4)]
    (colour_data / "bench.json").write_text(json.dumps(bench))
    train.main(args(tiny, colour_data, tmp_path, "--max-steps", "2", "--eval-bench", str(colour_data / "bench.json"),
                    "--eval-every", "1", "--eval-splits", "image_mc"))
    evals = [r for r in map(json.loads, open(tmp_path / "metrics.jsonl")) if "eval" in r]
    assert [r["step"] for r in evals] == [1, 2] and all(0 <= r["eval"]["image_mc"] <= 100 for r in evals)
    assert (tmp_path / "eval-2" / "predictions.jsonl").exists() and len(losses(tmp_path)) == 2


def test_two_process_run_and_its_exact_resume(tiny, colour_data, tmp_path):
    """DDP on CPU through accelerate (gloo), launched as accelerate/torchrun would, with text-only batches (no
    vision) and LoRA dropout; resuming from step 2's checkpoint repeats steps 3-4 exactly, every process's
    RNG included (the two processes see different samples, so their dropout streams differ)."""
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1"}

    def launch(out, *extra):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "train.py",
               *args(tiny, colour_data, out, "--max-steps", "4", "--save-every", "2", "--data",
                     f"{colour_data}/text.json:0.5", *extra)]
        run = subprocess.run(cmd, cwd=os.path.dirname(os.path.dirname(__file__)), env=env, capture_output=True,
                             text=True, timeout=300)
        assert run.returncode == 0, run.stderr[-2000:]

    launch(tmp_path / "full")
    assert os.path.exists(tmp_path / "full" / "final" / "trained.safetensors")
    rng = torch.load(tmp_path / "full" / "checkpoint-2" / "train_state.pt", weights_only=False)["rng"]
    assert len(rng) == 2
    (tmp_path / "resumed").mkdir()
    os.system(f"cp -r {tmp_path}/full/checkpoint-2 {tmp_path}/resumed/")  # what a run killed after step 2 leaves
    launch(tmp_path / "resumed", "--resume")
    assert losses(tmp_path / "resumed") == pytest.approx(losses(tmp_path / "full")[2:], abs=1e-5)


def test_a_non_finite_loss_stops_naming_step_samples_and_checkpoint(tiny, colour_data, tmp_path):
    """An absurd learning rate blows the weights up in step 1, so step 2's loss is not finite."""
    with pytest.raises(SystemExit, match=r"non-finite loss \S+ at step 2, micro-batch 0, samples \[.*llava.json: \d"
                                         r".*last good checkpoint is .*checkpoint-1 \(--resume\)"):
        train.main(args(tiny, colour_data, tmp_path, "--max-steps", "3", "--save-every", "1", "--lr", "1e30",
                        "--projector-lr", "1e30", "--lm-training", "full"))
    assert (tmp_path / "checkpoint-1" / "train_state.pt").exists() and not (tmp_path / "checkpoint-2").exists()


def test_report_to_tensorboard(tiny, colour_data, tmp_path):
    """--report-to goes through accelerate's trackers: the run's loss and learning rate land in TensorBoard."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    train.main(args(tiny, colour_data, tmp_path, "--max-steps", "2", "--report-to", "tensorboard"))
    runs = [os.path.join(d, "") for d, _, files in os.walk(tmp_path) if any("tfevents" in f for f in files)]
    assert runs, "no TensorBoard event file written"
    scalars = set().union(*(EventAccumulator(r).Reload().Tags()["scalars"] for r in runs))
    assert {"loss", "lr", "grad_norm"} <= scalars


def test_compiled_model_trains_like_the_eager_one(tiny, colour_data, tmp_path, monkeypatch):
    """--compile compiles each transformer block; the same two steps give the same losses as eager mode.
    The test traces with dynamo and AOT autograd but skips inductor's C++ code generation (minutes on 2 cores)."""
    import functools

    from torch._dynamo.utils import counters
    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="aot_eager"))
    eager = train.main(args(tiny, colour_data, tmp_path / "eager", "--max-steps", "2", "--lora-dropout", "0"))
    torch._dynamo.reset()
    counters.clear()
    compiled = train.main(args(tiny, colour_data, tmp_path / "compiled", "--max-steps", "2", "--lora-dropout", "0",
                               "--compile"))
    assert counters["stats"]["unique_graphs"] > 0  # the blocks really went through dynamo
    assert compiled["step"] == eager["step"] == 2
    assert losses(tmp_path / "compiled") == pytest.approx(losses(tmp_path / "eager"), abs=1e-4)
