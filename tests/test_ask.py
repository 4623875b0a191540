"""evaluate.py ask: one question about a user's own image or video, marks drawn from masks or boxes."""
import io
import json
import sys

import numpy as np
import pytest
from PIL import Image

import evaluate
import som
from model import LlavaStyleModel, ModelConfig, build_model
from test_data_frames import write_avi

WHITE = (255, 255, 255)


@pytest.fixture(scope="module")
def checkpoint(tiny, tmp_path_factory):
    """A saved tiny model that records the mark style it was trained with: white contours, no tint."""
    folder = tmp_path_factory.mktemp("ask") / "model"
    build_model(ModelConfig(vision_model=tiny["clip"], language_model=tiny["llama"], lora_r=4,
                            trainable_vision_layers=0, mark_style={"fill": 0.0, "colour": list(WHITE)}),
                device="cpu").save_pretrained(folder)
    return str(folder)


def ask(capsys, *args):
    """Run `evaluate.py ask` -> (its return value, what it printed on stdout)."""
    result = evaluate.main(["ask", *args, "--max-new-tokens", "3"])
    return result, capsys.readouterr().out


def test_image_with_boxes_json_and_the_marked_frame(checkpoint, tmp_path, capsys):
    Image.new("RGB", (64, 48), (90, 90, 90)).save(tmp_path / "photo.jpg")
    result, out = ask(capsys, "--model", checkpoint, "--image", str(tmp_path / "photo.jpg"), "--box", "1:4,4,20,20",
                      "--box", "2:30,10,50,40", "--json", "--save-marked", str(tmp_path / "seen"),
                      "Is [1] left of [2]?")
    assert json.loads(out) == result and out.count("\n") == 1  # one JSON object and nothing else on stdout
    assert result["frames"] == ["photo.jpg"] and result["marks"] == [1, 2]
    assert [t["question"] for t in result["turns"]] == ["Is [1] left of [2]?"]
    assert isinstance(result["turns"][0]["answer"], str)
    assert result["settings"]["mark_style"]["colour"] == list(WHITE)  # the checkpoint's style
    seen = np.array(Image.open(tmp_path / "seen" / "photo.png"))
    assert tuple(seen[12, 4]) == WHITE and tuple(seen[25, 30]) == WHITE  # the left contours, where the boxes are
    assert abs(int(seen[45, 60, 0]) - 90) <= 3  # outside the boxes the photo is untouched (JPEG)
    _, out = ask(capsys, "--model", checkpoint, "--image", str(tmp_path / "photo.jpg"), "--box", "1:4,4,20,20",
                 "--mark-style", '{"fill": 0}', "--save-marked", str(tmp_path / "own"), "What is [1]?")
    own = np.array(Image.open(tmp_path / "own" / "photo.png"))
    assert tuple(own[12, 4]) == som.id_colour(1)  # --mark-style overrides the checkpoint's


def test_streamed_answer_is_the_answer(checkpoint, tmp_path, capsys):
    Image.new("RGB", (64, 48), (200, 40, 40)).save(tmp_path / "red.png")
    args = ["--model", checkpoint, "--image", str(tmp_path / "red.png"), "--box", "1:10,10,40,40", "What is [1]?"]
    result, streamed = ask(capsys, *args)
    assert result["turns"][0]["answer"] and streamed.strip() == result["turns"][0]["answer"]  # greedy, streamed
    again, out = ask(capsys, *args, "--json")
    assert again["turns"] == result["turns"] and json.loads(out)["turns"] == result["turns"]


