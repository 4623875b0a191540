"""Batches: pixels, chat template, assistant-only labels, visual-token expansion, truncation, collation,
the mixture sampler, the CLI."""
import functools
import itertools
import json
import logging
import subprocess
import sys
from collections import Counter

import numpy as np
import pytest
import torch
from PIL import Image

import data
import train
import som
from conftest import make_tokenizer
from model import ModelConfig, num_visual_tokens, preprocess_image

CFG = ModelConfig(image_size=32, patch_size=8, has_cls=True, max_frames=8)  # 4x4 grid: 16 tokens, 4 pooled


def image(value=100, size=(20, 12)):
    return Image.new("RGB", size, (value, 50, 200))


def sample(messages, visuals=(), sample_id="s1"):
    return {"id": sample_id, "source": "test", "visuals": list(visuals),
            "messages": [{"role": r, "content": c} for r, c in messages]}


TWO_TURNS = [("user", "<image>\nDescribe [1]."), ("assistant", "[1] is a red circle."),
             ("user", "What changed?"), ("assistant", "[2] moves right.")]


@pytest.fixture(scope="module")
def tok():
    return make_tokenizer()


def test_preprocess_pads_with_the_mean_and_matches_clip_processing():
    try:
        from transformers import CLIPImageProcessorPil as Processor
    except ImportError:
        from transformers import CLIPImageProcessor as Processor
    cfg = ModelConfig(image_size=32, patch_size=8, image_mean=(0.4, 0.5, 0.6), image_std=(0.2, 0.3, 0.25))
    square = Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 40, 3), dtype=np.uint8))
    reference = Processor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32},
                          image_mean=cfg.image_mean, image_std=cfg.image_std)(square, return_tensors="pt")["pixel_values"][0]
    assert torch.allclose(preprocess_image(square, cfg), reference, atol=1e-5)
    wide = preprocess_image(Image.new("RGB", (64, 16), (255, 255, 255)), cfg)  # padded above and below
    assert wide.shape == (3, 32, 32)
    assert wide[:, :8].abs().max() < 0.03 and wide[:, 16].min() > 1.5  # mean colour -> ~0; white stays white


def test_exact_assistant_only_labels_with_the_chat_template(tok):
    out = data.encode_sample(sample(TWO_TURNS, [{"frames": [image()], "pooled": False}]), tok, CFG)
    pieces = ["<|im_start|>user\n<image>\nDescribe [1].<|im_end|>\n<|im_start|>assistant\n",
              "[1] is a red circle.<|im_end|>\n",
              "<|im_start|>user\nWhat changed?<|im_end|>\n<|im_start|>assistant\n",
              "[2] moves right.<|im_end|>\n"]
    ids = [tok(p, add_special_tokens=False)["input_ids"] for p in pieces]
    image_id = tok.convert_tokens_to_ids("<image>")
    k = ids[0].index(image_id)
    ids[0][k:k + 1] = [image_id] * 16  # one unpooled 4x4 image: 16 tokens
    expected_ids = [t for p in ids for t in p]
    expected_labels = [-100] * len(ids[0]) + ids[1] + [-100] * len(ids[2]) + ids[3]
    assert out["input_ids"].tolist() == expected_ids
    assert out["labels"].tolist() == expected_labels
    assert tok.decode(out["labels"][out["labels"] != -100]) == "[1] is a red circle.<|im_end|>\n[2] moves right.<|im_end|>\n"
    assert out["pixel_values"].shape == (1, 3, 32, 32)
    assert out["visual_frames"] == [1] and out["visual_pooled"] == [False]


def test_plain_template_for_tokenizers_without_one():
    tok = make_tokenizer()
    tok.chat_template = None
    out = data.encode_sample(sample(TWO_TURNS, [{"frames": [image()]}]), tok, CFG)
    text = tok.decode(out["input_ids"][out["input_ids"] != tok.convert_tokens_to_ids("<image>")])
    assert text.startswith("<s>" + data.FALLBACK_SYSTEM + " USER: \nDescribe [1]. ASSISTANT: [1] is")
    labelled = out["labels"] != -100
    starts = torch.diff(labelled.int(), prepend=torch.zeros(1, dtype=torch.int)) == 1
    assert starts.sum() == 2  # two separate assistant spans
    assert tok.decode(out["labels"][labelled]).split() == "[1] is a red circle.</s> [2] moves right.</s>".split()


