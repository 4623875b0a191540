"""Training step of LlavaStyleModel (model.py) against transformers' LLaVA models, same LoRA, same batch.

    images: ours vs LlavaForConditionalGeneration            (one image per sample, all grid tokens)
    videos: ours vs LlavaNextVideoForConditionalGeneration   (8 frames per sample, 2x2 average pooling)

Both sides load the same random-weight checkpoint (a CLIP vision tower, a 2-layer projector, a Llama), get
the same peft LoraConfig on the language model's linear layers, train the projector and the same vision
layers, and step AdamW on the same batch. Step = forward + backward + optimizer step, fp32 on CPU; the
median of --steps steps after --warmup, the two sides' steps interleaved in one process (another process
loading the CPU then slows both alike). Memory, in a fresh subprocess per variant: "MB" is the peak RSS
(VmHWM, reset after loading via /proc/self/clear_refs) of two steps minus the RSS before the model was built,
i.e. weights + gradients + AdamW state + activations, without the ~400 MB of imported libraries.
Goal: ours/theirs <= 1.0 in time and in memory. `--profile` prints where the time of one variant goes.

    .venv/bin/python benchmarks/train_step.py [--sizes tiny,small] [--steps 10] [--profile image-small]
"""
import argparse
import ctypes
import gc
import json
import logging
import os
import statistics
import subprocess
import sys
import tempfile
import time
import warnings

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests"))

SIZES = {  # vision (image px, patch, width, layers), LM (width, layers, heads, kv heads, vocab), batch
    "tiny": dict(image=32, patch=8, v_width=32, v_layers=4, width=64, layers=2, heads=4, kv=2, vocab=None,
                 image_batch=4, video_batch=2, frames=8, text=48),
    "small": dict(image=224, patch=14, v_width=256, v_layers=6, width=512, layers=4, heads=8, kv=4, vocab=32000,
                  image_batch=2, video_batch=1, frames=8, text=96),
}
LORA = dict(r=16, lora_alpha=32, lora_dropout=0.05)
TRAINABLE_VISION_LAYERS = 3  # as ModelConfig counts: the last 3 of the encoder; the last is unused, so 2 train
LM_LINEARS = r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"


