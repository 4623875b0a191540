"""LLaVA-NeXT and LLaVA-OneVision as bases: AnyRes images, pooling after the projector, their checkpoints adopted.

The references are transformers' own classes: LlavaNext/LlavaOnevision image processors for pixels, their
ForConditionalGeneration models for token counts, logits and loss, built tiny from configs and saved."""
import json

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import (LlavaNextConfig, LlavaNextForConditionalGeneration, LlavaNextImageProcessorPil,
                          LlavaOnevisionConfig, LlavaOnevisionForConditionalGeneration,
                          LlavaOnevisionImageProcessorPil)

import data
from conftest import make_tokenizer, text_config, vision_config
from model import LlavaStyleModel, ModelConfig, build_model, num_visual_tokens

CLIP_MEAN, CLIP_STD = [0.48145466, 0.4578275, 0.40821073], [0.26862954, 0.26130258, 0.27577711]
NEXT_PINPOINTS = [[32, 64], [64, 32], [64, 64], [96, 32], [32, 96]]  # LLaVA-NeXT's five grids, at 32 px tiles
OV_PINPOINTS = [[30 * i, 30 * j] for i in range(1, 5) for j in range(1, 5)]  # OneVision's (1x1)..(4x4) at 30 px
SIZES = {"next": [(40, 90), (100, 30), (50, 50)], "ov": [(70, 200), (300, 120), (45, 45)]}  # (height, width)


@pytest.fixture(scope="module")
def hf(tmp_path_factory):
    """Tiny saved checkpoints: "next" (CLIP + Llama LlavaNext) and "ov" (SigLIP + Qwen2 LlavaOnevision with
    anyres_max_4, so large images shrink), each with its image processor; and the processors."""
    torch.manual_seed(0)
    root, out = tmp_path_factory.mktemp("hf"), {}
    tokenizer = make_tokenizer()
    next_proc = LlavaNextImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32},
                                           image_grid_pinpoints=NEXT_PINPOINTS, image_mean=CLIP_MEAN,
                                           image_std=CLIP_STD)
    config = LlavaNextConfig(vision_config=vision_config("clip"), text_config=text_config("llama", len(tokenizer)),
                             image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
                             image_grid_pinpoints=NEXT_PINPOINTS, vision_feature_layer=-2)
    out["next"] = (str(root / "next"), LlavaNextForConditionalGeneration(config), next_proc, tokenizer)
    ov_tokenizer = make_tokenizer()
    ov_tokenizer.add_tokens(["<video>"], special_tokens=True)
    ov_proc = LlavaOnevisionImageProcessorPil(size={"height": 30, "width": 30}, image_grid_pinpoints=OV_PINPOINTS,
                                              image_mean=[0.5] * 3, image_std=[0.5] * 3)
    config = LlavaOnevisionConfig(vision_config=vision_config("siglip"),
                                  text_config=text_config("qwen2", len(ov_tokenizer)),
                                  image_token_index=ov_tokenizer.convert_tokens_to_ids("<image>"),
                                  video_token_index=ov_tokenizer.convert_tokens_to_ids("<video>"),
                                  image_grid_pinpoints=OV_PINPOINTS, vision_aspect_ratio="anyres_max_4")
    out["ov"] = (str(root / "ov"), LlavaOnevisionForConditionalGeneration(config), ov_proc, ov_tokenizer)
    for path, model, proc, tok in out.values():
        model.save_pretrained(path)
        proc.save_pretrained(path)
        tok.save_pretrained(path)
        model.eval()
    return out


def image(height, width, seed=0):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8))


