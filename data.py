"""Everything between raw media and a batch the model eats (INST-IT 2.1, 2.4; MIMIC-IT; MultiInstruct).

Read top to bottom in the order data flows: Set-of-Marks (masks -> numbered marks on frames), frames
(videos and frame folders), the published formats (-> conversations), and batches (chat template,
assistant-only labels, `<image>` expanded to `num_visual_tokens` copies, collation, the mixture sampler).

A conversation ("sample") is a plain dict, the unit every loader returns and `encode_sample` reads:
    {"id": str, "source": str,
     "visuals": [{"frames": [PIL image | path | encoded bytes, ...], "pooled": bool,
                  "marks": [{id: mask, ...} per frame] (optional: drawn with render_som when loaded)}
                 or {"video": video file or frame folder, "pooled": True, "num_frames": n (default cfg.max_frames)}],
     "messages": [{"role": "system" | "user" | "assistant", "content": str}]}
The i-th `<image>` placeholder in the messages is the i-th visual. A visual is 2x2-pooled iff it is a video
(several frames) or the sample has several visuals; a single image keeps all its tokens (INST-IT 2.4).
"""
import argparse
import base64
import colorsys
import io
import itertools
import json
import logging
import math
import os
import random
import re
import warnings
import zlib
from collections import Counter

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from model import ModelConfig, num_visual_tokens

log = logging.getLogger("data")

PROMPTS = {  # the INST-IT instruction-tuning conversations (INST-IT 2.4); annotation prompts live in annotate.py
    "instance": "Describe each marked instance in the image. Refer to each instance by its numeric ID in brackets.",
    "image": "Now describe the whole image in detail, referring to the marked instances by their IDs.",
    "temporal": "These are two consecutive frames of a video, <1> and <2>. What changed from the first frame to "
                "the second? Describe the movements and interactions of the marked instances by their IDs.",
    "video": "The video has {n} frames, numbered <1> to <{n}>. Describe what happens in the video in "
             "chronological order, referring to instances by their IDs and to frames as <t>.",
    "system": "A chat between a curious human and an artificial intelligence assistant. The assistant gives "
              "helpful, detailed, and polite answers to the human's questions.",  # Vicuna v1, the fallback template's
}
IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
PLACEHOLDER = "<image>"

# ---------------------------------------------------------------------------------------------------
# Set-of-Marks (INST-IT 2.1): masks, label places, numbered marks.


def decode_rle(rle: dict) -> np.ndarray:
    """COCO RLE {"size": [h, w], "counts": str | list} -> (h, w) bool mask, as pycocotools decodes it.

    Counts alternate runs of 0s and 1s (starting with 0s) over the mask in column-major order. The
    compressed form packs each count in 5-bit groups (6th bit: more follows), offset by 48 to printable
    characters, and from the 4th count on stores the difference to the count two before."""
    h, w = rle["size"]
    counts = rle["counts"]
    if isinstance(counts, bytes):
        counts = counts.decode("ascii")
    if isinstance(counts, str):
        chars, counts, p = counts, [], 0
        while p < len(chars):
            x, k, more = 0, 0, True
            while more:
                c = ord(chars[p]) - 48
                x |= (c & 0x1F) << (5 * k)
                more = bool(c & 0x20)
                p, k = p + 1, k + 1
                if not more and c & 0x10:
                    x |= -1 << (5 * k)  # sign-extend
            if len(counts) > 2:
                x += counts[-2]
            counts.append(x)
    if sum(counts) != h * w or min(counts, default=0) < 0:
        raise ValueError(f"RLE counts sum to {sum(counts)}, but size {h}x{w} needs {h * w}: a corrupt or "
                         "mislabelled RLE")
    values = np.arange(len(counts)) % 2 == 1
    return np.repeat(values, counts).reshape(w, h).T


def instance_mask(spec, size: tuple, instance_id="?") -> np.ndarray:
    """A mask (bool array, RLE dict, {"mask": RLE}), box [x0, y0, x1, y1] ({"box": ...}; COCO's {"bbox": [x, y,
    w, h]}) or polygon ([[x, y], ...], a flat [x, y, x, y, ...] or a COCO list of flat polygons) -> (H, W) bool
    mask for an image of `size` (W, H)."""
    w, h = size
    if isinstance(spec, dict) and "counts" in spec:
        try:
            mask = decode_rle(spec)
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"instance {instance_id}: bad RLE ({e})") from None
    elif isinstance(spec, dict):
        key = next((k for k in ("mask", "box", "bbox", "polygon") if k in spec), None)
        if key is None:
            raise ValueError(f"instance {instance_id}: expected an RLE or a dict with mask/box/bbox/polygon, "
                             f"got keys {list(spec)}")
        if key == "bbox":  # COCO: x, y, width, height
            x, y, bw, bh = spec["bbox"]
            return instance_mask([x, y, x + bw, y + bh], size, instance_id)
        return instance_mask(spec[key], size, instance_id)
    elif isinstance(spec, np.ndarray):
        mask = spec.astype(bool)
    elif isinstance(spec, (list, tuple)) and len(spec) == 4 and all(isinstance(v, (int, float)) for v in spec):
        x0, y0, x1, y1 = spec
        mask = np.zeros((h, w), bool)
        mask[max(0, math.floor(y0)):max(0, math.ceil(y1)), max(0, math.floor(x0)):max(0, math.ceil(x1))] = True
    elif isinstance(spec, (list, tuple)) and spec:
        if isinstance(spec[0], (int, float)):
            polygons = [list(zip(spec[0::2], spec[1::2]))]
        elif len(spec[0]) == 2 and isinstance(spec[0][0], (int, float)):
            polygons = [[tuple(p) for p in spec]]
        else:  # COCO: several flat polygons
            polygons = [list(zip(p[0::2], p[1::2])) for p in spec]
        canvas = Image.new("1", (w, h))
        for polygon in polygons:
            ImageDraw.Draw(canvas).polygon(polygon, fill=1)
        mask = np.array(canvas, bool)
    else:
        raise ValueError(f"instance {instance_id}: cannot read a mask from {type(spec).__name__} {str(spec)[:60]}")
    if mask.shape != (h, w):
        raise ValueError(f"instance {instance_id}: mask is {mask.shape[0]}x{mask.shape[1]} (h x w) but the image is "
                         f"{h}x{w}; the mask belongs to another image or frame (check the RLE's size)")
    return mask


def _largest_component(mask: np.ndarray) -> np.ndarray:
    """(h, w) bool -> its largest 4-connected component. Union-find over each row's runs of True pixels:
    two runs in neighbouring rows join when their columns overlap (a mask has a few runs per row, so this
    loop is short where a per-pixel flood fill would not be)."""
    edges = np.diff(np.pad(mask, ((0, 0), (1, 1))).astype(np.int8), axis=1)
    row, start = np.nonzero(edges == 1)   # runs in row-major order: start column ...
    end = np.nonzero(edges == -1)[1]      # ... and end column (exclusive) of each
    parent = list(range(len(start)))

    def root(i):
        while parent[i] != i:
            parent[i] = i = parent[parent[i]]
        return i

    first = np.searchsorted(row, np.arange(mask.shape[0] + 1)).tolist()  # runs of row y: first[y]:first[y+1]
    start_, end_ = start.tolist(), end.tolist()
    for y in range(1, mask.shape[0]):
        i, j, i_end, j_end = first[y - 1], first[y], first[y], first[y + 1]
        while i < i_end and j < j_end:  # walk both rows' runs left to right
            if start_[i] < end_[j] and start_[j] < end_[i]:
                parent[root(i)] = root(j)
            if end_[i] < end_[j]:
                i += 1
            else:
                j += 1
    roots = np.array([root(i) for i in range(len(start_))])
    sizes = np.bincount(roots, weights=end - start)
    out = np.zeros_like(mask)
    for y, a, b in zip(row[roots == sizes.argmax()], start[roots == sizes.argmax()], end[roots == sizes.argmax()]):
        out[y, a:b] = True
    return out


