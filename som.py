"""Set-of-Marks visual prompts (INST-IT 2.1): instance masks, boxes or polygons -> numbered marks on frames.

Read top to bottom: a frame and an instance ID, a mask (COCO RLE, box, polygon), where an ID's label goes
(`label_position`), its colour (`id_colour`), the style (`MarkStyle`), the drawing (`render_som`), the command line:

    python som.py FRAMES --masks M.json --out DIR    # FRAMES: an image or a folder of frames

An instance keeps its ID, colour and label place on every frame of a video, so "[2]" means the same object at <1>
and at <8>. data.py draws marks when it loads masked data, annotate.py before GPT sees a frame. Needs numpy and pillow.
"""
import argparse
import colorsys
import io
import json
import math
import os
import re
import warnings
import zlib
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw, ImageFont

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")


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


def frame_files(folder: str) -> list[str]:
    """The image files of a frame folder, in frame order ("frame_2" before "frame_10")."""
    return sorted((n for n in os.listdir(folder) if n.lower().endswith(IMAGE_EXTS)), key=natural_key)


def natural_key(name: str) -> list:
    """Sort key putting "frame_2" before "frame_10"."""
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


def instance_key(key) -> str:
    """Instance-caption / mask key -> canonical ID string: "01" -> "1", "1, 2" -> "1,2" (a caption of several)."""
    parts = [p.strip() for p in str(key).split(",")]
    return ",".join(str(int(p)) if p.isdigit() else p for p in parts)


def named_ids(text: str) -> set[int]:
    """The instance IDs a text names as [ID] (several: [3] [4])."""
    return {int(i) for i in re.findall(r"\[(\d+)\]", text)}


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
        chars, counts, x, k = counts, [], 0, 0
        for c in (ord(ch) - 48 for ch in chars):
            x |= (c & 0x1F) << (5 * k)
            k += 1
            if c & 0x20:  # more 5-bit groups of this count follow
                continue
            if c & 0x10:
                x |= -1 << (5 * k)  # sign-extend
            counts.append(x + counts[-2] if len(counts) > 2 else x)
            x, k = 0, 0
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
        if x1 < x0 or y1 < y0:  # an empty mask is legal (absent from a frame), a reversed box is not
            raise ValueError(f"instance {instance_id}: box {list(spec)} has x1 < x0 or y1 < y0 "
                             "(expected [x0, y0, x1, y1])")
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
    the border (the distance-transform peak; the image edge counts as border), so it lies inside C-shapes, rings
    and thin bars, where a centroid may not. Ties go to the point nearest the middle of the plateau. Works on the
    mask's bounding box, downsampled to <= LABEL_GRID px, so 4K frames stay cheap. `grid` (a ViT's patch size):
    moved to the nearest centre of a grid cell inside the mask, so the label lies whole in one patch token."""
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


@dataclass(frozen=True)
class MarkStyle:
    """How marks look. The defaults draw INST-IT's published frames: a light tint and a thin contour in the
    ID's colour, the ID in a small label box whose digits contrast with it; sizes scale with the frame."""
    fill: float = 0.25                # opacity of the tint over the mask (0: contour only)
    colour: tuple | None = None       # one RGB colour for every mark; None: each ID its own (id_colour)
    line_width: int | None = None     # contour width in px; None: min(w, h) / 250
    font_size: int | None = None      # label text size in px; None: min(w, h) / 16, at least 8
    grid: int | None = None           # put labels on patch centres of this size (label_position)


def render_som(image, instances: dict, style: MarkStyle = MarkStyle(), label_places: dict | None = None
               ) -> Image.Image:
    """An image and {instance ID: mask | RLE | box | polygon} -> a copy with Set-of-Marks drawn (INST-IT 2.1):
    a light fill and a contour in the ID's colour, and the ID in a label box at `label_position`.

    Colour and label come from the instance/track ID, so they stay fixed across a video's frames. Pass the same
    `label_places` dict for every frame: a label then stays where it was while that point is inside the mask.
    Sizes scale with the image (224 px to 4K) unless `style` fixes them. Empty masks are skipped with a warning."""
    image = open_image(image)
    w, h = image.size
    line_width = style.line_width or max(1, round(min(w, h) / 250))
    # font: 14 px at 224, 135 px at 4K; the floor for tiny frames
    font_size = style.font_size or max(8, round(min(w, h) / 16))
    pixels = np.array(image)  # (H, W, 3) uint8; each instance is drawn inside its bounding box only
    places = {} if label_places is None else label_places
    labels = []
    for instance_id, spec in instances.items():
        instance_id = instance_key(instance_id)  # "02" is [2]: same label, colour and place
        mask = instance_mask(spec, (w, h), instance_id)
        if not mask.any():
            warnings.warn(f"instance {instance_id}: empty mask, no mark drawn")
            continue
        colour = np.array(style.colour or id_colour(instance_id), np.float32)
        rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
        y0, y1 = max(0, rows[0] - 1), rows[-1] + 2
        x0, x1 = max(0, cols[0] - 1), cols[-1] + 2
        crop, region = mask[y0:y1, x0:x1], pixels[y0:y1, x0:x1]  # region is a view into pixels
        region[crop] = (region[crop] * (1 - style.fill) + colour * style.fill).round().astype(np.uint8)
        region[crop & ~_erode(crop, line_width)] = colour  # the contour
        place = places.get(instance_id)
        if place is None or not (place[0] < w and place[1] < h and mask[place[1], place[0]]):
            place = label_position(mask, style.grid)
        places[instance_id] = place
        labels.append((instance_id, place, tuple(int(c) for c in colour)))
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


def main(argv=None):
    p = argparse.ArgumentParser(description="som.py: draw Set-of-Marks (INST-IT 2.1) on an image or on every frame "
                                            "of a folder, one label place per ID across the frames")
    p.add_argument("source", help="an image file or a folder of frames")
    p.add_argument("--masks", required=True, help="JSON: {ID: RLE | box | polygon} for an image, "
                                                  "{frame file name: {ID: ...}} for a folder")
    p.add_argument("--out", required=True, help="output folder for the marked frames")
    p.add_argument("--fill", type=float, default=MarkStyle.fill, help="opacity of the mask tint (0: contour only)")
    args = p.parse_args(argv)
    if not 0 <= args.fill <= 1:
        p.error(f"--fill must be between 0 and 1, got {args.fill}")
    try:
        with open(args.masks, encoding="utf-8") as f:
            masks = json.load(f)
    except (OSError, ValueError) as e:
        raise SystemExit(f"{args.masks}: cannot read the masks ({e})")
    if os.path.isdir(args.source):
        names = frame_files(args.source)
        if not names or not set(masks) & set(names):
            raise SystemExit(f"{args.source}: no frames ({'/'.join(IMAGE_EXTS)})" if not names else
                             f"{args.masks}: no key names a frame of {args.source} (keys {sorted(masks)[:3]}, frames "
                             f"{names[:3]}); key the masks by frame file name")
        jobs = [(os.path.join(args.source, n), masks.get(n, {})) for n in names]
    else:
        jobs = [(args.source, masks)]
    os.makedirs(args.out, exist_ok=True)
    places = {}
    for file, instances in jobs:
        out = os.path.join(args.out, os.path.basename(file))
        render_som(file, instances, MarkStyle(fill=args.fill), label_places=places).save(out)
        print(f"{out}: {len(instances)} marks")


if __name__ == "__main__":
    main()
