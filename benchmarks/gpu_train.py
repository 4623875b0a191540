"""Training on one CUDA GPU at real sizes, random weights: peak memory and throughput.

memory      INST-IT's video recipe in QLoRA for a 24 GB card: a 7B Llama-shaped LM (nf4 + double quant, or
            bf16), LoRA on its linear layers, CLIP ViT-L/14-336 with the last N layers trained, one video of
            8/16/32 frames (2x2 pooled: 144 tokens a frame, 4,608 at 32) + 1,536 text tokens (6K context at
            32 frames), gradient checkpointing, batch 1. Peak torch.cuda.max_memory_allocated / reserved over
            two optimizer steps (the second holds AdamW's state), weights included.
throughput  bf16 LoRA training, 32-frame video, Qwen2-shaped 0.5B / 1.5B / 7B LMs, ours (model.build_model, as
            train.py) beside transformers' LlavaNextVideoForConditionalGeneration + peft on the same config and
            batch, both with gradient checkpointing: median step time -> tokens/s and MFU.

MFU counts model FLOPs as PaLM does (Chowdhery et al. 2022, App. B): 6 x parameters x tokens for every matrix
the step runs through (LM without its input embedding; vision layers up to the feature layer), plus causal
attention 6 x layers x width x T^2 (half of PaLM's 12, as a causal kernel computes) and the vision's full
attention 12 x layers x width x patches^2 per frame, plus the LM head at labelled positions only. It credits
the weight gradients that frozen and LoRA-wrapped weights skip and not checkpointing's recompute, so it is a
convention for comparison, not the hardware's count. Peak: 989 TFLOP/s dense bf16 (H100/H200 SXM).

Ours loads its checkpoint folders through build_model, as a hub ID would; theirs is built from the same configs
(weights are random on both sides, and values do not change speed or memory).

    python benchmarks/gpu_train.py memory [--frames 8,16,32] [--ranks 16,128] [--vision-layers 0,12]
    python benchmarks/gpu_train.py throughput [--lms qwen2-0.5b,qwen2-1.5b,qwen2-7b] [--profile]
    python benchmarks/gpu_train.py throughput --lms qwen2-7b --sides ours --compile inductor   # train.py --compile
    python benchmarks/gpu_train.py memory --tiny --device cpu     # a smoke run of the script itself
"""
import argparse
import gc
import json
import logging
import os
import statistics
import sys
import tempfile
import time
import warnings

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "tests")]

PEAK_FLOPS = 989e12
TEXT_TOKENS = 1536  # 4,608 visual tokens at 32 frames + 1,536 = INST-IT's 6K context (3.1)
LMS = {  # name -> (transformers config class, its fields)
    "llama-7b": ("LlamaConfig", dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                                     num_attention_heads=32, num_key_value_heads=32)),
    "qwen2-0.5b": ("Qwen2Config", dict(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                                       num_attention_heads=14, num_key_value_heads=2, tie_word_embeddings=True)),
    "qwen2-1.5b": ("Qwen2Config", dict(vocab_size=151936, hidden_size=1536, intermediate_size=8960,
                                       num_hidden_layers=28, num_attention_heads=12, num_key_value_heads=2,
                                       tie_word_embeddings=True)),
    "qwen2-7b": ("Qwen2Config", dict(vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                                     num_attention_heads=28, num_key_value_heads=4, tie_word_embeddings=False)),
    "tiny": ("LlamaConfig", dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2)),
}
VISION = dict(image_size=336, patch_size=14, hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
              num_attention_heads=16)  # CLIP ViT-L/14-336
TINY_VISION = dict(image_size=56, patch_size=14, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                   num_attention_heads=2)


def configs(lm: str, tiny: bool):
    import transformers
    from conftest import make_tokenizer

    tok = make_tokenizer()
    cls, fields = LMS[lm]
    text = getattr(transformers, cls)(**fields, bos_token_id=1, eos_token_id=2, pad_token_id=3)
    vision = transformers.CLIPVisionConfig(**(TINY_VISION if tiny else VISION))
    return vision, text, tok


