"""INST-IT's 7B video recipe on a 12 GB card: what train.py's memory levers save, on one CUDA GPU.

The recipe is `gpu_train.py memory`'s: a 7B Llama-shaped LM (Vicuna-7B's shape) in nf4 with double quant, LoRA
(alpha 2r) on its linear layers, CLIP ViT-L/14-336 with the projector and the last 12 layers trained, one 32-frame
video (4,608 pooled tokens; pooled after the projector, model.py's default, unless --pool-position before) + 1,536
labelled text tokens, gradient checkpointing, batch 1, random weights. For LoRA
r 16 and r 128 it runs each configuration

    adamw                   torch's AdamW, fp32 moments: the baseline
    adamw_8bit              train.py --optim adamw_8bit: bitsandbytes' AdamW8bit, 8-bit moments
    adamw_8bit+expandable   and --expandable-segments: PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True

in a process of its own, since the allocator reads its settings once, when CUDA starts; the setting is made as
train.start_run makes it (torch imported, CUDA not started) and the snapshot says whether it took. The optimizer is
train.build_optimizer's, at TrainConfig's learning rates; a step is train.train_step's (bf16 autocast, gradients
clipped to 1.0). Reported per configuration, over --steps steps: torch.cuda.max_memory_allocated and
max_memory_reserved (weights included); the device's used memory from torch.cuda.mem_get_info (CUDA context,
cuBLAS workspaces and the allocator's cache included) after the model is built and after the steps; card_peak_gb =
used after - reserved now + peak reserved, what a card must hold. Loss parity: each configuration's losses against
adamw's at the same rank (same weights, batch and seed), the largest relative difference over the steps.

    python benchmarks/gpu_memory_12gb.py                          # meant to finish within 8 minutes on an H200
    python benchmarks/gpu_memory_12gb.py --ranks 16 --configs adamw_8bit+expandable,paged_adamw_8bit
    python benchmarks/gpu_memory_12gb.py --tiny --device cpu --out /tmp/smoke.json   # a smoke run of the script
"""
import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

import torch

ROOT = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [os.path.dirname(ROOT), ROOT]