def prompt(model, counts, token_id=None, seed=0):
    """Right-padded ids: BOS, text, one visual's tokens (counts[i] of them), text; labels on the last text."""
    g = torch.Generator().manual_seed(seed)
    token = token_id or model.image_token_id
    rows = [[1, 20, 21] + [token] * n + torch.randint(10, 300, (4 + i,), generator=g).tolist()
            for i, n in enumerate(counts)]
    ids = torch.full((len(rows), max(map(len, rows))), model.tokenizer.pad_token_id)
    mask = torch.zeros_like(ids)
    for i, r in enumerate(rows):
        ids[i, :len(r)], mask[i, :len(r)] = torch.tensor(r), 1
    labels = ids.masked_fill(mask == 0, -100)
    labels[:, :3 + max(counts)] = -100
    return dict(input_ids=ids, attention_mask=mask, labels=labels)


@pytest.mark.parametrize("kind", ["next", "ov"])
def test_anyres_pixels_and_token_counts_equal_transformers(hf, kind):
    path, ref, proc, _ = hf[kind]
    ours = LlavaStyleModel.from_llava_hf(path, device="cpu")
    assert ours.cfg.image_grid_pinpoints == (NEXT_PINPOINTS if kind == "next" else OV_PINPOINTS)
    for h, w in SIZES[kind]:
        picture = image(h, w)
        theirs = proc(picture, return_tensors="pt")
        tiles = torch.stack(data.anyres_tiles(picture, ours.cfg))
        assert tiles.shape == theirs["pixel_values"][0].shape
        assert (tiles - theirs["pixel_values"][0]).abs().max() <= 1e-5, (h, w)
        with torch.no_grad():
            packed = ref.model.get_image_features(
                pixel_values=theirs["pixel_values"], image_sizes=theirs["image_sizes"],
                vision_feature_layer=ref.config.vision_feature_layer,
                vision_feature_select_strategy=ref.config.vision_feature_select_strategy).pooler_output[0]
        assert num_visual_tokens(ours.cfg, image_size=(h, w)) == len(packed), (h, w)
    if kind == "ov":  # the large image was shrunk to anyres_max tiles' worth
        assert num_visual_tokens(ours.cfg, image_size=(300, 120)) < 25 + 20 * 11


@pytest.mark.parametrize("kind", ["next", "ov"])
def test_adopted_checkpoints_give_the_reference_logits_and_loss(hf, kind):
    path, ref, proc, _ = hf[kind]
    ours = LlavaStyleModel.from_llava_hf(path, device="cpu").eval()  # LoRA B = 0: the same function
    pictures = [image(*size, seed=i) for i, size in enumerate(SIZES[kind][:2])]  # two aspect ratios, one batch
    pixels = proc(pictures, return_tensors="pt")
    batch = prompt(ours, [num_visual_tokens(ours.cfg, image_size=s) for s in SIZES[kind][:2]])
    with torch.no_grad():
        a, b = ref(**batch, **pixels), ours(**batch, pixel_values=pixels["pixel_values"],
                                           image_sizes=pixels["image_sizes"])
    assert (a.logits - b.logits).abs().max() <= 1e-4 and abs(a.loss - b.loss) <= 1e-4
    if kind == "ov":  # a video: 2x2 bilinear after the projector, then one image_newline
        assert (ours.cfg.pool_position, ours.cfg.pool_mode, ours.cfg.video_newline) == ("after", "bilinear", True)
        video = torch.randn(1, 3, 3, 30, 30)
        n = num_visual_tokens(ours.cfg, 3, pooled=True)
        assert n == 3 * 9 + 1
        batch = prompt(ours, [n], token_id=ours.tokenizer.convert_tokens_to_ids("<video>"))
        with torch.no_grad():
            a, b = ref(**batch, pixel_values_videos=video), ours(**batch, pixel_values_videos=video)
        assert (a.logits - b.logits).abs().max() <= 1e-4 and abs(a.loss - b.loss) <= 1e-4


