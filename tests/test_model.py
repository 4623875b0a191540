"""model.py against transformers' LLaVA, and the promises of the README's model.py section."""
import pytest
import torch
from transformers import LlavaForConditionalGeneration

from model import LlavaStyleModel, ModelConfig, build_model, encoder_layers, num_visual_tokens, pool_frames


def compose(tiny, vision="clip", lm="llama", **kw):
    kw = {"lm_training": "lora", "lora_r": 8, "lora_alpha": 16, "lora_dropout": 0.0,
          "trainable_vision_layers": 2, **kw}  # of CLIP's 4 layers; the 4th is cut (feature layer -2): 1 trains
    return build_model(ModelConfig(vision_model=tiny[vision], language_model=tiny[lm], **kw), device="cpu")


def image_batch(model, n_text=(3, 5), seed=0):
    """A right-padded batch: sample i = BOS, some text, one expanded image, n_text[i] text tokens."""
    g = torch.Generator().manual_seed(seed)
    n_img = num_visual_tokens(model.cfg)
    rows = [[1, 20, 21] + [model.image_token_id] * n_img + torch.randint(10, 300, (n,), generator=g).tolist()
            for n in n_text]
    length = max(map(len, rows))
    ids = torch.full((len(rows), length), model.tokenizer.pad_token_id)
    mask = torch.zeros_like(ids)
    for i, r in enumerate(rows):
        ids[i, :len(r)], mask[i, :len(r)] = torch.tensor(r), 1
    labels = ids.masked_fill(mask == 0, -100).masked_fill(ids == model.image_token_id, -100)
    size = model.cfg.image_size
    return dict(input_ids=ids, attention_mask=mask, labels=labels,
                pixel_values=torch.randn(len(rows), 3, size, size, generator=g))


def test_equals_transformers_llava_logits_and_loss(tiny):
    ref = LlavaForConditionalGeneration.from_pretrained(tiny["llava"]).eval()
    ours = LlavaStyleModel.from_llava_hf(tiny["llava"], device="cpu").eval()  # LoRA B=0: same function
    assert ours.cfg.vision_feature_layer == -2 and ours.cfg.has_cls
    for n_text in [(4,), (3, 7)]:  # one sample, then a right-padded batch of two
        batch = image_batch(ours, n_text)
        a, b = ref(**batch), ours(**batch)
        assert (a.logits - b.logits).abs().max() <= 1e-4
        assert abs(a.loss.item() - b.loss.item()) <= 1e-4


def test_num_visual_tokens_and_feature_counts(tiny):
    clip, siglip = compose(tiny, "clip"), compose(tiny, "siglip", "qwen2")
    assert (clip.cfg.has_cls, siglip.cfg.has_cls) == (True, False)
    # CLIP 32 px / patch 8: 4x4 grid (+CLS); SigLIP 30 px / patch 6: odd 5x5 grid, pooled rounds up to 3x3.
    assert num_visual_tokens(clip.cfg) == 16 and num_visual_tokens(clip.cfg, 8, pooled=True) == 8 * 4
    assert num_visual_tokens(replace_cfg(clip.cfg, vision_feature_select_strategy="full")) == 17
    assert num_visual_tokens(siglip.cfg) == 25 and num_visual_tokens(siglip.cfg, 8, pooled=True) == 8 * 9
    for model in (clip, siglip):  # the model produces exactly what num_visual_tokens says
        s = model.cfg.image_size
        feats = model.encode_visuals(torch.randn(1 + 8 + 2, 3, s, s), [1, 8, 2], [False, True, True])
        expected = (num_visual_tokens(model.cfg) + num_visual_tokens(model.cfg, 8, True)
                    + num_visual_tokens(model.cfg, 2, True))
        assert feats.shape == (expected, model.lm.config.hidden_size)


def replace_cfg(cfg, **kw):
    from dataclasses import replace
    return replace(cfg, **kw)


