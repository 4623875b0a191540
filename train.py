r"""Continuous SFT of the LLaVA-style model (INST-IT 2.4, 3.1, Tab. 6), one GPU to many via accelerate.

    python train.py --stage continuous --llava-checkpoint llava-hf/llava-1.5-7b-hf --load-in-4bit \
        --data inst_it_dataset_video_21k.json:0.5 --data llava_v1_5_mix665k.json:0.5 --out runs/instit
    accelerate launch train.py ...        # several GPUs: DDP (tested); FSDP/DeepSpeed are not wired in
    python train.py --demo --out runs/demo    # `make demo`; with --scenes 8000 --max-steps 4000 it learns (README)

A plain loop you can step through: build the model for the stage, load the data mixture, then for each
optimizer step accumulate micro-batches, clip, step, log, and checkpoint. A checkpoint holds trained
weights, optimizer, scheduler, RNG states and the data position, so `--resume` continues exactly.
"""
import argparse
import dataclasses
import functools
import itertools
import json
import math
import os
import signal
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass, field, fields

import torch
from tqdm import tqdm

from model import LlavaStyleModel, ModelConfig, build_model, image_normalization

# Stages are presets of ModelConfig fields, not code paths (INST-IT 3.1; MultiInstruct's sequential
# tuning is a stage run with --init-from an earlier run). Flags given explicitly override a preset.
STAGES = {
    "align": dict(lm_training="frozen", trainable_vision_layers=0),   # projector only (LLaVA stage 1)
    "sft": dict(lm_training="lora", trainable_vision_layers=0),       # projector + LoRA, vision frozen
    "continuous": dict(lm_training="lora", trainable_vision_layers=12),  # INST-IT: + last 12 vision layers
}


@dataclass
class TrainConfig:
    """The training knobs. Learning rates follow LLaVA(-NeXT)'s LoRA recipe; INST-IT's values elsewhere."""
    data: list = field(default_factory=list)  # "path:ratio" sources, mixed by ratio
    media_root: str = "."                     # images / videos are found under this folder
    templates: str | None = None              # MultiInstruct sources: JSON {task_name: [instruction templates]}
    stage: str = "continuous"
    init_from: str | None = None              # a previous run's final/ or checkpoint folder
    out: str = "runs/train"
    resume: bool = False                      # continue from the latest checkpoint in --out
    lr: float = 2e-4                          # language model (LoRA) learning rate
    projector_lr: float = 2e-5
    vision_lr: float = 2e-6                   # the trained vision tail learns 10x slower (LLaVA-NeXT)
    weight_decay: float = 0.0
    warmup_ratio: float = 0.03                # cosine schedule with linear warmup
    batch_size: int = 1                       # per device, per micro-step
    grad_accum: int = 8
    max_grad_norm: float = 1.0
    epochs: float = 1.0
    max_steps: int = 0                        # > 0 overrides epochs
    max_length: int = 6144                    # INST-IT's 6K context
    seed: int = 0
    num_workers: int = 2
    log_every: int = 1
    save_every: int = 500
    compile: bool = False                     # torch.compile each transformer block (model.compile_blocks)
    report_to: str | None = None              # "tensorboard" or "wandb", through accelerate
    eval_bench: str | None = None             # an INST-IT Bench file/folder scored at the end (evaluate.run_bench)
    eval_every: int = 0                       # > 0: also score it every K steps
    eval_splits: str = "image_mc,video_mc"    # splits to score (OE needs a judge for a real score)
    demo: bool = False                        # the README's `make demo`: a synthetic world, a tiny model
    som: bool = True                          # demo: --no-som shows the model the frames without marks
    scenes: int = 1500                        # demo: training scenes (half images, half 8-frame videos)
    base_url: str | None = None               # demo: annotate with a real chat-completions server instead
    annotator_model: str = "gpt-4o"           # demo: its model; the key comes from OPENAI_API_KEY
    vision_pretrain_steps: int = 1500         # demo: the ViT's pretraining first (demo_pretrain_vision), batch 32


# ---------------------------------------------------------------------------------------------------
# Configuration from the command line and a JSON file.