def test_visual_token_counts_pooled_and_unpooled(tok):
    video = {"frames": [image(v) for v in (10, 20, 30)], "pooled": True}
    pair = [{"frames": [image()], "pooled": True}, {"frames": [image()], "pooled": True}]
    msgs = [("user", "<image>\nWhat happens?"), ("assistant", "Nothing.")]
    image_id = tok.convert_tokens_to_ids("<image>")
    out = data.encode_sample(sample(msgs, [video]), tok, CFG)
    assert (out["input_ids"] == image_id).sum() == num_visual_tokens(CFG, 3, True) == 12
    assert out["pixel_values"].shape == (3, 3, 32, 32) and out["visual_frames"] == [3]
    out = data.encode_sample(sample([("user", "<image> or <image>?"), ("assistant", "Left.")], pair), tok, CFG)
    assert (out["input_ids"] == image_id).sum() == 8 and out["visual_pooled"] == [True, True]
    # without a "pooled" key the INST-IT rule applies: several frames or several visuals -> pooled
    out = data.encode_sample(sample(msgs, [{"frames": [image(), image()]}]), tok, CFG)
    assert out["visual_pooled"] == [True]
    out = data.encode_sample(sample([("user", "Hi"), ("assistant", "Hello.")]), tok, CFG)
    assert out["pixel_values"] is None and out["visual_frames"] == []


def test_bad_samples_are_errors_naming_them(tok):
    one = [{"frames": [image()]}]
    with pytest.raises(ValueError, match="sample s1: 2 <image> placeholders for 1 visuals"):
        data.encode_sample(sample([("user", "<image><image>"), ("assistant", "x")], one), tok, CFG)
    with pytest.raises(ValueError, match="sample q9: a training sample must end with an assistant turn"):
        data.encode_sample(sample([("user", "<image>?")], one, "q9"), tok, CFG)
    with pytest.raises(ValueError, match="sample a1: no assistant tokens to learn from"):
        data.encode_sample(sample([("assistant", "I start.")], [], "a1"), tok, CFG)


def test_label_masks_are_checked_against_the_template():
    users_only = make_tokenizer()  # a template that never renders assistant turns: nothing to learn from
    users_only.chat_template = "{% for m in messages %}{% if m['role'] == 'user' %}Q: {{ m['content'] }}\n{% endif %}{% endfor %}"
    with pytest.raises(ValueError, match="sample e1: assistant turn 0 gets no tokens .* label mask would be empty"):
        data.encode_sample(sample([("user", "Hi"), ("assistant", "Hello.")], [], "e1"), users_only, CFG)
    header_only = make_tokenizer()  # renders the assistant's header and end marker but drops its words
    header_only.chat_template = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{% if m['role'] != 'assistant' %}"
                                 "{{ m['content'] }}{% endif %}<|im_end|>\n{% endfor %}"
                                 "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    with pytest.raises(ValueError, match="sample e2: assistant turn 0: its labelled tokens .* do not cover"):
        data.encode_sample(sample([("user", "Hi"), ("assistant", "Hello.")], [], "e2"), header_only, CFG)
    shifting = make_tokenizer()  # earlier turns rendered differently once the chat grows
    shifting.chat_template = "{% for m in messages %}{{ loop.length }}{{ m['content'] }}{% endfor %}"
    with pytest.raises(ValueError, match="sample e3: the tokenizer's chat template renders earlier turns differently"):
        data.encode_sample(sample([("user", "Hi"), ("assistant", "Hello.")], [], "e3"), shifting, CFG)


def test_generation_prompt_is_left_for_the_model_to_answer(tok):
    out = data.encode_sample(sample([("user", "<image>\nWhat is [1]?")], [{"frames": [image()]}]), tok, CFG,
                             add_generation_prompt=True)
    assert tok.decode(out["input_ids"]).endswith("What is [1]?<|im_end|>\n<|im_start|>assistant\n")
    assert (out["labels"] == -100).all()


