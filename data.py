"""Everything between raw media and a batch the model eats (INST-IT 2.4; MIMIC-IT; MultiInstruct).

A conversation ("sample") is a plain dict, the unit every loader returns and `encode_sample` reads:
    {"id": str, "source": str,
     "visuals": [{"frames": [PIL image | path | encoded bytes, ...], "pooled": bool,
                  "masks": [{id: mask, ...} per frame] (optional: drawn with som.render_som when loaded)}
                 or {"video": video file or frame folder, "pooled": True, "num_frames": n (default cfg.max_frames)}],
     "messages": [{"role": "system" | "user" | "assistant", "content": str}]}
The i-th `<image>` placeholder in the messages is the i-th visual. A video is 2x2-pooled, a single image keeps
all its tokens (INST-IT 2.4), or its AnyRes tiles' (LLaVA-NeXT): `visual_layout` says which."""
import argparse
import base64
import io
import json
import logging
import os
import random
import re
from collections import Counter

import torch
from PIL import Image

from model import ModelConfig, anyres_tiles, num_visual_tokens, preprocess_image
from som import IMAGE_EXTS, MarkStyle, frame_files, instance_key, named_ids, natural_key, open_image, render_som

log = logging.getLogger("data")

INSTRUCTIONS = {  # the INST-IT instruction-tuning questions (INST-IT 2.4); annotation prompts live in annotate.py
    "instance": "Describe each marked instance in the image. Refer to each instance by its numeric ID in brackets.",
    "image": "Now describe the whole image in detail, referring to the marked instances by their IDs.",
    "temporal": "These are two consecutive frames of a video, <1> and <2>. What changed from the first frame to "
                "the second? Describe the movements and interactions of the marked instances by their IDs.",
    "video": "The video has {n} frames, numbered <1> to <{n}>. Describe what happens in the video in "
             "chronological order, referring to instances by their IDs and to frames as <t>.",
}
FALLBACK_SYSTEM = ("A chat between a curious human and an artificial intelligence assistant. The assistant gives "
                   "helpful, detailed, and polite answers to the human's questions.")  # Vicuna v1's system prompt
CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")  # ChatML, as Qwen2 writes chats
PLACEHOLDER = "<image>"
BENCH_SPLITS = {"image_mc": "image_multi_choice", "image_oe": "image_open_ended",  # short name -> the hub's
                "video_mc": "video_multi_choice", "video_oe": "video_open_ended"}


# ---------------------------------------------------------------------------------------------------
# Frames: video files, frame folders, lists of frames.

def uniform_indices(total: int, num: int) -> list[int]:
    """`num` indices spread evenly over range(total), first and last included; all of them if total <= num."""
    if total <= num:
        return list(range(total))
    return [(total - 1) // 2] if num == 1 else [i * (total - 1) // (num - 1) for i in range(num)]


def sample_frames(source, num_frames: int) -> tuple[list[Image.Image], list[int]]:
    """A video file, a folder of frames or a list of frame paths -> (at most `num_frames` RGB frames sampled
    uniformly, their 0-based indices in the source: they map INST-IT's 1-based <t> timestamps back to frames)."""
    if num_frames < 1:
        raise ValueError(f"num_frames must be >= 1, got {num_frames}")
    if isinstance(source, (list, tuple)):
        paths = list(source)
    elif os.path.isdir(source):
        paths = [os.path.join(source, n) for n in frame_files(source)]
    elif os.path.isfile(source):
        if not str(source).lower().endswith(IMAGE_EXTS):
            return _read_video(str(source), num_frames)
        paths = [source]
    else:
        raise FileNotFoundError(f"{source}: no such video file or frame folder")
    if not paths:
        raise ValueError(f"{source}: 0 frames (no {'/'.join(IMAGE_EXTS)} files); nothing to sample")
    indices = uniform_indices(len(paths), num_frames)
    return [open_image(paths[i]) for i in indices], indices


def _read_video(path: str, num_frames: int) -> tuple[list[Image.Image], list[int]]:
    """Decode sampled frames with decord, or PyAV where decord is not installed (macOS, aarch64); both upright."""
    try:
        import decord
    except ImportError:
        decord = None
        try:
            import av
        except ImportError:
            raise ImportError(f"{path}: reading video files needs decord (pip install decord) or PyAV "
                              "(pip install av); or extract the frames to a folder, which needs neither") from None
    try:
        if decord is not None:
            reader = decord.VideoReader(path, num_threads=1)
            indices = uniform_indices(len(reader), num_frames)
            frames = [Image.fromarray(a) for a in reader.get_batch(indices).asnumpy()] if indices else []
        else:
            with av.open(path) as container:
                total = container.streams.video[0].frames or sum(1 for p in container.demux(video=0) if p.size)
            indices = uniform_indices(total, num_frames)
            with av.open(path) as container:  # a phone clip's rotation tag: turn counterclockwise, as decord does
                frames = [f.to_image().convert("RGB").rotate(f.rotation, expand=True)
                          for i, f in enumerate(container.decode(video=0)) if i in indices]
    except Exception as e:  # decord raises RuntimeError or its own DECORDError, both with long C++ traces
        raise ValueError(f"{path}: cannot decode this video ({str(e).strip().splitlines()[0][:200]}); "
                         "the file is corrupt, truncated or not a video") from e
    if not frames:
        raise ValueError(f"{path}: the video has 0 frames")
    return frames, indices[:len(frames)]


# ---------------------------------------------------------------------------------------------------
# Frames to tokens: chat template, labels, visual layout (pooled or AnyRes), collation.

def load_visual(visual: dict, cfg: ModelConfig) -> list[Image.Image]:
    """A visual -> RGB frames (sampled to <= cfg.max_frames), marked from its `masks` with one label place per ID."""
    masks = visual.get("masks")
    if "video" in visual:
        frames, _ = sample_frames(visual["video"], visual.get("num_frames") or cfg.max_frames)
    else:  # a list of frames (a MIMIC-IT video is one) longer than max_frames is sampled uniformly
        keep = uniform_indices(len(visual["frames"]), cfg.max_frames)
        frames = [open_image(visual["frames"][i]) for i in keep]
        if masks and len(masks) == len(visual["frames"]):
            masks = [masks[i] for i in keep]
    if masks:
        if len(masks) != len(frames):
            raise ValueError(f"{len(masks)} sets of masks for {len(frames)} frames")
        places, style = {}, MarkStyle(**cfg.mark_style or {})  # the style the model is trained with
        frames = [render_som(f, m or {}, style, label_places=places) for f, m in zip(frames, masks)]
    return frames


def chat_pieces(messages: list[dict], tokenizer, add_generation_prompt: bool = False) -> list[tuple[str, bool]]:
    """Messages -> the rendered chat as (text, is_assistant) pieces that join into the whole prompt: by the tokenizer's
    chat template (an assistant piece: what it adds for that turn, content and end marker), else by Vicuna v1's."""
    if not tokenizer.chat_template:
        system = next((m["content"] for m in messages if m["role"] == "system"), FALLBACK_SYSTEM)
        return [((tokenizer.bos_token or "") + system, False)] + [
            (f" USER: {m['content']} ASSISTANT:", False) if m["role"] == "user" else
            (f" {m['content']}{tokenizer.eos_token or ''}", True)
            for m in messages if m["role"] in ("user", "assistant")]

    def render(msgs, generation_prompt=False):
        return tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=generation_prompt)

    pieces, done = [], ""
    for i in (k for k, m in enumerate(messages) if k > 0 and m["role"] == "assistant"):
        prompt, full = render(messages[:i], True), render(messages[:i + 1])
        if not (prompt.startswith(done) and full.startswith(prompt)):
            raise ValueError("the tokenizer's chat template renders earlier turns differently as the chat grows; "
                             "assistant-only labels cannot be placed (set tokenizer.chat_template to a simpler one)")
        pieces += [(prompt[len(done):], False), (full[len(prompt):], True)]
        done = full
    return pieces + [(render(messages, add_generation_prompt)[len(done):], False)]


