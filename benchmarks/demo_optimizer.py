"""The optimizer's share of a demo training step: torch's AdamW on a trained demo model's trained tensors.

Loads a model the demo trained (`demo.py --out RUN` writes RUN/final), gives each tensor the trainer trains (the
ones in trained.safetensors) a random gradient, and times AdamW.step() in its single-tensor loop (torch's default
on CPU), its foreach path (torch's default on CUDA) and its fused kernel: the median of --steps steps, the three
interleaved --rounds times. Compare with a mixture step (RUN/metrics.jsonl's time between lines) to see what a faster
optimizer could save.

    .venv/bin/python benchmarks/demo_optimizer.py RUN/final [--steps 50] [--rounds 4]
"""
import argparse
import os
import statistics
import sys
import time

import torch
from safetensors import safe_open

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from model import LlavaStyleModel  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", help="a demo run's final folder (RUN/final)")
    parser.add_argument("--steps", type=int, default=50, help="optimizer steps timed per round")
    parser.add_argument("--rounds", type=int, default=4, help="rounds of each path, interleaved")
    args = parser.parse_args()
    if not os.path.isfile(weights := os.path.join(args.model, "trained.safetensors")):
        parser.error(f"{weights}: no such file (give the final folder of a demo run: RUN/final)")
    with safe_open(weights, "pt") as f:
        trained = set(f.keys())
    model = LlavaStyleModel.from_pretrained(args.model)
    params = [p for name, p in model.named_parameters() if name in trained]
    for p in params:
        p.grad = torch.randn_like(p)
    print(f"{len(params)} trained tensors, {sum(p.numel() for p in params):,} values, "
          f"{torch.get_num_threads()} threads")
    paths = {"single-tensor": dict(foreach=False), "foreach": dict(foreach=True), "fused": dict(fused=True)}
    times = {path: [] for path in paths}
    for _ in range(args.rounds):
        for path, kwargs in paths.items():
            optimizer = torch.optim.AdamW(params, lr=1e-4, **kwargs)
            optimizer.step()  # creates the moments
            for _ in range(args.steps):
                start = time.perf_counter()
                optimizer.step()
                times[path].append(time.perf_counter() - start)
    medians = ", ".join(f"{path} {1000 * statistics.median(t):.2f} ms" for path, t in times.items())
    print(f"AdamW.step median: {medians}")


if __name__ == "__main__":
    main()