def test_overlong_samples_shortened_in_text_never_in_visual_tokens(tok, caplog):
    qa = [("user", "<image>\nWhat is [1]?"), ("assistant", "A red circle left of [2].")]
    for k in range(4):
        qa += [("user", f"And what changed at <{k + 1}>?"), ("assistant", "[2] moves right and [1] stays still.")]
    visual = [{"frames": [image()], "pooled": False}]
    full = data.encode_sample(sample(qa, visual), tok, CFG)
    two_pairs = data.encode_sample(sample(qa[:4], visual), tok, CFG)
    short = data.encode_sample(sample(qa, visual), tok, CFG, max_length=len(two_pairs["input_ids"]) + 5)
    assert torch.equal(short["input_ids"], two_pairs["input_ids"])  # the last QA turns were dropped whole
    assert torch.equal(short["labels"], two_pairs["labels"])
    one = data.encode_sample(sample(qa[:2], visual), tok, CFG)
    cut = data.encode_sample(sample(qa[:2], visual), tok, CFG, max_length=len(one["input_ids"]) - 3)
    assert len(cut["input_ids"]) == len(one["input_ids"]) - 3  # the answer's tail was cut
    assert (cut["input_ids"] == tok.convert_tokens_to_ids("<image>")).sum() == 16
    assert (cut["labels"] != -100).any()
    with caplog.at_level(logging.WARNING):
        assert data.encode_sample(sample(qa, visual, "long1"), tok, CFG, max_length=18) is None
    assert "sample long1 dropped" in caplog.text and "max_length=18" in caplog.text
    assert len(full["input_ids"]) > len(short["input_ids"])


def test_collate_pads_right_for_training_and_left_for_generation(tok):
    a = data.encode_sample(sample(TWO_TURNS, [{"frames": [image()]}]), tok, CFG)
    b = data.encode_sample(sample([("user", "Hi"), ("assistant", "Hello.")]), tok, CFG)
    c = data.encode_sample(sample([("user", "<image>"), ("assistant", "Two.")],
                                  [{"frames": [image(), image()], "pooled": True}]), tok, CFG)
    batch = data.collate([a, None, b, c], pad_token_id=tok.pad_token_id)
    n = max(len(x["input_ids"]) for x in (a, b, c))
    assert batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape == (3, n)
    assert batch["attention_mask"][1].tolist() == [1] * len(b["input_ids"]) + [0] * (n - len(b["input_ids"]))
    assert (batch["input_ids"][1, len(b["input_ids"]):] == tok.pad_token_id).all()
    assert (batch["labels"][1, len(b["input_ids"]):] == -100).all()
    assert batch["pixel_values"].shape == (3, 3, 32, 32)
    assert batch["visual_frames"] == [1, 2] and batch["visual_pooled"] == [False, True]
    left = data.collate([a, b], tok.pad_token_id, padding_side="left")
    assert left["attention_mask"][1, -1] == 1 and left["attention_mask"][1, 0] == 0
    assert torch.equal(left["input_ids"][1, -len(b["input_ids"]):], b["input_ids"])
    assert data.collate([None], tok.pad_token_id) is None


def test_batches_run_through_the_model(tiny, tmp_path):
    from model import build_model

    model = build_model(ModelConfig(vision_model=tiny["clip"], language_model=tiny["llama"], lm_training="frozen",
                                    trainable_vision_layers=0, max_frames=4), device="cpu")
    frames = []
    for i in range(3):
        image(40 * i).save(tmp_path / f"{i}.png")
        frames.append(str(tmp_path / f"{i}.png"))
    samples = [sample(TWO_TURNS, [{"frames": frames[:1]}]),
               sample([("user", "<image>\nWhat happens?"), ("assistant", "[1] moves.")], [{"video": str(tmp_path)}]),
               sample([("user", "Hi"), ("assistant", "Hello.")])]
    dataset = data.InstructionDataset(samples, model.tokenizer, model.cfg)
    loader = torch.utils.data.DataLoader(dataset, batch_size=3,
                                         collate_fn=functools.partial(data.collate, pad_token_id=model.tokenizer.pad_token_id))
    batch = next(iter(loader))
    assert batch["visual_frames"] == [1, 3] and batch["visual_pooled"] == [False, True]
    out = model(**batch)
    assert torch.isfinite(out.loss)
    lengths = dataset.lengths()
    real = [len(dataset[i]["input_ids"]) for i in range(3)]
    assert all(abs(e - r) <= 0.5 * r for e, r in zip(lengths, real))  # estimates good enough to group by


def test_a_frame_list_longer_than_max_frames_is_sampled_uniformly(tok, tmp_path):
    """A MIMIC-IT video is a list of frame ids; one longer than max_frames is sampled, not an error."""
    frames = []
    for i in range(11):
        image(20 * i).save(tmp_path / f"{i}.png")
        frames.append(str(tmp_path / f"{i}.png"))
    out = data.encode_sample(sample(TWO_TURNS, [{"frames": frames, "pooled": True}]), tok, CFG)  # max_frames 8
    assert out["visual_frames"] == [8] and out["pixel_values"].shape[0] == 8
    first_and_last = torch.stack([preprocess_image(image(0), CFG), data.preprocess_image(image(200), CFG)])
    assert torch.equal(out["pixel_values"][[0, -1]], first_and_last)