def tokenize_chat(messages, tokenizer, add_generation_prompt=False) -> tuple[list[int], list[int]]:
    """Messages -> (token ids, labels): the chat tokenized at once (as at inference); a token starting inside an
    assistant piece is labelled with its id, else -100. Each assistant turn's tokens must decode to its content."""
    pieces = chat_pieces(messages, tokenizer, add_generation_prompt)
    if not tokenizer.is_fast:
        raise ValueError("assistant-only labels need a fast tokenizer "
                         "(AutoTokenizer.from_pretrained(..., use_fast=True))")
    encoded = tokenizer("".join(p for p, _ in pieces), add_special_tokens=False, return_offsets_mapping=True)
    ids, starts = encoded["input_ids"], [s for s, _ in encoded["offset_mapping"]]
    labelled, position, turn = set(), 0, 0
    for piece, is_assistant in pieces:
        start, position = position, position + len(piece)
        if is_assistant:
            inside = [k for k, s in enumerate(starts) if start <= s < position]
            if not inside:
                raise ValueError(f"assistant turn {turn} gets no tokens from the chat template: its label mask "
                                 "would be empty")
            content = [m for m in messages if m["role"] == "assistant"][turn]["content"]
            decoded = tokenizer.decode([ids[k] for k in inside])
            if "".join(content.split()) not in "".join(decoded.split()):
                raise ValueError(f"assistant turn {turn}: its labelled tokens {decoded[:60]!r} do not cover its text "
                                 f"{content[:60]!r}; the template or tokenizer merges it with the prompt")
            labelled.update(inside)
            turn += 1
    return ids, [token if k in labelled else -100 for k, token in enumerate(ids)]


def visual_layout(visual: dict, num_frames: int, num_visuals: int, cfg: ModelConfig) -> tuple[bool, tuple | None]:
    """(pooled, AnyRes size): 2x2-pooled per its `pooled` flag, else iff it has several frames or the sample several
    visuals (cfg.multi_image "pooled"); an unpooled lone image (or any, multi_image "anyres") is cut into AnyRes
    tiles iff cfg has grid pinpoints: its (height, width) is then read from the file's header (no decoding)."""
    pooled = bool(visual.get("pooled", num_frames > 1 or num_visuals > 1 and cfg.multi_image == "pooled"))
    if not (cfg.image_grid_pinpoints and "frames" in visual and num_frames == 1 and not pooled
            and (num_visuals == 1 or cfg.multi_image == "anyres")):
        return pooled, None
    frame = visual["frames"][0]
    if isinstance(frame, Image.Image):
        return pooled, (frame.height, frame.width)
    with Image.open(io.BytesIO(frame) if isinstance(frame, bytes) else frame) as image:
        return pooled, (image.height, image.width)


