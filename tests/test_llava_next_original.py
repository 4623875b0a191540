"""INST-IT's released checkpoints: LLaVA-NeXT's original layout (LLaVA-VL/LLaVA-NeXT's code), adopted by
from_pretrained. Each tiny checkpoint is written here from a transformers LlavaNext / LlavaOnevision model, its weights
renamed into the original names, its vision tower's config in a folder that mm_vision_tower names; loaded back, it
must give that model's logits."""
import json
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from transformers import (CLIPImageProcessor, GenerationConfig, LlavaNextConfig, LlavaNextForConditionalGeneration,
                          LlavaNextImageProcessorPil, LlavaOnevisionConfig, LlavaOnevisionForConditionalGeneration,
                          LlavaOnevisionImageProcessorPil, SiglipImageProcessorPil)

from conftest import make_tokenizer, text_config, vision_config
from model import LlavaStyleModel, num_visual_tokens, original_layout
from test_anyres import CLIP_MEAN, CLIP_STD, image, prompt

NEXT_PINPOINTS = [[32, 64], [64, 64], [96, 32]]  # (height, width), as transformers reads them; not symmetric
OV_PINPOINTS = [[30, 30], [60, 30], [30, 60], [60, 60]]  # "(1x1),...,(2x2)" of 30 px tower images, (height, width)
ORIGINAL_NAMES = {r"^model\.vision_tower\.": "model.vision_tower.vision_tower.", r"^model\.language_model\.": "model.",
                  r"^model\.multi_modal_projector\.linear_1\.": "model.mm_projector.0.",
                  r"^model\.multi_modal_projector\.linear_2\.": "model.mm_projector.2."}


def write_original(folder, reference, tokenizer, tower, **fields):
    """Save `reference` (a transformers LLaVA model) as LLaVA-NeXT's code saves a checkpoint: config.json with the
    LM's fields and the mm_* ones, weights under the original names (no SigLIP head), the tokenizer."""
    folder.mkdir()
    state = {}
    for name, tensor in reference.state_dict().items():
        for pattern, new in ORIGINAL_NAMES.items():
            name = re.sub(pattern, new, name)
        if ".head." not in name:
            state[name] = tensor.contiguous()
    save_file(state, str(folder / "model.safetensors"))
    text = reference.config.text_config.to_dict()  # as the original code's transformers wrote them: rope_theta
    text = {k: v for k, v in text.items() if k not in ("model_type", "dtype", "rope_parameters")}
    config = dict(text, rope_theta=reference.config.text_config.rope_parameters["rope_theta"],
                  mm_vision_tower=str(tower), mm_projector_type="mlp2x_gelu", mm_hidden_size=32,
                  mm_vision_select_layer=-2, mm_vision_select_feature="patch", mm_patch_merge_type="spatial_unpad",
                  mm_spatial_pool_stride=2, mm_spatial_pool_mode="average", mm_newline_position="grid", **fields)
    (folder / "config.json").write_text(json.dumps(config))
    tokenizer.save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="module")
def original(tmp_path_factory):
    """"clip": a Vicuna-style LLaVA-NeXT (CLIP, Llama) with AnyRes grids given as (width, height) and a generation
    config; "siglip": a OneVision-style one (SigLIP of 4 layers, the checkpoint holding 3; Qwen2 with rope_theta
    1e6) with "(1x1),...,(2x2)" grids and anyres_max_2. Each as (path, its transformers twin, the twin's image
    processor)."""
    torch.manual_seed(0)
    root, tokenizer, out = tmp_path_factory.mktemp("original"), make_tokenizer(), {}
    image_token = tokenizer.convert_tokens_to_ids("<image>")
    clip_tower, siglip_tower = root / "clip_tower", root / "siglip_tower"
    vision_config("clip").save_pretrained(clip_tower)
    CLIPImageProcessor(image_mean=CLIP_MEAN, image_std=CLIP_STD).save_pretrained(clip_tower)
    vision_config("siglip").save_pretrained(siglip_tower)
    SiglipImageProcessorPil(image_mean=[0.5] * 3, image_std=[0.5] * 3).save_pretrained(siglip_tower)

    next_ref = LlavaNextForConditionalGeneration(LlavaNextConfig(
        vision_config=vision_config("clip"), text_config=text_config("llama", len(tokenizer)),
        image_token_index=image_token, image_grid_pinpoints=NEXT_PINPOINTS, vision_feature_layer=-2)).eval()
    path = write_original(root / "clip", next_ref, tokenizer, clip_tower, model_type="llava_llama",
                          architectures=["LlavaLlamaForCausalLM"], image_aspect_ratio="anyres",
                          image_grid_pinpoints=[[w, h] for h, w in NEXT_PINPOINTS])
    GenerationConfig(bos_token_id=1, eos_token_id=2, do_sample=True, temperature=0.2, top_p=0.7).save_pretrained(path)
    out["clip"] = (path, next_ref, LlavaNextImageProcessorPil(
        size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}, image_grid_pinpoints=NEXT_PINPOINTS,
        image_mean=CLIP_MEAN, image_std=CLIP_STD))

    cut = vision_config("siglip")
    cut.num_hidden_layers -= 1  # the layer the original code deletes
    qwen2 = text_config("qwen2", len(tokenizer))
    qwen2.rope_parameters = {"rope_type": "default", "rope_theta": 1e6}
    ov_ref = LlavaOnevisionForConditionalGeneration(LlavaOnevisionConfig(
        vision_config=cut, text_config=qwen2, image_token_index=image_token, image_grid_pinpoints=OV_PINPOINTS,
        vision_aspect_ratio="anyres_max_2", vision_feature_layer=-1, vision_feature_select_strategy="full")).eval()
    path = write_original(root / "siglip", ov_ref, tokenizer, siglip_tower, model_type="llava_qwen",
                          architectures=["LlavaQwenForCausalLM"], image_aspect_ratio="anyres_max_2",
                          image_grid_pinpoints="(1x1),...,(2x2)")
    out["siglip"] = (path, ov_ref, LlavaOnevisionImageProcessorPil(
        size={"height": 30, "width": 30}, image_grid_pinpoints=OV_PINPOINTS, image_mean=[0.5] * 3,
        image_std=[0.5] * 3))
    return out