def save_checkpoint(size: str, folder: str) -> str:
    """A random LlavaForConditionalGeneration checkpoint + tokenizer of `size` -> its folder."""
    from conftest import make_tokenizer
    from transformers import (CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration,
                              LlavaNextVideoConfig, LlavaNextVideoForConditionalGeneration)

    s, tok = SIZES[size], make_tokenizer()
    vision = CLIPVisionConfig(image_size=s["image"], patch_size=s["patch"], hidden_size=s["v_width"],
                              intermediate_size=4 * s["v_width"], num_hidden_layers=s["v_layers"],
                              num_attention_heads=max(2, s["v_width"] // 64))
    text = LlamaConfig(vocab_size=s["vocab"] or len(tok), hidden_size=s["width"], intermediate_size=int(2.75 * s["width"]),
                       num_hidden_layers=s["layers"], num_attention_heads=s["heads"], num_key_value_heads=s["kv"],
                       bos_token_id=1, eos_token_id=2, pad_token_id=3, tie_word_embeddings=False)
    config = LlavaConfig(vision_config=vision, text_config=text, image_token_id=tok.convert_tokens_to_ids("<image>"),
                         vision_feature_layer=-2, vision_feature_select_strategy="default")
    torch.manual_seed(0)
    path = os.path.join(folder, size)
    llava = LlavaForConditionalGeneration(config)
    llava.save_pretrained(path)
    tok.save_pretrained(path)
    video = LlavaNextVideoForConditionalGeneration(LlavaNextVideoConfig(  # the same weights, pooled videos
        vision_config=vision, text_config=text, video_token_index=config.image_token_id,
        image_token_index=text.vocab_size - 1, vision_feature_layer=-2, spatial_pool_mode="average", spatial_pool_stride=2))
    video.load_state_dict(llava.state_dict(), strict=False)  # all but image_newline, which videos do not use
    video.save_pretrained(path + "-video")
    return path


def make_batch(kind: str, size: str, image_token: int = 4) -> dict:  # 4: <image> in tests/conftest's tokenizer
    """The shared batch: right-padded text around the visual tokens, labels on the text after them."""
    from model import ModelConfig, num_visual_tokens

    s = SIZES[size]
    cfg = ModelConfig(image_size=s["image"], patch_size=s["patch"])
    n, frames = (s["image_batch"], 1) if kind == "image" else (s["video_batch"], s["frames"])
    visual = num_visual_tokens(cfg, frames, pooled=kind == "video")
    g = torch.Generator().manual_seed(0)
    lengths = [s["text"] - 8 * i for i in range(n)]  # a little padding, as in a real batch
    width = 8 + visual + max(lengths)
    ids, mask = torch.full((n, width), 3), torch.zeros(n, width, dtype=torch.long)
    for i, k in enumerate(lengths):
        row = [1] + torch.randint(10, 300, (7,), generator=g).tolist() + [image_token] * visual \
            + torch.randint(10, 300, (k,), generator=g).tolist()
        ids[i, :len(row)], mask[i, :len(row)] = torch.tensor(row), 1
    labels = ids.masked_fill(mask == 0, -100)
    labels[:, :8 + visual] = -100
    pixels = torch.randn(n * frames, 3, s["image"], s["image"], generator=g)
    return dict(input_ids=ids, attention_mask=mask, labels=labels, pixels=pixels, n=n, frames=frames)


def build_ours(path: str, kind: str, batch: dict):
    from model import LlavaStyleModel

    model = LlavaStyleModel.from_llava_hf(path, device="cpu", lora_r=LORA["r"], lora_alpha=LORA["lora_alpha"],
                                          lora_dropout=LORA["lora_dropout"], trainable_vision_layers=TRAINABLE_VISION_LAYERS,
                                          pool_position="before", pool_mode="average")  # as LLaVA-NeXT-Video pools
    inputs = dict(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"],
                  pixel_values=batch["pixels"], return_logits=False)  # as train.py calls it
    if kind == "video":
        inputs.update(visual_frames=[batch["frames"]] * batch["n"], visual_pooled=[True] * batch["n"])
    return model, inputs


def build_theirs(path: str, kind: str, batch: dict):
    """transformers' model on the same weights, LoRA on the LM's linears, projector + last vision layers trained."""
    from model import encoder_layers
    from peft import LoraConfig, get_peft_model
    from transformers import AutoTokenizer, LlavaForConditionalGeneration, LlavaNextVideoForConditionalGeneration

    inputs = dict(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"])
    if kind == "image":
        model = LlavaForConditionalGeneration.from_pretrained(path, attn_implementation="sdpa")
        inputs["pixel_values"] = batch["pixels"]
    else:
        model = LlavaNextVideoForConditionalGeneration.from_pretrained(path + "-video", attn_implementation="sdpa")
        inputs["pixel_values_videos"] = batch["pixels"].unflatten(0, (batch["n"], batch["frames"]))
    model.tokenizer = AutoTokenizer.from_pretrained(path)  # held by a training script, as ours holds model.tokenizer
    model = get_peft_model(model, LoraConfig(target_modules=LM_LINEARS, **LORA))
    layers = encoder_layers(model.base_model.model.model.vision_tower)
    used = len(layers) - 1  # vision_feature_layer = -2: the last layer's output is never used
    for layer in layers[len(layers) - TRAINABLE_VISION_LAYERS:used]:
        layer.requires_grad_(True)
    model.base_model.model.model.multi_modal_projector.requires_grad_(True)
    return model, inputs


def step(model, inputs, optimizer):
    model.train()  # as train.py does (from_pretrained returns eval mode)
    model(**inputs).loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def trainable(model) -> list:
    return [p for p in model.parameters() if p.requires_grad]


def time_steps(path: str, kind: str, size: str, warmup: int, steps: int) -> dict:
    """Both sides in this process, steps interleaved (ours, theirs, ours, ...) so that another process
    loading the CPU slows both alike -> {side: median step seconds}."""
    batch = make_batch(kind, size)
    models = {"ours": build_ours(path, kind, batch), "theirs": build_theirs(path, kind, batch)}
    optimizers = {side: torch.optim.AdamW(trainable(m), lr=1e-4) for side, (m, _) in models.items()}
    times = {side: [] for side in models}
    for _ in range(warmup + steps):
        for side, (model, inputs) in models.items():
            start = time.perf_counter()
            step(model, inputs, optimizers[side])
            times[side].append(time.perf_counter() - start)
    tokens = int(batch["attention_mask"].sum())
    return {side: {"step_s": statistics.median(t[warmup:]), "tokens": tokens,
                   "trainable": sum(p.numel() for p in trainable(models[side][0]))} for side, t in times.items()}


def memory_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field))


def measure_memory(side: str, kind: str, size: str, path: str):
    """Run in a fresh process: peak RSS of two steps above the RSS of the libraries alone -> a JSON line."""
    import peft, transformers, model  # noqa: F401  every library either side imports, before "base"
    from transformers import LlavaForConditionalGeneration, LlavaNextVideoForConditionalGeneration  # noqa: F401

    batch = make_batch(kind, size)
    base = memory_kb("VmRSS")
    net, inputs = (build_ours if side == "ours" else build_theirs)(path, kind, batch)
    optimizer = torch.optim.AdamW(trainable(net), lr=1e-4)
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)  # hand loading's freed memory back: both sides start from the same state
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM (peak RSS) to the current RSS
    for _ in range(2):  # the second step has the AdamW state and the same activations: the peak
        step(net, inputs, optimizer)
    print(json.dumps({"peak_mb": (memory_kb("VmHWM") - base) / 1024}))