def encode_sample(sample: dict, tokenizer, cfg: ModelConfig, max_length: int = 6144,
                  add_generation_prompt: bool = False) -> dict | None:
    """A sample -> {"input_ids": (L,), "labels": (L,), "pixel_values": (F, 3, S, S) | None, "visual_frames": [frames
    or AnyRes tiles per visual], "visual_pooled", "image_sizes" (visual_layout's), "id", "source"}: labels on assistant
    tokens only, each `<image>` expanded to num_visual_tokens(cfg, frames, pooled, size) tokens. Over `max_length`
    (INST-IT's 6K), trailing text-only turns go, then the text after the last visual token; a sample that still
    does not fit is dropped (None, logged). `add_generation_prompt=True` encodes a prompt (ends with a user turn)."""
    name = sample.get("id", "?")
    visuals = sample.get("visuals", [])
    try:
        frames = [load_visual(v, cfg) for v in visuals]
    except ValueError as e:
        raise ValueError(f"sample {name}: {e}") from e
    layouts = [visual_layout(v, len(f), len(visuals), cfg) for v, f in zip(visuals, frames)]
    pooled, sizes = [p for p, _ in layouts], [s for _, s in layouts]
    if any(len(f) > cfg.max_frames for f in frames):
        raise ValueError(f"sample {name}: a visual has {max(map(len, frames))} frames, more than max_frames="
                         f"{cfg.max_frames}; sample fewer (sample_frames)")
    counts = [num_visual_tokens(cfg, len(f), p, s) for f, p, s in zip(frames, pooled, sizes)]
    messages = [dict(m, content=m["content"].replace(PLACEHOLDER, cfg.image_token)) for m in sample["messages"]]
    placeholders = sum(m["content"].count(cfg.image_token) for m in messages)
    if placeholders != len(visuals):
        raise ValueError(f"sample {name}: {placeholders} {PLACEHOLDER} placeholders for {len(visuals)} visuals")
    if add_generation_prompt == (messages[-1]["role"] == "assistant"):
        raise ValueError(f"sample {name}: a {'prompt' if add_generation_prompt else 'training sample'} must end "
                         f"with {'a user' if add_generation_prompt else 'an assistant'} turn")
    image_id = tokenizer.convert_tokens_to_ids(cfg.image_token)
    while True:
        try:
            ids, labels = tokenize_chat(messages, tokenizer, add_generation_prompt)
        except ValueError as e:
            raise ValueError(f"sample {name}: {e}") from e
        last_user = max((i for i, m in enumerate(messages) if m["role"] == "user"), default=0)
        droppable = (not add_generation_prompt and any(m["role"] == "assistant" for m in messages[:last_user])
                     and cfg.image_token not in "".join(m["content"] for m in messages[last_user:]))
        if len(ids) + sum(counts) - len(counts) <= max_length or not droppable:  # placeholders expanded
            break
        messages = messages[:last_user]  # drop the last question and its answer
    if ids.count(image_id) != len(visuals):
        raise ValueError(f"sample {name}: {len(visuals)} visuals but {ids.count(image_id)} {cfg.image_token} tokens "
                         "after tokenization; add the image token to the tokenizer (model.build_model does)")
    visual_counts = iter(counts)  # the k-th placeholder becomes the k-th visual's tokens
    repeats = [next(visual_counts) if token == image_id else 1 for token in ids]
    input_ids = [token for token, n in zip(ids, repeats) for _ in range(n)]
    target = [-100 if token == image_id else label for token, label, n in zip(ids, labels, repeats) for _ in range(n)]
    if len(input_ids) > max_length:
        if add_generation_prompt or image_id in input_ids[max_length:] or all(t == -100 for t in target[:max_length]):
            return log.warning("sample %s dropped: %d tokens (%d visual) do not fit max_length=%d even with its "
                               "text shortened; raise max_length or use fewer frames",
                               name, len(input_ids), sum(counts), max_length)
        input_ids, target = input_ids[:max_length], target[:max_length]
    if not add_generation_prompt and all(t == -100 for t in target):
        raise ValueError(f"sample {name}: no assistant tokens to learn from (its label mask is empty)")
    pixels = [anyres_tiles(f[0], cfg) if s else [preprocess_image(x, cfg) for x in f] for f, s in zip(frames, sizes)]
    return {"input_ids": torch.tensor(input_ids), "labels": torch.tensor(target),
            "pixel_values": torch.stack([x for p in pixels for x in p]) if pixels else None,
            "visual_frames": [len(p) for p in pixels], "visual_pooled": pooled, "image_sizes": sizes, "id": name,
            "source": sample.get("source", "?")}


def collate(samples: list, pad_token_id: int, padding_side: str = "right") -> dict | None:
    """encode_sample outputs -> a batch for LlavaStyleModel.forward(**batch): input_ids, attention_mask, labels (B, L)
    padded right (training) or left (generation), the rest concatenated. Dropped samples (None) are left out."""
    samples = [s for s in samples if s is not None]
    if not samples:
        return None
    width = max(len(s["input_ids"]) for s in samples)

    def pad(x, value):
        filler = torch.full((width - len(x),), value, dtype=x.dtype)
        return torch.cat([x, filler] if padding_side == "right" else [filler, x])

    pixels = [s["pixel_values"] for s in samples if s["pixel_values"] is not None]
    return {"input_ids": torch.stack([pad(s["input_ids"], pad_token_id) for s in samples]),
            "attention_mask": torch.stack([pad(torch.ones_like(s["input_ids"]), 0) for s in samples]),
            "labels": torch.stack([pad(s["labels"], -100) for s in samples]),
            "pixel_values": torch.cat(pixels) if pixels else None,
            **{key: [x for s in samples for x in s[key]] for key in ("visual_frames", "visual_pooled", "image_sizes")}}


class InstructionDataset(torch.utils.data.Dataset):
    """Samples -> encode_sample outputs (None: dropped); media are read and marked in the DataLoader's workers."""

    def __init__(self, samples: list[dict], tokenizer, cfg: ModelConfig, max_length: int = 6144):
        self.samples, self.tokenizer, self.cfg, self.max_length = samples, tokenizer, cfg, max_length

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, i):
        return encode_sample(self.samples[i], self.tokenizer, self.cfg, self.max_length)

    def lengths(self) -> list[int]:
        """Estimated token counts for grouping by length, no media read (an unread video counts cfg.max_frames)."""
        texts = ["\n".join(m["content"] for m in s["messages"]) for s in self.samples]
        encoded = self.tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else []
        cfg, out = self.cfg, []
        for s, ids in zip(self.samples, encoded):
            visuals = s.get("visuals", [])
            frames = [v.get("num_frames") or cfg.max_frames if "video" in v else len(v["frames"]) for v in visuals]
            tokens = [num_visual_tokens(cfg, n, *visual_layout(v, n, len(visuals), cfg))
                      for v, n in zip(visuals, frames)]
            out.append(len(ids) + 4 * len(s["messages"]) + sum(tokens) - len(tokens))  # a placeholder -> its tokens
        return out