def test_pooling_shapes_and_odd_grid_rounding():
    x = torch.arange(2 * 25 * 3, dtype=torch.float).reshape(2, 25, 3)  # 2 frames, 5x5 grid, 3 channels
    avg = pool_frames(x, 2, "average")
    assert avg.shape == (2, 9, 3)
    grid = x[0, :, 0].reshape(5, 5)
    assert avg[0, 0, 0] == grid[:2, :2].mean()          # a full 2x2 window
    assert avg[0, 8, 0] == grid[4, 4]                     # the corner window is clipped to one patch
    assert avg[0, 2, 0] == grid[:2, 4].mean()             # the last column: a 2x1 window
    assert pool_frames(x, 2, "bilinear").shape == (2, 9, 3)
    assert pool_frames(torch.randn(1, 27 * 27, 4), 2, "average").shape == (1, 14 * 14, 4)  # SigLIP-384
    with pytest.raises(ValueError, match="pool_mode"):
        pool_frames(x, 2, "max")


def test_trainable_parameters_are_exactly_what_the_config_implies(tiny):
    model = compose(tiny)  # LoRA r=8 on a 2-layer Llama (64 wide, MLP 128, 2 KV heads of 16), 1 vision layer
    lora_per_layer = 8 * ((64 + 64) * 2 + (64 + 32) * 2 + (64 + 128) * 3)  # q,o + k,v + gate,up,down
    counts = {k: sum(p.numel() for p in v) for k, v in model.parameter_groups().items()}
    assert counts == {"projector": 32 * 64 + 64 + 64 * 64 + 64,
                      "vision": 4 * (32 * 32 + 32) + (32 * 64 + 64 + 64 * 32 + 32) + 4 * 32,
                      "language": 2 * lora_per_layer}
    frozen = compose(tiny, lm_training="frozen", trainable_vision_layers=0)
    assert {k: len(v) for k, v in frozen.parameter_groups().items()} == {"projector": 4, "vision": 0, "language": 0}


def test_gradients_reach_exactly_the_trainable_parameters_and_frozen_layers_stay(tiny):
    model = compose(tiny, trainable_vision_layers=2)  # CLIP feature layer -2 of 4: 3 layers used, last trains
    layers = encoder_layers(model.vision)
    assert len(layers) == 3
    records_graph = []
    for layer in layers:
        layer.register_forward_hook(lambda m, i, o: records_graph.append((o[0] if isinstance(o, tuple) else o).requires_grad))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.AdamW([p for ps in model.parameter_groups().values() for p in ps], lr=1e-2)
    model(**image_batch(model)).loss.backward()
    assert records_graph == [False, False, True]  # frozen prefix records no graph, the tail does
    got_grad = {n for n, p in model.named_parameters() if p.grad is not None}
    assert got_grad == {n for n, p in model.named_parameters() if p.requires_grad}
    assert all(p.grad.abs().sum() > 0 for p in layers[-1].parameters())  # the unfrozen tail really trains
    opt.step()
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]) != p.requires_grad, n  # trained changed, frozen bit-identical


def test_all_layers_trainable_trains_the_embeddings_too(tiny):
    """An encoder trained from scratch must learn its patch and position embeddings; with any
    layer frozen (INST-IT) they stay frozen."""
    for trainable, embeddings_train in [(3, False), (4, True)]:  # tiny CLIP has 4 layers
        model = compose(tiny, trainable_vision_layers=trainable)
        embedding = model.vision.embeddings  # transformers 5: CLIPVisionModel without the vision_model wrapper
        assert all(p.requires_grad == embeddings_train for p in embedding.parameters())
    model(**image_batch(model)).loss.backward()
    assert embedding.patch_embedding.weight.grad.abs().sum() > 0
    assert embedding.position_embedding.weight.grad.abs().sum() > 0
    assert {n for n, p in model.named_parameters() if p.grad is not None} == \
        {n for n, p in model.named_parameters() if p.requires_grad}


