"""Set-of-Marks on a crowded frame (INST-IT 2.1): do the labels stay readable with 24 instances, small and large?

A synthetic 640x480 scene of 24 discs, boxes and thin bars drawn over one another (the top one owns a pixel, as
in a segmentation), marked with som.render_som's defaults. Printed per rendering: label pairs that overlap, labels
hiding more than 25% of their own instance's mask, the median and largest share hidden, the label heights (px).
With --before OLD_SOM_PY (another som.py, e.g. `git show 878ecee:som.py > /tmp/som_before.py`) it renders that one
too and draws the two side by side.

    .venv/bin/python benchmarks/som_crowded.py [--before /tmp/som_before.py] [--out PNG]
"""
import argparse
import importlib.util
import os
import sys

import numpy as np
from PIL import Image, ImageDraw, ImageFont

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import som  # noqa: E402


def crowded_scene(seed: int = 0, size=(640, 480), count: int = 24):
    """-> (image, {ID: bool mask}): `count` discs (radius 6-70 px), boxes and 8-14 px wide bars at random angles,
    later ones drawn over earlier ones, on a soft grey gradient."""
    rng = np.random.default_rng(seed)
    w, h = size
    owner = Image.new("I", size, 0)
    draw = ImageDraw.Draw(owner)
    for i in range(1, count + 1):
        x, y, r = rng.uniform(0, w), rng.uniform(0, h), rng.choice([rng.uniform(6, 20), rng.uniform(20, 70)])
        kind = i % 3
        if kind == 0:
            draw.ellipse([x - r, y - r, x + r, y + r], fill=i)
        elif kind == 1:
            draw.rectangle([x - r, y - r * rng.uniform(0.3, 1), x + r, y + r * rng.uniform(0.3, 1)], fill=i)
        else:  # a thin bar
            a, half, length = rng.uniform(0, np.pi), rng.uniform(4, 7), rng.uniform(80, 250)
            d, n = np.array([np.cos(a), np.sin(a)]), np.array([-np.sin(a), np.cos(a)])
            corners = [(x, y) + s * length / 2 * d + t * half * n for s, t in ((-1, -1), (1, -1), (1, 1), (-1, 1))]
            draw.polygon([tuple(c) for c in corners], fill=i)
    owner = np.array(owner)
    colours = rng.integers(40, 230, (count + 1, 3))
    background = np.linspace(100, 170, h)[:, None, None] + np.linspace(0, 30, w)[None, :, None]  # a soft gradient
    pixels = colours[owner] * (owner > 0)[..., None] + background.round().astype(int) * (owner == 0)[..., None]
    masks = {i: owner == i for i in range(1, count + 1) if (owner == i).any()}
    return Image.fromarray(pixels.astype(np.uint8)), masks


def label_boxes(module, image, masks):
    """The label boxes (x, y, w, h) a som module draws: from the result's info, or found in an older som.py's
    rendering by drawing each label alone on a blank frame and diffing (older versions do not report them)."""
    out = module.render_som(image, masks)
    if "label_boxes" in out.info:
        return out, out.info["label_boxes"]
    blank = Image.new("RGB", image.size, (0, 0, 0))
    boxes, places = {}, {}
    module.render_som(image, masks, label_places=places)
    for i, mask in masks.items():  # the label alone, at the place it had in the full rendering
        only = np.array(module.render_som(blank, {i: mask}, module.MarkStyle(fill=0.0), {str(i): places[str(i)]}))
        contour = np.array(module.render_som(blank, {i: mask}, module.MarkStyle(fill=0.0, font_size=1),
                                             {str(i): places[str(i)]}))
        ys, xs = np.nonzero((only != contour).any(-1) | ((only != 0).any(-1) & ~mask))
        boxes[str(i)] = (xs.min(), ys.min(), xs.max() - xs.min() + 1, ys.max() - ys.min() + 1)
    return out, boxes


def measure(module, image, masks) -> tuple[Image.Image, dict]:
    out, boxes = label_boxes(module, image, masks)
    pairs = [(a, b) for a in boxes for b in boxes if a < b and
             boxes[a][0] < boxes[b][0] + boxes[b][2] and boxes[b][0] < boxes[a][0] + boxes[a][2] and
             boxes[a][1] < boxes[b][1] + boxes[b][3] and boxes[b][1] < boxes[a][1] + boxes[a][3]]
    hidden = [mask[y:y + bh, x:x + bw].sum() / mask.sum() for mask, (x, y, bw, bh) in
              ((m, boxes[str(i)]) for i, m in masks.items())]
    row = {"instances": len(masks), "overlapping_label_pairs": len(pairs),
           "labels_hiding_over_25pct": int(sum(v > 0.25 for v in hidden)),
           "median_share_hidden": round(float(np.median(hidden)), 3), "max_share_hidden": round(float(max(hidden)), 3),
           "label_heights_px": sorted({int(b[3]) for b in boxes.values()})}
    return out, row


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--before", help="another som.py to compare with (drawn on the left)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                                 "som_crowded.png"))
    args = p.parse_args()
    image, masks = crowded_scene(args.seed)
    panels = []
    for name, path in (("before", args.before), ("after", som.__file__)):
        if path is None:
            continue
        spec = importlib.util.spec_from_file_location(f"som_{name}", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        out, row = measure(module, image, masks)
        print(f"{name:6} {path}: {row}")
        panels.append((name, out))
    canvas = Image.new("RGB", (sum(o.width for _, o in panels) + 10 * (len(panels) - 1), image.height + 24), "white")
    x = 0
    for name, out in panels:
        canvas.paste(out, (x, 24))
        ImageDraw.Draw(canvas).text((x + 4, 4), f"{name}: som.render_som defaults", fill="black",
                                    font=ImageFont.load_default(size=16))
        x += out.width + 10
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    canvas.save(args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
