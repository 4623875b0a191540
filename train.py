r"""Continuous SFT of the LLaVA-style model (INST-IT 2.4, 3.1, Tab. 6), one GPU to many via accelerate.

    python train.py --stage continuous --llava-checkpoint llava-hf/llava-1.5-7b-hf --load-in-4bit \
        --data inst_it_dataset_video_21k.json:0.5 --data llava_v1_5_mix665k.json:0.5 --out runs/instit
    accelerate launch train.py ...        # several GPUs: DDP (tested); FSDP/DeepSpeed are not wired in

A plain loop you can step through: `start_run` builds the stage's model, data mixture and optimizer (or resumes
them); `train_step` accumulates micro-batches, clips and steps on the `cosine_with_warmup` rate; `log_and_checkpoint`
writes metrics.jsonl and checkpoints (weights, optimizer, RNG states, data position: `--resume` continues exactly)."""
import argparse
import inspect
import itertools
import json
import math
import os
import re
import shutil
import signal
import sys
import time
import typing
from contextlib import nullcontext, suppress
from dataclasses import asdict, dataclass, field, fields
from types import SimpleNamespace

import torch
from safetensors import SafetensorError
from tqdm import tqdm
import yaml

import data
from model import LlavaStyleModel, ModelConfig, build_model, missing_folder

STAGES = {
    "align": dict(lm_training="frozen", trainable_vision_layers=0),   # projector only (LLaVA stage 1)
    "sft": dict(lm_training="lora", trainable_vision_layers=0),       # projector + LoRA, vision frozen
    "continuous": dict(lm_training="lora", trainable_vision_layers=12),  # INST-IT: + last 12 vision layers
}
OPTIMIZERS = ("adamw", "adamw_8bit", "paged_adamw_8bit")  # --optim: build_optimizer
RESUME_FIXED = ("data", "media_root", "templates", "stage", "optim", "batch_size", "max_length", "seed")  # + model
RESUME_SCHEDULE = ("lr", "projector_lr", "vision_lr", "weight_decay", "warmup_ratio", "max_grad_norm", "grad_accum",
                   "max_steps", "epochs")


@dataclass
class TrainConfig:
    """The training knobs. Learning rates follow LLaVA(-NeXT)'s LoRA recipe; INST-IT's values elsewhere."""
    data: list = field(default_factory=list)  # "path:ratio" sources, mixed by ratio
    media_root: str = "."                     # images / videos are found under this folder
    templates: str | None = None              # MultiInstruct sources: JSON {task_name: [instruction templates]}
    stage: str = "continuous"                 # a preset of model fields: align, sft or continuous (STAGES)
    init_from: str | None = None              # a previous run's final/ or checkpoint folder
    out: str = "runs/train"                   # the run's folder: metrics.jsonl, checkpoints, final/
    run_name: str | None = None               # names the run in its progress bar (default: --out's folder name)
    resume: bool = False                      # continue from the latest checkpoint in --out
    resume_changes: bool = False              # --resume may change learning rates and the schedule (RESUME_SCHEDULE)
    lr: float = 2e-4                          # language model (LoRA) learning rate
    projector_lr: float = 2e-5                # projector learning rate
    vision_lr: float = 2e-6                   # the trained vision tail learns 10x slower (LLaVA-NeXT)
    weight_decay: float = 0.0                 # AdamW's decoupled weight decay
    optim: str = "adamw"                      # "adamw" (torch), "adamw_8bit" or "paged_adamw_8bit" (bitsandbytes,
    #                                           8-bit state: small cards); a run resumes with the one it was saved with
    warmup_ratio: float = 0.03                # cosine schedule with linear warmup over this share of the steps
    batch_size: int = 1                       # per device, per micro-step
    grad_accum: int = 8                       # micro-steps per optimizer step
    max_grad_norm: float = 1.0                # gradients are clipped to this norm
    epochs: float = 1.0                       # passes over the mixture
    max_steps: int = 0                        # > 0 overrides epochs
    max_length: int = 6144                    # INST-IT's 6K context
    seed: int = 0                             # seeds the model's init, dropout and the data order
    max_bad_fraction: float = 0.01            # stop when more of the samples read are unreadable (10 at least)
    num_workers: int = 2                      # DataLoader processes reading and marking media
    log_every: int = 1                        # write metrics.jsonl every K steps
    save_every: int = 500                     # checkpoint every K steps (and when stopped by a signal)
    compile: bool = False                     # torch.compile each transformer block (model.compile_blocks)
    expandable_segments: bool = False         # CUDA: PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True (less
    #                                           fragmentation) unless you set PYTORCH_(CUDA_)ALLOC_CONF yourself
    report_to: str | None = None              # "tensorboard" or "wandb", through accelerate
    eval_bench: str | None = None             # an INST-IT Bench file/folder scored at the end (evaluate.run_bench)
    eval_every: int = 0                       # > 0: also score it every K steps
    eval_splits: str = "image_mc,video_mc"    # splits to score (OE needs a judge for a real score)


