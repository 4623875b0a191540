"""Padding: fraction of padded tokens per batch, with and without grouping by length (train.MixtureSampler).

The length mix imitates INST-IT's training data (INST-IT 2.4) at the paper's settings: CLIP-336 / patch 14
(576 tokens per image, 144 per pooled video frame), at most 32 frames, samples cut at 6144 tokens. Lengths
come from model.num_visual_tokens plus text lengths drawn from log-normal distributions (medians in SOURCES,
assumed, not measured on the real data). The padded fraction is train.MixtureSampler.padded_fraction over
one pass: padding tokens / (longest length x batch size), both summed over all batches.
Goal: <= 10% padded with group_by_length.

    .venv/bin/python benchmarks/padding.py [--batch-sizes 4,8,16] [--samples 20000]
"""
import argparse
import json
import math
import os
import random
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from train import MixtureSampler  # noqa: E402
from model import ModelConfig, num_visual_tokens  # noqa: E402

CFG = ModelConfig(image_size=336, patch_size=14)
MAX_LENGTH = 6144
SOURCES = {  # name: (mixture ratio, text median tokens, text sigma, frames per visual: (lo, hi) or 0 = no visual)
    "instit_video": (0.2, 700, 0.5, (8, 32)),  # frame captions + video caption + QA pairs
    "instit_image": (0.3, 350, 0.5, (1, 1)),   # instance + image captions + QA
    "general_image": (0.4, 150, 0.9, (1, 1)),  # LLaVA-style visual instruction data
    "text_only": (0.1, 400, 1.0, 0),          # text-only instruction data
}


def source_lengths(name: str, n: int, rng: random.Random) -> list[int]:
    """Token lengths of n samples of one source: visual tokens + log-normal text, capped at MAX_LENGTH."""
    _, median, sigma, frames = SOURCES[name]
    out = []
    for _ in range(n):
        text = max(16, round(rng.lognormvariate(math.log(median), sigma)))
        visual = 0
        if frames:
            t = rng.randint(*frames)
            visual = num_visual_tokens(CFG, t, pooled=t > 1)
        out.append(min(MAX_LENGTH, visual + text))
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch-sizes", default="4,8,16")
    p.add_argument("--samples", type=int, default=20000, help="samples per source")
    p.add_argument("--group", type=int, default=64, help="MixtureSampler's group: batches sorted together")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "padding.json"))
    args = p.parse_args(argv)
    rng = random.Random(args.seed)
    lengths = [source_lengths(name, args.samples, rng) for name in SOURCES]
    ratios = [SOURCES[name][0] for name in SOURCES]
    for name, ls in zip(SOURCES, lengths):
        s = sorted(ls)
        print(f"{name:14} ratio {SOURCES[name][0]:.1f}  tokens p10 {s[len(s) // 10]:5}  median {s[len(s) // 2]:5}  "
              f"p90 {s[9 * len(s) // 10]:5}")
    rows = []
    print(f"\n{'batch':>5} {'padded, no grouping':>20} {'padded, grouped':>16}")
    for batch_size in map(int, args.batch_sizes.split(",")):
        row = {"batch_size": batch_size}
        for grouped in (False, True):
            sampler = MixtureSampler(lengths, ratios, batch_size, seed=args.seed, group_by_length=grouped, group=args.group)
            row["grouped" if grouped else "ungrouped"] = sampler.padded_fraction()
        rows.append(row)
        print(f"{batch_size:5} {row['ungrouped']:20.1%} {row['grouped']:16.1%}")
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"sources": SOURCES, "max_length": MAX_LENGTH, "samples_per_source": args.samples,
                   "group": args.group, "rows": rows}, f, indent=1)
    met = all(r["grouped"] <= 0.10 for r in rows)
    print(f"goal <= 10% padded with grouping: {'met' if met else 'NOT met'}; wrote {args.out}")


if __name__ == "__main__":
    main()