@pytest.mark.parametrize("kind, sizes", [("clip", [(40, 90), (100, 30)]), ("siglip", [(70, 200), (45, 45)])])
def test_original_layout_gives_the_transformers_logits(original, kind, sizes, tmp_path):
    path, ref, proc = original[kind]
    ours = LlavaStyleModel.from_pretrained(path, device="cpu").eval()  # LoRA B = 0: the same function
    assert ours.cfg.image_grid_pinpoints == ref.config.image_grid_pinpoints  # turned into (height, width)
    assert list(ours.cfg.image_mean) == list(proc.image_mean)  # the tower's image processor
    assert not ours.cfg.video_newline  # videos as INST-IT's bench runs them, not as the config's mm_newline_position
    assert ours.cfg.vision_feature_layer == (-2 if kind == "clip" else -1)
    pixels = proc([image(*size, seed=i) for i, size in enumerate(sizes)], return_tensors="pt")
    batch = prompt(ours, [num_visual_tokens(ours.cfg, image_size=s) for s in sizes])
    with torch.no_grad():
        a = ref(**batch, **pixels)
        b = ours(**batch, pixel_values=pixels["pixel_values"], image_sizes=pixels["image_sizes"])
    assert (a.logits - b.logits).abs().max() <= 1e-4 and abs(a.loss - b.loss) <= 1e-4
    if kind == "clip":  # the authors decode with the checkpoint's generation config; a trained copy reloads
        assert (ours.lm.generation_config.temperature, ours.lm.generation_config.top_p) == (0.2, 0.7)
        text = torch.tensor([[1, 20, 21, 30]])
        greedy = ours.generate(text, max_new_tokens=8)
        torch.manual_seed(0)
        assert not torch.equal(ours.generate(text, max_new_tokens=8, do_sample=None), greedy)  # sampled as it says
        assert torch.equal(ours.generate(text, max_new_tokens=8), greedy)
        ours.save_pretrained(str(tmp_path))
        again = LlavaStyleModel.from_pretrained(str(tmp_path), device="cpu").eval()
        with torch.no_grad():
            c = again(**batch, pixel_values=pixels["pixel_values"], image_sizes=pixels["image_sizes"])
        assert again.cfg.vision_model.endswith("clip_tower")  # the tower's config and normalisation come from it
        assert (c.logits - b.logits).abs().max() <= 1e-5
    else:  # merged, it reloads as a transformers LlavaOnevision: the tower's normalisation, OneVision's conventions
        ours.merge_to_llava_hf(str(tmp_path / "merged"))
        merged = LlavaStyleModel.from_pretrained(str(tmp_path / "merged"), device="cpu").eval()
        assert list(merged.cfg.image_mean) == [0.5] * 3 and merged.cfg.video_newline
        with torch.no_grad():
            c = merged(**batch, pixel_values=pixels["pixel_values"], image_sizes=pixels["image_sizes"])
        assert (c.logits - b.logits).abs().max() <= 1e-4


def test_grid_pinpoints_written_out_as_a_string_read_as_the_list(original):
    """LLaVA-NeXT's code reads an image_grid_pinpoints string without "x" with ast.literal_eval."""
    path = original["clip"][0]
    config = json.loads(Path(path, "config.json").read_text())
    for written in (str(config["image_grid_pinpoints"]), str([tuple(p) for p in config["image_grid_pinpoints"]])):
        fields, _, _ = original_layout(path, dict(config, image_grid_pinpoints=written), config["mm_vision_tower"])
        assert fields["image_grid_pinpoints"] == NEXT_PINPOINTS  # (height, width)
    with pytest.raises(ValueError, match=r"config.json's image_grid_pinpoints '\[\(64, 32\)' is neither"):
        original_layout(path, dict(config, image_grid_pinpoints="[(64, 32)"), config["mm_vision_tower"])


@pytest.mark.parametrize("changes, error, message", [
    (dict(architectures=["LlavaMistralForCausalLM"], model_type="llava_mistral"), ValueError,
     "'LlavaMistralForCausalLM' checkpoint .* LlavaLlamaForCausalLM"),
    (dict(mm_patch_merge_type="flat"), ValueError,  # AnyRes tiles without unpadding nor image_newline
     "'mm_patch_merge_type': 'flat'.* image_aspect_ratio 'anyres' is not supported"),
    (dict(mm_vision_tower="/mnt/gone/clip-336"), OSError, "'/mnt/gone/clip-336' .*mm_vision_tower.* as vision_model")])
def test_unsupported_checkpoints_and_unreachable_towers_are_refused(original, tmp_path, changes, error, message):
    config = json.loads(Path(original["clip"][0], "config.json").read_text())
    Path(tmp_path, "config.json").write_text(json.dumps(dict(config, **changes)))
    with pytest.raises(error, match=message):
        LlavaStyleModel.from_pretrained(str(tmp_path), device="cpu")