# ---------------------------------------------------------------------------------------------------
# Configuration from the command line and a JSON file.

def field_help(cls) -> dict:
    """{field: the comment beside it in `cls`'s source}: --help explains each flag in the config's own words."""
    line = r"^[ \t]+(\w+): [^#\n]*?(?:#[ \t]*(.*))?$((?:\n[ \t]+#[ \t]{2,}.*)*)"  # + indented comments that continue it
    return {m[1]: " ".join([m[2] or "", *re.findall(r"#[ \t]{2,}(.*)", m[3])])
            for m in re.finditer(line, inspect.getsource(cls), re.M)}


def parse_args(argv=None, defaults: dict | None = None) -> tuple[TrainConfig, dict]:
    """CLI -> (TrainConfig, ModelConfig overrides). A flag per field but the encoder's own. Precedence: flags, then
    --config FILE.json|yaml, then `defaults` (a script's preset, such as demo.py's), then the stage preset."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="JSON or YAML file with any of the fields below (flags override it)")
    known = fields(TrainConfig) + tuple(f for f in fields(ModelConfig) if f.name not in (
        "image_size", "patch_size", "has_cls", "image_mean", "image_std"))
    helps = {**field_help(TrainConfig), **field_help(ModelConfig)}
    for f in known:  # every flag defaults to None: "not given", so --config and `defaults` show through
        flag, text = "--" + f.name.replace("_", "-"), f"{helps.get(f.name, '')} (default: {f.default})"
        if f.name == "data":
            p.add_argument(flag, action="append", metavar="PATH:RATIO", help=helps.get("data", ""))
        elif f.type is bool:
            p.add_argument(flag, action=argparse.BooleanOptionalAction, help=text)
        else:  # a dict or list field (mark_style, image_grid_pinpoints) is given as JSON
            kind = f.type if f.type in (int, float) else json.loads if str(f.type).startswith(("dict", "list")) else str
            p.add_argument(flag, type=kind, help=text)
    args = vars(p.parse_args(argv))
    config = read_config(args["config"], known) if args["config"] else {}
    given = {**(defaults or {}), **config, **{k: v for k, v in args.items() if v is not None and k != "config"}}
    train_names = {f.name for f in fields(TrainConfig)}
    if unknown := set(given) - {f.name for f in known}:
        raise SystemExit(f"unknown config fields: {sorted(unknown)}")
    cfg = TrainConfig(**{k: v for k, v in given.items() if k in train_names})
    for name, choices in [("stage", list(STAGES)), ("optim", list(OPTIMIZERS))]:
        if getattr(cfg, name) not in choices:
            raise SystemExit(f"--{name} must be one of {choices}, got {getattr(cfg, name)!r}")
    for name, least in dict(batch_size=1, grad_accum=1, max_length=1, log_every=1, save_every=1, max_steps=0).items():
        if getattr(cfg, name) < least:
            raise SystemExit(f"--{name.replace('_', '-')} must be >= {least}, got {getattr(cfg, name)}")
    if cfg.eval_bench and not os.path.exists(cfg.eval_bench):  # read at the end: a wrong path would lose the run
        raise SystemExit(f"--eval-bench {cfg.eval_bench}: no such file or folder")
    parse_sources(cfg.data)  # fail on a bad path or ratio before any model is loaded
    for name in ("init_from", "llava_checkpoint", "vision_model", "language_model", "tokenizer"):
        if problem := missing_folder(given.get(name)):
            raise SystemExit(f"--{name.replace('_', '-')} {problem}")
    return cfg, {**STAGES[cfg.stage], **{k: v for k, v in given.items() if k not in train_names}}


def read_config(path: str, known) -> dict:
    """A JSON or YAML config file -> {field: value as its field's type}: a bad value fails before the model loads."""
    with open(path) as f:
        given = (yaml.safe_load(f) or {}) if path.endswith((".yaml", ".yml")) else json.load(f)
    types = {f.name: f.type for f in known}
    return {name: field_value(path, name, value, types.get(name)) for name, value in given.items()}


def field_value(path: str, name: str, value, kind):
    """A config file's value as its field's type, or SystemExit naming the file and field. Strings convert where meant
    so: numbers (YAML reads 2e-5 as a string), booleans ("no" is False), a lone --data source (not its characters)."""
    base = next((t for t in typing.get_args(kind) if t is not type(None)), kind)  # `str | None` -> str
    if kind is None or (value is None and base is not kind):
        return value
    if isinstance(value, str) and base is bool:
        value = dict(true=True, yes=True, on=True, false=False, no=False, off=False).get(value.lower(), value)
    elif (isinstance(value, str) and base in (int, float)) or (base is float and type(value) is int):  # 1 -> 1.0
        with suppress(ValueError):
            value = base(value)
    elif name == "data" and isinstance(value, str):
        value = [value]
    if type(value) is not base:
        raise SystemExit(f"{path}: {name} = {value!r} is not {'a number' if base is float else base.__name__}")
    return value


def parse_sources(specs: list[str]) -> list[tuple[str, float]]:
    """["a.json:0.7", "b.json:0.3"] -> [(path, ratio)]; ratios are normalised to sum to 1."""
    sources = []
    for spec in specs:
        path, ratio = spec.rsplit(":", 1) if ":" in spec else (spec, "1")
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
# Model, data and the learning rate.

def load_model(cfg: TrainConfig, overrides: dict, device) -> LlavaStyleModel:
    """The stage's model: from an earlier run (--init-from), a llava-hf checkpoint, or composed parts."""
    if cfg.init_from:
        return LlavaStyleModel.from_pretrained(cfg.init_from, device=device, strict=False, **overrides)
    if overrides.get("llava_checkpoint"):
        return LlavaStyleModel.from_llava_hf(overrides.pop("llava_checkpoint"), device=device, **overrides)
    return build_model(ModelConfig(**overrides), device)


def build_data(cfg: TrainConfig, model: LlavaStyleModel, sources: list[tuple[str, float]], num_shards=1):
    """Sources -> (ConcatDataset of lazy data.InstructionDatasets, a MixtureSampler mixing them by ratio)."""
    datasets = []
    for path, _ in sources:
        samples = data.load_conversations(path, cfg.media_root, templates=cfg.templates,
                                          max_frames=model.cfg.max_frames, seed=cfg.seed)
        if not samples:
            raise SystemExit(f"--data {path}: no usable samples")
        datasets.append(data.InstructionDataset(samples, model.tokenizer, model.cfg, cfg.max_length))
    sampler = MixtureSampler([d.lengths() for d in datasets], [r for _, r in sources],
                                  cfg.batch_size * num_shards, seed=cfg.seed)
    print(f"data: {sum(map(len, datasets))} samples from {len(sources)} sources; one pass = {len(sampler)} "
          f"batches; estimated padded fraction {sampler.padded_fraction(itertools.islice(sampler, 200)):.1%}")
    return SkipUnreadable(datasets), sampler


class SkipUnreadable(torch.utils.data.ConcatDataset):
    """The sources as one dataset; a sample whose media cannot be read becomes {"bad": data.py's message}."""

    def __getitem__(self, index):
        try:
            return super().__getitem__(index)
        except (ValueError, OSError) as e:  # data.py's readers name the file; train_step counts the skips
            print(f"skipped {e}", file=sys.stderr)
            return {"bad": str(e)}


class MixtureSampler(torch.utils.data.Sampler):
    """Batches of indices into ConcatDataset(sources), INST-IT data mixed with general and text-only data by ratio
    (INST-IT 2.4, MultiInstruct's mixed tuning). `lengths[s]`: source s's estimates (InstructionDataset.lengths).

    Each slot draws its source by ratio; a source gives a fresh seeded permutation per pass. Groups of `batch_size *
    group` slots are sorted by length, cut into batches and shuffled: little padding. A seeded torch.Generator makes
    the stream a pure function of the arguments: `start_batch=k` yields batches k.. of an uninterrupted run (resume)."""

    def __init__(self, lengths: list[list[int]], ratios: list[float], batch_size: int, seed: int = 0,
                 group_by_length: bool = True, num_batches: int | None = None, start_batch: int = 0, group: int = 64):
        if len(ratios) != len(lengths) or any(r < 0 for r in ratios) or not sum(ratios) > 0:
            raise ValueError(f"ratios {ratios} must be one non-negative number per source ({len(lengths)}), not all 0")
        if any(r > 0 and not n for r, n in zip(ratios, lengths)):
            raise ValueError(f"a source with ratio > 0 is empty (sizes {[len(n) for n in lengths]})")
        self.lengths = [n for source in lengths for n in source]
        self.offsets = [0] + list(itertools.accumulate(len(n) for n in lengths))[:-1]
        self.sizes, self.ratios = [len(n) for n in lengths], ratios
        self.batch_size, self.seed, self.group_by_length, self.group = batch_size, seed, group_by_length, group
        self.num_batches, self.start_batch = num_batches or math.ceil(len(self.lengths) / batch_size), start_batch

    def __len__(self):
        return max(0, self.num_batches - self.start_batch)

    def __iter__(self):
        return itertools.islice(self.stream(), self.start_batch, self.num_batches)

    def stream(self):
        """The endless batch stream; __iter__ is a slice of it."""
        g = torch.Generator().manual_seed(self.seed)
        probs = torch.tensor(self.ratios, dtype=torch.float64)

        def passes(size):  # a source's indices, endless: a fresh permutation per pass, drawn as the last one runs out
            while True:
                yield from torch.randperm(size, generator=g).tolist()

        orders = [passes(size) for size in self.sizes]
        while True:
            sources = torch.multinomial(probs, self.batch_size * self.group, replacement=True, generator=g).tolist()
            picks = [self.offsets[s] + next(orders[s]) for s in sources]
            if self.group_by_length:
                picks.sort(key=lambda i: self.lengths[i])
            batches = [picks[k:k + self.batch_size] for k in range(0, len(picks), self.batch_size)]
            yield from (batches[k] for k in torch.randperm(len(batches), generator=g).tolist())

    def padded_fraction(self, batches=None) -> float:
        """Fraction of padded tokens (by estimated lengths) over `batches`, default this sampler's batches."""
        rows = [[self.lengths[i] for i in batch] for batch in (batches if batches is not None else self)]
        total = sum(max(row) * len(row) for row in rows)  # each batch padded to its longest sample
        return (total - sum(map(sum, rows))) / max(total, 1)


def batches(dataset, sampler, pad_token_id, num_workers, start: int, rank=0, world=1):
    """Endless micro-batches from number `start` on (a resume skips indices unread), each process taking every world-th
    sample of a global batch: data.collate's batch (absent if all dropped or bad), "ids", "bad" (SkipUnreadable)."""
    def collate(samples):
        good = [s for s in samples if s is not None and "bad" not in s]
        return {**(data.collate(good, pad_token_id) or {}), "ids": [f"{s['source']}: {s['id']}" for s in good],
                "bad": [s["bad"] for s in samples if s is not None and "bad" in s]}

    order = (batch[rank::world] for batch in itertools.islice(sampler.stream(), start, None))
    return iter(torch.utils.data.DataLoader(dataset, batch_sampler=order, collate_fn=collate, num_workers=num_workers,
                                            generator=torch.Generator().manual_seed(0)))  # never the global RNG


def cosine_with_warmup(step: int, total: int, warmup: int) -> float:
    """Learning-rate multiplier: linear warmup, then cosine decay to 0 (LLaVA's schedule)."""
    return ((step + 1) / warmup if step < warmup
            else 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup))))