def save_random(lm: str, folder: str, device: str, tiny: bool) -> dict:
    """Random bf16 checkpoints (initialised on `device`, fast at 7B) + tokenizer -> {"vision": dir, "lm": dir}."""
    from transformers import AutoModel, AutoModelForCausalLM

    vision, text, tok = configs(lm, tiny)
    paths = {"vision": os.path.join(folder, "vision"), "lm": os.path.join(folder, lm)}
    torch.manual_seed(0)
    for path, config, auto in ((paths["vision"], vision, AutoModel), (paths["lm"], text, AutoModelForCausalLM)):
        if not os.path.exists(path):
            with torch.device(device):
                model = auto.from_config(config, dtype=torch.bfloat16)
            model.save_pretrained(path)
            del model
    tok.save_pretrained(paths["lm"])
    return paths


def video_batch(frames: int, image_size: int, device: str, tokens_per_frame: int, image_token: int = 4) -> dict:
    """One sample: 8 text tokens, the video's pooled tokens, TEXT_TOKENS labelled text tokens."""
    g = torch.Generator().manual_seed(0)
    ids = torch.cat([torch.tensor([1]), torch.randint(10, 300, (7,), generator=g),
                     torch.full((frames * tokens_per_frame,), image_token), torch.randint(10, 300, (TEXT_TOKENS,), generator=g)])
    labels = ids.clone()
    labels[:-TEXT_TOKENS] = -100
    return dict(input_ids=ids[None].to(device), attention_mask=torch.ones(1, len(ids), dtype=torch.long, device=device),
                labels=labels[None].to(device), pixels=torch.randn(frames, 3, image_size, image_size, generator=g).to(device))


def build_ours(paths: dict, device: str, **overrides):
    from model import ModelConfig, build_model

    pooling = dict(pool_position="before", pool_mode="average")  # as LLaVA-NeXT-Video, the class `theirs` runs
    cfg = ModelConfig(vision_model=paths["vision"], language_model=paths["lm"],
                      dtype="bfloat16" if device == "cuda" else "float32", **{**pooling, **overrides})
    return build_model(cfg, device=device)


def ours_step_inputs(model, device: str, frames: int):
    """The batch as train.py passes it, and a fresh AdamW over the model's parameter groups."""
    from model import num_visual_tokens

    batch = video_batch(frames, model.cfg.image_size, device, num_visual_tokens(model.cfg, 1, pooled=True))
    inputs = dict(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"],
                  pixel_values=batch["pixels"].to(model.vision.dtype), visual_frames=[frames], visual_pooled=[True],
                  return_logits=False)  # as train.py calls it
    return inputs, torch.optim.AdamW([{"params": ps} for ps in model.parameter_groups().values() if ps], lr=1e-5)