def test_loss_from_labelled_positions_only_equals_the_full_loss(tiny):
    """return_logits=False computes the LM head only where labels are set: same loss, same gradients."""
    model = compose(tiny)
    batch = image_batch(model, (3, 7))
    results = []
    for return_logits in (True, False):
        model.zero_grad()
        out = model(**batch, return_logits=return_logits)
        out.loss.backward()
        results.append((out.loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}))
        assert (out.logits is None) != return_logits
    assert abs(results[0][0] - results[1][0]) <= 1e-6
    assert all(torch.allclose(results[0][1][n], results[1][1][n], atol=1e-6) for n in results[0][1])


def test_trainable_vision_layers_count_the_encoders_original_depth(tiny):
    """INST-IT trains the last 12 of 24 layers, i.e. freezes the first 12, whatever the feature layer cuts."""
    for trainable, tail in [(0, 0), (1, 0), (2, 1), (3, 2), (4, 3), (10, 3)]:  # layer 4 of 4 is cut (feature -2)
        model = compose(tiny, trainable_vision_layers=trainable)
        layers = encoder_layers(model.vision)
        trained = [any(p.requires_grad for p in layer.parameters()) for layer in layers]
        assert trained == [False] * (3 - tail) + [True] * tail, trainable


def test_bf16_lora_adapters_see_bf16_inputs(tiny):
    """fp32 adapters under autocast: peft must not copy the bf16 activations to fp32 (12% of a 7B step)."""
    model = compose(tiny, dtype="bfloat16", lora_dropout=0.05).train()
    seen = []
    for name, module in model.lm.named_modules():
        if name.endswith("lora_A.default"):
            assert module.weight.dtype == torch.float32
            module.register_forward_pre_hook(lambda m, args: seen.append(args[0].dtype))
    model(**image_batch(model)).loss.backward()
    assert seen and set(seen) == {torch.bfloat16}
    grads = [p.grad for n, p in model.lm.named_parameters() if "lora_" in n]
    assert all(g is not None and g.dtype == torch.float32 and torch.isfinite(g).all() for g in grads)


def test_bf16_weights_run_outside_train_autocast(tiny):
    """bf16 frozen layers feed the fp32 trained tail: forward and generate must work without train.py."""
    model = compose(tiny, dtype="bfloat16").eval()
    assert {p.dtype for p in model.trainable_vision_tail()[0].parameters()} == {torch.float32}
    batch = image_batch(model)
    assert torch.isfinite(model(**batch).loss)
    assert model.generate(batch["input_ids"][:1], batch["pixel_values"][:1], max_new_tokens=2).shape[0] == 1


def test_gradient_checkpointing_gives_the_same_loss_and_gradients(tiny):
    batch = image_batch(compose(tiny))
    grads = []
    for ckpt in (False, True):
        torch.manual_seed(0)
        model = compose(tiny, gradient_checkpointing=ckpt).train()
        model(**batch).loss.backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.requires_grad})
    assert grads[0].keys() == grads[1].keys()
    for n in grads[0]:
        assert torch.allclose(grads[0][n], grads[1][n], atol=1e-6), n


def test_4bit_lora_forward_backward_on_cpu(tiny):
    import bitsandbytes as bnb

    model = compose(tiny, load_in_4bit=True)
    assert any(isinstance(m, bnb.nn.Linear4bit) for m in model.lm.modules())
    assert not any(isinstance(m, bnb.nn.Linear4bit) for m in model.vision.modules())
    assert all(p.dtype == torch.float32 for p in model.vision.parameters())
    out = model(**image_batch(model))
    out.loss.backward()
    assert torch.isfinite(out.loss)
    lora_grads = [p.grad for n, p in model.lm.named_parameters() if "lora_" in n]
    assert lora_grads and all(g is not None for g in lora_grads)


def trained_a_little(model):
    """One optimizer step, so LoRA B matrices and the vision tail differ from their initial values."""
    opt = torch.optim.AdamW([p for ps in model.parameter_groups().values() for p in ps], lr=1e-2)
    model(**image_batch(model)).loss.backward()
    opt.step()
    return model.eval()