def build_optimizer(cfg: TrainConfig, groups: dict, base_lr: dict) -> torch.optim.Optimizer:
    """{part: trained parameters} -> one named group per part at its base rate, in torch's AdamW (two fp32 moments
    per trained value) or bitsandbytes' 8-bit AdamW (moments block-wise quantized, Dettmers et al. 2022: a quarter
    of the memory; fp32 state kept for tensors under 4,096 values), paged: the state may spill to CPU memory."""
    params = [{"params": ps, "lr": base_lr[part], "name": part} for part, ps in groups.items() if ps]
    if cfg.optim == "adamw":
        return torch.optim.AdamW(params, weight_decay=cfg.weight_decay)
    import bitsandbytes as bnb
    return bnb.optim.AdamW8bit(params, weight_decay=cfg.weight_decay, is_paged=cfg.optim == "paged_adamw_8bit")


# ---------------------------------------------------------------------------------------------------
# Checkpoints: everything needed to continue exactly.

def save_checkpoint(directory, run, rng_generator_states):
    """A run's trained weights (model.save_pretrained) + optimizer, step, data position and RNG states -> directory."""
    tmp = directory + ".tmp"
    try:
        run.model.save_pretrained(tmp)
        torch.save({"optimizer": run.optimizer.state_dict(), "step": run.step, "micro_batches": run.micro,
                    "skipped": run.skipped, "rng": rng_generator_states}, os.path.join(tmp, "train_state.pt"))
    except (OSError, RuntimeError, SafetensorError) as e:  # torch.save says a full disk as "unexpected pos"
        shutil.rmtree(tmp, ignore_errors=True)
        raise SystemExit(f"{directory}: not saved, the disk is full or not writable ({e}); free space, then --resume")
    shutil.rmtree(directory, ignore_errors=True)
    os.replace(tmp, directory)  # a kill mid-save never leaves a half-written checkpoint