def parse_args(argv=None) -> tuple[TrainConfig, dict]:
    """CLI -> (TrainConfig, ModelConfig overrides). Every field of both dataclasses is a flag; --config
    FILE.json|yaml gives defaults that explicit flags override; the stage preset fills the rest."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="JSON or YAML file with any of the fields below (flags override it)")
    model_fields = [f for f in fields(ModelConfig) if f.name not in ("image_size", "patch_size", "has_cls",
                                                                     "image_mean", "image_std")]
    for f in fields(TrainConfig) + tuple(model_fields):
        flag = "--" + f.name.replace("_", "-")
        kind = f.type if f.type in (bool, int, float) else str
        if f.name == "data":
            p.add_argument(flag, action="append", default=None, metavar="PATH:RATIO")
        elif kind is bool:
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=None,
                           help=f"(default: {f.default})")
        else:
            p.add_argument(flag, type=kind, default=None, help=f"(default: {f.default})")
    args = vars(p.parse_args(argv))
    given = read_config(args.pop("config"), fields(TrainConfig) + tuple(model_fields)) if args.get("config") else {}
    given.update({k: v for k, v in args.items() if v is not None})
    if given.get("demo"):
        given = {**DEMO, **given}
    train_names = {f.name for f in fields(TrainConfig)}
    unknown = set(given) - train_names - {f.name for f in model_fields}
    if unknown:
        raise SystemExit(f"unknown config fields: {sorted(unknown)}")
    cfg = TrainConfig(**{k: v for k, v in given.items() if k in train_names})
    if cfg.stage not in STAGES:
        raise SystemExit(f"--stage must be one of {list(STAGES)}, got {cfg.stage!r}")
    model_overrides = {**STAGES[cfg.stage], **{k: v for k, v in given.items() if k not in train_names}}
    parse_sources(cfg.data)  # fail on a bad path or ratio before any model is loaded
    return cfg, model_overrides


def read_config(path: str, known) -> dict:
    """A JSON or YAML config file -> {field: value}, numbers given as strings converted to the field's type
    (YAML reads 2e-5 as a string), so a bad value fails here and not after the model has loaded."""
    with open(path) as f:
        if path.endswith((".yaml", ".yml")):
            import yaml
            given = yaml.safe_load(f) or {}
        else:
            given = json.load(f)
    types = {f.name: f.type for f in known}
    for name, value in given.items():
        if types.get(name) in (int, float) and isinstance(value, str):
            try:
                given[name] = types[name](value)
            except ValueError:
                raise SystemExit(f"{path}: {name} = {value!r} is not a{'n int' if types[name] is int else ' number'}")
    return given


def parse_sources(specs: list[str]) -> list[tuple[str, float]]:
    """["a.json:0.7", "b.json:0.3"] -> [(path, ratio)]; ratios are normalised to sum to 1."""
    sources = []
    for spec in specs:
        path, sep, ratio = spec.rpartition(":")
        if not sep:
            path, ratio = spec, "1"
        try:
            weight = float(ratio)
        except ValueError:
            raise SystemExit(f"--data {spec!r}: ratio {ratio!r} is not a number (use PATH:RATIO, e.g. a.json:0.5)")
        if not (0 < weight < math.inf):
            raise SystemExit(f"--data {spec!r}: ratio must be a positive number")
        if not os.path.exists(path):
            raise SystemExit(f"--data {spec!r}: {path} does not exist")
        sources.append((path, weight))
    total = sum(w for _, w in sources)
    return [(p, w / total) for p, w in sources]


# ---------------------------------------------------------------------------------------------------
# Model and data.

def load_model(cfg: TrainConfig, overrides: dict, device) -> LlavaStyleModel:
    """The stage's model: from an earlier run (--init-from), a llava-hf checkpoint, or composed parts."""
    if cfg.init_from:
        return LlavaStyleModel.from_pretrained(cfg.init_from, device=device, strict=False, **overrides)
    if overrides.get("llava_checkpoint"):
        return LlavaStyleModel.from_llava_hf(overrides.pop("llava_checkpoint"), device=device, **overrides)
    return build_model(ModelConfig(**overrides), device)


def build_data(cfg: TrainConfig, model: LlavaStyleModel, sources: list[tuple[str, float]], num_shards=1):
    """Load each source (data.load_conversations reads the format from the file), wrap it lazily
    (data.InstructionDataset) and mix them by ratio with batches grouped by length (data.MixtureSampler)."""
    import data

    datasets = []
    for path, _ in sources:
        samples = data.load_conversations(path, cfg.media_root, templates=cfg.templates,
                                          max_frames=model.cfg.max_frames, seed=cfg.seed)
        if not samples:
            raise SystemExit(f"--data {path}: no usable samples")
        datasets.append(data.InstructionDataset(samples, model.tokenizer, model.cfg, cfg.max_length))
    sampler = data.MixtureSampler([d.lengths() for d in datasets], [r for _, r in sources],
                                  cfg.batch_size * num_shards, seed=cfg.seed)
    print(f"data: {sum(map(len, datasets))} samples from {len(sources)} sources; one pass = {len(sampler)} "
          f"batches; estimated padded fraction {sampler.padded_fraction(itertools.islice(sampler, 200)):.1%}")
    return torch.utils.data.ConcatDataset(datasets), sampler


def batches(dataset, sampler, pad_token_id, num_workers, start: int, rank=0, world=1):
    """Endless stream of micro-batches from number `start` on: the sampler's stream is a pure function of
    its seed, so resuming skips indices without loading them. Each process takes every world-th sample of
    a global batch. A batch whose samples were all dropped (too long) comes out as None."""
    import data

    def collate(samples):
        batch = data.collate(samples, pad_token_id)
        return batch and {**batch, "ids": [f"{s['source']}: {s['id']}" for s in samples if s is not None]}

    order = (batch[rank::world] for batch in itertools.islice(sampler.stream(), start, None))
    return iter(torch.utils.data.DataLoader(dataset, batch_sampler=order, collate_fn=collate, num_workers=num_workers,
                                            generator=torch.Generator().manual_seed(0)))  # never the global RNG


def cosine_with_warmup(step: int, total: int, warmup: int) -> float:
    """Learning-rate multiplier: linear warmup, then cosine decay to 0 (LLaVA's schedule)."""
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


# ---------------------------------------------------------------------------------------------------
# Checkpoints: everything needed to continue exactly.

