"""Data pipeline, frames/s on one core: frame sampling and Set-of-Marks rendering, and video decoding.

1. data.sample_frames (8 of 16 JPEG frames in a folder) and som.render_som (10 instances, masks as bool
   arrays), at 336x336 and 1920x1080, beside roboflow supervision's MaskAnnotator + LabelAnnotator on the
   same frames and masks (if `import supervision` works), and beside a plain Pillow baseline a user would
   write (alpha-blend each mask, draw its ID at the mask's centroid). Note render_som does more than the
   other two: it also draws a contour and places each label at the mask's most interior point.
2. data.sample_frames on a 60 s 1280x720 30 fps H.264 clip (made here with PyAV, cached in the temp dir)
   for 8/16/32 uniformly sampled frames: decord (data.py's reader) against PyAV (data.py's fallback when
   decord is missing, forced here by hiding decord).
The process is pinned to one core (os.sched_setaffinity; OpenCV set to one thread), so figures are per core.
Goal: render_som no slower than supervision's annotators (ratio ours/supervision in frames/s >= 1).

    .venv/bin/python benchmarks/data_pipeline.py [--repeats 3] [--skip-video]
supervision and PyAV are not in requirements.txt; install them (pip install supervision av) or put them on
PYTHONPATH, else their rows are reported as missing.
"""
import argparse
import contextlib
import json
import os
import statistics
import sys
import tempfile
import time

import numpy as np
from PIL import Image, ImageDraw, ImageFont

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import data  # noqa: E402
import som  # noqa: E402

SIZES = {"336px": (336, 336), "1080p": (1920, 1080)}
NUM_INSTANCES = 10


def make_scene(size: tuple, seed: int = 0) -> tuple[Image.Image, dict]:
    """A textured frame of `size` (W, H) and {ID: (H, W) bool mask} for 10 overlapping ellipses and boxes."""
    w, h = size
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w]
    base = np.stack([x * 255 / w, y * 255 / h, (x + y) * 127 / (w + h)], -1)
    pixels = (base + rng.normal(0, 12, base.shape)).clip(0, 255).astype(np.uint8)
    masks = {}
    for i in range(1, NUM_INSTANCES + 1):
        r = rng.uniform(0.05, 0.2) * min(w, h)
        cx, cy = rng.uniform(r, w - r), rng.uniform(r, h - r)
        canvas = Image.new("1", size)
        shape = ImageDraw.Draw(canvas).ellipse if i % 2 else ImageDraw.Draw(canvas).rectangle
        shape([cx - r, cy - 0.7 * r, cx + r, cy + 0.7 * r], fill=1)
        masks[i] = np.array(canvas, bool)
    return Image.fromarray(pixels), masks


def frames_per_second(fn, frames: list, repeats: int) -> float:
    """fn applied to each frame, `repeats` times -> frames / median seconds of one pass."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        for frame in frames:
            fn(frame)
        times.append(time.perf_counter() - start)
    return len(frames) / statistics.median(times)


def pillow_baseline(image: Image.Image, masks: dict, fill: float = 0.25) -> Image.Image:
    """What a user writes with Pillow alone: blend each mask in its colour, draw its ID at the mask centroid."""
    out = image.copy()
    font = ImageFont.load_default(size=max(12, min(image.size) // 16))
    for instance_id, mask in masks.items():
        colour = Image.new("RGB", image.size, som.id_colour(instance_id))
        out.paste(Image.blend(out, colour, fill), mask=Image.fromarray(mask))
    draw = ImageDraw.Draw(out)
    for instance_id, mask in masks.items():
        ys, xs = np.nonzero(mask)
        draw.text((xs.mean(), ys.mean()), str(instance_id), fill=(255, 255, 255), font=font, anchor="mm",
                  stroke_width=2, stroke_fill=som.id_colour(instance_id))
    return out


def supervision_annotators(size: tuple):
    """-> fn(frame, masks) drawing supervision's MaskAnnotator + LabelAnnotator (label at the mask's centre
    of mass, text as tall as render_som's), or None if supervision is not installed."""
    try:
        import cv2
        import supervision as sv
    except ImportError:
        return None
    cv2.setNumThreads(1)
    scale = max(12, min(size) / 16) / 22  # Hershey font: ~22 px per unit of scale
    masker = sv.MaskAnnotator(opacity=0.25)
    labeler = sv.LabelAnnotator(text_scale=scale, text_thickness=max(1, round(scale)), text_position=sv.Position.CENTER_OF_MASS)

    def annotate(frame, masks):
        stack = np.stack(list(masks.values()))
        detections = sv.Detections(xyxy=sv.mask_to_xyxy(stack), mask=stack, class_id=np.arange(len(masks)))
        scene = masker.annotate(np.array(frame), detections)
        return labeler.annotate(scene, detections, labels=[str(i) for i in masks])
    return annotate


