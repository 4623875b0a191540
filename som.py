"""Set-of-Marks visual prompts (INST-IT 2.1): instance masks, boxes or polygons -> numbered marks on frames.

    python som.py FRAMES --masks M.json --out DIR    # FRAMES: an image or a folder of frames

An instance keeps its ID, colour and label place on every frame of a video ("[2]" is one object at <1> and <8>).
data.py draws marks when it loads masked data, annotate.py before GPT sees a frame. Needs numpy, scipy and pillow."""
import argparse
import colorsys
import functools
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
from scipy import ndimage

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
    return [int(t) if t.isdecimal() else t for t in re.split(r"(\d+)", name)]


def instance_key(key) -> str:
    """Instance-caption / mask key -> canonical ID string: "01" -> "1", "1, 2" -> "1,2" (a caption of several)."""
    if any(c.isdigit() and not c.isdecimal() for c in str(key)):  # "⑦", "²": digits that int() cannot read
        raise ValueError(f"instance {key}: not a number int() can read; write the ID in digits 0-9")
    return ",".join(str(int(p)) if p.isdecimal() else p for p in re.split(r"\s*,\s*", str(key).strip()))


def named_ids(text: str) -> set[int]:
    """The instance IDs a text names as [ID] (several: [3] [4])."""
    return {int(i) for i in re.findall(r"\[(\d+)\]", text)}


def decode_rle(rle: dict) -> np.ndarray:
    """COCO RLE {"size": [h, w], "counts": str | list} -> (h, w) bool mask, as pycocotools decodes it.

    Counts alternate runs of 0s and 1s (0s first) in column-major order. A string packs each count in 5-bit groups
    (6th bit: more follows) offset by 48, and from the 4th count on stores the difference to the count two before."""
    h, w = rle["size"]
    counts = rle["counts"]
    if isinstance(counts, (str, bytes)):
        chars = counts.decode("ascii") if isinstance(counts, bytes) else counts
        counts, x, k = [], 0, 0
        for c in (ord(ch) - 48 for ch in chars):
            x |= (c & 0x1F) << (5 * k)
            k += 1
            if not c & 0x20:  # the count's last 5-bit group (else more follow)
                if c & 0x10:
                    x |= -1 << (5 * k)  # sign-extend
                counts.append(x + counts[-2] if len(counts) > 2 else x)
                x, k = 0, 0
    if sum(counts) != h * w or min(counts, default=0) < 0:
        raise ValueError(f"RLE counts sum to {sum(counts)}, but size {h}x{w} needs {h * w}: a corrupt or "
                         "mislabelled RLE; encode the mask again (pycocotools.mask.encode)")
    return np.repeat(np.arange(len(counts)) % 2 == 1, counts).reshape(w, h).T


def instance_mask(spec, size: tuple, instance_id="?") -> np.ndarray:
    """A mask (bool array, RLE dict, {"mask": RLE}), box ([x0, y0, x1, y1], {"box": ...}, COCO {"bbox": [x, y, w, h]})
    or polygon ([[x, y], ...], flat [x, y, x, y, ...], COCO's list of flat ones) -> (H, W) bool mask; size: (W, H)."""
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
        if key == "bbox":  # COCO [x, y, w, h] as pycocotools draws it: edges to 1/5 px, then the pixels centred inside
            x, y, bw, bh = spec["bbox"]
            x0, x1, y0, y1 = (math.ceil(math.floor(5 * v + 0.5) / 5 - 0.5) for v in (x, x + bw, y, y + bh))
            return instance_mask([min(x0, x1), min(y0, y1), max(x0, x1), max(y0, y1)], size, instance_id)
        return instance_mask(spec[key], size, instance_id)
    elif isinstance(spec, np.ndarray):
        mask = np.asarray(spec, bool)
    elif isinstance(spec, (list, tuple)) and len(spec) == 4 and all(isinstance(v, (int, float)) for v in spec):
        x0, y0, x1, y1 = spec
        if x1 < x0 or y1 < y0:  # an empty mask is legal (absent from a frame), a reversed box is not
            raise ValueError(f"instance {instance_id}: box {list(spec)} has x1 < x0 or y1 < y0 "
                             "(expected [x0, y0, x1, y1])")
        mask = np.zeros((h, w), bool)
        mask[max(0, math.floor(y0)):max(0, math.ceil(y1)), max(0, math.floor(x0)):max(0, math.ceil(x1))] = True
    elif isinstance(spec, (list, tuple)) and spec:
        points = not isinstance(spec[0], (int, float)) and len(spec[0]) == 2 and isinstance(spec[0][0], (int, float))
        flats = [spec] if isinstance(spec[0], (int, float)) else spec  # one flat polygon, or COCO's list of them
        polygons = [[tuple(p) for p in spec]] if points else [list(zip(p[0::2], p[1::2])) for p in flats]
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