def save_checkpoint(directory, model, optimizer, step, micro_batches, rng_generator_states):
    """Trained weights (model.save_pretrained) + optimizer, step, data position and RNG states."""
    tmp = directory + ".tmp"
    model.save_pretrained(tmp)
    torch.save({"optimizer": optimizer.state_dict(), "step": step, "micro_batches": micro_batches,
                "rng": rng_generator_states}, os.path.join(tmp, "train_state.pt"))
    if os.path.exists(directory):
        import shutil
        shutil.rmtree(directory)
    os.replace(tmp, directory)  # a kill mid-save never leaves a half-written checkpoint


def rng_states():
    return {"torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def set_rng_states(states):
    torch.set_rng_state(states["torch"])
    if states["cuda"]:
        torch.cuda.set_rng_state_all(states["cuda"])


def truncate_metrics(path: str, step: int):
    """Drop metric lines logged after the checkpoint we resume from (they will be logged again)."""
    if os.path.exists(path):
        rows = [line for line in open(path) if json.loads(line)["step"] <= step]
        with open(path, "w") as f:
            f.writelines(rows)


def latest_checkpoint(out: str) -> str | None:
    steps = [d for d in os.listdir(out) if d.startswith("checkpoint-") and not d.endswith(".tmp")] if os.path.isdir(out) else []
    return os.path.join(out, max(steps, key=lambda d: int(d.split("-")[1]))) if steps else None


# ---------------------------------------------------------------------------------------------------
# The loop.

def train(cfg: TrainConfig, overrides: dict) -> dict:
    """Run one stage; returns {"step", "loss", "out"}. Writes metrics.jsonl, checkpoints and final/."""
    from accelerate import Accelerator, DistributedDataParallelKwargs
    from accelerate.utils import gather_object

    sources = parse_sources(cfg.data)
    if not sources:
        raise SystemExit("no --data given (or use --demo)")
    # find_unused_parameters: a text-only batch never reaches the vision tower and projector (mixed tuning)
    accelerator = Accelerator(mixed_precision="bf16" if torch.cuda.is_available() else "no",
                              log_with=cfg.report_to, project_dir=cfg.out,
                              kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)])
    torch.manual_seed(cfg.seed)
    resume_from = latest_checkpoint(cfg.out) if cfg.resume else None
    if resume_from:  # rebuild the same model, then load its trained tensors
        model = LlavaStyleModel.from_pretrained(resume_from, device=accelerator.device)
    else:
        model = load_model(cfg, overrides, accelerator.device)
    dataset, sampler = build_data(cfg, model, sources, accelerator.num_processes)
    wrapped = accelerator.prepare(model.compile_blocks() if cfg.compile else model)
    torch.manual_seed(cfg.seed + accelerator.process_index)  # built alike, but each process its own dropout masks
    groups = model.parameter_groups()  # after prepare, as accelerate asks (a wrapper may replace parameters)
    lrs = {"projector": cfg.projector_lr, "vision": cfg.vision_lr, "language": cfg.lr}
    optimizer = torch.optim.AdamW([{"params": ps, "lr": lrs[name], "name": name} for name, ps in groups.items() if ps],
                                  weight_decay=cfg.weight_decay)
    total = cfg.max_steps or max(1, int(cfg.epochs * len(sampler) / cfg.grad_accum))
    warmup = int(cfg.warmup_ratio * total)
    step = micro = 0
    if resume_from:
        state = torch.load(os.path.join(resume_from, "train_state.pt"), weights_only=False)
        optimizer.load_state_dict(state["optimizer"])
        step, micro = state["step"], state["micro_batches"]
    # The schedule counts from the resumed step, so the learning rate continues where it stopped.
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s, start=step: cosine_with_warmup(start + s, total, warmup))
    optimizer = accelerator.prepare(optimizer)  # the schedule stays ours: accelerate's would step once per process
    if resume_from:
        rng = state["rng"]  # one entry per process of the run that saved it
        set_rng_states(rng[min(accelerator.process_index, len(rng) - 1)])
        if accelerator.is_main_process:
            truncate_metrics(os.path.join(cfg.out, "metrics.jsonl"), step)
    os.makedirs(cfg.out, exist_ok=True)
    if accelerator.is_main_process:
        with open(os.path.join(cfg.out, "config.json"), "w") as f:
            json.dump({"train": dataclasses.asdict(cfg), "model": dataclasses.asdict(model.cfg)}, f, indent=1)
    if cfg.report_to:  # trackers take scalars and strings only (tensorboard's hparams)
        accelerator.init_trackers("inst-it", config={k: v if isinstance(v, (int, float, str, bool)) else str(v)
                                                     for k, v in dataclasses.asdict(cfg).items()})

    stop = {"signal": None}  # SIGINT/SIGTERM: finish the step, save, exit cleanly
    handlers = {sig: signal.signal(sig, lambda signum, frame: stop.update(signal=signum))
                for sig in (signal.SIGINT, signal.SIGTERM)}
    stream = batches(dataset, sampler, model.tokenizer.pad_token_id, cfg.num_workers, micro,
                     accelerator.process_index, accelerator.num_processes)
    log_file = open(os.path.join(cfg.out, "metrics.jsonl"), "a") if accelerator.is_main_process else None
    bar = tqdm(total=total, initial=step, desc=f"{cfg.stage}", disable=not accelerator.is_main_process)
    model.train()
    loss_value = float("nan")
    stopping = False
    while step < total and not stopping:
        start, tokens, padded, loss_sum = time.perf_counter(), 0, 0, 0.0
        for i in range(cfg.grad_accum):
            batch = next(stream)
            micro += 1
            if batch is None:
                continue
            sample_ids = batch.pop("ids")
            batch = {k: v.to(accelerator.device) if torch.is_tensor(v) else v for k, v in batch.items()}
            tokens += int(batch["attention_mask"].sum())
            padded += int((batch["attention_mask"] == 0).sum())
            sync = nullcontext() if i == cfg.grad_accum - 1 else accelerator.no_sync(wrapped)
            with sync, accelerator.autocast():
                loss = wrapped(**batch, return_logits=False).loss  # the LM head on labelled positions only
                if not torch.isfinite(loss):
                    last = latest_checkpoint(cfg.out)
                    raise SystemExit(f"non-finite loss {loss.item()} at step {step + 1}, micro-batch {i}, samples "
                                     f"{sample_ids}; " + (f"the last good checkpoint is {last} (--resume)" if last
                                                          else "no checkpoint was saved yet (see --save-every)"))
                accelerator.backward(loss / cfg.grad_accum)
            loss_sum += loss.item() / cfg.grad_accum
        grad_norm = accelerator.clip_grad_norm_([p for ps in groups.values() for p in ps], cfg.max_grad_norm)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        loss_value = loss_sum
        bar.update(1)
        bar.set_postfix(loss=f"{loss_value:.4f}")
        if log_file and (step % cfg.log_every == 0 or step == total):
            seconds = time.perf_counter() - start
            record = {"step": step, "loss": loss_value, "lr": schedule.get_last_lr()[-1],
                      "grad_norm": float(grad_norm), "tokens_per_s": tokens * accelerator.num_processes / seconds,
                      "padded_fraction": padded / max(1, tokens + padded),
                      "peak_memory_gb": torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None}
            log_file.write(json.dumps(record) + "\n")
            log_file.flush()
            if cfg.report_to:
                accelerator.log(record, step=step)
        stopping = stop["signal"] is not None
        if accelerator.num_processes > 1:  # all processes stop at the same step, or the others hang in all-reduce
            stopping = bool(accelerator.reduce(torch.tensor(float(stopping), device=accelerator.device), "max"))
        if step % cfg.save_every == 0 or stopping:
            states = gather_object([rng_states()])  # every process's RNG, so a multi-GPU resume is exact too
            if accelerator.is_main_process:
                save_checkpoint(os.path.join(cfg.out, f"checkpoint-{step}"), model, optimizer, step, micro, states)
        if cfg.eval_bench and accelerator.is_main_process and (
                (cfg.eval_every and step % cfg.eval_every == 0) or step == total):
            scores = evaluate_on_bench(model, cfg, step)
            if log_file:
                log_file.write(json.dumps({"step": step, "eval": scores}) + "\n")
                log_file.flush()
    for sig, handler in handlers.items():
        signal.signal(sig, handler)
    bar.close()
    if accelerator.is_main_process:
        if stopping:
            print(f"stopped by signal {stop['signal'] or '(to another process)'} at step {step}; --resume continues",
                  file=sys.stderr)
        else:
            model.save_pretrained(os.path.join(cfg.out, "final"))
            plot_loss(cfg.out)
    if cfg.report_to:
        accelerator.end_training()
    return {"step": step, "loss": loss_value, "out": cfg.out}