def test_data_path_equals_the_processor_path(hf):
    """encode_sample + collate (our pixels, tiles and token expansion) into our model = transformers' processor
    pixels into theirs, on the same token ids."""
    path, ref, proc, _ = hf["next"]
    ours = LlavaStyleModel.from_llava_hf(path, device="cpu").eval()
    picture = image(40, 90)
    sample = {"id": "s", "visuals": [{"frames": [picture]}], "messages": [
        {"role": "user", "content": "<image>\nWhat is in the image?"}, {"role": "assistant", "content": "a dog"}]}
    batch = data.collate([data.encode_sample(sample, ours.tokenizer, ours.cfg)], ours.tokenizer.pad_token_id)
    assert batch["image_sizes"] == [(40, 90)] and batch["visual_frames"] == [1 + 3]  # base + 1x3 tiles
    with torch.no_grad():
        a = ref(input_ids=batch["input_ids"], labels=batch["labels"], **proc(picture, return_tensors="pt"))
        b = ours(**batch)
    assert (a.logits - b.logits).abs().max() <= 1e-4 and abs(a.loss - b.loss) <= 1e-4
    # length grouping reads the size from the file's header: the visual part is what the model packs
    dataset = data.InstructionDataset([sample, dict(sample, visuals=[{"frames": [image(100, 30)]}])], ours.tokenizer,
                                      ours.cfg)
    first, second = dataset.lengths()
    assert second - first == num_visual_tokens(ours.cfg, image_size=(100, 30)) - num_visual_tokens(
        ours.cfg, image_size=(40, 90))


def test_multi_image_samples_follow_the_adopted_convention(hf):
    two = {"id": "m", "visuals": [{"frames": [image(40, 90)]}, {"frames": [image(50, 50)]}],
           "messages": [{"role": "user", "content": "<image> <image> Same?"}, {"role": "assistant", "content": "no"}]}
    for kind, frames, sizes in [("next", [4, 5], [(40, 90), (50, 50)]), ("ov", [1, 1], [None, None])]:
        model = LlavaStyleModel.from_llava_hf(hf[kind][0], device="cpu").eval()
        out = data.encode_sample(two, model.tokenizer, model.cfg)
        assert out["visual_frames"] == frames and out["image_sizes"] == sizes and out["visual_pooled"] == [False] * 2
        with torch.no_grad():  # the model packs exactly the expanded tokens
            model(**data.collate([out], model.tokenizer.pad_token_id))
    ov = LlavaStyleModel.from_llava_hf(hf["ov"][0], device="cpu").eval()
    assert num_visual_tokens(ov.cfg) == 25 + 1  # one square tile and its image_newline (OneVision)
    video = {"id": "v", "visuals": [{"frames": [image(30, 40, seed=k) for k in range(3)]}],
             "messages": [{"role": "user", "content": "<image> What moves?"}]}
    prompt_ = data.encode_sample(video, ov.tokenizer, ov.cfg, add_generation_prompt=True)
    assert prompt_["visual_pooled"] == [True] and (prompt_["input_ids"] == ov.image_token_id).sum() == 3 * 9 + 1
    batch = data.collate([prompt_], ov.tokenizer.pad_token_id, "left")
    batch.pop("labels")
    assert ov.generate(**batch, max_new_tokens=3).shape[0] == 1  # generation takes the same batch
    tiled = data.collate([data.encode_sample(dict(video, visuals=[{"frames": [image(40, 90)]}]), ov.tokenizer,
                                             ov.cfg, add_generation_prompt=True)], ov.tokenizer.pad_token_id, "left")
    tiled.pop("labels")
    assert tiled["image_sizes"] == [(40, 90)] and ov.generate(**tiled, max_new_tokens=3).shape[0] == 1