def train_step(model, inputs, optimizer, device: str) -> float:
    """One optimizer step as train.train_step takes it (bf16 autocast on CUDA, gradients clipped to 1.0) -> loss."""
    with torch.autocast(device, dtype=torch.bfloat16, enabled=device == "cuda"):
        loss = model(**inputs).loss
    loss.backward()
    torch.nn.utils.clip_grad_norm_([p for group in optimizer.param_groups for p in group["params"]], 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.item()


def device_used_gb(device: str) -> float | None:
    """Memory in use on the whole device (torch.cuda.mem_get_info), GiB: what nvidia-smi shows as used."""
    if device != "cuda":
        return None
    free, total = torch.cuda.mem_get_info()
    return (total - free) / 2**30


def quiet():
    """No progress bars and no warnings a random checkpoint is expected to give."""
    import logging
    import warnings

    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    logging.getLogger("model").setLevel(logging.ERROR)  # "no image processor config": expected for random checkpoints
    warnings.filterwarnings("ignore", category=FutureWarning)


def measure(args) -> dict:
    """One configuration, in this process: build, step, measure -> its row."""
    optim, _, allocator = args.config.partition("+")
    if allocator == "expandable":  # as train.start_run sets it: torch imported, CUDA not started yet
        os.environ["PYTORCH_CUDA_ALLOC_CONF"] = "expandable_segments:True"
    import train
    from gpu_train import build_ours, free, ours_step_inputs, peak_gb, save_random

    quiet()
    paths = save_random(args.lm, args.tmp, args.device, args.tiny)  # saved by the parent's first child
    torch.manual_seed(0)
    model = build_ours(paths, args.device, load_in_4bit=True, lora_r=args.rank, lora_alpha=2 * args.rank,
                       trainable_vision_layers=args.vision_layers, gradient_checkpointing=True,
                       pool_position=args.pool_position,
                       pool_mode="bilinear" if args.pool_position == "after" else "average")
    inputs, _ = ours_step_inputs(model, args.device, args.frames)  # the batch only: the optimizer is train.py's
    cfg = train.TrainConfig(optim=optim)
    base_lr = {"projector": cfg.projector_lr, "vision": cfg.vision_lr, "language": cfg.lr}
    optimizer = train.build_optimizer(cfg, model.parameter_groups(), base_lr)
    free(args.device)
    built = device_used_gb(args.device)
    start, losses = time.perf_counter(), []
    try:
        for _ in range(args.steps):
            losses.append(train_step(model, inputs, optimizer, args.device))
    except torch.OutOfMemoryError:
        return {"config": args.config, "lora_r": args.rank, "out_of_memory": True, "losses": losses}
    row = {"config": args.config, "lora_r": args.rank, "tokens": inputs["input_ids"].shape[1],
           **peak_gb(args.device), "device_used_built_gb": built, "device_used_after_gb": device_used_gb(args.device),
           "step_s": (time.perf_counter() - start) / args.steps, "losses": losses}
    if args.device == "cuda":
        reserved_now = torch.cuda.memory_reserved() / 2**30
        row["card_peak_gb"] = row["device_used_after_gb"] - reserved_now + row["reserved_gb"]
        segments = torch.cuda.memory._snapshot()["segments"]
        row["expandable_in_effect"] = any(s.get("is_expandable", False) for s in segments)
    moments = [s["state1"] for s in optimizer.state.values() if "state1" in s]  # bitsandbytes' first moment
    row["tensors_8bit_state"] = sum(m.dtype == torch.uint8 for m in moments)
    row["tensors_with_state"] = len(optimizer.state)
    return row


def child(args, what: str, *extra) -> dict | None:
    """Run `what` (save, or measure one configuration) in a fresh Python process -> its row (None after a failure)."""
    row_file = os.path.join(args.tmp, "row.json")
    if os.path.exists(row_file):
        os.remove(row_file)
    cmd = [sys.executable, os.path.abspath(__file__), "--child", what, "--row-file", row_file, "--tmp", args.tmp,
           "--lm", args.lm, "--device", args.device, "--frames", str(args.frames), "--steps", str(args.steps),
           "--vision-layers", str(args.vision_layers), "--pool-position", args.pool_position,
           *(["--tiny"] if args.tiny else []), *extra]
    env = {k: v for k, v in os.environ.items() if k not in ("PYTORCH_ALLOC_CONF", "PYTORCH_CUDA_ALLOC_CONF")}
    try:  # each child starts from torch's allocator defaults; measure sets expandable segments where asked
        run = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout, env=env)
    except subprocess.TimeoutExpired:
        print(f"{what} {' '.join(extra)}: over --timeout {args.timeout} s", flush=True)
        return None
    if run.returncode != 0:
        print(f"{what} {' '.join(extra)} failed:\n{run.stderr[-3000:]}", flush=True)
        return None
    return json.load(open(row_file)) if os.path.exists(row_file) else {}


def parity(rows: list[dict]) -> None:
    """Each row's largest relative loss difference from adamw's at the same rank, over the steps (in place)."""
    base = {r["lora_r"]: r["losses"] for r in rows if r.get("config") == "adamw" and r.get("losses")}
    for r in rows:
        if r.get("losses") and base.get(r["lora_r"]):
            r["max_rel_loss_diff_vs_adamw"] = max(abs(a - b) / abs(b) for a, b in zip(r["losses"], base[r["lora_r"]]))