def evaluate_on_bench(model, cfg: TrainConfig, step: int) -> dict:
    """Score the model on cfg.eval_bench (evaluate.run_bench, greedy) -> {split: score}; back to training.
    Multiple-choice answers are a letter, so MC-only evaluation generates at most 16 tokens."""
    import evaluate

    model.eval()
    splits = cfg.eval_splits.split(",")
    summary = evaluate.run_bench(model, cfg.eval_bench, splits, os.path.join(cfg.out, f"eval-{step}"),
                                 batch_size=max(8, cfg.batch_size),
                                 max_new_tokens=16 if all(s.endswith("mc") for s in splits) else 256)
    model.train()
    return {split if "score" in s else f"{split} oe_proxy": s.get("score", s.get("oe_proxy"))
            for split, s in summary.items()}


def plot_loss(out: str):
    """metrics.jsonl -> loss.png (skipped, with a note, when matplotlib is not installed)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no loss.png (pip install matplotlib)", file=sys.stderr)
        return
    rows = [r for r in map(json.loads, open(os.path.join(out, "metrics.jsonl"))) if "loss" in r]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot([r["step"] for r in rows], [r["loss"] for r in rows])
    ax.set(xlabel="optimizer step", ylabel="training loss", title=os.path.basename(os.path.abspath(out)))
    fig.tight_layout()
    fig.savefig(os.path.join(out, "loss.png"), dpi=120)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------------
# The demo (`make demo`): the whole method in miniature on a synthetic world, no weights, data or API key.

# Defaults under --demo (flags still override): a tiny model trained from scratch on CPU. Its ViT is pretrained
# first (demo_pretrain_vision), then frozen but for its last layer, as LLaVA-style runs keep a pretrained encoder.
DEMO = dict(
    out="runs/demo", lr=3e-4, projector_lr=3e-4, vision_lr=3e-4, weight_decay=0.01, warmup_ratio=0.05,
    batch_size=16, grad_accum=1, max_steps=400, max_length=1024, num_workers=0, log_every=10, save_every=500,
    lm_training="full", trainable_vision_layers=1, vision_feature_layer=-1, max_frames=8)
DEMO_IMAGE_SIZE, DEMO_PATCH = 96, 16   # a 6x6 patch grid; a mark's label box is about one patch
DEMO_VISION_LAYERS = 4                 # the tiny ViT's depth
DEMO_GENERAL_RATIO = 0.4               # share of LLaVA-style general questions in the demo's mixture
DEMO_QUESTION_ROUNDS = 2               # draws of each question kind per scene in that data (repeats dropped)
DEMO_READING_SHARE = 1.0               # the reading stage's steps, as a share of --max-steps (run before them)
DEMO_READING_RATIO = 0.2               # share of reading chats kept in the mixture that follows, so it is not forgotten
DEMO_MARKS = dict(fill=0.0, mark_colour=(255, 255, 255), grid=DEMO_PATCH)  # data.render_som's style for a model
# that learns to see from scratch: no tint and white marks (the world's saturated colours are what the bench asks
# about), each label whole in one patch token. Measured: benchmarks/DEMO_HISTORY.md.
CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def build_demo_model(folder: str, texts: list[str], seed: int) -> dict:
    """Save a tiny CLIP vision encoder, a tiny Llama and a word-level tokenizer (vocabulary: the words of
    `texts`) under `folder`, all random -> the ModelConfig fields that load them, as paths to hub IDs would."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers, trainers
    from transformers import CLIPVisionConfig, CLIPVisionModel, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    specials = ["<unk>", "<s>", "</s>", "<pad>", "<image>", "<|im_start|>", "<|im_end|>"]
    words = Tokenizer(models.WordLevel(unk_token="<unk>"))
    words.pre_tokenizer = pre_tokenizers.Sequence([  # a word, a mark "[3]", a time "<2>" or a punctuation mark
        pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Split(Regex(r"\[\d+\]|<\d+>|\w+|[^\w\s]"), "isolated")])
    words.train_from_iterator(texts + ["system user assistant"], trainers.WordLevelTrainer(special_tokens=specials))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=words, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                        unk_token="<unk>", additional_special_tokens=specials[4:], chat_template=CHATML)
    torch.manual_seed(seed)
    vision, lm = os.path.join(folder, "vision"), os.path.join(folder, "lm")
    CLIPVisionModel(CLIPVisionConfig(image_size=DEMO_IMAGE_SIZE, patch_size=DEMO_PATCH, hidden_size=128,
                                     intermediate_size=512, num_hidden_layers=DEMO_VISION_LAYERS,
                                     num_attention_heads=4)).save_pretrained(vision)
    LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), hidden_size=128, intermediate_size=512, num_hidden_layers=4,
                                 num_attention_heads=4, max_position_embeddings=2048, tie_word_embeddings=True,
                                 bos_token_id=1, eos_token_id=2, pad_token_id=3)).save_pretrained(lm)
    tokenizer.save_pretrained(lm)
    return {"vision_model": vision, "language_model": lm, "tokenizer": lm}