def test_video_folder_with_masks_by_frame_name(checkpoint, tmp_path, capsys):
    (tmp_path / "clip").mkdir()
    for t in range(6):
        Image.new("RGB", (64, 48), (30 * t, 60, 60)).save(tmp_path / "clip" / f"frame_{t}.png")
    masks = {"frame_0.png": {"1": [2, 2, 20, 20]}, "frame_5.png": {"1": [30, 2, 48, 20], "2": [2, 26, 20, 46]}}
    (tmp_path / "masks.json").write_text(json.dumps(masks))
    result, _ = ask(capsys, "--model", checkpoint, "--video", str(tmp_path / "clip"), "--masks",
                    str(tmp_path / "masks.json"), "--num-frames", "3", "--json",
                    "--save-marked", str(tmp_path / "seen"), "What does [1] do after <2>?")
    assert result["frames"] == ["frame_0.png", "frame_2.png", "frame_5.png"]  # sampled as `run` samples
    assert result["marks"] == [1, 2]
    middle = np.array(Image.open(tmp_path / "seen" / "frame_2.png"))
    assert (middle == np.array(Image.open(tmp_path / "clip" / "frame_2.png"))).all()  # no masks there: no marks
    last = np.array(Image.open(tmp_path / "seen" / "frame_5.png"))
    assert tuple(last[10, 30]) == WHITE and tuple(last[35, 2]) == WHITE


def test_video_file_masks_by_source_index(checkpoint, tmp_path, capsys):
    pytest.importorskip("decord")
    write_avi(tmp_path / "clip.avi", [Image.new("RGB", (64, 48), (20 * t,) * 3) for t in range(10)])
    (tmp_path / "masks.json").write_text(json.dumps({"00009.jpg": {"3": {"box": [10, 10, 30, 30]}}}))
    result, _ = ask(capsys, "--model", checkpoint, "--video", str(tmp_path / "clip.avi"), "--num-frames", "4",
                    "--masks", str(tmp_path / "masks.json"), "--json", "Where is [3] at <4>?")
    assert result["frames"] == ["00000.jpg", "00003.jpg", "00006.jpg", "00009.jpg"] and result["marks"] == [3]


def test_chat_keeps_the_marked_frames_and_the_history(checkpoint, tmp_path, capsys, monkeypatch):
    Image.new("RGB", (64, 48), (90, 90, 90)).save(tmp_path / "photo.png")
    prompts = []
    generate = LlavaStyleModel.generate
    monkeypatch.setattr(LlavaStyleModel, "generate", lambda self, **kw: prompts.append(kw) or generate(self, **kw))
    monkeypatch.setattr(sys, "stdin", io.StringIO("And [2]?\n\n"))
    result, out = ask(capsys, "--model", checkpoint, "--image", str(tmp_path / "photo.png"), "--box", "1:4,4,20,20",
                      "--box", "2:30,10,50,40", "--chat", "--json", "What is [1]?")
    assert [t["question"] for t in result["turns"]] == ["What is [1]?", "And [2]?"]
    first, second = (p["input_ids"][0].tolist() for p in prompts)
    assert second[:len(first)] == first and len(second) > len(first)  # the second prompt holds the first turn
    assert all(p["pixel_values"].shape[0] == 1 for p in prompts)  # the marked image in every turn's context


def test_bad_boxes_files_and_undrawn_ids(checkpoint, tmp_path, capsys, caplog):
    Image.new("RGB", (64, 48)).save(tmp_path / "photo.png")
    photo = ["--model", checkpoint, "--image", str(tmp_path / "photo.png")]
    with pytest.raises(SystemExit, match=r"--box 1:40,4,70,20 lies outside the 64x48 frame photo.png"):
        evaluate.main(["ask", *photo, "--box", "1:40,4,70,20", "Q?"])
    with pytest.raises(SystemExit, match=r"expected ID:x0,y0,x1,y1"):
        evaluate.main(["ask", *photo, "--box", "1:20,4,10,20", "Q?"])
    (tmp_path / "broken.jpg").write_bytes(b"not an image")
    with pytest.raises(SystemExit, match="broken.jpg: cannot read this image"):
        evaluate.main(["ask", "--model", checkpoint, "--image", str(tmp_path / "broken.jpg"), "Q?"])
    with pytest.raises(SystemExit, match="missing.mp4: no such video"):
        evaluate.main(["ask", "--model", checkpoint, "--video", str(tmp_path / "missing.mp4"), "Q?"])
    (tmp_path / "bad.json").write_text(json.dumps({"1": {"counts": [5], "size": [48, 64]}}))
    with pytest.raises(SystemExit, match="instance 1: bad RLE"):  # read against the frame before the model loads
        evaluate.main(["ask", "--model", str(tmp_path / "no-model"), "--image", str(tmp_path / "photo.png"),
                       "--masks", str(tmp_path / "bad.json"), "Q?"])
    (tmp_path / "long").mkdir()
    for t in range(33):
        Image.new("RGB", (16, 16)).save(tmp_path / "long" / f"{t:05d}.png")
    with pytest.raises(SystemExit, match="--num-frames 33: the model reads at most 32 frames"):
        evaluate.main(["ask", "--model", checkpoint, "--video", str(tmp_path / "long"), "--num-frames", "33", "Q?"])
    with pytest.raises(SystemExit, match="--mark-style|unexpected keyword argument 'size'"):
        evaluate.main(["ask", *photo, "--mark-style", '{"size": 3}', "Q?"])
    ask(capsys, *photo, "--box", "1:4,4,20,20", "--json", "Is [1] next to [7]?")
    assert "names [7], not drawn on the frames (drawn: [1])" in caplog.text


