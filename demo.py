"""The whole INST-IT method in miniature, on a synthetic world: `make demo` (= python demo.py --out runs/demo).

No weights, data or API key: a world of coloured shapes with exact masks and track IDs (images and 8-frame
videos) -> Set-of-Marks frames (som.py) -> annotations written from the ground truth by an oracle that passes
the same checks as GPT's (or the real three-stage annotator with --base-url: annotate.py) -> the INST-IT
conversations mixed with general questions (data.py) -> a tiny CLIP ViT + tiny Llama built from configs and
loaded by path (model.py) -> two training stages (train.py) -> a held-out bench in the INST-IT Bench format,
scored as any model's (evaluate.py). --no-som shows the model the same frames without marks.

This file is an example beside the method: it uses the method's public names as any user script would and
pins every setting it depends on (DEMO, DEMO_MODEL, DEMO_MARKS), so a change of a method default does not
change the demo. Its record of what was tried and measured: benchmarks/DEMO_HISTORY.md.

    python demo.py --out runs/demo                                  # `make demo`: 9-11 minutes on 2 CPU cores
    python demo.py --out runs/learn --scenes 8000 --max-steps 4000  # the setting that learns (README)
"""
import argparse
import dataclasses
import functools
import json
import math
import os
import random
import re
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw
from tqdm import tqdm
from transformers import CLIPVisionModel

import annotate
import data
import evaluate
import train
from model import LlavaStyleModel, image_normalization
from som import MarkStyle, decode_rle, instance_key, open_image, render_som

# Training settings under the demo (train.py flags still override them): a tiny model trained from scratch on a
# CPU. Its ViT is pretrained first (pretrain_vision), then frozen but for its last layer, as LLaVA-style runs
# keep a pretrained encoder.
DEMO = dict(
    out="runs/demo", lr=3e-4, projector_lr=3e-4, vision_lr=3e-4, weight_decay=0.01, warmup_ratio=0.05,
    max_grad_norm=1.0, batch_size=16, grad_accum=1, max_steps=400, max_length=1024, num_workers=0, log_every=10,
    save_every=500, eval_splits="image_mc,video_mc")
DEMO_IMAGE_SIZE, DEMO_PATCH = 96, 16   # a 6x6 patch grid; a mark's label box is about one patch
DEMO_MARKS = MarkStyle(fill=0.0, colour=(255, 255, 255), line_width=1, font_size=8, grid=DEMO_PATCH)  # for a model
# that learns to see from scratch: no tint and white marks (the world's saturated colours are what the bench asks
# about), 1 px contours and 8 px digits, each label whole in one patch token. Measured: benchmarks/DEMO_HISTORY.md.
DEMO_MODEL = dict(  # the model's settings: full LM training, the ViT's last layer, LLaVA-NeXT-Video's pooling
    lm_training="full", trainable_vision_layers=1, vision_feature_layer=-1, vision_feature_select_strategy="default",
    max_frames=8, pool_stride=2, pool_mode="average", pool_position="before", load_in_4bit=False,
    gradient_checkpointing=False,
    mark_style=dataclasses.asdict(DEMO_MARKS))  # recorded in every checkpoint: evaluate.py ask draws the same marks
DEMO_VISION_LAYERS = 4                 # the tiny ViT's depth
DEMO_GENERAL_RATIO = 0.4               # share of LLaVA-style general questions in the demo's mixture
DEMO_QUESTION_ROUNDS = 2               # draws of each question kind per scene in that data (repeats dropped)
DEMO_READING_SHARE = 1.0               # the reading stage's steps, as a share of --max-steps (run before them)
DEMO_READING_RATIO = 0.2               # share of reading chats kept in the mixture that follows, so it is not forgotten
DEMO_PRETRAIN_BATCH = 32               # frames per step of the ViT's pretraining
DEMO_BENCH_SCENES = 200                # the held-out bench (2,000 questions) at its own seed, whatever --scenes is


# ---------------------------------------------------------------------------------------------------
# The synthetic world: shapes with exact masks, track IDs and attributes, so that an oracle can annotate them
# and a bench can ask about them. One frame is an image, 8 frames a video.

COLOURS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (50, 80, 230), "yellow": (235, 215, 40),
           "purple": (140, 60, 200), "orange": (245, 140, 30), "white": (245, 245, 245), "black": (25, 25, 25)}
SHAPES = ("circle", "square", "triangle", "diamond")
SIZES = {"tiny": 0.11, "small": 0.14, "medium": 0.17, "large": 0.21}  # radius as a fraction of the image side:
#       even a tiny shape (21 px across at 96 px) stays larger than its ID label box (about 12 px)
MOTIONS = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1), "still": (0, 0)}
QUADRANTS = ("top left", "top right", "bottom left", "bottom right")
ATTRIBUTES = {"colour": COLOURS, "shape": SHAPES, "size": SIZES}  # what an instance is, and the values