def demo_pretrain_vision(records: list[dict], world, source: str, out: str, seed: int, steps: int):
    """The stand-in for CLIP's pretraining, which a real run inherits: the demo's ViT (from `source`, saved to
    `out`) learns to name, in every patch token, the colour, shape and size of the instance covering most of
    its patch (demo_token_targets), through three linear heads dropped afterwards. Raw frames of the training
    scenes (an image, or three frames of a video), no marks and no IDs: --som and --no-som get the same ViT.
    Measured (benchmarks/DEMO_HISTORY.md): the LM's loss alone never puts shape into the features."""
    import random

    import numpy as np
    import torch.nn.functional as F
    from transformers import CLIPVisionModel

    import data

    rng, frames, targets = random.Random(seed), [], []
    for rec in records:
        for name in rng.sample(rec["frames"], min(3, len(rec["frames"]))):
            frames.append(np.asarray(data.open_image(str(world / rec["video_path"] / name))))
            targets.append(demo_token_targets(rec["segmentations"][name], rec["truth"]["instances"]))
    pixels, targets = torch.tensor(np.stack(frames)).permute(0, 3, 1, 2), torch.tensor(np.stack(targets))
    mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in image_normalization(source))
    torch.manual_seed(seed)
    vit = CLIPVisionModel.from_pretrained(source)
    heads = torch.nn.ModuleList(torch.nn.Linear(vit.config.hidden_size, len(v)) for v in data.ATTRIBUTES.values())
    optimizer = torch.optim.AdamW([*vit.parameters(), *heads.parameters()], lr=DEMO["lr"],
                                  weight_decay=DEMO["weight_decay"])
    bar = tqdm(range(steps), desc="pretrain vision")
    for _ in bar:
        batch = torch.randint(len(pixels), (32,))
        tokens = vit(pixel_values=(pixels[batch] / 255 - mean) / std).last_hidden_state[:, 1:]  # CLS dropped
        loss = sum(F.cross_entropy(head(tokens).flatten(0, 1), targets[batch][..., k].flatten())
                   for k, head in enumerate(heads))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        bar.set_postfix(loss=f"{loss.item():.3f}")
    vit.save_pretrained(out)


