"""Frame sampling from frame folders, frame lists and video files (decord; PyAV fallback)."""
import importlib.util
import io
import os
import struct
import sys
import types

import numpy as np
import pytest
from PIL import Image

import data


def grey(value, size=(64, 48)):
    return Image.new("RGB", size, (value,) * 3)


def write_avi(path, frames, fps=10):
    """A minimal MJPEG AVI (RIFF: hdrl with avih/strh/strf, movi with one JPEG per frame, idx1), which
    decord reads with its bundled FFmpeg; no encoder library needed. 0 frames gives a headers-only file."""
    def chunk(fourcc, payload):
        return fourcc + struct.pack("<I", len(payload)) + payload + b"\0" * (len(payload) % 2)

    w, h = frames[0].size if frames else (64, 48)
    jpegs = []
    for f in frames:
        buf = io.BytesIO()
        f.save(buf, "JPEG", quality=95)
        jpegs.append(buf.getvalue())
    n = len(jpegs)
    avih = struct.pack("<14I", 1_000_000 // fps, 0, 0, 0x10, n, 0, 1, 0, w, h, 0, 0, 0, 0)
    strh = b"vidsMJPG" + struct.pack("<IHHIIIIIIIIhhhh", 0, 0, 0, 0, 1, fps, 0, n, 0, 0xFFFFFFFF, 0, 0, 0, w, h)
    strf = struct.pack("<IiiHH4sIiiII", 40, w, h, 1, 24, b"MJPG", w * h * 3, 0, 0, 0, 0)
    strl = chunk(b"LIST", b"strl" + chunk(b"strh", strh) + chunk(b"strf", strf))
    hdrl = chunk(b"LIST", b"hdrl" + chunk(b"avih", avih) + strl)
    movi, index, offset = b"", b"", 4
    for j in jpegs:
        index += b"00dc" + struct.pack("<III", 0x10, offset, len(j))
        movi += chunk(b"00dc", j)
        offset = 4 + len(movi)
    body = b"AVI " + hdrl + chunk(b"LIST", b"movi" + movi) + chunk(b"idx1", index)
    path.write_bytes(b"RIFF" + struct.pack("<I", len(body)) + body)


@pytest.fixture
def folder(tmp_path):
    d = tmp_path / "frames"
    d.mkdir()
    for i in range(10):
        grey(i * 20).save(d / f"frame_{i}.png")  # natural order: frame_2 before frame_10 would matter
    return d


def test_folder_uniform_sampling_and_indices(folder):
    frames, indices = data.sample_frames(str(folder), 4)
    assert indices == [0, 3, 6, 9]  # first and last included, evenly spaced
    assert [f.getpixel((0, 0))[0] for f in frames] == [0, 60, 120, 180]
    frames, indices = data.sample_frames(str(folder), 20)  # shorter than asked: all of them
    assert indices == list(range(10)) and len(frames) == 10
    for k in range(1, 11):
        assert len(data.sample_frames(str(folder), k)[0]) == k  # never more than asked


def test_frame_folder_order_is_natural(tmp_path):
    for i in (1, 2, 10):
        grey(i).save(tmp_path / f"f{i}.png")
    frames, _ = data.sample_frames(str(tmp_path), 3)
    assert [f.getpixel((0, 0))[0] for f in frames] == [1, 2, 10]


def test_frame_list_missing_and_corrupt_frames(folder, tmp_path):
    paths = sorted(str(p) for p in folder.iterdir())
    frames, indices = data.sample_frames(paths[:3], 8)
    assert indices == [0, 1, 2] and len(frames) == 3
    missing = str(folder / "frame_99.png")
    with pytest.raises(FileNotFoundError, match="frame_99.png: frame not found"):
        data.sample_frames([paths[0], missing], 2)
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"not a jpeg at all")
    with pytest.raises(ValueError, match="bad.jpg: cannot read this image"):
        data.sample_frames([str(bad)], 1)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="empty: 0 frames"):
        data.sample_frames(str(empty), 4)
    with pytest.raises(FileNotFoundError, match="nowhere.mp4: no such video"):
        data.sample_frames(str(tmp_path / "nowhere.mp4"), 4)


def test_video_file_through_decord(tmp_path):
    pytest.importorskip("decord")
    video = tmp_path / "clip.avi"
    write_avi(video, [grey(i * 25) for i in range(10)])
    frames, indices = data.sample_frames(str(video), 4)
    assert indices == [0, 3, 6, 9]
    assert [abs(f.getpixel((5, 5))[0] - i * 25) <= 3 for f, i in zip(frames, indices)] == [True] * 4
    assert frames[0].size == (64, 48)
    assert len(data.sample_frames(str(video), 32)[0]) == 10