def som_rows(repeats: int, folder: str) -> list[dict]:
    rows = []
    for name, size in SIZES.items():
        frame_dir = os.path.join(folder, name)
        os.makedirs(frame_dir, exist_ok=True)
        scenes = [make_scene(size, seed) for seed in range(8)]
        for k in range(16):  # the folder sample_frames reads: 16 JPEG frames, 8 sampled
            scenes[k % 8][0].save(os.path.join(frame_dir, f"{k:05d}.jpg"), quality=90)
        frames = [image for image, _ in scenes]
        masks = {id(image): m for image, m in scenes}  # each frame with its own masks
        sampled = frames_per_second(lambda _: data.sample_frames(frame_dir, 8), [None], repeats) * 8
        ours = frames_per_second(lambda f: som.render_som(f, masks[id(f)]), frames, repeats)

        def video(_):  # 8 frames of one video share a dict: a label stays put while inside its (static) mask
            places = {}
            for f in frames:
                som.render_som(f, scenes[0][1], label_places=places)
        reused = frames_per_second(video, [None], repeats) * len(frames)

        both = 1 / (1 / sampled + 1 / ours)  # the two stages run one after the other per frame
        pillow = frames_per_second(lambda f: pillow_baseline(f, masks[id(f)]), frames, repeats)
        annotate = supervision_annotators(size)
        sv_fps = frames_per_second(lambda f: annotate(f, masks[id(f)]), frames, repeats) if annotate else None
        row = {"size": name, "sample_frames": sampled, "render_som": ours, "render_som_places_reused": reused,
               "sample_and_render": both, "supervision_mask_label": sv_fps, "pillow_baseline": pillow,
               "ours_vs_supervision": ours / sv_fps if sv_fps else None, "ours_vs_pillow": ours / pillow}
        rows.append(row)
        print(f"{name:6} {sampled:10.1f} {ours:10.1f} {reused:10.1f} {both:10.1f} {sv_fps or float('nan'):12.1f} {pillow:10.1f} "
              f"{row['ours_vs_supervision'] or float('nan'):8.2f} {row['ours_vs_pillow']:8.2f}", flush=True)
    return rows


def make_clip(path: str, seconds: int = 60, fps: int = 30, size=(1280, 720)):
    """A 720p H.264 clip (x264 veryfast, its default keyframe interval of 250): moving boxes on a gradient."""
    import av

    w, h = size
    y, x = np.mgrid[0:h, 0:w]
    base = np.stack([x * 255 // w, y * 255 // h, np.full_like(x, 96)], -1).astype(np.uint8)
    with av.open(path, "w") as out:
        stream = out.add_stream("libx264", rate=fps, options={"preset": "veryfast"})
        stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
        for t in range(seconds * fps):
            image = np.roll(base, 4 * t, axis=1)
            for k in range(5):
                x0, y0 = (37 * k + 6 * t) % (w - 120), (90 * k + 2 * t) % (h - 120)
                image[y0:y0 + 120, x0:x0 + 120] = (40 * k, 255 - 40 * k, 128)
            for packet in stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)


@contextlib.contextmanager
def without_decord():
    """data._read_video falls back to PyAV when `import decord` fails; make it fail for a while."""
    saved = sys.modules.get("decord")
    sys.modules["decord"] = None
    try:
        yield
    finally:
        sys.modules.pop("decord")
        if saved is not None:
            sys.modules["decord"] = saved


def video_rows(repeats: int) -> list[dict]:
    try:
        import av  # noqa: F401
    except ImportError:
        print("PyAV is not installed: no clip can be made and no PyAV row measured (pip install av)")
        return []
    clip = os.path.join(tempfile.gettempdir(), "instit_bench_60s_720p.mp4")
    if not os.path.exists(clip):
        start = time.perf_counter()
        make_clip(clip + ".part.mp4")
        os.replace(clip + ".part.mp4", clip)
        print(f"made {clip} in {time.perf_counter() - start:.0f} s")
    rows = []
    for n in (8, 16, 32):
        row = {"frames": n}
        for reader in ("decord", "pyav"):
            with without_decord() if reader == "pyav" else contextlib.nullcontext():
                times = []
                for _ in range(repeats if reader == "decord" else 1):  # PyAV decodes every frame: one pass
                    start = time.perf_counter()
                    frames, _ = data.sample_frames(clip, n)
                    times.append(time.perf_counter() - start)
            assert len(frames) == n and frames[0].size == (1280, 720)
            row[f"{reader}_s"] = statistics.median(times)
        row["pyav_vs_decord"] = row["pyav_s"] / row["decord_s"]
        rows.append(row)
        print(f"{n:6} {row['decord_s']:10.2f} {row['pyav_s']:10.2f} {row['pyav_vs_decord']:10.1f}", flush=True)
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=3, help="passes per measurement (median reported)")
    p.add_argument("--skip-video", action="store_true", help="only the SoM part")
    p.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "data_pipeline.json"))
    args = p.parse_args(argv)
    os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})  # one core: figures are per core
    print("frames/s on one core. som reuse: render_som on an 8-frame video, label places kept across its frames;\n"
          "both: sample_frames then render_som; supervision: MaskAnnotator + LabelAnnotator; pillow: blend + text")
    print(f"{'size':6} {'sample':>10} {'render_som':>10} {'som reuse':>10} {'both':>10} {'supervision':>12} {'pillow':>10} "
          f"{'ours/sv':>8} {'ours/pil':>8}")
    with tempfile.TemporaryDirectory() as folder:
        som = som_rows(args.repeats, folder)
    video = []
    if not args.skip_video:
        print("\nseconds per data.sample_frames call on a 60 s 720p 30 fps H.264 clip (one core)")
        print(f"{'frames':>6} {'decord':>10} {'pyav':>10} {'pyav/dec':>10}")
        video = video_rows(args.repeats)
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"num_instances": NUM_INSTANCES, "repeats": args.repeats, "som_frames_per_s": som,
                   "video_seconds_per_call": video}, f, indent=1)
    ratios = [r["ours_vs_supervision"] for r in som if r["ours_vs_supervision"]]
    verdict = "not measured (supervision missing)" if not ratios else "met" if min(ratios) >= 1 else "NOT met"
    print(f"goal render_som no slower than supervision: {verdict}; wrote {args.out}")


if __name__ == "__main__":
    main()