def coco_instances(coco, image_id: int, min_score: float = 0.5) -> dict:
    """A COCO results list or instances file -> {ID: segmentation or {"bbox": ...}} of one image for render_som:
    IDs 1..N in descending score (results scoring >= min_score) or in file order (instances)."""
    records = coco if isinstance(coco, list) else coco["annotations"]
    for i, r in enumerate(records):
        if not (isinstance(r, dict) and "image_id" in r and (r.get("segmentation") or "bbox" in r)):
            raise ValueError(f"record {i}: not a COCO result (needs image_id, segmentation or bbox): {r!s:.40}")
    chosen = sorted((r for r in records if r["image_id"] == image_id and r.get("score", 1) >= min_score),
                    key=lambda r: -r.get("score", 1))  # sorted is stable: instances keep their file order
    if not chosen:
        raise ValueError(f"no record of image_id {image_id} scores {min_score}+: set --image-id or lower --min-score")
    return {i + 1: r.get("segmentation") or {"bbox": r["bbox"]} for i, r in enumerate(chosen)}


LABEL_GRID = 64  # label_position's working resolution: 1/64 of the mask is precise enough for a label
LABEL_COVER = 0.25  # render_som: a label hides at most this share of its own instance's mask (but on a ViT's grid)


def label_position(mask: np.ndarray, grid: int | None = None, size=(1, 1), taken=(), max_cover=1.0, prefer=None):
    """(H, W) bool mask -> (x, y) where its ID label goes: the distance-transform peak of its largest component
    (the image edge counts as border), inside C-shapes, rings and thin bars where a centroid may not be. Works on the
    bounding box cut into <= LABEL_GRID cells a side (finer for thin shapes), so 4K frames stay cheap. A label box of
    `size` (w, h) must not overlap the `taken` boxes [(x, y, w, h)] nor hide more than `max_cover` of the mask: else
    the next-deepest point, then the one beside the mask nearest the peak; None if none fits. `prefer` (its place on
    the frame before) stays if inside and fitting. `grid` (a ViT's patch size): cell centres, whole in one token."""
    mask = np.asarray(mask, bool)
    h, w = mask.shape
    rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
    if not len(rows):
        raise ValueError("an empty mask has no label position")
    crop = mask[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1]
    area = np.count_nonzero(crop)

    def fits(xs, ys):  # which label centres (arrays) keep their box off `taken` and hide at most max_cover
        x0, y0 = label_box(np.asarray(xs), np.asarray(ys), size, (w, h))
        tx, ty, tw, th = np.reshape(taken, (-1, 4)).T[..., None]  # each taken box against each candidate
        ok = ~((x0 < tx + tw) & (tx < x0 + size[0]) & (y0 < ty + th) & (ty < y0 + size[1])).any(0)
        if size[0] * size[1] > max_cover * area:  # a label this large may hide too much: count what it hides
            hidden = np.pad(crop.cumsum(0, dtype=np.int32).cumsum(1), ((1, 0), (1, 0)))  # mask pixels above-left
            a, b = (np.minimum(np.maximum(v - cols[0], 0), crop.shape[1]) for v in (x0, x0 + size[0]))
            c, d = (np.minimum(np.maximum(v - rows[0], 0), crop.shape[0]) for v in (y0, y0 + size[1]))
            ok &= hidden[d, b] - hidden[c, b] - hidden[d, a] + hidden[c, a] <= max_cover * area
        return ok

    if prefer is not None and prefer[0] < w and prefer[1] < h and mask[prefer[1], prefer[0]] and fits(*zip(prefer)):
        return prefer
    # cells of LABEL_GRID a side, or 1/6 of a thin shape's width (area / longest side) so its middle line stays
    f = max(1, min(math.ceil(max(crop.shape) / LABEL_GRID), area // max(crop.shape) // 6))
    padded = np.pad(crop, [(0, -n % f) for n in crop.shape])  # to a multiple of f
    blocks = padded.reshape(padded.shape[0] // f, f, padded.shape[1] // f, f)
    small = blocks.all((1, 3))  # a block counts only when wholly inside: a narrow gap in a C stays open
    small = small if small.any() else blocks.any((1, 3))  # a shape thinner than a block: "any" keeps thin bars alive
    components, _ = ndimage.label(small)  # the largest 4-connected part (the first in raster order among equals)
    small = components == np.bincount(components.ravel())[1:].argmax() + 1
    depth = ndimage.distance_transform_edt(np.pad(small, 1))[1:-1, 1:-1]  # to the nearest False
    peaks = np.argwhere(depth == depth.max())
    centre = peaks.mean(0)
    peak = peaks[np.argmin(((peaks - centre) ** 2).sum(1))]  # the deepest cell nearest the centre of such cells
    ys, xs = (np.minimum(peak * f + f // 2, np.array(crop.shape) - 1) + (rows[0], cols[0]))[:, None]
    centres = np.argwhere(mask[grid // 2::grid, grid // 2::grid]) * grid + grid // 2 if grid else []  # (y, x)
    if len(centres):  # on a grid: the cell centres inside the mask, nearest the peak first (else keep the peak)
        ys, xs = centres[np.argsort(((centres - (ys[0], xs[0])) ** 2).sum(1), kind="stable")].T
    ok = fits(xs, ys)  # the peak or, on a grid, every centre: the first fits unless the frame is crowded
    if not ok[0] and not len(centres):  # then every cell and those beside the mask, the deepest and central first
        m = math.ceil(max(size) / f)
        depth = np.pad(depth, m).ravel()
        cells = np.indices((small.shape[0] + 2 * m, small.shape[1] + 2 * m)).reshape(2, -1).T - m
        order = np.lexsort((((cells - centre) ** 2).sum(1), -depth))
        ys, xs = np.clip(cells[order] * f + f // 2 + (rows[0], cols[0]), 0, (h - 1, w - 1)).T
        ok = fits(xs, ys)
    if not ok.any():
        return None
    i = ok.argmax()  # the first that fits
    return int(xs[i]), int(ys[i])


@functools.cache  # every frame of a video draws the same IDs: measuring the text once saves most of a label's cost
def label_shape(text: str, size: int) -> tuple:
    """A label's text at a font size -> (font, the text's offset in its box, the box's (w, h))."""
    font = ImageFont.load_default(size=size)
    left, top, right, bottom = font.getbbox(text)
    pad = max(2, size // 4)
    return font, (pad - left, pad - top), (right - left + 2 * pad, bottom - top + 2 * pad)


def label_box(x, y, size, frame):
    """A label box of `size` (w, h) centred at (x, y) and moved inside a `frame` (w, h) -> its top-left corner."""
    return tuple(np.minimum(np.maximum(v - s // 2, 0), max(0, n - s)) for v, s, n in zip((x, y), size, frame))


def id_colour(instance_id) -> tuple[int, int, int]:
    """A fixed, saturated RGB colour per instance ID (golden-ratio hue steps keep neighbouring IDs apart)."""
    key = str(instance_id).strip()
    n = int(key) if key.isdecimal() else zlib.crc32(key.encode())
    return tuple(round(c * 255) for c in colorsys.hsv_to_rgb((n * 0.618033988749895) % 1.0, 0.85, 0.95))


@dataclass(frozen=True)
class MarkStyle:
    """How marks look. The defaults draw INST-IT's published frames: a light tint and a thin contour in the
    ID's colour, the ID in a small label box whose digits contrast with it; sizes scale with the frame."""
    fill: float = 0.25                # opacity of the tint over the mask (0: contour only)
    colour: tuple | None = None       # one RGB colour for every mark; None: each ID its own (id_colour)
    line_width: int | None = None     # contour width in px; None: min(w, h) / 250
    font_size: int | None = None      # label text size in px; None: min(w, h) / 32, at least 8
    grid: int | None = None           # put labels on patch centres of this size (label_position)


def render_som(image, instances: dict, style: MarkStyle = MarkStyle(), label_places: dict | None = None) -> Image.Image:
    """An image and {instance ID: mask | RLE | box | polygon} -> a copy with Set-of-Marks drawn (INST-IT 2.1):
    a light fill and a contour in the ID's colour, and the ID in a label box at `label_position`, clear of the
    other labels and hiding at most LABEL_COVER of its instance (smaller labels where the frame is crowded). Pass
    the same `label_places` dict for every frame of a video: a label then stays where it was while it fits there.
    The result's info["label_boxes"] holds each ID's label box (x, y, w, h)."""
    image = open_image(image)
    w, h = image.size
    line_width = max(1, style.line_width or round(min(w, h) / 250))
    font_size = style.font_size or max(8, round(min(w, h) / 32))  # 10 px at 336, 34 px at 1080p
    sizes = [max(min(font_size, 8), round(font_size * 0.75 ** k)) for k in range(3)]  # smaller ones when crowded
    pixels = np.array(image)  # (H, W, 3) uint8; each instance is drawn inside its bounding box only
    places = {} if label_places is None else label_places
    cover = 1.0 if style.grid else LABEL_COVER  # on a ViT's grid a label fills its patch, however small the object
    labels, taken = [], []  # taken: the label boxes (x, y, w, h) placed so far
    for instance_id, spec in instances.items():
        instance_id = instance_key(instance_id)  # "02" is [2]: same label, colour and place
        mask = instance_mask(spec, (w, h), instance_id)
        rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
        if not len(rows):
            warnings.warn(f"instance {instance_id}: empty mask, no mark drawn")
            continue
        colour = np.array(style.colour or id_colour(instance_id), np.float32)
        box = np.s_[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1]  # the mask is empty outside: eroding the box is exact
        crop, region = mask[box], pixels[box]  # region is a view into pixels
        region[crop] = (region[crop] * (1 - style.fill) + colour * style.fill).round().astype(np.uint8)
        region[crop & ~ndimage.binary_erosion(crop, iterations=line_width)] = colour  # the contour
        for size in sizes:
            font, offset, label = label_shape(instance_id, size)
            place = label_position(mask, style.grid, label, taken, cover, places.get(instance_id))
            if place:
                break
        else:  # no place fits in a crowded frame: the deepest point, over another label
            place = label_position(mask, style.grid, label, prefer=places.get(instance_id))
        places[instance_id] = place
        taken.append((*(int(v) for v in label_box(*place, label, (w, h))), *label))
        labels.append((instance_id, font, offset, taken[-1], tuple(int(c) for c in colour)))
    out = Image.fromarray(pixels)
    draw = ImageDraw.Draw(out)
    for text, font, (dx, dy), (x0, y0, bw, bh), colour in labels:
        ink = (0, 0, 0) if 0.299 * colour[0] + 0.587 * colour[1] + 0.114 * colour[2] > 140 else (255, 255, 255)
        draw.rectangle([x0, y0, x0 + bw - 1, y0 + bh - 1], fill=colour, outline=ink, width=max(1, font.size // 16))
        draw.text((x0 + dx, y0 + dy), text, fill=ink, font=font)
    out.info["label_boxes"] = {text: box for text, _, _, box, _ in labels}  # each ID's label (x, y, w, h)
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description="som.py: draw Set-of-Marks (INST-IT 2.1) on an image or on every frame "
                                            "of a folder, one label place per ID across the frames")
    p.add_argument("source", help="an image file or a folder of frames")
    p.add_argument("--masks", required=True, help="JSON: {ID: RLE | box | polygon} for an image, {frame file name: "
                                                  "{ID: ...}} for a folder, or COCO results or instances for an image")
    p.add_argument("--out", required=True, help="output folder for the marked frames")
    p.add_argument("--image-id", type=int, help="COCO masks: the image's id (default: the last number in its name)")
    p.add_argument("--min-score", type=float, default=0.5, help="COCO results: mark those scoring this or more")
    p.add_argument("--fill", type=float, default=MarkStyle.fill, help="opacity of the mask tint (0: contour only)")
    args = p.parse_args(argv)
    if not 0 <= args.fill <= 1:
        p.error(f"--fill must be between 0 and 1, got {args.fill}")
    try:
        with open(args.masks, encoding="utf-8") as f:
            masks = json.load(f)
    except (OSError, ValueError) as e:
        raise SystemExit(f"{args.masks}: cannot read the masks ({e})")
    coco = isinstance(masks, list) or "annotations" in masks  # COCO results or instances: they mark one image
    named = re.findall(r"[0-9]+", os.path.basename(args.source)) or ["-1"]  # COCO: 000000397133.jpg is id 397133
    image_id = args.image_id if args.image_id is not None else int(named[-1])
    jobs = [(args.source, masks)]
    if os.path.isdir(args.source) and not coco:
        names = frame_files(args.source)
        if not names or not set(masks) & set(names):
            raise SystemExit(f"{args.source}: no frames ({'/'.join(IMAGE_EXTS)})" if not names else
                             f"{args.masks}: no key names a frame of {args.source} (keys {sorted(masks)[:3]}, frames "
                             f"{names[:3]}); key the masks by frame file name")
        jobs = [(os.path.join(args.source, n), masks.get(n, {})) for n in names]
    os.makedirs(args.out, exist_ok=True)
    places = {}
    for file, instances in jobs:
        out = os.path.join(args.out, os.path.basename(file))
        try:
            instances = coco_instances(masks, image_id, args.min_score) if coco else instances
            render_som(file, instances, MarkStyle(fill=args.fill), label_places=places).save(out)
        except (TypeError, ValueError) as e:
            raise SystemExit(f"{args.masks}: {os.path.basename(file)}: {e}")
        print(f"{out}: {len(instances)} marks")


if __name__ == "__main__":
    main()