def write(args, rows: list[dict], seconds: float):
    import bitsandbytes

    device = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"device": device, "torch": torch.__version__, "bitsandbytes": bitsandbytes.__version__,
                   "lm": args.lm, "weights": "nf4", "frames": args.frames, "vision_layers": args.vision_layers,
                   "pool_position": args.pool_position,
                   "steps": args.steps, "seconds": seconds, "rows": rows}, f, indent=1)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ranks", type=lambda s: [int(x) for x in s.split(",")], default=[16, 128], help="LoRA ranks")
    p.add_argument("--configs", type=lambda s: s.split(","), default=["adamw", "adamw_8bit", "adamw_8bit+expandable"],
                   help="optimizers (train.OPTIMIZERS), each optionally +expandable")
    p.add_argument("--frames", type=int, default=32)
    p.add_argument("--vision-layers", type=int, default=12, help="trained vision layers")
    p.add_argument("--pool-position", default="after", choices=["after", "before"],
                   help="2x2 pooling after the projector (bilinear, model.py's default) or before it (average, "
                        "the order gpu_train.py's memory table was measured in)")
    p.add_argument("--steps", type=int, default=5, help="optimizer steps per configuration (memory and parity)")
    p.add_argument("--lm", default="llama-7b", help="gpu_train.LMS name (tiny with --tiny)")
    p.add_argument("--tiny", action="store_true", help="tiny vision and LM configs (sets --lm tiny)")
    p.add_argument("--device", default="cuda")
    p.add_argument("--timeout", type=int, default=170, help="seconds per configuration's process")
    p.add_argument("--tmp", default=None, help="folder for the random checkpoint (7B: ~14 GB; removed if made here)")
    p.add_argument("--out", default=os.path.join(ROOT, "results", "gpu_memory_12gb.json"))
    p.add_argument("--child", choices=["save", "measure"], help=argparse.SUPPRESS)
    p.add_argument("--config", help=argparse.SUPPRESS)
    p.add_argument("--rank", type=int, help=argparse.SUPPRESS)
    p.add_argument("--row-file", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.lm = "tiny" if args.tiny else args.lm
    if args.child:  # one step of the plan, in its own process
        if args.child == "save":
            from gpu_train import save_random
            quiet()
            save_random(args.lm, args.tmp, args.device, args.tiny)
            row = {}
        else:
            row = measure(args)
        with open(args.row_file, "w") as f:
            json.dump(row, f)
        return
    import train

    bad = [c for c in args.configs if c.partition("+")[0] not in train.OPTIMIZERS or c.partition("+")[2] not in (
        "", "expandable")]
    if bad:  # before a 14 GB checkpoint is written
        p.error(f"--configs {bad}: each is one of {list(train.OPTIMIZERS)}, optionally +expandable")
    made_tmp, args.tmp = args.tmp is None, args.tmp or tempfile.mkdtemp()
    start, rows = time.perf_counter(), []
    try:
        if child(args, "save") is None:
            raise SystemExit("could not save the random checkpoint")
        print(f"{'config':24} {'rank':>4} {'alloc GB':>8} {'reserved GB':>11} {'device GB':>9} {'card peak GB':>12} "
              f"{'s/step':>6} {'loss diff':>9}", flush=True)
        for rank in args.ranks:
            for config in args.configs:
                row = child(args, "measure", "--config", config, "--rank", str(rank)) or {
                    "config": config, "lora_r": rank, "failed": True}
                rows.append(row)
                parity(rows)
                gb = lambda k: f"{row[k]:.2f}" if row.get(k) is not None else "-"  # noqa: E731
                print(f"{config:24} {rank:4} {gb('allocated_gb'):>8} {gb('reserved_gb'):>11} "
                      f"{gb('device_used_after_gb'):>9} {gb('card_peak_gb'):>12} {gb('step_s'):>6} "
                      f"{row.get('max_rel_loss_diff_vs_adamw', float('nan')):9.2%}", flush=True)
                write(args, rows, time.perf_counter() - start)
    finally:
        if made_tmp:
            shutil.rmtree(args.tmp, ignore_errors=True)
    worst = max((r.get("max_rel_loss_diff_vs_adamw", 0) for r in rows), default=0)
    print(f"largest loss difference from AdamW's (goal: within 2%): {worst:.2%}; {time.perf_counter() - start:.0f} s; "
          f"{args.out}")


if __name__ == "__main__":
    main()