# ---------------------------------------------------------------------------------------------------
# Files: JSON in, JSON out, figures.

def read_json(path: str):
    """A .json file, or a .jsonl file as a list of its lines' objects (errors name the file and line)."""
    with open(path, "rb") as f:
        raw = f.read()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:  # the exact byte: a text stream's error counts from its last chunk
        raise ValueError(f"{path}: not UTF-8 text (byte offset {e.start}: {raw[e.start:e.start + 4]!r}); open it in "
                         "an editor and save it with the UTF-8 encoding") from None
    if not path.endswith(".jsonl"):
        try:
            return json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not valid JSON ({e})") from None

    def parse_line(n, line):
        try:
            return json.loads(line)
        except json.JSONDecodeError as e:  # None (log.warning's): kept as a bad record, counted in the loader's summary
            return log.warning("%s:%d: not valid JSON (%s)", path, n, e)

    return [parse_line(n, line) for n, line in enumerate(text.split("\n"), 1) if line.strip()]


def write_json(path, obj):
    """Write .json (.jsonl: a line per item) through a temporary file renamed over `path`: no half file if killed."""
    path = str(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        if path.endswith(".jsonl"):
            f.writelines(json.dumps(item, ensure_ascii=False) + "\n" for item in obj)
        else:
            json.dump(obj, f, ensure_ascii=False, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def read_parquet(path: str) -> list[dict]:
    """Rows of a parquet file as dicts (pyarrow, imported only here)."""
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise ImportError(f"{path}: reading parquet needs pyarrow (pip install pyarrow); "
                          "or use the JSON copy of the same data") from None
    return pq.read_table(path).to_pylist()


def log_to_stderr():
    """Every CLI's logging: this project's loggers at INFO (model.py's parameter report shows), others' at WARNING."""
    logging.basicConfig(format="%(message)s")
    for name in ("model", "data", "annotate", "train", "evaluate", "demo"):
        logging.getLogger(name).setLevel(logging.INFO)


def pyplot():
    """matplotlib.pyplot drawing to files (the Agg backend), or None with a warning when it is not installed."""
    try:
        import matplotlib.pyplot as plt
    except ImportError:
        return log.warning("matplotlib is not installed: no figure (pip install matplotlib)")
    plt.switch_backend("Agg")
    return plt


# ---------------------------------------------------------------------------------------------------
# Published formats (FORMATS.md) -> conversations. A record that does not fit is reported with
# its file, record and field, and skipped; the run goes on with the rest.

class RecordError(ValueError):
    """A record that does not fit its format; `field` names where."""

    def __init__(self, field: str, problem: str):
        super().__init__(f"{field}: {problem}")
        self.field = field


def required(record, key: str, kind=str, where: str = ""):
    """record[key], checked to be present and of type `kind`, else a RecordError naming the field."""
    field = f"{where}.{key}" if where else key
    if not isinstance(record, dict):
        raise RecordError(where or "record", f"expected a JSON object, got {type(record).__name__}")
    if record.get(key) is None:
        raise RecordError(field, "missing")
    if not isinstance(record[key], kind):
        raise RecordError(field, f"expected {getattr(kind, '__name__', kind)}, got {type(record[key]).__name__}")
    return record[key]


def media_path(root: str, relative: str, field: str, check: bool = True) -> str:
    """root/relative; with `check`, a RecordError naming `field` when the file is not there."""
    file = os.path.join(root, relative)
    if check and not os.path.exists(file):
        raise RecordError(field, f"{file} not found (check --media-root)")
    return file


def record_label(index, record, *id_fields) -> str:
    """How a record is named in messages: its position and, when it has one, its ID."""
    named = [f for f in id_fields if isinstance(record, dict) and record.get(f) is not None]
    return f"#{index} ({named[0]} {record[named[0]]})" if named else f"#{index}"


def convert_records(file: str, records, convert, *id_fields) -> list:
    """`convert(record) -> list` over a list or dict {name: record}; misfits are logged, skipped, counted per field."""
    if not isinstance(records, dict):
        records = {record_label(i, r, *id_fields): r for i, r in enumerate(records)}
    out, skipped = [], Counter()
    for name, record in records.items():
        try:
            out.extend(convert(record))
        except (RecordError, KeyError, TypeError, ValueError, AttributeError) as e:
            skipped[re.sub(r"\[\d+\]", "[]", getattr(e, "field", "record"))] += 1
            if sum(skipped.values()) <= 20:
                problem = e if isinstance(e, RecordError) else f"record: {type(e).__name__}: {e}"
                log.warning("%s: record %s: %s (skipped)", file, name, problem)
    if skipped:
        reasons = ", ".join(f"{n} at {f}" for f, n in skipped.most_common())
        log.warning("%s: skipped %d of %d records (%s)", file, sum(skipped.values()), len(records), reasons)
    return out


def normalize_text(text: str) -> str:
    """Fix the released data's known quirks: ID lists `[3, 4]` -> `[3] [4]`, zero-padded `[01]` -> `[1]` and
    `<05>` -> `<5>`. `<0>` has no meaning in 1-based time and is kept as written."""
    text = re.sub(r"\[(\d+(?:\s*,\s*\d+)+)\]", lambda m: " ".join(f"[{int(x)}]" for x in m[1].split(",")), text)
    text = re.sub(r"\[0+(\d+)\]", r"[\1]", text)
    return re.sub(r"<0+([1-9]\d*)>", r"<\1>", text)


def load_instit_dataset(path: str, media_root: str | None = None, records: list | None = None) -> list[dict]:
    """An INST-IT Dataset JSON (video or image part, an image a one-frame video; masks optional; `records`: its content
    when already read) -> records {"id", "file", "frames" (by timestamp): [{"timestamp", "path", "instances": {id:
    caption}, "image_level", "temporal_change", "masks": {id: RLE | box} | None}], "video_caption", "qa": [(q, a)]}."""
    records = read_json(path) if records is None else records
    media_root = media_root if media_root is not None else os.path.dirname(path)
    if not isinstance(records, list):
        raise ValueError(f"{path}: expected a JSON list of INST-IT records, got {type(records).__name__}")

    def caption(value, field):
        if isinstance(value, dict):  # the image release's {"short": ..., "long": ...}
            value = value.get("long") or value.get("short")
        if not isinstance(value, str):
            raise RecordError(field, f"expected a caption string, got {type(value).__name__}")
        return normalize_text(value)

    def frame(folder, name, instances, image_level, temporal, masks, field, t=1):
        file = media_path(folder, name, field)
        if not isinstance(instances or {}, dict) or not isinstance(masks or {}, dict):
            raise RecordError(field, "instance captions and segmentations must map ID -> value")
        return {"timestamp": t, "path": file, "image_level": image_level and normalize_text(image_level),
                "instances": {instance_key(k): caption(v, f"{field}.{k}") for k, v in (instances or {}).items()},
                "temporal_change": temporal and normalize_text(temporal),
                "masks": None if masks is None else {instance_key(k): v for k, v in masks.items()}}

    def convert(rec):
        if not isinstance(rec, dict) or "frame_level_caption" not in rec:  # image part (required refuses a non-object)
            frames = [frame(media_root, required(rec, "image_path"), rec.get("instance_level_caption"),
                            rec.get("image_level_caption"), None, rec.get("segmentations"), "image_path")]
            return [{"id": f"image {rec.get('image_id', '?')}", "file": path, "frames": frames,
                     "video_caption": None, "qa": []}]
        folder = os.path.join(media_root, required(rec, "video_path"))
        segmentations = rec.get("segmentations")
        frames = []
        for k, f in enumerate(required(rec, "frame_level_caption", list)):
            field = f"frame_level_caption[{k}]"
            name = required(f, "frame_name", str, field)
            t = required(f, "timestamp", (int, str), field)
            if not str(t).isdigit():
                raise RecordError(f"{field}.timestamp", f"expected an integer, got {t!r}")
            masks = None if segmentations is None else segmentations.get(name)
            if segmentations is not None and masks is None:
                raise RecordError(f"segmentations.{name}", "no masks for this annotated frame")
            frames.append(frame(folder, name, f.get("instance_level"), f.get("image_level"),
                                f.get("temporal_change"), masks, f"{field}.frame_name", int(t)))
        if not frames:
            raise RecordError("frame_level_caption", "empty")
        frames.sort(key=lambda f: f["timestamp"])
        qa = [tuple(normalize_text(required(pair, key, str, f"question_answer_pairs[{k}]"))
                    for key in ("question", "answer")) for k, pair in enumerate(rec.get("question_answer_pairs") or [])]
        summary = rec.get("video_level_caption")
        return [{"id": f"video {rec.get('video_id', '?')}", "file": path, "frames": frames,
                 "video_caption": summary and normalize_text(summary), "qa": qa}]

    return convert_records(path, records, convert, "video_id", "image_id")


def instit_conversations(record: dict, max_frames: int = 32, draw_marks: bool = False) -> list[dict]:
    """A normalised INST-IT record -> its instruction conversations, the four kinds of INST-IT 2.4:
    1. each frame: "describe each marked instance" -> instance captions; "describe the image" -> its caption;
    2. each two consecutive frames with a temporal change: "what changed" -> the change;
    3. all annotated frames: "describe the video" -> the video caption; 4. the QA pairs as one multi-turn chat.
    `draw_marks=True`: raw frames, masks drawn when loaded (False: marked frames, as the released *_vpt folders)."""
    out, frames = [], record["frames"]

    def add(kind, shown, turns):
        where = f"{record['file']}: record {record['id']}: {kind} conversation"
        with_masks = all(f["masks"] is not None for f in shown)
        if draw_marks and not with_masks:
            return log.warning("%s: no masks to draw marks from (skipped)", where)
        if with_masks:
            unmarked = {str(i) for q, a in turns for i in named_ids(q + a)} - set().union(*(f["masks"] for f in shown))
            if unmarked:
                return log.warning("%s names %s, not marked on its frames (skipped)", where,
                                   " ".join(f"[{i}]" for i in sorted(unmarked, key=int)))
        if len(shown) > max_frames:
            return log.warning("%s: %d frames, more than max_frames=%d (skipped)", where, len(shown), max_frames)
        visual = {"frames": [f["path"] for f in shown], "pooled": len(shown) > 1}
        if draw_marks:
            visual["masks"] = [f["masks"] for f in shown]
        out.append(conversation(f"{record['id']} {kind}", record["file"], [visual], turns))

    for f in frames:
        captions = "\n".join(" ".join(f"[{i}]" for i in key.split(",")) + f": {text}"
                             for key, text in sorted(f["instances"].items(), key=lambda kv: natural_key(kv[0])))
        turns = [t for t in ((INSTRUCTIONS["instance"], captions), (INSTRUCTIONS["image"], f["image_level"])) if t[1]]
        if turns:  # those of the two the frame has
            add(f"frame <{f['timestamp']}>", [f], turns)
    for previous, current in zip(frames, frames[1:]):
        if current["temporal_change"]:
            add(f"change <{previous['timestamp']}>-<{current['timestamp']}>", [previous, current],
                [(INSTRUCTIONS["temporal"], current["temporal_change"])])
    if record["video_caption"]:
        add("video", frames, [(INSTRUCTIONS["video"].format(n=len(frames)), record["video_caption"])])
    if record["qa"]:
        add("qa", frames, record["qa"])
    return out


def load_instit_bench(path, splits=None, media_root: str | None = None, check_media: bool = True) -> list[dict]:
    """INST-IT Bench in any shape FORMATS.md lists (a flat JSON/JSONL, a folder of them or of the hub's parquet
    files, a list of records) -> questions {"question_id", "split", "question" (IDs normalised), "raw_question" (as
    published), "options": {"A": text, ...} | None, "answer" (MC: the letter; OE: the reference), "media" (image or
    frame folder), "file"}. The split follows from the record (video_path: video; options: MC)."""
    short = {hub: name for name, hub in BENCH_SPLITS.items()}
    wanted = None if splits is None else {short.get(s, s) for s in splits}
    if wanted and not wanted <= set(BENCH_SPLITS):
        raise ValueError(f"unknown bench split(s) {sorted(wanted - set(BENCH_SPLITS))}; "
                         f"choose from {sorted(BENCH_SPLITS)} (or {sorted(short)})")
    if isinstance(path, (list, tuple)):
        sources = [("<records>", list(path), media_root or ".")]
    else:
        files = [path] if os.path.isfile(path) else sorted(
            os.path.join(d, n) for d, _, names in os.walk(path) for n in names
            if n.endswith((".json", ".jsonl", ".parquet")))
        if not files:
            raise FileNotFoundError(f"{path}: no bench file (.json, .jsonl or .parquet) found")
        sources = [(f, read_parquet(f) if f.endswith(".parquet") else read_json(f),
                    media_root if media_root is not None else os.path.dirname(f)) for f in files]

    def convert(rec, file, root):
        # The hub's folders and the flat copies are named by split (image_multi_choice/, video_open_ended.json):
        # a name says MC or OE, so an MC record that lost its options is an error, not an OE question.
        declared = "mc" if "multi_choice" in file else "oe" if "open_ended" in file else None
        question = normalize_text(required(rec, "question"))
        options = rec.get("options") or {L: rec[c] for L in "ABCDEFGH" if rec.get(c := f"choice_{L.lower()}")}
        if isinstance(options, list):
            options = dict(zip("ABCDEFGH", options))
        if not isinstance(options, dict):
            raise RecordError("options", f"expected a dict or list, got {type(options).__name__}")
        options = {str(k).strip("() .").upper(): str(v) for k, v in options.items()} or None
        if declared and declared != ("mc" if options else "oe"):
            raise RecordError("options", "missing in a multiple-choice file" if declared == "mc"
                              else "given in an open-ended file")
        modality = "video" if rec.get("video_path") is not None else "image"
        split = f"{modality}_{'mc' if options else 'oe'}"
        if wanted and split not in wanted:
            return []
        answer = str(required(rec, "answer", (str, int))).strip()
        if options:  # MC: the letter, also when the record gives the option's text
            letter = answer.strip("().:* ").upper()
            if letter not in options:
                letter = next((k for k, v in options.items() if v.strip() == answer), None)
            if letter is None:
                raise RecordError("answer", f"{answer[:40]!r} is neither an option letter {sorted(options)} "
                                  "nor an option")
            answer = letter
        key = "video_path" if modality == "video" else "image" if rec.get("image") is not None else "image_path"
        visual = required(rec, key, object)
        if isinstance(visual, dict):  # a datasets Image feature as stored in parquet
            visual = visual.get("bytes") or visual.get("path")
        if isinstance(visual, str):
            visual = media_path(root, visual, key, check_media)
        elif not isinstance(visual, (bytes, Image.Image)):
            raise RecordError(key, f"expected an image, bytes or a path, got {type(visual).__name__}")
        return [{"question_id": str(required(rec, "question_id", (str, int))), "split": split, "question": question,
                 "raw_question": rec["question"], "options": options, "answer": answer, "media": visual, "file": file}]

    return [q for file, records, root in sources
            for q in convert_records(file, records, lambda rec: convert(rec, file, root), "question_id")]


LLAVA_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}


def conversation(sample_id: str, source: str, visuals: list, turns) -> dict:
    """[(question, answer), ...] -> a sample, its visuals' placeholders before the first question."""
    messages = []
    for k, (question, answer) in enumerate(turns):
        prefix = (PLACEHOLDER + "\n") * len(visuals) if k == 0 else ""
        messages += [{"role": "user", "content": prefix + question}, {"role": "assistant", "content": answer}]
    return {"id": sample_id, "source": source, "visuals": visuals, "messages": messages}


def load_llava(path: str, media_root: str | None = None, records: list | None = None) -> list[dict]:
    """LLaVA conversation JSON (LLaVA-NeXT-Data, the general data INST-IT mixes in; `records`: its content if read)
    -> samples, text-only or with images and/or a video; placeholders missing go before the first user turn."""
    records = read_json(path) if records is None else records
    root = media_root if media_root is not None else os.path.dirname(path)

    def convert(rec):
        messages = []
        for k, turn in enumerate(required(rec, "conversations", list)):
            role = LLAVA_ROLES.get(required(turn, "from", str, f"conversations[{k}]"))
            if role is None:
                raise RecordError(f"conversations[{k}].from", f"unknown speaker {turn['from']!r} (expected human/gpt)")
            messages.append({"role": role, "content": required(turn, "value", str, f"conversations[{k}]")})
        images = rec.get("image") or []
        images = [images] if isinstance(images, str) else images
        visuals = [{"frames": [media_path(root, p, "image")]} for p in images]
        if rec.get("video"):
            visuals.append({"video": media_path(root, required(rec, "video"), "video")})
        placeholders = sum(m["content"].count(PLACEHOLDER) for m in messages)
        first_user = next((m for m in messages if m["role"] == "user"), None)
        if first_user is None or not any(m["role"] == "assistant" for m in messages):
            raise RecordError("conversations", "needs a human turn and a gpt turn")
        if placeholders == 0 and visuals:
            first_user["content"] = PLACEHOLDER * len(visuals) + "\n" + first_user["content"]
        elif placeholders != len(visuals):
            raise RecordError("conversations", f"{placeholders} <image> placeholders for {len(visuals)} images/videos")
        return [{"id": str(rec.get("id", "?")), "source": path, "visuals": visuals, "messages": messages}]

    return convert_records(path, records, convert, "id")


def load_mimicit(instructions: str, images: str, train_config: str | None = None) -> list[dict]:
    """MIMIC-IT instructions + their base64 images (FORMATS.md) -> in-context samples: the in-context examples
    (`rel_ins_ids`, or the train config's ins_id -> [ids]) then the query, each chunk `<image> instruction` ->
    answer, all answers supervised; an instruction's images are one visual."""
    data = read_json(instructions)
    if not isinstance(data, dict) or not isinstance(data.get("data"), dict):
        raise ValueError(f"{instructions}: expected MIMIC-IT {{'meta': ..., 'data': {{ins_id: ...}}}}")
    if images.endswith(".parquet"):
        rows = read_parquet(images)
        id_column = next((c for c in ("id", "image_id", "__index_level_0__") if rows and c in rows[0]), None)
        if id_column is None or "base64" not in rows[0]:  # a column found implies a first row
            raise ValueError(f"{images}: expected columns id (or the index) and base64")
        pictures = {row[id_column]: row["base64"] for row in rows}
    else:
        pictures = read_json(images)
    queries = read_json(train_config) if train_config else {k: v.get("rel_ins_ids") or [] for k, v in
                                                               data["data"].items() if isinstance(v, dict)}

    def chunk(ins_id, field):
        ins = data["data"].get(ins_id)
        if ins is None:
            raise RecordError(field, f"instruction {ins_id} not in {instructions}")
        frames = []  # no image_ids: a text-only instruction, as Otter reads one
        for image_id in required(ins, "image_ids", list, ins_id) if ins.get("image_ids") is not None else []:
            if image_id not in pictures:
                raise RecordError(f"{ins_id}.image_ids", f"image {image_id} not in {images}")
            try:  # the standard alphabet or the url-safe one (-_) that Otter's urlsafe_b64decode reads
                frames.append(base64.b64decode(pictures[image_id].translate(str.maketrans("-_", "+/")), validate=True))
            except ValueError:
                raise RecordError(f"{ins_id}.image_ids", f"image {image_id} is not valid base64") from None
        question = (f"{PLACEHOLDER}\n" if frames else "") + required(ins, "instruction", str, ins_id)
        return {"frames": frames}, [{"role": "user", "content": question},
                                    {"role": "assistant", "content": required(ins, "answer", str, ins_id)}]

    def convert(item):
        ins_id, context = item
        chunks = [chunk(c, f"{ins_id}.rel_ins_ids") for c in context or []] + [chunk(ins_id, "data")]
        return [{"id": ins_id, "source": instructions, "visuals": [v for v, _ in chunks if v["frames"]],
                 "messages": [m for _, turn in chunks for m in turn]}]

    return convert_records(instructions, {k: (k, v) for k, v in queries.items()}, convert)


class JoinedList(list):
    """A MultiInstruct list field: `{region}` is its items joined by "||||" (the authors' token), `{region[0]}` one."""

    def __format__(self, spec):
        return format("||||".join(map(str, self)), spec)


def template_fields(value):
    """A record's value for str.format: every list in it, `meta_data`'s too, a JoinedList."""
    if isinstance(value, dict):
        return {key: template_fields(v) for key, v in value.items()}
    return JoinedList(map(template_fields, value)) if isinstance(value, list) else value


def find_media(root: str, path: str, field: str) -> str:
    """root/path, or root + the longest tail of `path` (a folder and file at least) under root: MultiInstruct's
    image paths are relative (`./raw_datasets/...`) or absolute on the authors' machine (`/projects/.../data/...`)."""
    parts = [p for p in path.split("/") if p not in ("", ".")]
    for file in [os.path.join(root, path)] + [os.path.join(root, *parts[k:]) for k in range(len(parts) - 1)]:
        if os.path.exists(file):
            return file
    raise RecordError(field, f"{path}: neither it nor any tail of it is under {root} (check --media-root)")


def load_multiinstruct(path: str, templates, media_root: str | None = None, seed: int = 0,
                       template_index: int | None = None, records=None) -> list[dict]:
    """MultiInstruct instances + {task_name: [instruction templates]} (a dict or a JSON file) -> samples, each written
    with a template drawn by a generator seeded with `seed` (or `template_index` for all, as Sensitivity needs) and
    formatted with the record's fields (see JoinedList); options follow "\\n\\n[Options]: " unless it has {options}."""
    if isinstance(templates, str):
        templates = read_json(templates)
    root = media_root if media_root is not None else os.path.dirname(path)
    rng = random.Random(seed)

    def convert(rec):
        task = required(rec, "task_name")
        choices = templates.get(task)
        if not choices:
            raise RecordError("task_name", f"no instruction templates for task {task!r}")
        k = template_index if template_index is not None else rng.randrange(len(choices))
        region = rec.get("region") or []  # none: "" as before; one region written as a string is still `{region[0]}`
        fields = template_fields(dict(rec, region=[region] if isinstance(region, str) else region))
        try:
            instruction = choices[k].format(**fields)
        except KeyError as e:
            raise RecordError(e.args[0], f"template {k} of {task} needs it") from None
        except (IndexError, ValueError) as e:  # IndexError: `{region[1]}` on a record with one region
            raise RecordError("task_name", f"template {k} of {task} indexes past a field's end or is not a valid "
                              f"format string ({e})") from None
        if rec.get("options") and "{options" not in choices[k]:
            instruction += "\n\n[Options]: " + "||||".join(map(str, required(rec, "options", list)))
        target = rec.get("target_txt", rec.get("target"))
        if not isinstance(target, str):
            raise RecordError("target_txt", "missing")
        visual = {"frames": [find_media(root, required(rec, "image_path"), "image_path")], "pooled": False}
        return [{**conversation(str(rec.get("unique_id", "?")), path, [visual], [(instruction, target)]), "task": task}]

    return convert_records(path, read_json(path) if records is None else records, convert, "unique_id")


def load_natural_instructions(path: str, num_examples: int = 2) -> list[dict]:
    """Natural Instructions task file(s) (a file or a folder; the text-only data MultiInstruct mixes in or starts on) ->
    samples: `Definition` + `num_examples` `Positive Examples` + an `Instances` item's input -> its first output."""
    files = [path] if os.path.isfile(path) else sorted(
        os.path.join(path, n) for n in os.listdir(path) if n.endswith(".json"))
    samples = []
    for file in files:
        try:
            task = read_json(file)
        except ValueError as e:  # one broken task file in a folder of hundreds: report it, keep the rest
            log.warning("%s (skipped)", e)
            continue
        if not isinstance(task, dict) or not isinstance(task.get("Instances"), list):
            log.warning("%s: not a Natural Instructions task file (no Instances list; skipped)", file)
            continue
        definition = task.get("Definition") or []
        definition = " ".join(definition) if isinstance(definition, list) else str(definition)
        examples = "".join(f"\n\nPositive example {k + 1}:\nInput: {e.get('input', '')}\nOutput: {e.get('output', '')}"
                           for k, e in enumerate((task.get("Positive Examples") or [])[:num_examples]))

        def convert(instance):
            output = required(instance, "output", (list, str))
            output = output[0] if isinstance(output, list) and output else output
            if not isinstance(output, str):
                raise RecordError("output", "empty")
            prompt = (f"{definition}{examples}\n\nNow complete the following example.\n"
                      f"Input: {required(instance, 'input')}\nOutput:")
            return [conversation(str(instance.get("id", "?")), file, [], [(prompt.strip(), output)])]

        samples += convert_records(file, task["Instances"], convert, "id")
    return samples


def load_conversations(path: str, media_root: str | None = None, images: str | None = None, templates=None,
                       draw_marks: bool = False, max_frames: int = 32, seed: int = 0, train_config=None) -> list[dict]:
    """Any supported data file -> samples, its format (FORMATS.md) read from its records, whatever the extension."""
    if os.path.isdir(path):
        return load_natural_instructions(path)
    if images is not None:
        return load_mimicit(path, images, train_config)
    records = read_json(path)
    if isinstance(records, dict) and "Instances" in records:
        return load_natural_instructions(path)
    if isinstance(records, dict) and "data" in records:  # MIMIC-IT: DC_instructions.json, DC.json or DC.parquet
        name = re.sub(r"_instructions\.json$", "", path)
        beside = [f for f in (name + ".json", name + ".parquet") if name != path and os.path.exists(f)]
        if not beside:
            raise ValueError(f"{path}: MIMIC-IT instructions need their images file (images=..., or <name>.json or "
                             f"<name>.parquet beside <name>_instructions.json)")
        config = name + "_train.json"  # its in-context examples, when published beside it
        return load_mimicit(path, beside[0], train_config or (config if os.path.exists(config) else None))
    first = next((r for r in records if isinstance(r, dict)), {}) if isinstance(records, list) else {}
    if "task_name" in first:
        if templates is None:
            raise ValueError(f"{path}: a MultiInstruct file (task_name) needs its instruction templates (--templates)")
        return load_multiinstruct(path, templates, media_root, seed, records=records)
    if "question_id" in first and "text" in first:  # LLaVA's question_id/image/text: what model_vqa asks
        raise ValueError(f"{path}: a LLaVA question file (question_id, image, text; no answers) is for evaluation, "
                         "not training: train on conversations with answers (LLaVA's `conversations` JSON)")
    if "conversations" in first:
        return load_llava(path, media_root, records=records)
    if "frame_level_caption" in first or "image_path" in first:
        return [s for r in load_instit_dataset(path, media_root, records=records)
                for s in instit_conversations(r, max_frames, draw_marks)]
    raise ValueError(f"{path}: not a format data.py reads (INST-IT, LLaVA, MIMIC-IT, MultiInstruct, Natural "
                     "Instructions; see FORMATS.md)")


# ---------------------------------------------------------------------------------------------------
# Command line: look at converted data.

def main(argv=None):
    """Print the first conversations of a data file in any supported format (FORMATS.md) as the model will see them."""
    parser = argparse.ArgumentParser(description=main.__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    show = commands.add_parser("show", help="read a data file in any supported format and print its conversations")
    show.add_argument("path", help="a data file (or a folder of Natural Instructions tasks)")
    show.add_argument("--media-root", help="folder the records' media paths are relative to (default: the file's)")
    show.add_argument("--images", help="MIMIC-IT: the base64 images file, .json or .parquet (default: beside it)")
    show.add_argument("--train-config", dest="config", help="MIMIC-IT: {ins_id: [example ins_ids]} (default: beside)")
    show.add_argument("--templates", help="MultiInstruct: JSON {task_name: [instruction templates]}")
    show.add_argument("-n", type=int, default=2, help="how many conversations to print")
    args = parser.parse_args(argv)
    log_to_stderr()
    samples = load_conversations(args.path, args.media_root, args.images, args.templates, train_config=args.config)
    print(f"{args.path}: {len(samples)} conversations")
    for s in samples[:args.n]:  # frames given as bytes or images print as a placeholder, masks not at all
        visuals = [{k: v for k, v in visual.items() if k != "masks"} for visual in s["visuals"]]
        print(json.dumps(dict(s, visuals=visuals), indent=1, ensure_ascii=False,
                         default=lambda x: f"<{len(x)} bytes>" if isinstance(x, bytes) else "<image>"))


if __name__ == "__main__":
    main()