def encode_rle(mask: np.ndarray) -> dict:
    """(h, w) bool mask -> COCO RLE with uncompressed counts (runs of 0s and 1s, column-major, 0s first)."""
    flat = np.asarray(mask, bool).ravel(order="F").astype(np.int8)
    edges = np.flatnonzero(np.diff(flat)) + 1
    counts = np.diff(np.concatenate([[0], edges, [flat.size]]))
    return {"size": list(mask.shape), "counts": ([0] if flat[0] else []) + counts.tolist()}


def shape_polygon(shape: str, x: float, y: float, r: float) -> list[tuple[float, float]]:
    """A shape of radius r centred at (x, y) -> its polygon's corners."""
    if shape == "circle":
        return [(x + r * math.cos(a), y + r * math.sin(a)) for a in np.linspace(0, 2 * math.pi, 32, endpoint=False)]
    corners = {"square": [(-0.85, -0.85), (0.85, -0.85), (0.85, 0.85), (-0.85, 0.85)],
               "triangle": [(0, -1.1), (1.1, 0.85), (-1.1, 0.85)],
               "diamond": [(0, -1.15), (1.15, 0), (0, 1.15), (-1.15, 0)]}[shape]
    return [(x + r * dx, y + r * dy) for dx, dy in corners]


def quadrant(x: float, y: float, size: int) -> str:
    """Which quarter of a size x size frame the point (x, y) lies in."""
    return QUADRANTS[2 * (y >= size / 2) + (x >= size / 2)]