def build_theirs(lm: str, device: str, frames: int, lora_r: int, vision_layers: int, checkpointing: bool, tiny: bool):
    """LLaVA-NeXT-Video (transformers) in bf16, peft LoRA on the LM's linears, projector + last vision layers
    trained in bf16 under autocast: what a user would write with transformers and peft."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlavaNextVideoConfig, LlavaNextVideoForConditionalGeneration

    from model import encoder_layers
    from train_step import LM_LINEARS  # the same LoRA targets as the CPU comparison

    vision, text, _ = configs(lm, tiny)
    config = LlavaNextVideoConfig(vision_config=vision, text_config=text, video_token_index=4,
                                  image_token_index=text.vocab_size - 1, vision_feature_layer=-2,
                                  vision_feature_select_strategy="default", spatial_pool_mode="average",
                                  spatial_pool_stride=2)
    torch.manual_seed(0)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    with torch.device(device):
        model = LlavaNextVideoForConditionalGeneration._from_config(config, dtype=dtype, attn_implementation="sdpa")
    model = get_peft_model(model, LoraConfig(r=lora_r, lora_alpha=2 * lora_r, lora_dropout=0.05,
                                             target_modules=LM_LINEARS))
    layers = encoder_layers(model.base_model.model.model.vision_tower)
    for layer in layers[len(layers) - vision_layers:len(layers) - 1]:  # the last layer's output is never used
        layer.requires_grad_(True)
    model.base_model.model.model.multi_modal_projector.requires_grad_(True)
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    grid = vision.image_size // vision.patch_size
    batch = video_batch(frames, vision.image_size, device, ((grid + 1) // 2) ** 2)
    inputs = dict(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"],
                  pixel_values_videos=batch["pixels"][None].to(dtype))
    return model, inputs, torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)


def step(model, inputs, optimizer, device: str):
    model.train()
    with torch.autocast(device, dtype=torch.bfloat16, enabled=device == "cuda"):
        loss = model(**inputs).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def sync(device: str):
    if device == "cuda":
        torch.cuda.synchronize()


def free(device: str):
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def peak_gb(device: str) -> dict:
    if device != "cuda":
        return {"allocated_gb": None, "reserved_gb": None}
    return {"allocated_gb": torch.cuda.max_memory_allocated() / 2**30, "reserved_gb": torch.cuda.max_memory_reserved() / 2**30}


def model_flops(lm: str, frames: int, tiny: bool) -> float:
    """Model FLOPs of one training step under the convention in the module docstring."""
    vision, text, _ = configs(lm, tiny)
    d, L, inter = text.hidden_size, text.num_hidden_layers, text.intermediate_size
    kv = d // text.num_attention_heads * text.num_key_value_heads
    lm_params = L * (2 * d * d + 2 * d * kv + 3 * d * inter)
    grid = vision.image_size // vision.patch_size
    T = 8 + frames * ((grid + 1) // 2) ** 2 + TEXT_TOKENS
    dv, Lv, P = vision.hidden_size, vision.num_hidden_layers - 1, grid * grid + 1  # layers up to the feature layer
    vision_params = Lv * (4 * dv * dv + 2 * dv * vision.intermediate_size)
    projector = vision.hidden_size * d + d * d
    return (6 * lm_params * T + 6 * L * d * T * T + 6 * text.vocab_size * d * TEXT_TOKENS
            + 6 * (vision_params * P + 2 * Lv * dv * P * P) * frames + 6 * projector * (T - 8 - TEXT_TOKENS))


def memory(args):
    rows = []
    paths = save_random(args.lm, args.tmp or tempfile.mkdtemp(), args.device, args.tiny)
    free(args.device)
    print(f"{'weights':7} {'rank':>4} {'vision':>6} {'frames':>6} {'tokens':>6} {'alloc GB':>8} {'reserved GB':>11} "
          f"{'s/step':>6}", flush=True)
    for four_bit in args.four_bit:
        for r in args.ranks:
            for v in args.vision_layers:
                model = build_ours(paths, args.device, load_in_4bit=four_bit, lora_r=r, lora_alpha=2 * r,
                                   trainable_vision_layers=v, gradient_checkpointing=args.checkpointing,
                                   pool_position=args.pool_position,
                                   pool_mode="average" if args.pool_position == "before" else "bilinear")
                for frames in args.frames:
                    inputs, optimizer = ours_step_inputs(model, args.device, frames)
                    free(args.device)
                    times = []
                    for _ in range(2):
                        start = time.perf_counter()
                        step(model, inputs, optimizer, args.device)
                        sync(args.device)
                        times.append(time.perf_counter() - start)
                    row = {"weights": "nf4" if four_bit else "bf16", "lora_r": r, "vision_layers": v, "frames": frames,
                           "tokens": inputs["input_ids"].shape[1], **peak_gb(args.device), "step_s": times[-1]}
                    rows.append(row)
                    print(f"{row['weights']:7} {r:4} {v:6} {frames:6} {row['tokens']:6} "
                          f"{row['allocated_gb'] or 0:8.2f} {row['reserved_gb'] or 0:11.2f} {times[-1]:6.2f}", flush=True)
                    write(args, {"lm": args.lm, "pool_position": args.pool_position, "text_tokens": TEXT_TOKENS,
                                 "rows": rows})
                    del inputs, optimizer
                del model
                free(args.device)


def throughput(args):
    rows, folder = [], args.tmp or tempfile.mkdtemp()
    frames, r, v = args.frames[-1], args.ranks[-1], args.vision_layers[-1]
    print(f"{'lm':11} {'side':6} {'tokens':>6} {'s/step':>7} {'tokens/s':>9} {'MFU':>5} {'alloc GB':>8}", flush=True)
    for lm in args.lms:
        paths = save_random(lm, folder, args.device, args.tiny)
        free(args.device)
        row = {"lm": lm, "frames": frames, "lora_r": r, "vision_layers": v, "gradient_checkpointing": args.checkpointing}
        for side in args.sides:
            try:
                row[side] = time_side(args, side, lm, paths, frames, r, v)
            except torch.OutOfMemoryError:
                row[side] = None
                free(args.device)
            s = row[side]
            print(f"{lm:11} {side:6} " + (f"{s['tokens']:6} {s['step_s']:7.3f} {s['tokens_per_s']:9.0f} {s['mfu']:5.1%} "
                                          f"{s['allocated_gb'] or 0:8.2f}" if s else "out of memory"), flush=True)
        row["speedup"] = row["theirs"]["step_s"] / row["ours"]["step_s"] if row.get("ours") and row.get("theirs") else None
        rows.append(row)
        write(args, {"text_tokens": TEXT_TOKENS, "peak_flops": PEAK_FLOPS, "warmup": args.warmup, "steps": args.steps,
                     "rows": rows})
    print("goal ours >= theirs:", "met" if all(r["speedup"] is None or r["speedup"] >= 1 for r in rows) else "NOT met")


def time_side(args, side: str, lm: str, paths: dict, frames: int, r: int, v: int) -> dict:
    """Median step time of one side after warm-up -> figures; --profile prints ours' kernels by GPU time."""
    if side == "ours":
        model = build_ours(paths, args.device, lora_r=r, lora_alpha=2 * r, trainable_vision_layers=v,
                           gradient_checkpointing=args.checkpointing)
        inputs, optimizer = ours_step_inputs(model, args.device, frames)
        if args.compile:
            model.compile_blocks(backend=args.compile)  # as train.py --compile
    else:
        model, inputs, optimizer = build_theirs(lm, args.device, frames, r, v, args.checkpointing, args.tiny)
    free(args.device)  # the peak of the steps, not of loading
    times = []
    for _ in range(args.warmup + args.steps):
        start = time.perf_counter()
        step(model, inputs, optimizer, args.device)
        sync(args.device)
        times.append(time.perf_counter() - start)
    if args.profile and side == "ours":
        with torch.profiler.profile() as prof:
            step(model, inputs, optimizer, args.device)
            sync(args.device)
        print(prof.key_averages().table(sort_by="self_device_time_total" if args.device == "cuda" else "self_cpu_time_total",
                                        row_limit=25, max_name_column_width=60))
    seconds, tokens = statistics.median(times[args.warmup:]), inputs["input_ids"].shape[1]
    figures = {"step_s": seconds, "tokens": tokens, "tokens_per_s": tokens / seconds,
               "mfu": model_flops(lm, frames, args.tiny) / seconds / PEAK_FLOPS, **peak_gb(args.device)}
    del model, inputs, optimizer
    free(args.device)
    return figures