def test_corrupt_and_empty_video_files_name_the_file(tmp_path):
    pytest.importorskip("decord")
    corrupt = tmp_path / "corrupt.mp4"
    corrupt.write_bytes(b"\x00\x00\x00\x18ftypmp42" + b"garbage" * 50)
    with pytest.raises(ValueError, match="corrupt.mp4: cannot decode this video"):
        data.sample_frames(str(corrupt), 4)
    empty = tmp_path / "empty.avi"
    write_avi(empty, [])
    with pytest.raises(ValueError, match="empty.avi: "):
        data.sample_frames(str(empty), 4)


class FakeReader:
    """Stands in for a decoder library to reach the code paths a real file cannot (a reader that opens
    a video and reports 0 frames)."""

    def __init__(self, path, num_threads=1):
        self.path = path

    def __len__(self):
        return 0


def test_zero_frame_video_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "decord", types.SimpleNamespace(VideoReader=FakeReader))
    video = tmp_path / "zero.mp4"
    video.write_bytes(b"x")
    with pytest.raises(ValueError, match="zero.mp4: the video has 0 frames"):
        data.sample_frames(str(video), 4)


def test_pyav_fallback_when_decord_is_missing(tmp_path, monkeypatch):
    pytest.importorskip("av")
    monkeypatch.setitem(sys.modules, "decord", None)  # "not installed": the real PyAV decodes
    video = tmp_path / "clip.avi"
    write_avi(video, [grey(i * 25) for i in range(10)])
    frames, indices = data.sample_frames(str(video), 4)
    assert indices == [0, 3, 6, 9]
    assert [abs(f.getpixel((5, 5))[0] - i * 25) <= 3 for f, i in zip(frames, indices)] == [True] * 4


ROTATED = os.path.join(os.path.dirname(__file__), "data", "rotated")  # decord's phone clips (SOURCE.md)
UPRIGHT_QUADRANTS = {0: [[101, 111], [93, 100]], 90: [[108, 110], [76, 90]], 180: [[120, 126], [98, 107]],
                     270: [[152, 150], [101, 90]]}


@pytest.mark.parametrize("degrees", [0, 90, 180, 270])
def test_rotated_phone_clip_is_upright_from_both_readers(degrees, monkeypatch):
    """A clip with a rotation tag: PyAV's frames equal decord's (which are upright), pixel for pixel."""
    pytest.importorskip("av")
    path = os.path.join(ROTATED, f"video_{degrees}.mov")
    upright = data.sample_frames(path, 3)[0] if importlib.util.find_spec("decord") else None
    monkeypatch.setitem(sys.modules, "decord", None)
    frames, indices = data.sample_frames(path, 3)
    assert indices == [0, 1, 2]
    assert frames[0].size == ((320, 568) if degrees in (90, 270) else (568, 320))  # portrait when turned a quarter
    # where decord is missing (macOS, aarch64), the mean grey of frame 0's four quadrants as decord 0.6.0 gives
    # them upright: a frame turned the wrong way round has its bright top elsewhere
    grey = np.array(frames[0].convert("L"), float)
    h, w = grey.shape
    quadrants = [[grey[i * h // 2:(i + 1) * h // 2, j * w // 2:(j + 1) * w // 2].mean() for j in (0, 1)] for i in (0, 1)]
    assert np.allclose(quadrants, UPRIGHT_QUADRANTS[degrees], atol=3)
    if upright is not None:
        assert [np.array_equal(np.array(a), np.array(b)) for a, b in zip(frames, upright)] == [True] * 3


def test_no_decoder_installed_says_what_to_install(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "decord", None)
    monkeypatch.setitem(sys.modules, "av", None)
    video = tmp_path / "clip.mp4"
    video.write_bytes(b"x")
    with pytest.raises(ImportError, match=r"clip.mp4: .*pip install decord.*pip install av"):
        data.sample_frames(str(video), 4)


def test_uniform_indices():
    assert data.uniform_indices(5, 1) == [2]
    assert data.uniform_indices(100, 3) == [0, 49, 99]
    for total in range(1, 40):
        for num in range(1, 12):
            idx = data.uniform_indices(total, num)
            assert len(idx) == min(total, num) and idx == sorted(set(idx)) and idx[-1] < total
    with pytest.raises(ValueError, match="num_frames"):
        data.sample_frames([np.zeros(1)], 0)