def test_a_llava_hf_checkpoint_in_4bit(tiny, tmp_path, capsys):
    """Every layout from_pretrained adopts: here transformers' LLaVA, its language model in nf4 (bitsandbytes runs
    on CPU); no style recorded, so INST-IT's marks are drawn."""
    pytest.importorskip("bitsandbytes")
    Image.new("RGB", (64, 48), (90, 90, 90)).save(tmp_path / "photo.png")
    result, _ = ask(capsys, "--model", tiny["llava"], "--image", str(tmp_path / "photo.png"), "--box", "1:4,4,20,20",
                    "--load-in-4bit", "--json", "--save-marked", str(tmp_path / "seen"), "What is [1]?")
    assert result["marks"] == [1] and result["settings"]["mark_style"] == {
        "fill": 0.25, "colour": None, "line_width": None, "font_size": None, "grid": None}
    assert tuple(np.array(Image.open(tmp_path / "seen" / "photo.png"))[12, 4]) == som.id_colour(1)


def test_asked_as_the_bench_asks_unless_verbatim(checkpoint):
    """The question goes in the bench's open-ended form (the form a model is evaluated in; a video's frames
    announced, so <t> is the t-th), or as typed with verbatim=True; the frames go with the first turn only."""
    model = LlavaStyleModel.from_pretrained(checkpoint).eval()
    frames = [Image.new("RGB", (64, 48))] * 3
    history = []
    evaluate.ask(model, frames, history, "What does [1] do at <2>?", video=True, max_new_tokens=2)
    evaluate.ask(model, frames, history, "And [2]?", video=True, max_new_tokens=2)
    assert history[0]["content"] == "<image>\n" + evaluate.BENCH_PROMPTS["video_oe"].format(
        question="What does [1] do at <2>?", n=3)
    assert history[2]["content"].startswith("The video has 3 frames") and "<image>" not in history[2]["content"]
    typed = []
    evaluate.ask(model, frames[:1], typed, "What is [1]?", video=False, verbatim=True, max_new_tokens=2)
    assert typed[0]["content"] == "<image>\nWhat is [1]?" and [m["role"] for m in typed] == ["user", "assistant"]


def test_masks_with_named_ids_or_no_sampled_frame(checkpoint, tmp_path, capsys, caplog):
    Image.new("RGB", (64, 48)).save(tmp_path / "photo.png")
    (tmp_path / "named.json").write_text(json.dumps({"person": [4, 4, 20, 20]}))
    with pytest.raises(SystemExit, match="instance IDs must be numbers"):  # before any model loads
        evaluate.main(["ask", "--model", str(tmp_path / "no-model"), "--image", str(tmp_path / "photo.png"),
                       "--masks", str(tmp_path / "named.json"), "Q?"])
    (tmp_path / "clip").mkdir()
    for t in range(3):
        Image.new("RGB", (64, 48)).save(tmp_path / "clip" / f"frame_{t}.png")
    (tmp_path / "other.json").write_text(json.dumps({"00000.jpg": {"1": [4, 4, 20, 20]}}))
    result, _ = ask(capsys, "--model", checkpoint, "--video", str(tmp_path / "clip"), "--masks",
                    str(tmp_path / "other.json"), "--json", "What is [1]?")
    assert result["marks"] == [] and "other.json: no key names a sampled frame (frame_0.png" in caplog.text
