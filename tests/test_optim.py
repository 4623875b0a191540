"""train.py --optim adamw_8bit (bitsandbytes' AdamW with 8-bit state, on CPU here): the losses follow torch's AdamW,
a resumed run repeats the uninterrupted one, a run resumes only with its own optimizer; --expandable-segments."""
import os
import shutil

import pytest
import torch

import train
from test_train import args, colour_data, losses  # noqa: F401  (colour_data is a fixture)

# LoRA r 32 on the tiny Llama (width 64, MLP 128): bitsandbytes gives 8-bit state to the tensors of >= 4,096 values,
# the projector's second linear (64x64), LoRA B of gate_proj and up_proj (128x32) and LoRA A of down_proj (32x128)
# in both layers, 7 in all; the other LoRA matrices, the projector's first linear and the 2 vision layers keep fp32.
EIGHT_BIT = {"projector": [(64, 64)], "vision": [], "language": [(128, 32), (128, 32), (32, 128)] * 2}


def run_args(tiny, colour_data, out, optim, *extra):
    return args(tiny, colour_data, out, "--optim", optim, "--lora-r", "32", "--lora-alpha", "64",
                "--trainable-vision-layers", "2", "--max-steps", "20", "--save-every", "10", *extra)


@pytest.fixture(scope="module")
def runs(tiny, colour_data, tmp_path_factory):
    """20 steps of the same tiny run with torch's AdamW and with AdamW8bit -> {optim: its folder}."""
    root = tmp_path_factory.mktemp("optim")
    for optim in ("adamw", "adamw_8bit"):
        train.main(run_args(tiny, colour_data, root / optim, optim))
    return {optim: root / optim for optim in ("adamw", "adamw_8bit")}


def test_8bit_state_where_tensors_are_large_enough(runs):
    state = torch.load(runs["adamw_8bit"] / "checkpoint-20" / "train_state.pt", weights_only=False)["optimizer"]
    for group in state["param_groups"]:  # bitsandbytes' state_dict nests the moments under one key (for FSDP)
        kinds = [state["state"][i]["__bnb_optimizer_quant_state__"]["state1"] for i in group["params"]]
        assert sorted(tuple(s.shape) for s in kinds if s.dtype == torch.uint8) == sorted(EIGHT_BIT[group["name"]])
        assert all(s.dtype == torch.float32 for s in kinds if s.dtype != torch.uint8)


def test_8bit_losses_within_2_percent_of_adamw(runs):
    exact, eight_bit = losses(runs["adamw"]), losses(runs["adamw_8bit"])
    assert len(exact) == len(eight_bit) == 20
    assert exact[-1] < 0.9 * exact[0] and eight_bit != exact  # a learning run, and the 8-bit state changes it
    assert eight_bit == pytest.approx(exact, rel=0.02)


def test_8bit_resume_gives_the_same_losses(tiny, colour_data, runs, tmp_path):
    """What a run killed after step 10 leaves (its config.json and checkpoint-10), resumed: steps 11-20 again."""
    shutil.copytree(runs["adamw_8bit"] / "checkpoint-10", tmp_path / "checkpoint-10")
    shutil.copy(runs["adamw_8bit"] / "config.json", tmp_path)
    train.main(run_args(tiny, colour_data, tmp_path, "adamw_8bit", "--resume"))
    assert losses(tmp_path) == pytest.approx(losses(runs["adamw_8bit"])[10:], abs=1e-5)


def test_resume_refuses_another_optimizer_before_the_model_loads(tiny, colour_data, runs, monkeypatch):
    def load(*a, **k):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(train.LlavaStyleModel, "from_pretrained", load)
    checkpoint = runs["adamw_8bit"] / "checkpoint-20"
    with pytest.raises(SystemExit, match=f"{checkpoint} was saved with --optim adamw_8bit; resume it with the same, "
                                         "not --optim adamw$"):
        train.main(run_args(tiny, colour_data, runs["adamw_8bit"], "adamw", "--resume"))
    with pytest.raises(SystemExit, match=r"--optim must be one of \['adamw', 'adamw_8bit', 'paged_adamw_8bit'\]"):
        train.parse_args(["--optim", "sgd"])


def test_expandable_segments_unless_the_allocator_is_set_already(tiny, colour_data, tmp_path, monkeypatch):
    monkeypatch.delenv("PYTORCH_CUDA_ALLOC_CONF", raising=False)
    monkeypatch.setenv("PYTORCH_ALLOC_CONF", "expandable_segments:False")
    train.main(args(tiny, colour_data, tmp_path / "own", "--max-steps", "1", "--expandable-segments"))
    assert "PYTORCH_CUDA_ALLOC_CONF" not in os.environ  # the user's own setting wins
    monkeypatch.delenv("PYTORCH_ALLOC_CONF")
    train.main(args(tiny, colour_data, tmp_path / "set", "--max-steps", "1", "--expandable-segments"))
    assert os.environ["PYTORCH_CUDA_ALLOC_CONF"] == "expandable_segments:True"