def latest_checkpoint(out: str) -> str | None:
    """A run's folder -> its newest complete checkpoint-N folder, or None."""
    # checkpoint-N folders only: not .tmp, nor a checkpoint-final of yours
    steps = [d for d in (os.listdir(out) if os.path.isdir(out) else []) if re.fullmatch(r"checkpoint-\d+", d)]
    return os.path.join(out, max(steps, key=lambda d: int(d.split("-")[1]))) if steps else None


# ---------------------------------------------------------------------------------------------------
# The loop: set-up, one step, log and checkpoint.

def start_run(cfg: TrainConfig, overrides: dict) -> SimpleNamespace:
    """-> the run: accelerator, model, data stream, optimizer and step counters, built new or resumed from --out."""
    from accelerate import Accelerator, DistributedDataParallelKwargs

    if not (sources := parse_sources(cfg.data)):
        raise SystemExit("no --data given")
    if cfg.expandable_segments and not {"PYTORCH_ALLOC_CONF", "PYTORCH_CUDA_ALLOC_CONF"} & set(os.environ):
        os.environ["PYTORCH_CUDA_ALLOC_CONF"] = "expandable_segments:True"  # read when CUDA starts: just below
    # find_unused_parameters: a text-only batch never reaches the vision tower and projector (mixed tuning)
    accelerator = Accelerator(mixed_precision="bf16" if torch.cuda.is_available() else "no",
                              log_with=cfg.report_to, project_dir=cfg.out,
                              kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)])
    torch.manual_seed(cfg.seed)
    resume_from, metrics = latest_checkpoint(cfg.out), os.path.join(cfg.out, "metrics.jsonl")
    if not cfg.resume and (resume_from or os.path.exists(metrics)):
        raise SystemExit(f"{cfg.out} already holds a run: --resume continues it, or give another --out")
    if cfg.resume and not resume_from:
        print(f"--resume: no checkpoint in {cfg.out}; starting from step 0", file=sys.stderr)
    if resume_from and os.path.exists(os.path.join(cfg.out, "config.json")):
        check_resume(data.read_json(os.path.join(cfg.out, "config.json")), cfg, overrides, resume_from)
    # to resume: rebuild the same model, then load its trained tensors
    model = (LlavaStyleModel.from_pretrained(resume_from, device=accelerator.device) if resume_from
             else load_model(cfg, overrides, accelerator.device))
    dataset, sampler = build_data(cfg, model, sources, accelerator.num_processes)
    wrapped = accelerator.prepare(model.compile_blocks() if cfg.compile else model)
    torch.manual_seed(cfg.seed + accelerator.process_index)  # built alike, but each process its own dropout masks
    groups = model.parameter_groups()  # after prepare, as accelerate asks (a wrapper may replace parameters)
    base_lr = {"projector": cfg.projector_lr, "vision": cfg.vision_lr, "language": cfg.lr}
    optimizer = build_optimizer(cfg, groups, base_lr)
    total = cfg.max_steps or max(1, int(cfg.epochs * len(sampler) / cfg.grad_accum))
    step = micro = skipped = 0
    if resume_from:
        state = torch.load(os.path.join(resume_from, "train_state.pt"), weights_only=False)
        optimizer.load_state_dict(state["optimizer"])
        for group in optimizer.param_groups:  # the state's own would win over a changed --weight-decay
            group["weight_decay"] = cfg.weight_decay
        step, micro, skipped = state["step"], state["micro_batches"], state.get("skipped", 0)
        # one RNG entry per process of the run that saved it
        rng = state["rng"][min(accelerator.process_index, len(state["rng"]) - 1)]
        torch.set_rng_state(rng["torch"])
        torch.cuda.set_rng_state_all(rng["cuda"])  # [] when saved without CUDA: nothing to set
    if accelerator.is_main_process and os.path.exists(metrics):  # resuming: drop the lines logged after the
        # checkpoint (they will be logged again) and one cut by the kill (data.read_json warns, naming the file)
        data.write_json(metrics, [r for r in data.read_json(metrics) if r is not None and r["step"] <= step])
    optimizer = accelerator.prepare(optimizer)
    if main := accelerator.is_main_process:  # write_json makes the folder: only the main process writes in it
        data.write_json(os.path.join(cfg.out, "config.json"), {"train": asdict(cfg), "model": asdict(model.cfg)})
    # without --report-to accelerate has no tracker to start; trackers take scalars and strings (tensorboard's hparams)
    accelerator.init_trackers("inst-it", config={k: v if isinstance(v, (int, float, str, bool)) else str(v)
                                                 for k, v in asdict(cfg).items()})
    stream = batches(dataset, sampler, model.tokenizer.pad_token_id, cfg.num_workers, micro,
                     accelerator.process_index, accelerator.num_processes)
    return SimpleNamespace(
        accelerator=accelerator, model=model, wrapped=wrapped, optimizer=optimizer, groups=groups, stopping=False,
        base_lr=base_lr, stream=stream, step=step, micro=micro, total=total, warmup=int(cfg.warmup_ratio * total),
        log_file=open(metrics, "a", buffering=1) if main else None,  # line-flushed
        bar=tqdm(total=total, initial=step, desc=cfg.run_name or os.path.basename(os.path.abspath(cfg.out)),
                 disable=not main), loss=float("nan"), skipped=skipped, samples=len(dataset), last_batch=None)