def test_save_load_gives_identical_logits_with_an_added_token(tiny, tmp_path):
    model = trained_a_little(compose(tiny, "siglip", "qwen2", image_token="<img_slot>"))  # token is added
    assert len(model.tokenizer) == model.lm.get_input_embeddings().weight.shape[0]
    batch = image_batch(model)
    model.save_pretrained(tmp_path)
    again = LlavaStyleModel.from_pretrained(str(tmp_path), device="cpu").eval()
    assert again.image_token_id == model.image_token_id
    with torch.no_grad():
        assert torch.equal(model(**batch).logits, again(**batch).logits)


@pytest.mark.parametrize("lm_training", ["lora", "full"])
def test_merge_writes_a_transformers_llava_with_the_same_logits(tiny, tmp_path, lm_training):
    from conftest import make_tokenizer

    tokenizer = make_tokenizer()  # a tokenizer of its own with one more token than the LM's vocabulary
    tokenizer.add_special_tokens({"additional_special_tokens": ["<extra>"]})
    tokenizer.save_pretrained(tmp_path / "tok")
    model = trained_a_little(compose(tiny, tokenizer=str(tmp_path / "tok"), lm_training=lm_training))
    tmp_path = tmp_path / "merged"
    batch = image_batch(model, (3, 6))
    model.merge_to_llava_hf(str(tmp_path))
    ref = LlavaForConditionalGeneration.from_pretrained(str(tmp_path)).eval()
    adopted = LlavaStyleModel.from_pretrained(str(tmp_path), device="cpu").eval()
    with torch.no_grad():
        ours = model(**batch).logits
        assert (ref(**batch).logits - ours).abs().max() <= 1e-4
        assert (adopted(**batch).logits - ours).abs().max() <= 1e-4


def test_generate_batched_left_padding_equals_one_at_a_time(tiny):
    model = compose(tiny).eval()
    n = num_visual_tokens(model.cfg)
    prompts = [[1, 20] + [model.image_token_id] * n + [30, 31, 32, 33], [1] + [model.image_token_id] * n + [40]]
    pixels = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    singles = [model.generate(torch.tensor([p]), pixels[i:i + 1], max_new_tokens=6)[0].tolist()
               for i, p in enumerate(prompts)]
    length = max(map(len, prompts))
    pad = model.tokenizer.pad_token_id
    ids = torch.tensor([[pad] * (length - len(p)) + p for p in prompts])
    batched = model.generate(ids, pixels, attention_mask=(ids != pad).long(), max_new_tokens=6)
    for single, row in zip(singles, batched.tolist()):
        assert row[:len(single)] == single and len(single) <= 6
    torch.manual_seed(0)
    sampled = model.generate(ids, pixels, attention_mask=(ids != pad).long(), max_new_tokens=4, do_sample=True,
                             temperature=0.7, top_p=0.9)
    assert sampled.shape[0] == 2 and sampled.shape[1] <= 4


def test_full_clip_checkpoint_gives_its_vision_half(tiny):
    model = compose(tiny, "clip_full", trainable_vision_layers=0)
    assert type(model.vision).__name__ == "CLIPVisionModel" and num_visual_tokens(model.cfg) == 16


def test_bad_inputs_give_clear_errors(tiny):
    model = compose(tiny, max_frames=4)
    s = model.cfg.image_size
    with pytest.raises(ValueError, match="more than max_frames=4"):
        model.encode_visuals(torch.randn(5, 3, s, s), [5], [True])
    batch = image_batch(model)
    batch["input_ids"][0, 5] = 7  # one placeholder fewer than the image's features
    with pytest.raises(ValueError, match=r"tokens per sample \[15, 16\]"):
        model(**batch)
    batch = image_batch(model, (4, 4))  # totals right, samples wrong: n+1 and n-1 placeholders
    batch["input_ids"][0, 19], batch["input_ids"][1, 5] = model.image_token_id, 7
    with pytest.raises(ValueError, match=r"tokens per sample \[17, 15\].*whole visuals"):
        model(**batch)
    with pytest.raises(ValueError, match="no image_size/patch_size"):
        compose(tiny, vision="llama")
    with pytest.raises(ValueError, match="lm_training"):
        compose(tiny, lm_training="qlora")