@pytest.mark.parametrize("kind", ["next", "ov", "composed"])
def test_merge_writes_the_class_the_model_came_from(hf, tiny, tmp_path, kind):
    from transformers import AutoModelForImageTextToText

    if kind == "composed":  # a model composed with AnyRes grids writes LlavaNext
        model = build_model(ModelConfig(vision_model=tiny["clip"], language_model=tiny["llama"], lora_r=4,
                                        image_grid_pinpoints=NEXT_PINPOINTS), device="cpu")
    else:
        model = LlavaStyleModel.from_llava_hf(hf[kind][0], device="cpu")
    with torch.no_grad():
        model.projector.image_newline += 0.5  # trained: the merged file must carry it
    model.eval()
    model.merge_to_llava_hf(str(tmp_path))
    merged = AutoModelForImageTextToText.from_pretrained(str(tmp_path)).eval()
    expected_class = LlavaOnevisionForConditionalGeneration if kind == "ov" else LlavaNextForConditionalGeneration
    assert type(merged) is expected_class
    size = (40, 90) if kind != "ov" else (70, 200)
    tiles = torch.stack(data.anyres_tiles(image(*size), model.cfg))[None]
    batch = prompt(model, [num_visual_tokens(model.cfg, image_size=size)])
    again = LlavaStyleModel.from_pretrained(str(tmp_path), device="cpu").eval()
    with torch.no_grad():
        expected = model(**batch, pixel_values=tiles, image_sizes=[size]).logits
        theirs = merged(**batch, pixel_values=tiles, image_sizes=torch.tensor([size])).logits
        assert (theirs - expected).abs().max() <= 1e-4
        assert (again(**batch, pixel_values=tiles, image_sizes=[size]).logits - expected).abs().max() <= 1e-4


def test_pooling_position_defaults_and_old_checkpoints(tiny, tmp_path):
    model = build_model(ModelConfig(vision_model=tiny["clip"], language_model=tiny["llama"], lora_r=4), device="cpu")
    assert (model.cfg.pool_position, model.cfg.pool_mode) == ("after", "bilinear")  # INST-IT's bench
    frames = torch.randn(4, 3, 32, 32)
    after = model.encode_visuals(frames, [4], [True])
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "model_config.json").read_text())
    del config["pool_position"]  # a checkpoint saved before the field existed pooled before the projector
    (tmp_path / "model_config.json").write_text(json.dumps(config))
    old = LlavaStyleModel.from_pretrained(str(tmp_path), device="cpu")
    assert old.cfg.pool_position == "before"
    before = old.encode_visuals(frames, [4], [True])
    assert before.shape == after.shape == (4 * 4, 64) and not torch.allclose(before, after, atol=1e-3)
    with pytest.raises(ValueError, match="pool_position"):
        build_model(ModelConfig(vision_model=tiny["clip"], language_model=tiny["llama"], pool_position="middle"))


def test_bad_layouts_and_mixed_transformers_inputs_are_refused(hf, tiny):
    with pytest.raises(ValueError, match="multi_image must be one of"):
        build_model(ModelConfig(vision_model=tiny["clip"], language_model=tiny["llama"], multi_image="mosaic"))
    ov = LlavaStyleModel.from_llava_hf(hf["ov"][0], device="cpu")
    batch = prompt(ov, [4])
    with pytest.raises(ValueError, match="one per sample, no images beside them"):
        ov(**batch, pixel_values=torch.randn(1, 2, 3, 30, 30), image_sizes=[(30, 30)],
           pixel_values_videos=torch.randn(1, 2, 3, 30, 30))


def test_unsupported_checkpoints_are_refused(tiny):
    with pytest.raises(ValueError, match="'llama' checkpoint .* not supported"):
        LlavaStyleModel.from_llava_hf(tiny["llama"], device="cpu")
    with pytest.raises(ValueError, match="not supported"):  # no model_config.json: read as a transformers class
        LlavaStyleModel.from_pretrained(tiny["qwen2"], device="cpu")


def test_grid_pinpoints_flag_is_json():
    import train

    _, overrides = train.parse_args(["--data", __file__, "--image-grid-pinpoints", "[[32, 64], [64, 32]]"])
    assert overrides["image_grid_pinpoints"] == [[32, 64], [64, 32]]