def check_resume(saved: dict, cfg: TrainConfig, overrides: dict, checkpoint: str):
    """A checkpoint resumes as saved (config.json): only learning rates and schedule may change (--resume-changes)."""
    was = {"optim": "adamw", **saved["train"], **saved["model"]}
    now = json.loads(json.dumps({**{k: getattr(cfg, k) for k in RESUME_FIXED + RESUME_SCHEDULE}, **overrides}))
    changed = {k: (was.get(k), v) for k, v in now.items() if was.get(k) != v}
    fixed = [k for k in changed if k not in RESUME_SCHEDULE]
    if fixed or (changed and not cfg.resume_changes):
        said = [", ".join(f"--{k.replace('_', '-')} {v[i]}" for k, v in changed.items()) for i in (0, 1)]
        raise SystemExit(f"{checkpoint} was saved with {said[0]}; resume it with the same, not {said[1]}"
                         + ("" if fixed else " (or allow that with --resume-changes)"))


def too_many_skipped(skipped: int, read: int, total: int, fraction: float) -> bool:
    """Unreadable samples past `fraction` of those read, on enough evidence: 10 of them, or past it of all the data."""
    return skipped > fraction * read and (skipped >= 10 or skipped > fraction * total)


def train_step(run, cfg: TrainConfig) -> dict:
    """One optimizer step (grad_accum micro-batches, gradients synchronised on the last only) -> its log record."""
    accelerator = run.accelerator
    start, tokens, padded, loss_sum, bad = time.perf_counter(), 0, 0, 0.0, []
    for i in range(cfg.grad_accum):
        batch = next(run.stream)
        run.micro += 1
        bad += batch.pop("bad")
        sample_ids = batch.pop("ids")
        weight = 1.0
        if "input_ids" not in batch:  # all its samples dropped or unreadable
            if accelerator.num_processes == 1 or run.last_batch is None:
                continue
            batch, weight = run.last_batch, 0.0  # DDP: every process joins each gradient all-reduce, this one adds 0
        run.last_batch = batch = {k: v.to(accelerator.device) if torch.is_tensor(v) else v for k, v in batch.items()}
        tokens += int(weight * batch["attention_mask"].sum())  # a replayed batch (weight 0) trains nothing
        padded += int(weight * (batch["attention_mask"] == 0).sum())
        # gradients all-reduced on the last micro-batch only
        with (nullcontext() if i == cfg.grad_accum - 1 else accelerator.no_sync(run.wrapped)), accelerator.autocast():
            loss = run.wrapped(**batch, return_logits=False).loss  # the LM head on labelled positions only
            if not torch.isfinite(loss):
                last = latest_checkpoint(cfg.out)
                raise SystemExit(f"non-finite loss {loss.item()} at step {run.step + 1}, micro-batch {i}, samples "
                                 f"{sample_ids}; " + (f"the last good checkpoint is {last} (--resume)" if last
                                                      else "no checkpoint was saved yet (see --save-every)"))
            accelerator.backward(weight * loss / cfg.grad_accum)
        loss_sum += weight * loss.item() / cfg.grad_accum
    run.skipped += int(accelerator.reduce(torch.tensor(len(bad), device=accelerator.device), "sum"))  # all alike
    read = run.micro * cfg.batch_size * accelerator.num_processes
    if too_many_skipped(run.skipped, read, run.samples, cfg.max_bad_fraction):
        raise SystemExit(f"{run.skipped} samples skipped of {read} read, over --max-bad-fraction "
                         f"{cfg.max_bad_fraction}; the last: {'; '.join(bad[-3:])}")
    if not tokens and not bad:
        raise SystemExit(f"step {run.step + 1}: all samples of its {cfg.grad_accum} micro-batches were dropped "
                         f"(longer than --max-length {cfg.max_length}? see the warnings above): nothing to learn")
    grad_norm = accelerator.clip_grad_norm_([p for ps in run.groups.values() for p in ps], cfg.max_grad_norm)
    for group in run.optimizer.param_groups:  # each part's base rate on the schedule, at this step
        group["lr"] = run.base_lr[group["name"]] * cosine_with_warmup(run.step, run.total, run.warmup)
    run.optimizer.step()
    run.optimizer.zero_grad(set_to_none=True)
    run.step += 1
    run.loss = loss_sum
    seconds = time.perf_counter() - start
    return {"step": run.step, "loss": loss_sum, "skipped": run.skipped, "lr": run.optimizer.param_groups[-1]["lr"],
            "grad_norm": float(grad_norm), "tokens_per_s": tokens * accelerator.num_processes / seconds,
            "padded_fraction": padded / max(1, tokens + padded), "time": time.time(),
            "peak_memory_gb": torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None}