def demo_token_targets(segmentations: dict, instances: dict, cover: float = 0.3):
    """One frame's masks {ID: {"mask": RLE}} + the instances' truth -> (patches, 3): the indices of the colour,
    shape and size (data.ATTRIBUTES) of the instance covering most of each patch, -100 where none covers `cover`."""
    import numpy as np

    import data

    grid = DEMO_IMAGE_SIZE // DEMO_PATCH
    best, target = np.full(grid * grid, cover), np.full((grid * grid, 3), -100)
    for i, entry in segmentations.items():
        covered = data.decode_rle(entry["mask"]).reshape(grid, DEMO_PATCH, grid, DEMO_PATCH).mean((1, 3)).reshape(-1)
        wins = covered >= best
        best[wins] = covered[wins]
        target[wins] = [list(values).index(instances[i][k]) for k, values in data.ATTRIBUTES.items()]
    return target


def run_demo(cfg: TrainConfig, overrides: dict) -> dict:
    """World -> SoM -> annotations (oracle, or GPT with --base-url) -> instruction data -> tiny model ->
    train -> held-out synthetic bench. Writes results.json, loss.png, som_frames.png and answers.png in --out.
    --no-som shows the model the same frames without marks (the annotations still name the [IDs])."""
    from pathlib import Path

    import annotate
    import data
    import evaluate

    started, out = time.perf_counter(), Path(cfg.out)
    world = out / "world"
    train_records = data.synthetic_world(str(world), cfg.scenes, cfg.seed, size=DEMO_IMAGE_SIZE, prefix="train")
    bench_scenes = min(200, max(40, cfg.scenes // 8))  # 200 scenes: 2,000 questions
    bench_records = data.synthetic_world(str(world), bench_scenes, cfg.seed + 7919, size=DEMO_IMAGE_SIZE,
                                         prefix="bench")
    som = world / "train_som"
    if cfg.base_url:  # the real three-stage annotator on the same SoM frames
        client = annotate.LLMClient(cfg.base_url, cfg.annotator_model, str(world / "train.cache.jsonl"))
        annotate_one = functools.partial(annotate.annotate_record, client, media_root=world, som_dir=som,
                                         num_frames=16, marks=DEMO_MARKS)
        records, failures = annotate.run_all(annotate_one, train_records, [r["video_id"] for r in train_records],
                                             8, client, "annotate")
        records = [r for r in records if r is not None]
    else:
        records = [annotate.oracle_record(r, world, som, cfg.seed, DEMO_MARKS)
                   for r in tqdm(train_records, desc="annotate (oracle)")]
    for r in bench_records:
        annotate.render_record(r, world, world / "bench_som", len(r["frames"]), marks=DEMO_MARKS)
    if not cfg.som:  # the model sees the raw frames
        records = [{**r, "video_path": f"media/{r['video_id']}"} for r in records]
    train_json, general_json = world / "train.json", world / "general.json"
    annotate.write_json_atomic(train_json, records)
    frames_root = "train_som/videos" if cfg.som else "media"
    annotate.write_json_atomic(general_json, demo_general_data(train_records, frames_root, cfg.seed))
    bench = world / "bench"
    data.write_synthetic_bench(bench_records, str(world / ("bench_som/videos" if cfg.som else "media")), str(bench),
                               cfg.seed)

    reading_json = world / "reading.json"
    annotate.write_json_atomic(reading_json, demo_reading_data(train_records, world, cfg.som))

    questions = data.load_instit_bench(str(bench))
    texts = [m["content"] for path in (train_json, reading_json)
             for s in data.load_conversations(str(path), str(world)) for m in s["messages"]]
    texts += [m["content"] for q in questions for m in evaluate.bench_sample(q, 8)["messages"]]
    base = build_demo_model(str(out / "base"), texts, cfg.seed)
    vision = out / "vision"
    if not (cfg.resume and (vision / "model.safetensors").exists()):
        demo_pretrain_vision(train_records, world, base["vision_model"], str(vision), cfg.seed, cfg.vision_pretrain_steps)
    base["vision_model"] = str(vision)
    print(f"demo world: {len(records)} annotated scenes, {len(questions)} bench questions, "
          f"{time.perf_counter() - started:.0f} s; marks {'on' if cfg.som else 'off (--no-som)'}")

    # Two stages, as INST-IT trains in stages: first read lone marks, then the whole mixture --init-from that.
    reading = dataclasses.replace(cfg, data=[str(reading_json)], media_root=str(world), out=str(out / "reading"),
                                  max_steps=max(1, round(DEMO_READING_SHARE * cfg.max_steps)), eval_bench=None)
    reading_final = os.path.join(reading.out, "final")
    if not (cfg.resume and os.path.isdir(reading_final)):
        result = train(reading, {**overrides, **base})
        if result["step"] < reading.max_steps:
            return result  # stopped by a signal: --resume continues
    keep = 1 - DEMO_READING_RATIO
    mixture = [f"{train_json}:{(1 - DEMO_GENERAL_RATIO) * keep}", f"{general_json}:{DEMO_GENERAL_RATIO * keep}",
               f"{reading_json}:{DEMO_READING_RATIO}"]
    mixed = dataclasses.replace(cfg, data=mixture, media_root=str(world), init_from=reading_final,
                                eval_bench=str(bench) if cfg.eval_every else None)  # --eval-every: a learning curve
    result = train(mixed, overrides)
    if result["step"] < (cfg.max_steps or 1):
        return result  # stopped by a signal: --resume continues
    model = LlavaStyleModel.from_pretrained(str(out / "final"))
    model.eval()
    summary = evaluate.run_bench(model, str(bench), list(evaluate.SPLITS), str(out / "bench"), batch_size=32,
                                 max_new_tokens=24, num_frames=8)
    predictions = evaluate.load_predictions(str(out / "bench" / "predictions.jsonl"))
    results = {"som": cfg.som, "steps": result["step"], "seed": cfg.seed,
               "minutes": round((time.perf_counter() - started) / 60, 2), "chance_mc": evaluate.MC_RANDOM, "splits": {},
               "curve": [r for r in map(json.loads, open(out / "metrics.jsonl")) if "eval" in r]}
    for split, scores in summary.items():
        rows = [p for p in predictions if p["split"] == split]
        kinds = sorted({p["question_id"].rsplit("-", 1)[1] for p in rows})
        by_kind = {k: [p for p in rows if p["question_id"].endswith("-" + k)] for k in kinds}
        score = (lambda ps: evaluate.score_mc(ps)["score"]) if split.endswith("mc") else demo_exact
        results["splits"][split] = {**scores, "by_kind": {k: round(score(ps), 1) for k, ps in by_kind.items()}}
        if split.endswith("oe"):  # templated answers share most words: the proxy flatters, exact match does not
            results["splits"][split]["exact"] = demo_exact(rows)
    results["binding"] = demo_binding(predictions, bench_records)
    evaluate.write_json(str(out / "results.json"), results)
    shown = [p for split in evaluate.SPLITS for p in [q for q in predictions if q["split"] == split][:2]]
    demo_pictures(out, train_records[:8], shown, questions)  # two questions of each split
    print(json.dumps({s: {k: v for k, v in r.items() if k in ("score", "oe_proxy", "by_kind")}
                      for s, r in results["splits"].items()}, indent=1))
    for split, b in results["binding"].items():
        print(f"{split} colour/shape/size: {b['right']:.1f}% right, ID-blind guess {b['id_blind']:.1f}%, "
              f"names a value seen in the scene {b['in_scene']:.1f}%")
    print(f"{out}/results.json, loss.png, som_frames.png, answers.png ({results['minutes']} min)")
    return {**result, "results": results}


def demo_exact(predictions: list[dict]) -> float:
    """% of OE answers equal to the reference, ignoring case and punctuation (the demo's answers are templated,
    so a right answer is the reference sentence)."""
    import evaluate

    same = [evaluate._normalise(p["model_prediction"]) == evaluate._normalise(p["ground_truth"]) for p in predictions]
    return 100 * sum(same) / len(same)


def demo_binding(predictions: list[dict], records: list[dict]) -> dict:
    """Bench answers about an instance's colour, shape or size + the bench scenes' truth -> per split: % right,
    % naming a value some instance of the scene has, and the ID-blind guess (% right when picking one of the
    scene's values at random). Seeing what is in the scene gives the ID-blind level; only binding each mark to
    its object goes above it, which is what SoM is for (INST-IT 2.1)."""
    import re

    import data
    import evaluate

    truth = {r["video_id"]: r["truth"]["instances"] for r in records}
    vocab = {kind: set(values) for kind, values in data.ATTRIBUTES.items()}
    out = {}
    for split in sorted({p["split"] for p in predictions}):
        right = in_scene = id_blind = total = 0
        for p in predictions:
            scene, kind = p["question_id"].rsplit("-", 1)
            if p["split"] != split or kind not in vocab:
                continue
            if p["options"]:
                said = p["options"].get(evaluate.extract_choice(p["model_prediction"], p["options"]))
            else:  # the one value word the sentence names
                named = vocab[kind] & set(re.findall(r"[a-z]+", p["model_prediction"].lower()))
                said = named.pop() if len(named) == 1 else None
            instances = truth[scene]
            values = {v[kind] for v in instances.values()}
            right += said == instances[re.search(r"\[(\d+)\]", p["question"]).group(1)][kind]
            in_scene += said in values
            id_blind += 1 / len(values)
            total += 1
        if total:
            out[split] = {"right": 100 * right / total, "in_scene": 100 * in_scene / total,
                          "id_blind": 100 * id_blind / total, "total": total}
    return out


def demo_reading_data(records: list[dict], world, som: bool) -> list[dict]:
    """The reading stage's data: each instance of a training scene's first frame marked alone, asked "Which number
    is marked?" and then its colour, shape, size and position, one chat per instance, the frame saved in
    world/reading/<scene>-<ID>/ (--no-som: unmarked). A video scene's frame is a one-frame video, so that it is
    read 2x2 pooled as the bench's videos are. Measured (benchmarks/DEMO_HISTORY.md): a model that first reads a lone
    mark's digit then binds [k] to its object among several marks; without it, not in 7,000 steps. The number is
    asked first, so that its answer cannot be copied from a later question."""
    import data

    rows = []
    for rec in records:
        name, video = rec["frames"][0], len(rec["frames"]) > 1
        frame = data.open_image(str(world / rec["video_path"] / name))
        for i, entry in sorted(rec["segmentations"][name].items(), key=lambda kv: int(kv[0])):  # the visible ones
            mask = data.decode_rle(entry["mask"])
            folder = f"reading/{rec['video_id']}-{i}"
            os.makedirs(world / folder, exist_ok=True)
            (data.render_som(frame, {int(i): mask}, **DEMO_MARKS) if som else frame).save(world / folder / name)
            position = data.quadrant(*rec["truth"]["centres"][name][i], rec["truth"]["size"])
            facts = {"a": f"[{i}]", **rec["truth"]["instances"][i], "position": position}
            conversation = [{"from": "human", "value": f"{data.PLACEHOLDER}\nWhich number is marked?"},
                            {"from": "gpt", "value": f"[{i}]."}]
            for kind in ("colour", "shape", "size", "position"):
                question, answer = data.QUESTIONS[kind]
                conversation += [{"from": "human", "value": question.format(**facts)},
                                 {"from": "gpt", "value": answer.format(**facts)}]
            media = {"video": folder} if video else {"image": f"{folder}/{name}"}
            rows.append({"id": f"{rec['video_id']}-{i}", **media, "conversations": conversation})
    return rows


def demo_general_data(records: list[dict], frames_root: str, seed: int) -> list[dict]:
    """LLaVA-format MC and OE questions about the *training* scenes, asked as the bench asks them: the part of
    the mixture INST-IT takes from LLaVA's data (the bench's scenes are never used). As in LLaVA's data, each
    scene's questions (DEMO_QUESTION_ROUNDS draws of every kind) are one multi-turn chat. An MC answer is the
    option's text, which evaluate.extract_choice maps to its letter: answering with the letter is a large
    pretrained LM's ability that the tiny one does not learn on a CPU (benchmarks/DEMO_HISTORY.md)."""
    import random

    import data
    import evaluate

    rng, rows = random.Random(seed), []
    for rec in records:
        video = len(rec["frames"]) > 1
        folder = f"{frames_root}/{rec['video_id']}"
        media = {"video": folder} if video else {"image": f"{folder}/{rec['frames'][0]}"}
        kinds = data.SYNTHETIC_KINDS["video" if video else "image"]
        questions = {q["question"]: q for _ in range(DEMO_QUESTION_ROUNDS)
                     for q in data.synthetic_questions(rec["truth"], rng, kinds)}
        conversation = []
        for q in rng.sample(list(questions.values()), len(questions)):
            mc = rng.random() < 0.5
            options = dict(zip("ABCD", q["options"])) if mc else None
            split = ("video" if video else "image") + ("_mc" if mc else "_oe")
            asked = evaluate.bench_sample({"question_id": "", "split": split,
                                           "question": q["question"], "options": options, "media": "", "file": ""}, 8)
            text = asked["messages"][0]["content"]
            answer = q["value"] if mc else q["answer"]
            if conversation:  # the frames are announced in the first turn only
                text = text.removeprefix(data.PLACEHOLDER + "\n")
            conversation += [{"from": "human", "value": text}, {"from": "gpt", "value": answer}]
        rows.append({"id": rec["video_id"], **media, "conversations": conversation})
    return rows


def demo_pictures(out, records, predictions, questions):
    """som_frames.png: a few marked scenes; answers.png: bench questions, the model's answers (green when
    right, red when wrong), the truth."""
    from PIL import Image, ImageDraw

    import evaluate

    frames = [Image.open(out / "world" / "train_som" / "videos" / r["video_id"] / r["frames"][0]) for r in records]
    sheet = Image.new("RGB", (len(frames) * DEMO_IMAGE_SIZE, DEMO_IMAGE_SIZE))
    for k, frame in enumerate(frames):
        sheet.paste(frame, (k * DEMO_IMAGE_SIZE, 0))
    sheet.resize((sheet.width * 2, sheet.height * 2), Image.NEAREST).save(out / "som_frames.png")
    media = {q["question_id"]: q["media"] for q in questions}
    page = Image.new("RGB", (720, 2 * DEMO_IMAGE_SIZE * len(predictions)), "white")
    draw = ImageDraw.Draw(page)
    for k, p in enumerate(predictions):
        source = media[p["question_id"]]
        frame = Image.open(source if os.path.isfile(source) else os.path.join(source, sorted(os.listdir(source))[0]))
        y = k * 2 * DEMO_IMAGE_SIZE
        page.paste(frame.convert("RGB").resize((2 * DEMO_IMAGE_SIZE,) * 2, Image.NEAREST), (0, y))
        options = " ".join(f"{L}. {v}" for L, v in (p.get("options") or {}).items())
        right = (evaluate.extract_choice(p["model_prediction"], p["options"]) == p["ground_truth"] if p.get("options")
                 else demo_exact([p]) == 100)
        x = 2 * DEMO_IMAGE_SIZE + 10
        draw.multiline_text((x, y + 10), f"Q: {p['question']}\n{options}", fill="black", spacing=6)
        draw.text((x, y + 52), f"model: {p['model_prediction']}", fill=(0, 140, 0) if right else (200, 0, 0))
        draw.text((x, y + 70), f"truth: {p['ground_truth']}", fill="black")
    page.save(out / "answers.png")


def main(argv=None):
    cfg, overrides = parse_args(argv)
    return run_demo(cfg, overrides) if cfg.demo else train(cfg, overrides)


if __name__ == "__main__":
    main()