def synthetic_scene(rng: random.Random, num_frames: int = 1, size: int = 96) -> dict:
    """A random scene -> {"instances": {ID: {colour, shape, size, motion}}, "frames": [PIL image],
    "masks": [{ID: visible (H, W) bool mask}], "centres": [{ID: (x, y)}]}.

    2-4 shapes with distinct colours and shapes, each starting in its own quadrant, moving in a straight
    line or standing still (always still in an image); later shapes hide earlier ones where they overlap.
    IDs are a random permutation of 1..n, so an ID says nothing about position or paint order."""
    n = rng.randint(2, 4)
    ids = rng.sample(range(1, n + 1), n)
    instances, tracks = {}, {}
    for k, (i, colour, shape, place) in enumerate(zip(ids, rng.sample(list(COLOURS), n), rng.sample(SHAPES, n),
                                                        rng.sample(range(4), n))):
        size_name = rng.choice(list(SIZES))
        motion = rng.choice(list(MOTIONS)) if num_frames > 1 else "still"
        r, (dx, dy) = SIZES[size_name] * size, MOTIONS[motion]
        step = 0.4 * size / max(num_frames - 1, 1)  # a moving shape travels 40% of the image side
        x0 = (place % 2 + 0.5) * size / 2 + rng.uniform(-0.06, 0.06) * size - dx * step * (num_frames - 1) / 2
        y0 = (place // 2 + 0.5) * size / 2 + rng.uniform(-0.06, 0.06) * size - dy * step * (num_frames - 1) / 2
        track = [(min(max(x0 + dx * step * t, r), size - r), min(max(y0 + dy * step * t, r), size - r))
                 for t in range(num_frames)]
        instances[str(i)] = {"colour": colour, "shape": shape, "size": size_name, "motion": motion}
        tracks[str(i)] = (track, r)
    background = rng.choice(["plain", "noise", "stripes"])
    base = np.full((size, size, 3), rng.randint(90, 160), np.float32)
    if background == "noise":
        base += np.random.default_rng(rng.getrandbits(32)).normal(0, 12, (size, size, 1))
    elif background == "stripes":
        base[(np.arange(size) // max(2, size // 12)) % 2 == 1] -= 30
    frames, masks, centres = [], [], []
    for t in range(num_frames):
        pixels, owner = base.copy(), np.full((size, size), "", dtype=object)
        for i, (track, r) in tracks.items():  # paint order = ID order of the dict, which is random
            canvas = Image.new("1", (size, size))
            ImageDraw.Draw(canvas).polygon(shape_polygon(instances[i]["shape"], *track[t], r), fill=1)
            painted = np.array(canvas)
            pixels[painted], owner[painted] = COLOURS[instances[i]["colour"]], i
        frames.append(Image.fromarray(pixels.clip(0, 255).astype(np.uint8)))
        masks.append({i: owner == i for i in instances if (owner == i).sum() >= 4})
        centres.append({i: tracks[i][0][t] for i in masks[-1]})
    return {"instances": instances, "frames": frames, "masks": masks, "centres": centres, "size": size}


def motion(a: tuple, b: tuple) -> str:
    """How a centre moved from a to b, in MOTION_WORDS: along the larger offset, still under half a pixel."""
    dx, dy = b[0] - a[0], b[1] - a[1]
    if max(abs(dx), abs(dy)) < 0.5:
        return MOTION_WORDS["still"]
    return MOTION_WORDS[("left" if dx < 0 else "right") if abs(dx) >= abs(dy) else ("up" if dy < 0 else "down")]


def relation(a: tuple, b: tuple) -> str:
    """Where centre a is relative to centre b, along the larger of the two offsets."""
    dx, dy = a[0] - b[0], a[1] - b[1]
    return ("left of" if dx < 0 else "right of") if abs(dx) >= abs(dy) else ("above" if dy < 0 else "below")


def synthetic_world(out_dir: str, num_scenes: int, seed: int, video_fraction: float = 0.5,
                    num_frames: int = 8, size: int = 96, prefix: str = "scene") -> list[dict]:
    """Write scenes' raw frames under out_dir/media/ -> records for annotate.py's input (IN.json): video
    records with a frame folder, `segmentations` {frame: {ID: {"mask": RLE}}} and the ground truth under
    `truth` (attributes, per-frame centres) for the oracle and the bench. An image is a one-frame video
    record, so it can carry QA pairs. Same seed, same world."""
    rng, records = random.Random(seed), []
    for k in range(num_scenes):
        frames = num_frames if rng.random() < video_fraction else 1
        scene = synthetic_scene(rng, frames, size)
        folder = f"media/{prefix}{k:05d}"
        os.makedirs(os.path.join(out_dir, folder), exist_ok=True)
        names = [f"{t:05d}.png" for t in range(frames)]
        for name, frame in zip(names, scene["frames"]):
            frame.save(os.path.join(out_dir, folder, name))
        records.append({"video_id": f"{prefix}{k:05d}", "video_path": folder, "frames": names,
                        "segmentations": {name: {i: {"mask": encode_rle(m)} for i, m in masks.items()}
                                          for name, masks in zip(names, scene["masks"])},
                        "truth": {"instances": scene["instances"], "size": size,
                                  "centres": {name: c for name, c in zip(names, scene["centres"])}}})
    return records



QUESTIONS = {  # the synthetic bench's question kinds -> (question, answer); the oracle's QA pairs use them too
    "colour": ("What colour is {a}?", "{a} is {colour}."),
    "shape": ("What shape is {a}?", "{a} is a {shape}."),
    "size": ("What size is {a}?", "{a} is {size}."),
    "position": ("Where is {a} at <1>?", "{a} is at the {position} at <1>."),
    "motion": ("Which way does {a} move?", "{a} {motion}."),
    "relation": ("Where is {a} relative to {b} at <1>?", "{a} is {relation} {b} at <1>."),
}
MOTION_WORDS = {m: ("stays still" if m == "still" else f"moves {m}") for m in MOTIONS}
SYNTHETIC_KINDS = {"image": ("colour", "shape", "size", "position", "relation"),
                   "video": ("colour", "shape", "size", "motion", "relation")}


def synthetic_questions(truth: dict, rng: random.Random, kinds) -> list[dict]:
    """Ground truth of a scene -> questions of the given kinds, one per kind where the scene allows:
    {"kind", "question", "answer" (a sentence), "value", "options" (4 values: the answer, then distractors
    taken first from the other marked instances of the scene, then from the vocabulary)}. Options taken from
    the scene mean a model that sees what is there but cannot tell [1] from [2] stays near chance."""
    first = next(iter(truth["centres"].values()))
    ids = sorted(first, key=int)
    vocab = {"colour": list(COLOURS), "shape": list(SHAPES), "size": list(SIZES), "position": list(QUADRANTS),
             "motion": list(MOTION_WORDS.values()), "relation": ["left of", "right of", "above", "below"]}
    out = []
    for kind in kinds:
        a, b = rng.sample(ids, 2) if len(ids) >= 2 else (ids[0], None)
        if kind == "relation" and b is None:
            continue
        values = {i: {"colour": truth["instances"][i]["colour"], "shape": truth["instances"][i]["shape"],
                      "size": truth["instances"][i]["size"], "motion": MOTION_WORDS[truth["instances"][i]["motion"]],
                      "position": quadrant(*first[i], truth["size"]),
                      "relation": relation(first[i], first[b]) if b and i != b else None} for i in ids}
        value = values[a][kind]
        others = [v[kind] for i, v in values.items() if i != a and v[kind] and v[kind] != value]
        if kind == "relation":  # the other instances' relations to [b] (and the opposite one) first
            others.append({"left of": "right of", "right of": "left of", "above": "below", "below": "above"}[value])
        distractors = list(dict.fromkeys(rng.sample(others, len(others))))[:3]
        distractors += rng.sample([v for v in vocab[kind] if v != value and v not in distractors], 3 - len(distractors))
        options = [value] + distractors
        rng.shuffle(options)
        question, answer = QUESTIONS[kind]
        fields = {"a": f"[{a}]", "b": f"[{b}]", **values[a], kind: value}
        out.append({"kind": kind, "question": question.format(**fields), "answer": answer.format(**fields),
                    "value": value, "options": options})
    return out


def write_synthetic_bench(records: list[dict], frames_root: str, out_dir: str, seed: int) -> dict:
    """Held-out scenes (their frames in frames_root/<video_id>/: SoM frames, or raw ones for --no-som) -> the four
    INST-IT Bench splits as flat JSON files in out_dir (image_multi_choice.json, ...): every question both MC (4
    options) and OE."""
    rng, splits = random.Random(seed), {name: [] for name in data.BENCH_SPLITS.values()}
    for rec in records:
        video = len(rec["frames"]) > 1
        kinds = SYNTHETIC_KINDS["video" if video else "image"]
        folder = os.path.join(frames_root, rec["video_id"])
        media = {"video_path": os.path.relpath(folder, out_dir)} if video else \
            {"image": os.path.relpath(os.path.join(folder, rec["frames"][0]), out_dir)}
        for q in synthetic_questions(rec["truth"], rng, kinds):
            qid = f"{rec['video_id']}-{q['kind']}"
            modality = "video" if video else "image"
            splits[f"{modality}_open_ended"].append({"question_id": qid, "question": q["question"],
                                                     "answer": q["answer"], "kind": q["kind"], **media})
            choices = {f"choice_{L.lower()}": v for L, v in zip("ABCD", q["options"])}
            splits[f"{modality}_multi_choice"].append({"question_id": qid, "question": q["question"], **choices,
                                                       "answer": "ABCD"[q["options"].index(q["value"])],
                                                       "kind": q["kind"], **media})
    for name, rows in splits.items():
        data.write_json(os.path.join(out_dir, f"{name}.json"), rows)
    return {name: len(rows) for name, rows in splits.items()}


# ---------------------------------------------------------------------------------------------------
# The annotator and the demo's data: the oracle writes what GPT would, the reading stage's chats and the
# general questions.

def oracle_record(rec, media_root, som_dir, seed=0, style=DEMO_MARKS):
    """A synthetic-world IN.json record (synthetic_world, with its `truth`) -> the INST-IT record that
    annotate_record writes, with the same SoM frames, but every text written from the ground truth: the
    demo's annotator, which needs no API. Its output passes check_record, as GPT's answers must."""
    rendered = annotate.render_record(rec, media_root, som_dir, len(rec["frames"]), style)
    truth, rng = rec["truth"], random.Random(f"{seed}-{rec['video_id']}")
    size, captions, previous = truth["size"], [], None
    for t, (name, _, ids) in enumerate(rendered, 1):
        centres, ids = truth["centres"][name], sorted(map(str, ids), key=int)
        instance_level = {}
        for i in ids:
            a = truth["instances"][i]
            instance_level[i] = f"A {a['size']} {a['colour']} {a['shape']} at the {quadrant(*centres[i], size)}."
        image_level = " ".join(f"[{a}] is {relation(centres[a], centres[b])} [{b}]."
                               for k, a in enumerate(ids) for b in ids[k + 1:])
        change = None
        if previous is not None:
            moves = []
            for i in ids:
                if i not in previous:
                    moves.append(f"[{i}] appears.")
                    continue
                moves.append(f"[{i}] {motion(previous[i], centres[i])}.")
            change = " ".join(moves)
        captions.append({"timestamp": t, "frame_name": name, "instance_level": instance_level,
                         "image_level": image_level or None, "temporal_change": change})
        previous = centres
    video = len(rendered) > 1
    kinds = SYNTHETIC_KINDS["video" if video else "image"]
    pairs = {q["question"]: q["answer"] for _ in range(2) for q in synthetic_questions(truth, rng, kinds)}
    summary = None
    if video:
        summary = f"From <1> to <{len(rendered)}>, " + "; ".join(
            f"[{i}], a {a['colour']} {a['shape']}, {MOTION_WORDS[a['motion']]}"
            for i, a in sorted(truth["instances"].items(), key=lambda kv: int(kv[0]))
            if any(i in truth["centres"][name] for name, _, _ in rendered)) + "."
    return {"video_id": rec["video_id"], "video_path": f"{som_dir.name}/videos/{annotate.file_safe(rec['video_id'])}",
            "frame_level_caption": captions, "video_level_caption": summary,
            "question_answer_pairs": [{"question": q, "answer": a} for q, a in pairs.items()],
            "segmentations": {name: rec["segmentations"].get(name, {}) for name, _, _ in rendered}}


def check_record(rec):
    """Raise ValueError, naming record and frame, where an INST-IT dataset record names an [ID] not marked on that
    frame (a key of its `segmentations`; without them, any ID captioned in the record) or a <t> it does not
    have: the checks every GPT answer passes in annotate.py (check_refs), for the oracle's records to pass too."""
    frames, _ = annotate.record_frames(rec)
    segs = rec.get("segmentations")
    captioned = {int(i) for f in frames for k in f["instance_level"] for i in instance_key(k).split(",")}
    drawn = [captioned if segs is None else
             {int(i) for i in (segs if "image_path" in rec else segs.get(f["frame_name"], {}))} for f in frames]
    for f, ids, prev in zip(frames, drawn, [set()] + drawn):  # prev: the IDs drawn on the frame before
        try:
            annotate.check_refs(annotate.annotations_text([{**f, "timestamp": None, "temporal_change": None}]), ids)
            annotate.check_refs(f.get("temporal_change") or "", ids | prev)
        except ValueError as e:
            frame = f.get("frame_name", rec.get("image_path"))
            raise ValueError(f"{annotate.record_name(rec)} frame {frame}: {e}") from None
    texts = [rec.get("video_level_caption") or ""]
    texts += [" ".join(qa.values()) for qa in rec.get("question_answer_pairs", [])]
    try:
        annotate.check_refs("\n".join(texts), set().union(*drawn), {f["timestamp"] for f in frames} - {None})
    except ValueError as e:
        raise ValueError(f"{annotate.record_name(rec)} video caption or QA: {e}") from None


def reading_data(records: list[dict], world, som: bool) -> list[dict]:
    """The reading stage's data: each instance of a training scene's first frame marked alone, asked "Which number
    is marked?" and then its colour, shape, size and position, one chat per instance, the frame saved in
    world/reading/<scene>-<ID>/ (--no-som: unmarked). A video scene's frame is a one-frame video, so that it is
    read 2x2 pooled as the bench's videos are. Measured (benchmarks/DEMO_HISTORY.md): a model that first reads a lone
    mark's digit then binds [k] to its object among several marks; without it, not in 7,000 steps. The number is
    asked first, so that its answer cannot be copied from a later question."""
    rows = []
    for rec in records:
        name, video = rec["frames"][0], len(rec["frames"]) > 1
        frame = open_image(str(world / rec["video_path"] / name))
        for i, entry in sorted(rec["segmentations"][name].items(), key=lambda kv: int(kv[0])):  # the visible ones
            mask = decode_rle(entry["mask"])
            folder = f"reading/{rec['video_id']}-{i}"
            os.makedirs(world / folder, exist_ok=True)
            (render_som(frame, {int(i): mask}, DEMO_MARKS) if som else frame).save(world / folder / name)
            position = quadrant(*rec["truth"]["centres"][name][i], rec["truth"]["size"])
            facts = {"a": f"[{i}]", **rec["truth"]["instances"][i], "position": position}
            conversation = [{"from": "human", "value": f"{data.PLACEHOLDER}\nWhich number is marked?"},
                            {"from": "gpt", "value": f"[{i}]."}]
            for kind in ("colour", "shape", "size", "position"):
                question, answer = QUESTIONS[kind]
                conversation += [{"from": "human", "value": question.format(**facts)},
                                 {"from": "gpt", "value": answer.format(**facts)}]
            media = {"video": folder} if video else {"image": f"{folder}/{name}"}
            rows.append({"id": f"{rec['video_id']}-{i}", **media, "conversations": conversation})
    return rows


def general_data(records: list[dict], frames_root: str, seed: int) -> list[dict]:
    """LLaVA-format MC and OE questions about the *training* scenes, asked as the bench asks them: the part of
    the mixture INST-IT takes from LLaVA's data (the bench's scenes are never used). As in LLaVA's data, each
    scene's questions (DEMO_QUESTION_ROUNDS draws of every kind) are one multi-turn chat. An MC answer is the
    option's text, which evaluate.extract_choice maps to its letter: answering with the letter is a large
    pretrained LM's ability that the tiny one does not learn on a CPU (benchmarks/DEMO_HISTORY.md)."""
    rng, rows = random.Random(seed), []
    for rec in records:
        video = len(rec["frames"]) > 1
        folder = f"{frames_root}/{rec['video_id']}"
        media = {"video": folder} if video else {"image": f"{folder}/{rec['frames'][0]}"}
        kinds = SYNTHETIC_KINDS["video" if video else "image"]
        questions = {q["question"]: q for _ in range(DEMO_QUESTION_ROUNDS)
                     for q in synthetic_questions(rec["truth"], rng, kinds)}
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


# ---------------------------------------------------------------------------------------------------
# The model: a tiny ViT and LM built from configs and saved, and the ViT's pretraining.

def build_tiny_model(folder: str, texts: list[str], seed: int) -> dict:
    """Save a tiny CLIP vision encoder, a tiny Llama and a word-level tokenizer (vocabulary: the words of
    `texts`) under `folder`, all random -> the ModelConfig fields that load them, as paths to hub IDs would."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers, trainers
    from transformers import CLIPVisionConfig, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    specials = ["<unk>", "<s>", "</s>", "<pad>", "<image>", "<|im_start|>", "<|im_end|>"]
    words = Tokenizer(models.WordLevel(unk_token="<unk>"))
    words.pre_tokenizer = pre_tokenizers.Sequence([  # a word, a mark "[3]", a time "<2>" or a punctuation mark
        pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Split(Regex(r"\[\d+\]|<\d+>|\w+|[^\w\s]"), "isolated")])
    words.train_from_iterator(texts + ["system user assistant"], trainers.WordLevelTrainer(special_tokens=specials))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=words, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                        unk_token="<unk>", additional_special_tokens=specials[4:],
                                        chat_template=data.CHATML)
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


def pretrain_vision(records: list[dict], world, source: str, out: str, seed: int, steps: int):
    """The stand-in for CLIP's pretraining, which a real run inherits: the demo's ViT (from `source`, saved to
    `out`) learns to name, in every patch token, the colour, shape and size of the instance covering most of
    its patch (token_targets), through three linear heads dropped afterwards. Raw frames of the training
    scenes (an image, or three frames of a video), no marks and no IDs: --som and --no-som get the same ViT.
    Measured (benchmarks/DEMO_HISTORY.md): the LM's loss alone never puts shape into the features."""
    rng, frames, targets = random.Random(seed), [], []
    for rec in records:
        for name in rng.sample(rec["frames"], min(3, len(rec["frames"]))):
            frames.append(np.asarray(open_image(str(world / rec["video_path"] / name))))
            targets.append(token_targets(rec["segmentations"][name], rec["truth"]["instances"]))
    pixels, targets = torch.tensor(np.stack(frames)).permute(0, 3, 1, 2), torch.tensor(np.stack(targets))
    mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in image_normalization(source))
    torch.manual_seed(seed)
    vit = CLIPVisionModel.from_pretrained(source)
    heads = torch.nn.ModuleList(torch.nn.Linear(vit.config.hidden_size, len(v)) for v in ATTRIBUTES.values())
    optimizer = torch.optim.AdamW([*vit.parameters(), *heads.parameters()], lr=DEMO["lr"],
                                  weight_decay=DEMO["weight_decay"])
    bar = tqdm(range(steps), desc="pretrain vision")
    for _ in bar:
        batch = torch.randint(len(pixels), (DEMO_PRETRAIN_BATCH,))
        tokens = vit(pixel_values=(pixels[batch] / 255 - mean) / std).last_hidden_state[:, 1:]  # CLS dropped
        loss = sum(F.cross_entropy(head(tokens).flatten(0, 1), targets[batch][..., k].flatten())
                   for k, head in enumerate(heads))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        bar.set_postfix(loss=f"{loss.item():.3f}")
    vit.save_pretrained(out)


def token_targets(segmentations: dict, instances: dict, cover: float = 0.3):
    """One frame's masks {ID: {"mask": RLE}} + the instances' truth -> (patches, 3): the indices of the colour,
    shape and size (ATTRIBUTES) of the instance covering most of each patch, -100 where none covers `cover`."""
    grid = DEMO_IMAGE_SIZE // DEMO_PATCH
    best, target = np.full(grid * grid, cover), np.full((grid * grid, 3), -100)
    for i, entry in segmentations.items():
        covered = decode_rle(entry["mask"]).reshape(grid, DEMO_PATCH, grid, DEMO_PATCH).mean((1, 3)).reshape(-1)
        wins = covered >= best
        best[wins] = covered[wins]
        target[wins] = [list(values).index(instances[i][k]) for k, values in ATTRIBUTES.items()]
    return target


# ---------------------------------------------------------------------------------------------------
# The run: world -> marks -> annotations -> data -> two stages -> bench; then its scores and pictures.

def run_demo(demo, cfg: train.TrainConfig, overrides: dict) -> dict:
    """World -> SoM -> annotations (oracle, or GPT with --base-url) -> instruction data -> tiny model ->
    train -> held-out synthetic bench. Writes results.json, loss.png, som_frames.png and answers.png in --out.
    `demo`: the demo's own flags (scenes, som, vision_pretrain_steps, base_url, annotator_model); --no-som
    shows the model the same frames without marks (the annotations still name the [IDs])."""
    started, wall_start, out = time.perf_counter(), time.time(), Path(cfg.out)
    if not cfg.resume and (out / "reading").exists():  # train.py would refuse a second run there: say it for the demo
        raise SystemExit(f"{out} holds a demo run already: add --resume to continue it, or give another --out "
                         f"(make demo: rm -r {out} first)")
    world = out / "world"
    train_records = synthetic_world(str(world), demo.scenes, cfg.seed, size=DEMO_IMAGE_SIZE, prefix="train")
    bench_records = synthetic_world(str(world), DEMO_BENCH_SCENES, cfg.seed + 7919, size=DEMO_IMAGE_SIZE,
                                    prefix="bench")
    som = world / "train_som"
    if demo.base_url:  # the real three-stage annotator on the same SoM frames
        client = annotate.LLMClient(demo.base_url, demo.annotator_model, str(world / "train.cache.jsonl"))
        annotate_one = functools.partial(annotate.annotate_record, client, media_root=world, som_dir=som,
                                         num_frames=16, style=DEMO_MARKS)
        records, failures = annotate.run_all(annotate_one, train_records, [r["video_id"] for r in train_records],
                                             8, client, "annotate")
        records = [r for r in records if r is not None]
    else:
        records = [oracle_record(r, world, som, cfg.seed, DEMO_MARKS)
                   for r in tqdm(train_records, desc="annotate (oracle)")]
        for r in records:  # what GPT's answers must pass, the oracle's must too
            check_record(r)
    for r in bench_records:
        annotate.render_record(r, world, world / "bench_som", len(r["frames"]), DEMO_MARKS)
    if not demo.som:  # the model sees the raw frames
        records = [{**r, "video_path": f"media/{r['video_id']}"} for r in records]
    train_json, general_json = world / "train.json", world / "general.json"
    data.write_json(train_json, records)
    frames_root = "train_som/videos" if demo.som else "media"
    data.write_json(general_json, general_data(train_records, frames_root, cfg.seed))
    bench = world / "bench"
    write_synthetic_bench(bench_records, str(world / ("bench_som/videos" if demo.som else "media")), str(bench),
                          cfg.seed)
    reading_json = world / "reading.json"
    data.write_json(reading_json, reading_data(train_records, world, demo.som))

    questions = data.load_instit_bench(str(bench))
    texts = [m["content"] for path in (train_json, reading_json)
             for s in data.load_conversations(str(path), str(world)) for m in s["messages"]]
    texts += [m["content"] for q in questions for m in evaluate.bench_sample(q, 8)["messages"]]
    base = build_tiny_model(str(out / "base"), texts, cfg.seed)
    vision = out / "vision"
    if not (cfg.resume and (vision / "model.safetensors").exists()):
        pretrain_vision(train_records, world, base["vision_model"], str(vision), cfg.seed, demo.vision_pretrain_steps)
    base["vision_model"] = str(vision)
    print(f"demo world: {len(records)} annotated scenes, {len(questions)} bench questions, "
          f"{time.perf_counter() - started:.0f} s; marks {'on' if demo.som else 'off (--no-som)'}")

    # Two stages, as INST-IT trains in stages: first read lone marks, then the whole mixture --init-from that.
    reading = dataclasses.replace(cfg, data=[str(reading_json)], media_root=str(world), out=str(out / "reading"),
                                  max_steps=max(1, round(DEMO_READING_SHARE * cfg.max_steps)), eval_bench=None,
                                  run_name="reading")
    reading_final = os.path.join(reading.out, "final")
    if not (cfg.resume and os.path.isdir(reading_final)):
        result = train.train(reading, {**overrides, **base})
        if result["step"] < reading.max_steps:
            return result  # stopped by a signal: --resume continues
    keep = 1 - DEMO_READING_RATIO
    mixture = [f"{train_json}:{(1 - DEMO_GENERAL_RATIO) * keep}", f"{general_json}:{DEMO_GENERAL_RATIO * keep}",
               f"{reading_json}:{DEMO_READING_RATIO}"]
    mixed = dataclasses.replace(cfg, data=mixture, media_root=str(world), init_from=reading_final, run_name="mixture",
                                eval_bench=str(bench) if cfg.eval_every else None)  # --eval-every: a learning curve
    result = train.train(mixed, overrides)
    if result["step"] < (cfg.max_steps or 1):
        return result  # stopped by a signal: --resume continues
    model = LlavaStyleModel.from_pretrained(str(out / "final"))
    model.eval()
    summary = evaluate.run_bench(model, str(bench), list(data.BENCH_SPLITS), str(out / "bench"), batch_size=32,
                                 max_new_tokens=24, num_frames=8)
    predictions = evaluate.load_predictions(str(out / "bench" / "predictions.jsonl"))
    results = {"som": demo.som, "demo": vars(demo), "steps": result["step"], "seed": cfg.seed,
               "minutes": round((time.perf_counter() - started) / 60, 2), "chance_mc": evaluate.MC_RANDOM, "splits": {},
               "curve": [{"step": r["step"], "eval": r["eval"], "minutes": round((r["time"] - wall_start) / 60, 2)}
                         for r in map(json.loads, open(out / "metrics.jsonl")) if "eval" in r]}  # since the start
    for split, scores in summary.items():
        rows = [p for p in predictions if p["split"] == split]
        kinds = sorted({p["question_id"].rsplit("-", 1)[1] for p in rows})
        by_kind = {k: [p for p in rows if p["question_id"].endswith("-" + k)] for k in kinds}
        score = (lambda ps: evaluate.score_mc(ps)["score"]) if split.endswith("mc") else exact_match
        results["splits"][split] = {**scores, "by_kind": {k: round(score(ps), 1) for k, ps in by_kind.items()}}
        if split.endswith("oe"):  # templated answers share most words: the proxy flatters, exact match does not
            results["splits"][split]["exact"] = exact_match(rows)
    results["binding"] = binding(predictions, bench_records)
    data.write_json(str(out / "results.json"), results)
    shown = [p for split in data.BENCH_SPLITS for p in [q for q in predictions if q["split"] == split][:2]]
    pictures(out, train_records[:8], shown, questions)  # two questions of each split
    print(json.dumps({s: {k: v for k, v in r.items() if k in ("score", "oe_proxy", "by_kind")}
                      for s, r in results["splits"].items()}, indent=1))
    for split, b in results["binding"].items():
        print(f"{split} colour/shape/size: {b['right']:.1f}% right, ID-blind guess {b['id_blind']:.1f}%, "
              f"names a value seen in the scene {b['in_scene']:.1f}%")
    print(f"{out}/results.json, loss.png, som_frames.png, answers.png ({results['minutes']} min)")
    image, video = (results["splits"][s]["score"] for s in ("image_mc", "video_mc"))
    if demo.som and (image < 60 or video < 50):  # the default run is too short to bind: say so, not just the numbers
        print(f"image / video MC {image:.1f} / {video:.1f} (chance {evaluate.MC_RANDOM:.0f}): too few steps to read "
              f"the marks; --scenes 8000 --max-steps 4000 reaches 60-72 / 57-66 (about an hour on 2 CPU cores; "
              f"README, The demo)")
    return {**result, "results": results}


def exact_match(predictions: list[dict]) -> float:
    """% of OE answers equal to the reference, ignoring case and punctuation (the demo's answers are templated,
    so a right answer is the reference sentence)."""
    same = [evaluate.normalise(p["model_prediction"]) == evaluate.normalise(p["ground_truth"]) for p in predictions]
    return 100 * sum(same) / len(same)


def binding(predictions: list[dict], records: list[dict]) -> dict:
    """Bench answers about an instance's colour, shape or size + the bench scenes' truth -> per split: % right,
    % naming a value some instance of the scene has, and the ID-blind guess (% right when picking one of the
    scene's values at random). Seeing what is in the scene gives the ID-blind level; only binding each mark to
    its object goes above it, which is what SoM is for (INST-IT 2.1)."""
    truth = {r["video_id"]: r["truth"]["instances"] for r in records}
    vocab = {kind: set(values) for kind, values in ATTRIBUTES.items()}
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


def pictures(out, records, predictions, questions):
    """som_frames.png: a few marked scenes; answers.png: bench questions, the model's answers (green when
    right, red when wrong), the truth."""
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
                 else exact_match([p]) == 100)
        x = 2 * DEMO_IMAGE_SIZE + 10
        draw.multiline_text((x, y + 10), f"Q: {p['question']}\n{options}", fill="black", spacing=6)
        draw.text((x, y + 52), f"model: {p['model_prediction']}", fill=(0, 140, 0) if right else (200, 0, 0))
        draw.text((x, y + 70), f"truth: {p['ground_truth']}", fill="black")
    page.save(out / "answers.png")


def main(argv=None):
    """The demo's own flags; every other flag goes to train.py's parser over the DEMO presets."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="Every train.py flag passes through (python train.py --help): --out, "
                                       "--max-steps, --eval-every, --seed, --resume, --lr, ... Defaults: DEMO and "
                                       "DEMO_MODEL.")
    p.add_argument("--scenes", type=int, default=1500,
                   help="training scenes, half images, half 8-frame videos (default: 1500)")
    p.add_argument("--som", action=argparse.BooleanOptionalAction, default=True,
                   help="draw the marks; --no-som shows the model the same frames without them")
    p.add_argument("--vision-pretrain-steps", type=int, default=1500,
                   help=f"the ViT's pretraining first (pretrain_vision), batch {DEMO_PRETRAIN_BATCH} (default: 1500)")
    p.add_argument("--base-url", help="annotate with a real chat-completions server instead of the oracle")
    p.add_argument("--annotator-model", default="gpt-4o",
                   help="its model (default: gpt-4o); the key comes from OPENAI_API_KEY")
    demo, rest = p.parse_known_args(argv)
    if demo.scenes < 1:  # else the world is empty and train.py would blame its data file
        raise SystemExit(f"--scenes must be >= 1, got {demo.scenes}: the demo trains on that many scenes")
    cfg, overrides = train.parse_args(rest, defaults={**DEMO, **DEMO_MODEL})
    data.log_to_stderr()
    return run_demo(demo, cfg, overrides)


if __name__ == "__main__":
    main()