def log_and_checkpoint(run, cfg: TrainConfig, record: dict, stop: dict):
    """After a step: progress bar, metrics.jsonl, a checkpoint (also when a signal asks to stop), the bench."""
    from accelerate.utils import gather_object

    accelerator = run.accelerator
    run.bar.update(1)
    run.bar.set_postfix(loss=f"{run.loss:.4f}")
    if run.log_file and (run.step % cfg.log_every == 0 or run.step == run.total):
        run.log_file.write(json.dumps(record) + "\n")
        accelerator.log(record, step=run.step)  # to --report-to's tracker; none: nothing
    # all processes stop at the same step, or the others hang in all-reduce (one process: the value itself)
    run.stopping = bool(accelerator.reduce(torch.tensor(float(stop["signal"] is not None), device=accelerator.device),
                                           "max"))
    if run.step % cfg.save_every == 0 or run.stopping:
        # every process's RNG states, so a multi-GPU resume is exact too
        cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []
        states = gather_object([{"torch": torch.get_rng_state(), "cuda": cuda}])
        if accelerator.is_main_process:
            save_checkpoint(os.path.join(cfg.out, f"checkpoint-{run.step}"), run, states)
    if cfg.eval_bench and accelerator.is_main_process and (
            (cfg.eval_every and run.step % cfg.eval_every == 0) or run.step == run.total):
        scores = evaluate_on_bench(run.model, cfg, run.step)
        run.log_file.write(json.dumps({"step": run.step, "eval": scores, "time": time.time()}) + "\n")