def write(args, result: dict):
    device = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"device": device, "torch": torch.__version__, **result}, f, indent=1)


def main(argv=None):
    ints = lambda s: [int(x) for x in s.split(",")]  # noqa: E731
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", choices=["memory", "throughput"])
    p.add_argument("--frames", type=ints, default=[8, 16, 32], help="memory: each; throughput: the last")
    p.add_argument("--ranks", type=ints, default=[16, 128], help="LoRA ranks (throughput: the last)")
    p.add_argument("--vision-layers", type=ints, default=[0, 12], help="trained vision layers (throughput: the last)")
    p.add_argument("--four-bit", type=lambda s: [x == "1" for x in s.split(",")], default=[True, False],
                   help="memory: 1,0 = nf4 then bf16 weights")
    p.add_argument("--lm", default="llama-7b", choices=LMS, help="memory's language model")
    p.add_argument("--lms", type=lambda s: s.split(","), default=["qwen2-0.5b", "qwen2-1.5b", "qwen2-7b"])
    p.add_argument("--steps", type=int, default=5, help="throughput: timed steps (median)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--no-checkpointing", dest="checkpointing", action="store_false",
                   help="no gradient checkpointing (both sides): faster where the card has room")
    p.add_argument("--compile", metavar="BACKEND", help="throughput: ours with model.compile_blocks(backend=BACKEND), e.g. inductor")
    p.add_argument("--sides", type=lambda s: s.split(","), default=["ours", "theirs"])
    p.add_argument("--profile", action="store_true", help="throughput: print ours' kernels of one step by GPU time")
    p.add_argument("--tiny", action="store_true", help="tiny vision and LM configs (with --lm/--lms tiny)")
    p.add_argument("--pool-position", default="before", choices=["before", "after"],
                   help="memory: 2x2 pooling before the projector (average, as theirs) or after it (bilinear, "
                        "model.py's default)")
    p.add_argument("--device", default="cuda")
    p.add_argument("--tmp", default=None, help="folder for the random checkpoints (7B: ~15 GB each)")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    args.out = args.out or os.path.join(ROOT, "benchmarks", "results", f"gpu_{args.what}.json")
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    logging.getLogger("model").setLevel(logging.ERROR)  # "no image processor config": expected for random checkpoints
    warnings.filterwarnings("ignore", category=FutureWarning)
    (memory if args.what == "memory" else throughput)(args)


if __name__ == "__main__":
    main()