def mixture(**kw):
    rng = np.random.default_rng(0)
    lengths = [rng.integers(10, 400, 100).tolist(), rng.integers(10, 400, 50).tolist(), rng.integers(10, 400, 30).tolist()]
    return train.MixtureSampler(lengths, **{"ratios": [0.5, 0.3, 0.2], "batch_size": 8, "seed": 1, **kw})


def test_mixture_draws_sources_at_their_ratios():
    sampler = mixture(num_batches=400)
    def source_of(index):  # the source a yielded index belongs to
        return max(s for s, offset in enumerate(sampler.offsets) if offset <= index and sampler.sizes[s])

    counts = Counter(source_of(i) for batch in sampler for i in batch)
    total = sum(counts.values())
    assert total == 400 * 8
    for source, ratio in enumerate([0.5, 0.3, 0.2]):
        assert abs(counts[source] / total - ratio) < 0.03


def test_mixture_is_seeded_and_resumes_exactly():
    full = list(mixture(num_batches=150))
    assert len(full) == 150 and all(len(b) == 8 for b in full)
    assert list(mixture(num_batches=150, start_batch=97)) == full[97:]  # past a group boundary (64 batches)
    assert list(mixture(num_batches=150)) == full
    assert list(mixture(num_batches=150, seed=2)) != full
    assert len(mixture(num_batches=150, start_batch=100)) == 50
    assert len(mixture()) == 23  # default: one pass over the 180 samples


def test_each_source_pass_is_a_permutation():
    sampler = train.MixtureSampler([[5] * 40], [1.0], batch_size=5, seed=0, group=8)  # groups of 40 = one pass
    first_group = [i for batch in itertools.islice(sampler.stream(), 8) for i in batch]
    assert sorted(first_group) == list(range(40))


def test_grouping_by_length_cuts_padding():
    grouped, mixed = mixture(num_batches=64), mixture(num_batches=64, group_by_length=False)
    assert grouped.padded_fraction() < 0.1 < 0.3 < mixed.padded_fraction()


def test_mixture_argument_errors():
    with pytest.raises(ValueError, match="one non-negative number per source"):
        train.MixtureSampler([[1], [2]], [1.0], 2)
    with pytest.raises(ValueError, match="non-negative"):
        train.MixtureSampler([[1], [2]], [1.0, -1.0], 2)
    with pytest.raises(ValueError, match="ratio > 0 is empty"):
        train.MixtureSampler([[1], []], [0.5, 0.5], 2)


def test_every_script_explains_itself_and_som_draws_a_folder(tmp_path, capsys):
    for script, says in (("data.py", "show"), ("som.py", "--masks"), ("annotate.py", "--base-url"),
                         ("evaluate.py", "score"), ("demo.py", "--no-som"),
                         ("train.py", "micro-steps per optimizer step")):  # a field's comment, not only its default
        out = subprocess.run([sys.executable, script, "--help"], capture_output=True, text=True,
                             cwd=str(__import__("pathlib").Path(data.__file__).parent))
        assert out.returncode == 0 and says in " ".join(out.stdout.split()), script
    frames = tmp_path / "frames"
    frames.mkdir()
    for i in range(2):
        Image.new("RGB", (48, 32), (120, 120, 120)).save(frames / f"{i:05d}.png")
    masks = {"00000.png": {"1": [4, 4, 20, 20]}, "00001.png": {"1": [8, 4, 24, 20], "2": [30, 10, 44, 28]}}
    (tmp_path / "masks.json").write_text(json.dumps(masks))
    som.main([str(frames), "--masks", str(tmp_path / "masks.json"), "--out", str(tmp_path / "out")])
    for name in masks:
        drawn = np.array(Image.open(tmp_path / "out" / name))
        assert tuple(drawn[12, 4 if name == "00000.png" else 8]) == som.id_colour(1)  # left contour
    records = [{"id": "7", "conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Yo"}]}]
    (tmp_path / "l.json").write_text(json.dumps(records))
    data.main(["show", str(tmp_path / "l.json")])
    assert "l.json: 1 conversations" in capsys.readouterr().out