def train(cfg: TrainConfig, overrides: dict) -> dict:
    """Run one stage; returns {"step", "loss", "out"}. Writes metrics.jsonl, checkpoints, final/ and loss.png.
    SIGINT/SIGTERM finish the current step, save a checkpoint and return: --resume continues."""
    run = start_run(cfg, overrides)
    stop = {"signal": None}
    handlers = {sig: signal.signal(sig, lambda signum, frame: stop.update(signal=signum))
                for sig in (signal.SIGINT, signal.SIGTERM)}
    run.model.train()
    try:
        while run.step < run.total and not run.stopping:
            log_and_checkpoint(run, cfg, train_step(run, cfg), stop)
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
        run.bar.close()
    if run.accelerator.is_main_process:
        if run.stopping:
            print(f"stopped by signal {stop['signal'] or '(to another process)'} at step {run.step}; --resume "
                  "continues", file=sys.stderr)
        else:
            run.model.save_pretrained(os.path.join(cfg.out, "final"))
            plot_loss(cfg.out)
    if cfg.report_to:
        run.accelerator.end_training()
    return {"step": run.step, "loss": run.loss, "out": cfg.out}


def evaluate_on_bench(model, cfg: TrainConfig, step: int) -> dict:
    """cfg.eval_bench -> {split: score} (evaluate.run_bench, greedy; MC-only: 16 new tokens, for a letter)."""
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
    """metrics.jsonl -> loss.png (skipped, with a warning, when matplotlib is not installed)."""
    if (plt := data.pyplot()) is None:
        return
    rows = [r for r in map(json.loads, open(os.path.join(out, "metrics.jsonl"))) if "loss" in r]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot([r["step"] for r in rows], [r["loss"] for r in rows])
    ax.set(xlabel="optimizer step", ylabel="training loss", title=os.path.basename(os.path.abspath(out)))
    fig.tight_layout()
    fig.savefig(os.path.join(out, "loss.png"), dpi=120)
    plt.close(fig)


def main(argv=None):
    data.log_to_stderr()
    return train(*parse_args(argv))


if __name__ == "__main__":
    main()