def _squared_distance(mask: np.ndarray) -> np.ndarray:
    """(h, w) bool -> squared Euclidean distance of each pixel to the nearest False pixel, everything outside
    the array counting as False. Exact: vertical distances per column, then the minimum over columns of
    g(x')^2 + (x - x')^2. O(h w^2), so callers keep w small (label_position: <= LABEL_GRID)."""
    p = np.pad(mask, 1)
    h, w = p.shape
    rows = np.arange(h)[:, None]
    above = np.maximum.accumulate(np.where(p, -2 * h, rows), axis=0)  # nearest background row at or above
    below = np.minimum.accumulate(np.where(p, 4 * h, rows)[::-1], axis=0)[::-1]
    g = np.minimum(rows - above, below - rows)
    cols = np.arange(w)
    d2 = (g[:, None, :] ** 2 + (cols[:, None] - cols[None, :]) ** 2).min(-1)
    return d2[1:-1, 1:-1]


LABEL_GRID = 64  # label_position's working resolution: 1/64 of the mask is precise enough for a label


def label_position(mask: np.ndarray, grid: int | None = None) -> tuple[int, int]:
    """(H, W) bool mask -> (x, y) where its ID label goes: the point of the largest component farthest from
    the border (the distance-transform peak; the image edge counts as border), so it lies inside C-shapes,
    rings and thin bars, where a centroid may not. Ties go to the point nearest the middle of the plateau.
    Works on the mask's bounding box, downsampled to <= LABEL_GRID px, so 4K frames stay cheap.
    `grid` (a ViT's patch size): moved to the nearest centre of a grid cell inside the mask, so the label
    lies whole in one patch token instead of in pieces across four."""
    mask = np.asarray(mask, bool)
    rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
    if not len(rows):
        raise ValueError("an empty mask has no label position")
    y0, x0 = rows[0], cols[0]
    crop = mask[y0:rows[-1] + 1, x0:cols[-1] + 1]
    f = math.ceil(max(crop.shape) / LABEL_GRID)
    h, w = -(-crop.shape[0] // f) * f, -(-crop.shape[1] // f) * f
    blocks = np.pad(crop, ((0, h - crop.shape[0]), (0, w - crop.shape[1]))).reshape(h // f, f, w // f, f)
    small = blocks.all((1, 3))  # a block counts only when wholly inside: a narrow gap in a C stays open
    if not small.any():
        small = blocks.any((1, 3))  # a shape thinner than a block: "any" keeps thin bars alive
    d2 = _squared_distance(_largest_component(small))
    peak = np.argwhere(d2 == d2.max())
    py, px = peak[np.argmin(((peak - peak.mean(0)) ** 2).sum(1))]
    cy, cx = min(py * f + f // 2, crop.shape[0] - 1), min(px * f + f // 2, crop.shape[1] - 1)
    if not crop[cy, cx]:  # the block centre missed the (downsampled) mask: take the nearest mask pixel
        ys, xs = np.nonzero(crop)
        k = np.argmin((ys - cy) ** 2 + (xs - cx) ** 2)
        cy, cx = ys[k], xs[k]
    x, y = int(x0 + cx), int(y0 + cy)
    if grid:
        gy, gx = np.mgrid[grid // 2:mask.shape[0]:grid, grid // 2:mask.shape[1]:grid]
        distance = np.where(mask[gy, gx], (gx - x) ** 2 + (gy - y) ** 2, np.inf)
        if np.isfinite(distance).any():  # else the mask holds no cell centre: keep the peak
            k = np.unravel_index(np.argmin(distance), distance.shape)
            x, y = int(gx[k]), int(gy[k])
    return x, y


def id_colour(instance_id) -> tuple[int, int, int]:
    """A fixed, saturated RGB colour per instance ID (golden-ratio hue steps keep neighbouring IDs apart)."""
    key = str(instance_id).strip()
    n = int(key) if key.isdigit() else zlib.crc32(key.encode())
    r, g, b = colorsys.hsv_to_rgb((n * 0.618033988749895) % 1.0, 0.85, 0.95)
    return round(r * 255), round(g * 255), round(b * 255)


def _erode(mask: np.ndarray, steps: int) -> np.ndarray:
    for _ in range(steps):
        p = np.pad(mask, 1)
        mask = p[1:-1, 1:-1] & p[:-2, 1:-1] & p[2:, 1:-1] & p[1:-1, :-2] & p[1:-1, 2:]
    return mask


def render_som(image, instances: dict, fill: float = 0.25, line_width: int | None = None,
               font_size: int | None = None, label_places: dict | None = None, grid: int | None = None,
               mark_colour: tuple | None = None) -> Image.Image:
    """An image and {instance ID: mask | RLE | box | polygon} -> a copy with Set-of-Marks drawn (INST-IT 2.1):
    a light fill and a contour in the ID's colour, and the ID in a label box at `label_position`.

    Colour and label text come from the annotation's instance/track ID, so they stay fixed across the
    frames of a video. Pass the same `label_places` dict for every frame: a label then stays where it was
    for as long as that point is inside the instance's mask. Line width and font size scale with the image
    (legible from 224 px to 4K). Empty masks are skipped with a warning. `grid`: labels on patch centres
    (label_position); `mark_colour`: one colour for every mark instead of the ID's, so that a world painted in
    saturated colours cannot mistake a mark for an object (the demo draws them white)."""
    image = open_image(image)
    w, h = image.size
    line_width = line_width or max(1, round(min(w, h) / 250))
    font_size = font_size or max(8, round(min(w, h) / 16))  # 14 px at 224, 135 px at 4K; the floor for tiny frames
    pixels = np.array(image)  # (H, W, 3) uint8; each instance is drawn inside its bounding box only
    labels = []
    for instance_id, spec in instances.items():
        instance_id = instance_key(instance_id)  # "02" is [2]: same label, colour and place
        mask = instance_mask(spec, (w, h), instance_id)
        if not mask.any():
            warnings.warn(f"instance {instance_id}: empty mask, no mark drawn")
            continue
        colour = np.array(mark_colour or id_colour(instance_id), np.float32)
        rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
        y0, y1 = max(0, rows[0] - 1), rows[-1] + 2
        x0, x1 = max(0, cols[0] - 1), cols[-1] + 2
        crop, region = mask[y0:y1, x0:x1], pixels[y0:y1, x0:x1]  # region is a view into pixels
        region[crop] = (region[crop] * (1 - fill) + colour * fill).round().astype(np.uint8)
        region[crop & ~_erode(crop, line_width)] = colour  # the contour
        place = (label_places or {}).get(str(instance_id))
        if place is None or not (place[0] < w and place[1] < h and mask[place[1], place[0]]):
            place = label_position(mask, grid)
        if label_places is not None:
            label_places[str(instance_id)] = place
        labels.append((str(instance_id).strip(), place, tuple(int(c) for c in colour)))
    out = Image.fromarray(pixels)
    draw = ImageDraw.Draw(out)
    font = ImageFont.load_default(size=font_size)
    pad = max(2, font_size // 4)
    for text, (x, y), colour in labels:
        left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
        bw, bh = right - left + 2 * pad, bottom - top + 2 * pad
        bx = min(max(0, x - bw // 2), max(0, w - bw))
        by = min(max(0, y - bh // 2), max(0, h - bh))
        ink = (0, 0, 0) if 0.299 * colour[0] + 0.587 * colour[1] + 0.114 * colour[2] > 140 else (255, 255, 255)
        draw.rectangle([bx, by, bx + bw - 1, by + bh - 1], fill=colour, outline=ink, width=max(1, font_size // 16))
        draw.text((bx + pad - left, by + pad - top), text, fill=ink, font=font)
    return out


# ---------------------------------------------------------------------------------------------------
# Frames: video files, frame folders, lists of frames.


def open_image(source) -> Image.Image:
    """A PIL image, a file path or encoded image bytes -> an RGB PIL image; errors name the file."""
    if isinstance(source, Image.Image):
        return source.convert("RGB")
    try:
        with Image.open(io.BytesIO(source) if isinstance(source, bytes) else source) as image:
            return image.convert("RGB")
    except FileNotFoundError:
        raise FileNotFoundError(f"{source}: frame not found") from None
    except (OSError, SyntaxError, ValueError) as e:
        name = f"<{len(source)} bytes>" if isinstance(source, bytes) else source
        raise ValueError(f"{name}: cannot read this image ({e}); the file is corrupt or not an image") from e


def natural_key(name: str) -> list:
    """Sort key putting "frame_2" before "frame_10"."""
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


def uniform_indices(total: int, num: int) -> list[int]:
    """`num` indices spread evenly over range(total), first and last included; all of them if total <= num."""
    if total <= num:
        return list(range(total))
    if num == 1:
        return [(total - 1) // 2]
    return [i * (total - 1) // (num - 1) for i in range(num)]


def sample_frames(source, num_frames: int) -> tuple[list[Image.Image], list[int]]:
    """A video file, a folder of frames or a list of frame paths -> (at most `num_frames` RGB frames sampled
    uniformly, their 0-based indices in the source). A shorter video gives all its frames; the indices map
    INST-IT's 1-based <t> timestamps back to frames."""
    if num_frames < 1:
        raise ValueError(f"num_frames must be >= 1, got {num_frames}")
    if isinstance(source, (list, tuple)):
        paths = list(source)
    elif os.path.isdir(source):
        names = sorted((n for n in os.listdir(source) if n.lower().endswith(IMAGE_EXTS)), key=natural_key)
        paths = [os.path.join(source, n) for n in names]
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
    """Decode sampled frames with decord, or PyAV where decord is not installed (macOS, aarch64)."""
    try:
        import decord
    except ImportError:
        decord = None
    if decord is not None:
        try:
            reader = decord.VideoReader(path, num_threads=1)
            total = len(reader)
            indices = uniform_indices(total, num_frames)
            arrays = reader.get_batch(indices).asnumpy() if total else []
        except Exception as e:  # decord raises RuntimeError or its own DECORDError, both with long C++ traces
            raise ValueError(f"{path}: cannot decode this video ({str(e).strip().splitlines()[0][:200]}); "
                             "the file is corrupt, truncated or not a video") from e
        if not total:
            raise ValueError(f"{path}: the video has 0 frames")
        return [Image.fromarray(a) for a in arrays], indices
    try:
        import av
    except ImportError:
        raise ImportError(f"{path}: reading video files needs decord (pip install decord) or PyAV (pip install av); "
                          "or extract the frames to a folder, which needs neither") from None
    try:
        with av.open(path) as container:
            total = container.streams.video[0].frames or sum(
                1 for packet in container.demux(video=0) if packet.size)
        indices = uniform_indices(total, num_frames)
        wanted, frames = set(indices), []
        with av.open(path) as container:
            for i, frame in enumerate(container.decode(video=0)):
                if i in wanted:
                    frames.append(frame.to_image().convert("RGB"))
    except (av.error.FFmpegError, IndexError, OSError) as e:
        raise ValueError(f"{path}: cannot decode this video ({e}); the file is corrupt, truncated or not a video") from e
    if not frames:
        raise ValueError(f"{path}: the video has 0 frames")
    return frames, indices[:len(frames)]


# ---------------------------------------------------------------------------------------------------
# Published formats (../shared/FORMATS.md) -> conversations. A record that does not fit is reported with
# its file, record and field, and skipped; the run goes on with the rest.


class RecordError(ValueError):
    """A record that does not fit its format; `field` names where."""

    def __init__(self, field: str, problem: str):
        super().__init__(f"{field}: {problem}")
        self.field = field


def need(record, key: str, kind=str, where: str = ""):
    """record[key], checked to be present and of type `kind`, else a RecordError naming the field."""
    field = f"{where}.{key}" if where else key
    if not isinstance(record, dict):
        raise RecordError(where or "record", f"expected a JSON object, got {type(record).__name__}")
    if record.get(key) is None:
        raise RecordError(field, "missing")
    if not isinstance(record[key], kind):
        raise RecordError(field, f"expected {getattr(kind, '__name__', kind)}, got {type(record[key]).__name__}")
    return record[key]


def convert_records(file: str, items: list, convert) -> list:
    """Apply `convert(record) -> list` to (name, record) pairs; a record that does not fit is logged (file,
    record, field, problem) and skipped, and a summary counts the skips per field."""
    out, skipped = [], Counter()
    for name, record in items:
        try:
            out.extend(convert(record))
        except (RecordError, KeyError, TypeError, ValueError, AttributeError) as e:
            skipped[re.sub(r"\[\d+\]", "[]", getattr(e, "field", "record"))] += 1
            if sum(skipped.values()) <= 20:
                problem = e if isinstance(e, RecordError) else f"record: {type(e).__name__}: {e}"
                log.warning("%s: record %s: %s (skipped)", file, name, problem)
    if skipped:
        reasons = ", ".join(f"{n} at {f}" for f, n in skipped.most_common())
        log.warning("%s: skipped %d of %d records (%s)", file, sum(skipped.values()), len(items), reasons)
    return out


def read_json(path: str):
    """A .json file, or a .jsonl file as a list of its lines' objects (errors name the file and line)."""
    with open(path, encoding="utf-8") as f:
        if not path.endswith(".jsonl"):
            try:
                return json.load(f)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}: not valid JSON ({e})") from None
        out = []
        for n, line in enumerate(f, 1):
            if line.strip():
                try:
                    out.append(json.loads(line))
                except json.JSONDecodeError as e:  # kept as a bad record: counted in the loader's summary
                    log.warning("%s:%d: not valid JSON (%s)", path, n, e)
                    out.append(None)
        return out


def normalize_text(text: str) -> str:
    """Fix the released data's known quirks: ID lists `[3, 4]` -> `[3] [4]`, zero-padded `[01]` -> `[1]` and
    `<05>` -> `<5>`. `<0>` has no meaning in 1-based time and is kept as written."""
    text = re.sub(r"\[(\d+(?:\s*,\s*\d+)+)\]", lambda m: " ".join(f"[{int(x)}]" for x in m[1].split(",")), text)
    text = re.sub(r"\[0+(\d+)\]", r"[\1]", text)
    return re.sub(r"<0+([1-9]\d*)>", r"<\1>", text)


def instance_key(key) -> str:
    """Instance-caption / mask key -> canonical ID string: "01" -> "1", "1, 2" -> "1,2" (a caption of several)."""
    parts = [p.strip() for p in str(key).split(",")]
    return ",".join(str(int(p)) if p.isdigit() else p for p in parts)


def load_instit_dataset(path: str, media_root: str | None = None, check_media: bool = True) -> list[dict]:
    """An INST-IT Dataset JSON, video or image part, with or without masks -> normalised records
    {"id", "file", "frames": [{"timestamp", "path", "instances": {id: caption}, "image_level",
    "temporal_change", "masks": {id: RLE | box} | None}], "video_caption", "qa": [(question, answer)]}.
    An image is a one-frame video. Frames are sorted by timestamp; <t> in the text is the t-th of them.
    `media_root` (default: the JSON's folder) holds `video_path` / `image_path`."""
    return _instit_records(read_json(path), path, media_root, check_media)


def _instit_records(records, path, media_root, check_media):
    media_root = media_root if media_root is not None else os.path.dirname(path)
    if not isinstance(records, list):
        raise ValueError(f"{path}: expected a JSON list of INST-IT records, got {type(records).__name__}")

    def caption(value, field):
        if isinstance(value, dict):  # the image release's {"short": ..., "long": ...}
            value = value.get("long") or value.get("short")
        if not isinstance(value, str):
            raise RecordError(field, f"expected a caption string, got {type(value).__name__}")
        return normalize_text(value)

    def frame(file, instances, image_level, temporal, masks, field, t=1):
        if check_media and not os.path.exists(file):
            raise RecordError(field, f"{file} not found (check --media-root)")
        if not isinstance(instances or {}, dict) or not isinstance(masks or {}, dict):
            raise RecordError(field, "instance captions and segmentations must map ID -> value")
        return {"timestamp": t, "path": file, "image_level": image_level and normalize_text(image_level),
                "instances": {instance_key(k): caption(v, f"{field}.{k}") for k, v in (instances or {}).items()},
                "temporal_change": temporal and normalize_text(temporal),
                "masks": None if masks is None else {instance_key(k): v for k, v in masks.items()}}

    def convert(rec):
        if not isinstance(rec, dict):
            raise RecordError("record", f"expected a JSON object, got {type(rec).__name__}")
        if "frame_level_caption" not in rec:  # image part
            frames = [frame(os.path.join(media_root, need(rec, "image_path")), rec.get("instance_level_caption"),
                            rec.get("image_level_caption"), None, rec.get("segmentations"), "image_path")]
            return [{"id": f"image {rec.get('image_id', '?')}", "file": path, "frames": frames,
                     "video_caption": None, "qa": []}]
        folder = os.path.join(media_root, need(rec, "video_path"))
        segmentations = rec.get("segmentations")
        frames = []
        for k, f in enumerate(need(rec, "frame_level_caption", list)):
            field = f"frame_level_caption[{k}]"
            name = need(f, "frame_name", str, field)
            t = need(f, "timestamp", (int, str), field)
            if not str(t).isdigit():
                raise RecordError(f"{field}.timestamp", f"expected an integer, got {t!r}")
            masks = None if segmentations is None else segmentations.get(name)
            if segmentations is not None and masks is None:
                raise RecordError(f"segmentations.{name}", "no masks for this annotated frame")
            frames.append(frame(os.path.join(folder, name), f.get("instance_level"), f.get("image_level"),
                                f.get("temporal_change"), masks, f"{field}.frame_name", int(t)))
        if not frames:
            raise RecordError("frame_level_caption", "empty")
        frames.sort(key=lambda f: f["timestamp"])
        qa = []
        for k, pair in enumerate(rec.get("question_answer_pairs") or []):
            where = f"question_answer_pairs[{k}]"
            qa.append((normalize_text(need(pair, "question", str, where)), normalize_text(need(pair, "answer", str, where))))
        summary = rec.get("video_level_caption")
        return [{"id": f"video {rec.get('video_id', '?')}", "file": path, "frames": frames,
                 "video_caption": summary and normalize_text(summary), "qa": qa}]

    return convert_records(path, [(_name(i, r, "video_id", "image_id"), r) for i, r in enumerate(records)], convert)


def _name(index, record, *id_fields) -> str:
    """How a record is named in messages: its position and, when it has one, its ID."""
    for f in id_fields:
        if isinstance(record, dict) and record.get(f) is not None:
            return f"#{index} ({f} {record[f]})"
    return f"#{index}"


def instit_conversations(record: dict, max_frames: int = 32, draw_marks: bool = False) -> list[dict]:
    """A normalised INST-IT record -> its instruction conversations, the four kinds of INST-IT 2.4:
    1. each frame: "describe each marked instance" -> instance captions; "describe the image" -> its caption;
    2. each two consecutive frames with a temporal change: "what changed" -> the change;
    3. all annotated frames: "describe the video" -> the video-level caption;
    4. all annotated frames: the QA pairs as one multi-turn chat.
    `draw_marks=True`: the frames are raw and the record's masks are drawn with render_som when the sample
    is loaded (False: the frames already carry marks, as the released *_vpt folders do). Where masks are
    known, a conversation naming an [ID] that is not marked on its frames is skipped with a warning."""
    out, frames = [], record["frames"]

    def add(kind, shown, turns):
        where = f"{record['file']}: record {record['id']}: {kind} conversation"
        with_masks = all(f["masks"] is not None for f in shown)
        if draw_marks and not with_masks:
            return log.warning("%s: no masks to draw marks from (skipped)", where)
        if with_masks:
            marked = set().union(*(f["masks"] for f in shown))
            unmarked = {i for q, a in turns for i in re.findall(r"\[(\d+)\]", q + a)} - marked
            if unmarked:
                return log.warning("%s names %s, not marked on its frames (skipped)", where,
                                   " ".join(f"[{i}]" for i in sorted(unmarked, key=int)))
        if len(shown) > max_frames:
            return log.warning("%s: %d frames, more than max_frames=%d (skipped)", where, len(shown), max_frames)
        messages = []
        for k, (question, answer) in enumerate(turns):
            messages += [{"role": "user", "content": (PLACEHOLDER + "\n" if k == 0 else "") + question},
                         {"role": "assistant", "content": answer}]
        visual = {"frames": [f["path"] for f in shown], "pooled": len(shown) > 1}
        if draw_marks:
            visual["marks"] = [f["masks"] for f in shown]
        out.append({"id": f"{record['id']} {kind}", "source": record["file"], "visuals": [visual], "messages": messages})

    for f in frames:
        turns = []
        if f["instances"]:
            captions = [" ".join(f"[{i}]" for i in key.split(",")) + f": {text}"
                        for key, text in sorted(f["instances"].items(), key=lambda kv: natural_key(kv[0]))]
            turns.append((PROMPTS["instance"], "\n".join(captions)))
        if f["image_level"]:
            turns.append((PROMPTS["image"], f["image_level"]))
        if turns:
            add(f"frame <{f['timestamp']}>", [f], turns)
    for previous, current in zip(frames, frames[1:]):
        if current["temporal_change"]:
            add(f"change <{previous['timestamp']}>-<{current['timestamp']}>", [previous, current],
                [(PROMPTS["temporal"], current["temporal_change"])])
    if record["video_caption"]:
        add("video", frames, [(PROMPTS["video"].format(n=len(frames)), record["video_caption"])])
    if record["qa"]:
        add("qa", frames, record["qa"])
    return out


BENCH_SPLITS = {"image_multi_choice": "image_mc", "image_open_ended": "image_oe",
                "video_multi_choice": "video_mc", "video_open_ended": "video_oe"}


def load_instit_bench(path, splits=None, media_root: str | None = None, check_media: bool = True) -> list[dict]:
    """INST-IT Bench -> questions {"question_id", "split", "question", "options": {"A": text, ...} | None,
    "answer" (MC: the letter; OE: the reference text), "media", "file"}.

    `path`: a flat JSON/JSONL copy, a folder of them (or of the hub's parquet files, with pyarrow), or a list
    of records (e.g. a `datasets` split). Options may be choice_a..choice_d or an `options` dict/list. The
    split ("image_mc", "image_oe", "video_mc", "video_oe"; the hub names work too) follows from the record:
    video_path -> video, options -> multiple choice; a file named *multi_choice* / *open_ended* must agree. `media`: the image (PIL image, bytes or path) or the
    video's frame folder. `media_root` (default: the file's folder) holds relative media paths."""
    wanted = None if splits is None else {BENCH_SPLITS.get(s, s) for s in splits}
    if wanted and not wanted <= set(BENCH_SPLITS.values()):
        raise ValueError(f"unknown bench split(s) {sorted(wanted - set(BENCH_SPLITS.values()))}; "
                         f"choose from {sorted(BENCH_SPLITS.values())} (or {sorted(BENCH_SPLITS)})")
    if isinstance(path, (list, tuple)):
        sources = [("<records>", list(path), media_root or ".")]
    else:
        files = [path] if os.path.isfile(path) else sorted(
            os.path.join(d, n) for d, _, names in os.walk(path) for n in names if n.endswith((".json", ".jsonl", ".parquet")))
        if not files:
            raise FileNotFoundError(f"{path}: no bench file (.json, .jsonl or .parquet) found")
        sources = [(f, read_parquet(f) if f.endswith(".parquet") else read_json(f),
                    media_root if media_root is not None else os.path.dirname(f)) for f in files]

    def media(value, root, field):
        if isinstance(value, dict):  # a datasets Image feature as stored in parquet
            value = value.get("bytes") or value.get("path")
        if isinstance(value, str):
            return _joined(root, value, check_media, field)
        if not isinstance(value, (bytes, Image.Image)):
            raise RecordError(field, f"expected an image, bytes or a path, got {type(value).__name__}")
        return value

    questions = []
    for file, records, root in sources:
        # The hub's folders and the flat copies are named by split (image_multi_choice/, video_open_ended.json):
        # a name says MC or OE, so an MC record that lost its options is an error, not an OE question.
        declared = "mc" if "multi_choice" in file else "oe" if "open_ended" in file else None

        def convert(rec):
            question = normalize_text(need(rec, "question"))
            options = rec.get("options") or {L: rec[f"choice_{L.lower()}"] for L in "ABCDEFGH" if rec.get(f"choice_{L.lower()}")}
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
            answer = str(need(rec, "answer", (str, int))).strip()
            if options:  # MC: the letter, also when the record gives the option's text
                letter = answer.strip("().:* ").upper()
                letter = letter if letter in options else next((k for k, v in options.items() if v.strip() == answer), None)
                if letter is None:
                    raise RecordError("answer", f"{answer[:40]!r} is neither an option letter {sorted(options)} nor an option")
                answer = letter
            if modality == "video":
                visual = media(rec["video_path"], root, "video_path")
            else:
                key = "image" if rec.get("image") is not None else "image_path"
                visual = media(need(rec, key, object), root, key)
            return [{"question_id": str(need(rec, "question_id", (str, int))), "split": split, "question": question,
                     "options": options, "answer": answer, "media": visual, "file": file}]

        questions += convert_records(file, [(_name(i, r, "question_id"), r) for i, r in enumerate(records)], convert)
    return questions


def read_parquet(path: str) -> list[dict]:
    """Rows of a parquet file as dicts (pyarrow, imported only here)."""
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise ImportError(f"{path}: reading parquet needs pyarrow (pip install pyarrow); "
                          "or use the JSON copy of the same data") from None
    return pq.read_table(path).to_pylist()


LLAVA_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}


def _joined(root: str, relative: str, check: bool, field: str) -> str:
    file = os.path.join(root, relative)
    if check and not os.path.exists(file):
        raise RecordError(field, f"{file} not found (check --media-root)")
    return file


def _single_turn(sample_id, source, visuals, question, answer) -> dict:
    """One user question with its visuals' placeholders, one answer."""
    prefix = "".join(PLACEHOLDER + "\n" for _ in visuals)
    return {"id": sample_id, "source": source, "visuals": visuals,
            "messages": [{"role": "user", "content": prefix + question}, {"role": "assistant", "content": answer}]}


def load_llava(path: str, media_root: str | None = None, check_media: bool = True) -> list[dict]:
    """LLaVA conversation JSON (LLaVA-NeXT-Data, the general data INST-IT mixes in) -> samples. `image` may be
    absent (text-only), a path or a list of paths (one `<image>` each, pooled), or `video` a video file or frame
    folder (sampled to cfg.max_frames when loaded). Placeholders missing from the text go before the first
    user turn, as LLaVA does."""
    return _llava(read_json(path), path, media_root, check_media)


def _llava(records, path, media_root, check_media):
    root = media_root if media_root is not None else os.path.dirname(path)

    def convert(rec):
        messages = []
        for k, turn in enumerate(need(rec, "conversations", list)):
            role = LLAVA_ROLES.get(need(turn, "from", str, f"conversations[{k}]"))
            if role is None:
                raise RecordError(f"conversations[{k}].from", f"unknown speaker {turn['from']!r} (expected human/gpt)")
            messages.append({"role": role, "content": need(turn, "value", str, f"conversations[{k}]")})
        images = rec.get("image") or []
        images = [images] if isinstance(images, str) else images
        visuals = [{"frames": [_joined(root, p, check_media, "image")]} for p in images]
        if rec.get("video"):
            visuals.append({"video": _joined(root, need(rec, "video"), check_media, "video")})
        for v in visuals:
            v["pooled"] = "video" in v or len(visuals) > 1
        placeholders = sum(m["content"].count(PLACEHOLDER) for m in messages)
        first_user = next((m for m in messages if m["role"] == "user"), None)
        if first_user is None or not any(m["role"] == "assistant" for m in messages):
            raise RecordError("conversations", "needs a human turn and a gpt turn")
        if placeholders == 0 and visuals:
            first_user["content"] = PLACEHOLDER * len(visuals) + "\n" + first_user["content"]
        elif placeholders != len(visuals):
            raise RecordError("conversations", f"{placeholders} <image> placeholders for {len(visuals)} images/videos")
        return [{"id": str(rec.get("id", "?")), "source": path, "visuals": visuals, "messages": messages}]

    return convert_records(path, [(_name(i, r, "id"), r) for i, r in enumerate(records)], convert)


def load_mimicit(instructions: str, images: str, train_config: str | None = None) -> list[dict]:
    """MIMIC-IT `<name>_instructions.json` + its base64 images (JSON id -> base64, or parquet with a `base64`
    column, with pyarrow) -> in-context samples: the in-context examples (`rel_ins_ids`, or the train-config
    file's ins_id -> [ids], whose keys are then the queries) then the query, each chunk `<image> instruction`
    -> answer, all answers supervised. An instruction's images form one visual (several ids: a video's frames
    or an image pair); a sample with several chunks pools every visual (several visuals)."""
    data = read_json(instructions)
    if not isinstance(data, dict) or not isinstance(data.get("data"), dict):
        raise ValueError(f"{instructions}: expected MIMIC-IT {{'meta': ..., 'data': {{ins_id: ...}}}}")
    if images.endswith(".parquet"):
        rows = read_parquet(images)
        id_column = next((c for c in ("id", "image_id", "__index_level_0__") if rows and c in rows[0]), None)
        if id_column is None or "base64" not in (rows[0] if rows else {}):
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
        frames = []
        for image_id in need(ins, "image_ids", list, ins_id):
            if image_id not in pictures:
                raise RecordError(f"{ins_id}.image_ids", f"image {image_id} not in {images}")
            try:
                frames.append(base64.b64decode(pictures[image_id], validate=True))
            except ValueError:
                raise RecordError(f"{ins_id}.image_ids", f"image {image_id} is not valid base64") from None
        return {"frames": frames}, need(ins, "instruction", str, ins_id), need(ins, "answer", str, ins_id)

    def convert(item):
        ins_id, context = item
        chunks = [chunk(c, f"{ins_id}.rel_ins_ids") for c in context or []] + [chunk(ins_id, "data")]
        messages = []
        for visual, instruction, answer in chunks:
            visual["pooled"] = len(visual["frames"]) > 1 or len(chunks) > 1
            messages += [{"role": "user", "content": f"{PLACEHOLDER}\n{instruction}"},
                         {"role": "assistant", "content": answer}]
        return [{"id": ins_id, "source": instructions, "visuals": [c[0] for c in chunks], "messages": messages}]

    return convert_records(instructions, [(k, (k, v)) for k, v in queries.items()], convert)


def load_multiinstruct(path: str, templates, media_root: str | None = None, seed: int = 0,
                       template_index: int | None = None, check_media: bool = True) -> list[dict]:
    """MultiInstruct .jsonl instances + {task_name: [5 instruction templates]} (a dict or a JSON file) ->
    samples. Each instance is written with one of its task's templates, drawn uniformly with a generator
    seeded by `seed` (or template `template_index` for all, as the Sensitivity evaluation needs). Templates
    are str.format strings over the instance's fields ({question}, {text}, {region}); regions are written as
    text (several joined by "||||"); options follow as "\\n\\n[Options]: a||||b", as MultiInstruct does."""
    if isinstance(templates, str):
        templates = read_json(templates)
    root = media_root if media_root is not None else os.path.dirname(path)
    rng = random.Random(seed)

    def convert(rec):
        task = need(rec, "task_name")
        choices = templates.get(task)
        if not choices:
            raise RecordError("task_name", f"no instruction templates for task {task!r}")
        k = template_index if template_index is not None else rng.randrange(len(choices))
        region = rec.get("region") or []
        fields = {key: rec[key] for key in rec if isinstance(rec[key], str)}
        fields["region"] = region if isinstance(region, str) else "||||".join(map(str, region))
        try:
            instruction = choices[k].format(**fields)
        except KeyError as e:
            raise RecordError(e.args[0], f"template {k} of {task} needs it") from None
        except (IndexError, ValueError) as e:
            raise RecordError("task_name", f"template {k} of {task} is not a valid format string ({e})") from None
        if rec.get("options"):
            instruction += "\n\n[Options]: " + "||||".join(map(str, need(rec, "options", list)))
        target = rec.get("target_txt", rec.get("target"))
        if not isinstance(target, str):
            raise RecordError("target_txt", "missing")
        visual = {"frames": [_joined(root, need(rec, "image_path"), check_media, "image_path")], "pooled": False}
        return [_single_turn(str(rec.get("unique_id", "?")), path, [visual], instruction, target)]

    return convert_records(path, [(_name(i, r, "unique_id"), r) for i, r in enumerate(read_json(path))], convert)


def load_natural_instructions(path: str, num_examples: int = 2) -> list[dict]:
    """Natural Instructions task file(s) (`Definition`, `Positive Examples`, `Instances`; a file or a folder
    of them) -> text-only samples: definition + `num_examples` positive examples + the instance's input ->
    its first output. The text-only data MultiInstruct mixes in or trains on first."""
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
            output = need(instance, "output", (list, str))
            output = output[0] if isinstance(output, list) and output else output
            if not isinstance(output, str):
                raise RecordError("output", "empty")
            prompt = f"{definition}{examples}\n\nNow complete the following example.\nInput: {need(instance, 'input')}\nOutput:"
            return [_single_turn(str(instance.get("id", "?")), file, [], prompt.strip(), output)]

        samples += convert_records(file, [(_name(i, r, "id"), r) for i, r in enumerate(task["Instances"])], convert)
    return samples


def load_conversations(path: str, media_root: str | None = None, images: str | None = None, templates=None,
                       draw_marks: bool = False, max_frames: int = 32, seed: int = 0) -> list[dict]:
    """Any supported data file -> samples, the format read from the file's shape: a .jsonl is MultiInstruct
    (needs `templates`); with `images`, MIMIC-IT; a folder or a dict with `Instances` is Natural
    Instructions; a list of records with `conversations` is LLaVA; with `frame_level_caption` or
    `image_path` it is the INST-IT Dataset (-> the four conversation kinds). train.py's `--data` uses this."""
    if os.path.isdir(path):
        return load_natural_instructions(path)
    if path.endswith(".jsonl"):
        if templates is None:
            raise ValueError(f"{path}: a MultiInstruct .jsonl needs its instruction templates (templates=...)")
        return load_multiinstruct(path, templates, media_root, seed)
    if images is not None:
        return load_mimicit(path, images)
    records = read_json(path)
    if isinstance(records, dict) and "Instances" in records:
        return load_natural_instructions(path)
    if isinstance(records, dict) and "data" in records:  # MIMIC-IT: CGD_instructions.json beside CGD.json
        images = re.sub(r"_instructions\.json$", ".json", path)
        if images == path or not os.path.exists(images):
            raise ValueError(f"{path}: MIMIC-IT instructions need their images file (images=..., or "
                             f"<name>.json beside <name>_instructions.json)")
        return load_mimicit(path, images)
    first = records[0] if isinstance(records, list) and records and isinstance(records[0], dict) else {}
    if "conversations" in first:
        return _llava(records, path, media_root, True)
    if "frame_level_caption" in first or "image_path" in first:
        return [s for r in _instit_records(records, path, media_root, True)
                for s in instit_conversations(r, max_frames, draw_marks)]
    raise ValueError(f"{path}: not a format data.py reads (INST-IT, LLaVA, MIMIC-IT, MultiInstruct, Natural "
                     "Instructions; see FORMATS.md)")


# ---------------------------------------------------------------------------------------------------
# Batches: pixels, chat template, labels, collation, mixture sampling.


def preprocess_image(image, cfg: ModelConfig) -> torch.Tensor:
    """An image -> (3, S, S) pixels: padded to a square with the mean colour (LLaVA's "pad"), resized
    (bicubic) to cfg.image_size, normalised with the encoder's mean and std."""
    image = open_image(image)
    w, h = image.size
    side = max(w, h)
    square = Image.new("RGB", (side, side), tuple(round(255 * m) for m in cfg.image_mean))
    square.paste(image, ((side - w) // 2, (side - h) // 2))
    square = square.resize((cfg.image_size, cfg.image_size), Image.BICUBIC)
    x = torch.from_numpy(np.asarray(square, dtype=np.float32) / 255).permute(2, 0, 1)
    return (x - torch.tensor(cfg.image_mean).view(3, 1, 1)) / torch.tensor(cfg.image_std).view(3, 1, 1)


def load_visual(visual: dict, cfg: ModelConfig) -> list[Image.Image]:
    """A sample's visual -> its RGB frames: read from paths/bytes or sampled from a video (cfg.max_frames),
    with Set-of-Marks drawn when the visual has `marks` (one label place per ID across its frames)."""
    marks = visual.get("marks")
    if "video" in visual:
        frames, _ = sample_frames(visual["video"], visual.get("num_frames") or cfg.max_frames)
    else:  # a list of frames (a MIMIC-IT video is one) longer than max_frames is sampled uniformly
        keep = uniform_indices(len(visual["frames"]), cfg.max_frames)
        frames = [open_image(visual["frames"][i]) for i in keep]
        if marks and len(marks) == len(visual["frames"]):
            marks = [marks[i] for i in keep]
    if marks:
        if len(marks) != len(frames):
            raise ValueError(f"{len(marks)} sets of marks for {len(frames)} frames")
        places = {}
        frames = [render_som(f, m or {}, label_places=places) for f, m in zip(frames, marks)]
    return frames


def chat_pieces(messages: list[dict], tokenizer, add_generation_prompt: bool = False) -> list[tuple[str, bool]]:
    """Messages -> the rendered chat as consecutive (text, is_assistant) pieces; joined they are the whole
    prompt. Uses the tokenizer's chat template (each assistant piece is what the template adds for that
    turn: content and end marker), or LLaVA's Vicuna v1 template for tokenizers without one."""
    if not tokenizer.chat_template:
        system = next((m["content"] for m in messages if m["role"] == "system"), PROMPTS["system"])
        pieces = [((tokenizer.bos_token or "") + system, False)]
        for m in messages:
            if m["role"] == "user":
                pieces.append((f" USER: {m['content']} ASSISTANT:", False))
            elif m["role"] == "assistant":
                pieces.append((f" {m['content']}{tokenizer.eos_token or ''}", True))
        return pieces

    def render(msgs, generation_prompt=False):
        return tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=generation_prompt)

    pieces, done = [], ""
    for i, m in enumerate(messages):
        if m["role"] == "assistant" and i > 0:
            prompt, full = render(messages[:i], True), render(messages[:i + 1])
            if not (prompt.startswith(done) and full.startswith(prompt)):
                raise ValueError("the tokenizer's chat template renders earlier turns differently as the chat grows; "
                                 "assistant-only labels cannot be placed (set tokenizer.chat_template to a simpler one)")
            pieces += [(prompt[len(done):], False), (full[len(prompt):], True)]
            done = full
    final = render(messages, add_generation_prompt)
    pieces.append((final[len(done):], False))
    return pieces


def tokenize_chat(messages, tokenizer, add_generation_prompt=False) -> tuple[list[int], list[int]]:
    """Messages -> (token ids, labels): the whole chat tokenized at once (as at inference), each token
    labelled with its id if it starts inside an assistant piece, else -100. Checked: every assistant turn
    gets tokens whose text contains its content."""
    pieces = chat_pieces(messages, tokenizer, add_generation_prompt)
    text = "".join(p for p, _ in pieces)
    if not tokenizer.is_fast:
        raise ValueError("assistant-only labels need a fast tokenizer (AutoTokenizer.from_pretrained(..., use_fast=True))")
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids, starts = encoded["input_ids"], [s for s, _ in encoded["offset_mapping"]]
    labels, position, turn = [-100] * len(ids), 0, 0
    for piece, is_assistant in pieces:
        end = position + len(piece)
        if is_assistant:
            inside = [k for k, s in enumerate(starts) if position <= s < end]
            for k in inside:
                labels[k] = ids[k]
            if not inside:
                raise ValueError(f"assistant turn {turn} gets no tokens from the chat template: its label mask "
                                 "would be empty")
            content = [m for m in messages if m["role"] == "assistant"][turn]["content"]
            decoded = tokenizer.decode([ids[k] for k in inside])
            if "".join(content.split()) not in "".join(decoded.split()):
                raise ValueError(f"assistant turn {turn}: its labelled tokens {decoded[:60]!r} do not cover its text "
                                 f"{content[:60]!r}; the template or tokenizer merges it with the prompt")
            turn += 1
        position = end
    return ids, labels


def encode_sample(sample: dict, tokenizer, cfg: ModelConfig, max_length: int = 6144,
                  add_generation_prompt: bool = False) -> dict | None:
    """A sample -> {"input_ids": (L,), "labels": (L,), "pixel_values": (F, 3, S, S) | None, "visual_frames":
    [frames per visual], "visual_pooled": [bool], "id"}: the chat template applied, labels on assistant
    tokens only, each `<image>` expanded to num_visual_tokens(cfg, frames, pooled) image tokens.

    Longer than `max_length` (INST-IT's 6K): trailing text-only turns are dropped, then the text after the
    last visual token is cut; a sample that still does not fit (or would keep no assistant token) is
    dropped: None, with the reason logged. `add_generation_prompt=True` encodes a prompt for generation
    (ends with a user turn; no labels)."""
    name = sample.get("id", "?")
    visuals = sample.get("visuals", [])
    try:
        frames = [load_visual(v, cfg) for v in visuals]
    except ValueError as e:
        raise ValueError(f"sample {name}: {e}") from e
    pooled = [bool(v.get("pooled", len(f) > 1 or len(visuals) > 1)) for v, f in zip(visuals, frames)]
    if any(len(f) > cfg.max_frames for f in frames):
        raise ValueError(f"sample {name}: a visual has {max(map(len, frames))} frames, more than max_frames="
                         f"{cfg.max_frames}; sample fewer (sample_frames)")
    counts = [num_visual_tokens(cfg, len(f), p) for f, p in zip(frames, pooled)]
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
        length = len(ids) + sum(counts) - len(counts)
        last_user = max((i for i, m in enumerate(messages) if m["role"] == "user"), default=0)
        droppable = (not add_generation_prompt and cfg.image_token not in "".join(m["content"] for m in messages[last_user:])
                     and any(m["role"] == "assistant" for m in messages[:last_user]))
        if length <= max_length or not droppable:
            break
        messages = messages[:last_user]  # drop the last question and its answer
    if ids.count(image_id) != len(visuals):
        raise ValueError(f"sample {name}: {len(visuals)} visuals but {ids.count(image_id)} {cfg.image_token} tokens "
                         "after tokenization; add the image token to the tokenizer (model.build_model does)")
    input_ids, target, k = [], [], 0
    for token, label in zip(ids, labels):
        if token == image_id:  # the k-th placeholder becomes the k-th visual's tokens
            input_ids += [image_id] * counts[k]
            target += [-100] * counts[k]
            k += 1
        else:
            input_ids.append(token)
            target.append(label)
    if len(input_ids) > max_length:
        last_visual = max((i for i, t in enumerate(input_ids) if t == image_id), default=-1)
        if add_generation_prompt or last_visual >= max_length or all(t == -100 for t in target[:max_length]):
            log.warning("sample %s dropped: %d tokens (%d visual) do not fit max_length=%d even with its text "
                        "shortened; raise max_length or use fewer frames", name, len(input_ids), sum(counts), max_length)
            return None
        input_ids, target = input_ids[:max_length], target[:max_length]
    if not add_generation_prompt and all(t == -100 for t in target):
        raise ValueError(f"sample {name}: no assistant tokens to learn from (its label mask is empty)")
    pixels = [preprocess_image(f, cfg) for visual in frames for f in visual]
    return {"input_ids": torch.tensor(input_ids), "labels": torch.tensor(target),
            "pixel_values": torch.stack(pixels) if pixels else None,
            "visual_frames": [len(f) for f in frames], "visual_pooled": pooled, "id": name,
            "source": sample.get("source", "?")}


def collate(samples: list, pad_token_id: int, padding_side: str = "right") -> dict | None:
    """encode_sample outputs -> a batch for LlavaStyleModel.forward(**batch): input_ids, attention_mask,
    labels (B, L); pixel_values (all frames in order, or None); visual_frames / visual_pooled over all visuals.
    Right padding for training, left for generation. Dropped samples (None) are left out; None if all are."""
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
            "visual_frames": [n for s in samples for n in s["visual_frames"]],
            "visual_pooled": [p for s in samples for p in s["visual_pooled"]]}


def sample_lengths(samples: list[dict], tokenizer, cfg: ModelConfig) -> list[int]:
    """Estimated token counts (text tokens + visual tokens; an unread video counts as cfg.max_frames frames)
    for grouping by length, without reading any media."""
    texts = ["\n".join(m["content"] for m in s["messages"]) for s in samples]
    text_lengths = [len(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]] if texts else []
    out = []
    for s, n in zip(samples, text_lengths):
        visuals = s.get("visuals", [])
        frames = [v.get("num_frames") or cfg.max_frames if "video" in v else len(v["frames"]) for v in visuals]
        out.append(n + 4 * len(s["messages"]) + sum(num_visual_tokens(cfg, f, v.get("pooled", f > 1 or len(visuals) > 1)) - 1
                                                    for f, v in zip(frames, visuals)))
    return out


class InstructionDataset(torch.utils.data.Dataset):
    """Samples -> encode_sample outputs (None for a dropped over-long sample). Media are read, sampled and
    marked in __getitem__, i.e. in the DataLoader's workers."""

    def __init__(self, samples: list[dict], tokenizer, cfg: ModelConfig, max_length: int = 6144):
        self.samples, self.tokenizer, self.cfg, self.max_length = samples, tokenizer, cfg, max_length

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, i):
        return encode_sample(self.samples[i], self.tokenizer, self.cfg, self.max_length)

    def lengths(self) -> list[int]:
        return sample_lengths(self.samples, self.tokenizer, self.cfg)


class MixtureSampler(torch.utils.data.Sampler):
    """Batches of indices into ConcatDataset(sources), sources drawn by ratio and batches grouped by length:
    INST-IT data mixed with general and text-only data (INST-IT 2.4, MultiInstruct's mixed tuning).

    `lengths[s][i]`: estimated length of sample i of source s (InstructionDataset.lengths); a yielded index
    is offsets[s] + i, as ConcatDataset numbers them. Each batch slot draws its source with probability
    ratios[s]; a source gives its samples in a fresh seeded permutation per pass. Slots come in groups of
    `batch_size * group` sorted by length and cut into batches whose order is then shuffled, so a batch
    holds similar lengths (little padding). The stream is a pure function of the arguments (a seeded
    torch.Generator, no global seed): `start_batch=k` yields exactly batches k.. of an uninterrupted run,
    which is how training resumes. `num_batches` defaults to one pass over all samples."""

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
        self.num_batches = num_batches or math.ceil(len(self.lengths) / batch_size)
        self.start_batch = start_batch

    def __len__(self):
        return max(0, self.num_batches - self.start_batch)

    def __iter__(self):
        return itertools.islice(self.stream(), self.start_batch, self.num_batches)

    def stream(self):
        """The endless batch stream; __iter__ is a slice of it."""
        g = torch.Generator().manual_seed(self.seed)
        probs = torch.tensor(self.ratios, dtype=torch.float64)
        orders, used = [[] for _ in self.sizes], [0] * len(self.sizes)
        while True:
            picks = []
            for s in torch.multinomial(probs, self.batch_size * self.group, replacement=True, generator=g).tolist():
                if used[s] == len(orders[s]):  # a new pass over source s
                    orders[s], used[s] = torch.randperm(self.sizes[s], generator=g).tolist(), 0
                picks.append(self.offsets[s] + orders[s][used[s]])
                used[s] += 1
            if self.group_by_length:
                picks.sort(key=lambda i: self.lengths[i])
            batches = [picks[k:k + self.batch_size] for k in range(0, len(picks), self.batch_size)]
            for k in torch.randperm(len(batches), generator=g).tolist():
                yield batches[k]

    def source_of(self, index: int) -> int:
        """The source a yielded index belongs to."""
        return max(s for s, offset in enumerate(self.offsets) if offset <= index and self.sizes[s])

    def padded_fraction(self, batches=None) -> float:
        """Fraction of padded tokens (by estimated lengths) over `batches`, default this sampler's batches."""
        padded = total = 0
        for batch in batches if batches is not None else self:
            width = max(self.lengths[i] for i in batch)
            padded += sum(width - self.lengths[i] for i in batch)
            total += width * len(batch)
        return padded / max(total, 1)


# ---------------------------------------------------------------------------------------------------
# The demo's synthetic world (train.py --demo): shapes with exact masks, track IDs and attributes, so that
# an oracle can annotate them and a bench can ask about them. One frame is an image, 8-16 frames a video.

COLOURS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (50, 80, 230), "yellow": (235, 215, 40),
           "purple": (140, 60, 200), "orange": (245, 140, 30), "white": (245, 245, 245), "black": (25, 25, 25)}
SHAPES = ("circle", "square", "triangle", "diamond")
SIZES = {"tiny": 0.11, "small": 0.14, "medium": 0.17, "large": 0.21}  # radius as a fraction of the image side:
# even a tiny shape (21 px across at 96 px) stays larger than its ID label box (about 12 px)
MOTIONS = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1), "still": (0, 0)}
QUADRANTS = ("top left", "top right", "bottom left", "bottom right")
ATTRIBUTES = {"colour": COLOURS, "shape": SHAPES, "size": SIZES}  # what an instance is, and the values


def encode_rle(mask: np.ndarray) -> dict:
    """(h, w) bool mask -> COCO RLE with uncompressed counts (runs of 0s and 1s, column-major, 0s first)."""
    flat = np.asarray(mask, bool).ravel(order="F").astype(np.int8)
    edges = np.flatnonzero(np.diff(flat)) + 1
    counts = np.diff(np.concatenate([[0], edges, [flat.size]]))
    return {"size": list(mask.shape), "counts": ([0] if flat[0] else []) + counts.tolist()}


def _shape_polygon(shape: str, x: float, y: float, r: float) -> list[tuple[float, float]]:
    if shape == "circle":
        return [(x + r * math.cos(a), y + r * math.sin(a)) for a in np.linspace(0, 2 * math.pi, 32, endpoint=False)]
    corners = {"square": [(-0.85, -0.85), (0.85, -0.85), (0.85, 0.85), (-0.85, 0.85)],
               "triangle": [(0, -1.1), (1.1, 0.85), (-1.1, 0.85)],
               "diamond": [(0, -1.15), (1.15, 0), (0, 1.15), (-1.15, 0)]}[shape]
    return [(x + r * dx, y + r * dy) for dx, dy in corners]


def quadrant(x: float, y: float, size: int) -> str:
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
            ImageDraw.Draw(canvas).polygon(_shape_polygon(instances[i]["shape"], *track[t], r), fill=1)
            painted = np.array(canvas)
            pixels[painted], owner[painted] = COLOURS[instances[i]["colour"]], i
        frames.append(Image.fromarray(pixels.clip(0, 255).astype(np.uint8)))
        masks.append({i: owner == i for i in instances if (owner == i).sum() >= 4})
        centres.append({i: tracks[i][0][t] for i in masks[-1]})
    return {"instances": instances, "frames": frames, "masks": masks, "centres": centres, "size": size}


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
    """Held-out scenes (their frames in frames_root/<video_id>/: SoM frames, or raw ones for --no-som) -> the four INST-IT Bench splits as flat
    JSON files in out_dir (image_multi_choice.json, ...): every question both MC (4 options) and OE."""
    rng, splits = random.Random(seed), {name: [] for name in BENCH_SPLITS}
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
    os.makedirs(out_dir, exist_ok=True)
    for name, rows in splits.items():
        with open(os.path.join(out_dir, f"{name}.json"), "w") as f:
            json.dump(rows, f, indent=1)
    return {name: len(rows) for name, rows in splits.items()}


# ---------------------------------------------------------------------------------------------------
# Command line: look at marks and at converted data.


def main(argv=None):
    parser = argparse.ArgumentParser(description="data.py: Set-of-Marks rendering and the data formats of INST-IT")
    commands = parser.add_subparsers(dest="command", required=True)
    som = commands.add_parser("som", help="draw Set-of-Marks on an image or a frame folder and save the result")
    som.add_argument("source", help="an image file or a folder of frames")
    som.add_argument("--masks", required=True, help="JSON: {id: RLE|box|polygon} for an image, "
                                                    "{frame_name: {id: ...}} for a folder")
    som.add_argument("--out", required=True, help="output folder")
    som.add_argument("--fill", type=float, default=0.25, help="opacity of the mask fill (0: contour only)")
    show = commands.add_parser("show", help="read a data file in any supported format and print its conversations")
    show.add_argument("path")
    show.add_argument("--media-root")
    show.add_argument("--images", help="MIMIC-IT: the base64 images file")
    show.add_argument("--templates", help="MultiInstruct: JSON {task_name: [instruction templates]}")
    show.add_argument("-n", type=int, default=2, help="how many conversations to print")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.command == "som":
        masks = read_json(args.masks)
        os.makedirs(args.out, exist_ok=True)
        if os.path.isdir(args.source):
            names = sorted((n for n in os.listdir(args.source) if n.lower().endswith(IMAGE_EXTS)), key=natural_key)
            jobs = [(os.path.join(args.source, n), masks.get(n, {})) for n in names]
        else:
            jobs = [(args.source, masks)]
        places = {}
        for file, instances in jobs:
            out = os.path.join(args.out, os.path.basename(file))
            render_som(file, instances, fill=args.fill, label_places=places).save(out)
            print(f"{out}: {len(instances)} marks")
    else:
        samples = load_conversations(args.path, args.media_root, args.images, args.templates)
        print(f"{args.path}: {len(samples)} conversations")
        shown = lambda x: x if isinstance(x, str) else f"<{len(x)} bytes>" if isinstance(x, bytes) else "<image>"
        for s in samples[:args.n]:
            visuals = [{k: [shown(f) for f in v] if k == "frames" else v for k, v in visual.items() if k != "marks"}
                       for visual in s["visuals"]]
            print(json.dumps(dict(s, visuals=visuals), indent=1, ensure_ascii=False))


if __name__ == "__main__":
    main()
