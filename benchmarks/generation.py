"""Evaluation: batched generation (evaluate.generate_answers, batch size 16) against one prompt at a time.

A small random LlavaStyleModel (CLIP 64 px / patch 8: 64 image tokens; a 4-layer Llama of width 256 with a
LoRA adapter, unmerged, as evaluate.py loads a trained model) answers the same image questions, built
by evaluate.bench_sample as the bench does (half multiple choice, half open-ended, questions of varied
length), greedily, up to --max-new-tokens. Random weights rarely emit EOS, so nearly every answer runs to
the limit in both modes. Runs alternate (batched, single, batched, ...) and medians are reported.
On a GPU, `--lm qwen2-0.5b` (any LM of gpu_train.py, beside CLIP ViT-L/14-336: 576 image tokens) is the
size a user evaluates. Figures: prompts/s, the speed-up batched/single, and how many answers are identical
in both modes (left padding may change a near-tie argmax of a random model).

    .venv/bin/python benchmarks/generation.py [--prompts 64] [--max-new-tokens 32] [--repeats 2]
    python benchmarks/generation.py --device cuda --lm qwen2-0.5b --out benchmarks/results/generation_cuda.json
"""
import argparse
import json
import logging
import os
import random
import statistics
import sys
import tempfile
import time
import warnings

import numpy as np
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORDS = "which marked instance is left of the red umbrella in frame and what does it hold while walking".split()


def small_model(folder: str, lm: str, device: str):
    """Save a random CLIP + Llama + tokenizer to `folder`, load them with model.build_model -> the model.
    lm "small": the CPU model above; a name of gpu_train.LMS: that LM beside CLIP ViT-L/14-336."""
    import torch
    from conftest import make_tokenizer
    from transformers import AutoModel, AutoModelForCausalLM, CLIPVisionConfig, LlamaConfig

    from model import ModelConfig, build_model

    if lm != "small":
        from gpu_train import save_random

        paths = save_random(lm, folder, device, tiny=False)
        return build_model(ModelConfig(vision_model=paths["vision"], language_model=paths["lm"], lora_r=16, lora_alpha=32,
                                       trainable_vision_layers=0), device=device).eval()
    torch.manual_seed(0)
    tok = make_tokenizer()
    vision = CLIPVisionConfig(image_size=64, patch_size=8, hidden_size=128, intermediate_size=512,
                              num_hidden_layers=4, num_attention_heads=4)
    text = LlamaConfig(vocab_size=len(tok), hidden_size=256, intermediate_size=704, num_hidden_layers=4,
                       num_attention_heads=8, num_key_value_heads=4, bos_token_id=1, eos_token_id=2, pad_token_id=3)
    AutoModel.from_config(vision).save_pretrained(os.path.join(folder, "vision"))
    AutoModelForCausalLM.from_config(text).save_pretrained(os.path.join(folder, "lm"))
    tok.save_pretrained(os.path.join(folder, "lm"))
    cfg = ModelConfig(vision_model=os.path.join(folder, "vision"), language_model=os.path.join(folder, "lm"),
                      lora_r=16, lora_alpha=32, trainable_vision_layers=0)
    return build_model(cfg, device=device).eval()


def bench_prompts(n: int, seed: int = 0) -> list[dict]:
    """n generation samples from evaluate.bench_sample: image questions, half with options, varied length."""
    from evaluate import bench_sample

    rng = random.Random(seed)
    samples = []
    for k in range(n):
        image = Image.fromarray(np.random.default_rng(k).integers(0, 255, (64, 64, 3), dtype=np.uint8))
        question = " ".join(rng.choices(WORDS, k=rng.randint(4, 40))) + f" [{rng.randint(1, 9)}]?"
        options = {c: " ".join(rng.choices(WORDS, k=rng.randint(1, 6))) for c in "ABCD"} if k % 2 else {}
        samples.append(bench_sample({"question_id": str(k), "file": "bench", "split": "image_mc" if options else "image_oe",
                                     "media": image, "question": question, "options": options}, num_frames=8))
    return samples


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--prompts", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--repeats", type=int, default=2, help="runs per mode, alternating (median reported)")
    p.add_argument("--threads", type=int, default=2, help="torch threads")
    p.add_argument("--device", default="cpu", help="cpu or cuda (bf16 weights on cuda)")
    p.add_argument("--lm", default="small", help="small (4-layer Llama, 64 px CLIP) or a gpu_train.py LM, e.g. qwen2-0.5b")
    p.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "generation.json"))
    args = p.parse_args(argv)
    sys.path[:0] = [ROOT, os.path.join(ROOT, "tests"), os.path.dirname(os.path.abspath(__file__))]
    os.environ["TQDM_DISABLE"] = "1"  # generate_answers' progress bar; read when tqdm is imported, so before torch
    import torch
    from transformers.utils import logging as hf_logging

    from evaluate import generate_answers

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    logging.getLogger("model").setLevel(logging.ERROR)  # "no image processor config": expected here
    warnings.filterwarnings("ignore", category=FutureWarning)  # a deprecation inside peft/transformers

    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as folder:
        model = small_model(folder, args.lm, args.device)
    samples = bench_prompts(args.prompts)
    generate_answers(model, samples[:2], batch_size=2, max_new_tokens=4)  # warm-up
    times, answers = {"batched": [], "single": []}, {}
    for _ in range(args.repeats):
        for mode, batch_size in (("batched", args.batch_size), ("single", 1)):
            start = time.perf_counter()
            answers[mode] = generate_answers(model, samples, batch_size=batch_size, max_new_tokens=args.max_new_tokens)
            times[mode].append(time.perf_counter() - start)
    rows = {mode: {"seconds": statistics.median(t), "prompts_per_s": len(samples) / statistics.median(t)}
            for mode, t in times.items()}
    speedup = rows["single"]["seconds"] / rows["batched"]["seconds"]
    same = sum(a == b for a, b in zip(answers["batched"], answers["single"]))
    where = torch.cuda.get_device_name() if args.device == "cuda" else f"cpu, {args.threads} torch threads"
    print(f"{len(samples)} prompts, LM {args.lm}, max_new_tokens {args.max_new_tokens}, {where}, median of {args.repeats}")
    print(f"{'mode':16} {'seconds':>8} {'prompts/s':>10}")
    for mode, r in rows.items():
        label = f"batch {args.batch_size}" if mode == "batched" else "one at a time"
        print(f"{label:16} {r['seconds']:8.2f} {r['prompts_per_s']:10.2f}")
    print(f"speed-up batched/single: {speedup:.2f}x; identical answers: {same}/{len(samples)}")
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"device": where, "lm": args.lm, "prompts": len(samples), "batch_size": args.batch_size,
                   "max_new_tokens": args.max_new_tokens, "threads": args.threads, "repeats": args.repeats,
                   "rows": rows, "speedup": speedup,
                   "identical_answers": same}, f, indent=1)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