def profile(kind: str, size: str, steps: int = 3):
    """Operators by self CPU time over `steps` steps of each side, after two warm-up steps."""
    from torch.profiler import profile as torch_profile

    folder, batch = tempfile.TemporaryDirectory(), make_batch(kind, size)
    path = save_checkpoint(size, folder.name)
    for side, build in (("ours", build_ours), ("theirs", build_theirs)):
        model, inputs = build(path, kind, batch)
        optimizer = torch.optim.AdamW(trainable(model), lr=1e-4)
        for _ in range(2):
            step(model, inputs, optimizer)
        with torch_profile() as prof:
            for _ in range(steps):
                step(model, inputs, optimizer)
        print(f"\n== {side} {kind}-{size}: {steps} steps ==")
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default="tiny,small", help="comma-separated: " + ",".join(SIZES))
    p.add_argument("--kinds", default="image,video")
    p.add_argument("--steps", type=int, default=10, help="timed steps per side (median reported)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=1, help="torch threads (1: steadier on a shared 2-core machine)")
    p.add_argument("--profile", metavar="KIND-SIZE", help="e.g. video-small: print an operator profile instead")
    p.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "train_step.json"))
    p.add_argument("--_memory", nargs=4, metavar=("SIDE", "KIND", "SIZE", "CHECKPOINT"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    logging.getLogger("model").setLevel(logging.ERROR)  # "no image processor config": expected for random checkpoints
    warnings.filterwarnings("ignore", category=FutureWarning)  # a deprecation inside peft/transformers
    torch.set_num_threads(args.threads)
    if args._memory:
        return measure_memory(*args._memory)
    if args.profile:
        return profile(*args.profile.split("-"))
    rows = []
    print(f"{'kind':5} {'size':5} {'tokens':>6} {'ours ms':>8} {'theirs ms':>9} {'ratio':>5} {'ours MB':>8} "
          f"{'theirs MB':>9} {'ratio':>5} {'trainable ours/theirs':>23}")
    with tempfile.TemporaryDirectory() as folder:
        for size in args.sizes.split(","):
            path = save_checkpoint(size, folder)
            for kind in args.kinds.split(","):
                row = {"kind": kind, "size": size, **time_steps(path, kind, size, args.warmup, args.steps)}
                for side in ("ours", "theirs"):
                    cmd = [sys.executable, os.path.abspath(__file__), "--threads", str(args.threads),
                           "--_memory", side, kind, size, path]
                    out = subprocess.run(cmd, capture_output=True, text=True)
                    if out.returncode:
                        sys.exit(f"{side} {kind}-{size} failed:\n{out.stderr[-3000:]}")
                    row[side].update(json.loads(out.stdout.strip().splitlines()[-1]))
                o, t = row["ours"], row["theirs"]
                row["time_ratio"], row["memory_ratio"] = o["step_s"] / t["step_s"], o["peak_mb"] / t["peak_mb"]
                rows.append(row)
                print(f"{kind:5} {size:5} {o['tokens']:6} {o['step_s'] * 1e3:8.1f} {t['step_s'] * 1e3:9.1f} "
                      f"{row['time_ratio']:5.2f} {o['peak_mb']:8.1f} {t['peak_mb']:9.1f} {row['memory_ratio']:5.2f} "
                      f"{o['trainable']:>11}/{t['trainable']:<11}", flush=True)
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"lora": LORA, "trainable_vision_layers": TRAINABLE_VISION_LAYERS, "sizes": SIZES, "steps": args.steps,
                   "warmup": args.warmup, "threads": args.threads, "rows": rows}, f, indent=1)
    verdict = {name: "met" if all(r[f"{name}_ratio"] <= 1 for r in rows) else "NOT met" for name in ("time", "memory")}
    print(f"goal ours/theirs <= 1.0: time {verdict['time']}, memory {verdict['memory']}; wrote {args.out}")


if __name__ == "__main__":
    main()
