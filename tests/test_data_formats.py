"""The published formats (FORMATS.md) -> conversations, with the bad records the loaders must survive."""
import base64
import io
import json
import logging
import os
from collections import Counter

import numpy as np
import pytest
from PIL import Image

import data
import som
from data import INSTRUCTIONS
from model import ModelConfig

U, A = "user", "assistant"


def chat(*turns):
    return [{"role": role, "content": text} for role, text in turns]


def png(path, value=128, size=(16, 12)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, (value,) * 3).save(path)
    return str(path)


def write(path, obj):
    path.write_text(json.dumps(obj) if not str(path).endswith(".jsonl") else "\n".join(map(json.dumps, obj)))
    return str(path)


VIDEO = {  # the released shape; timestamps out of order and the known quirks ([02], <02>, "1, 2" keys)
    "video_id": 17, "video_path": "videos_vpt/v17",
    "frame_level_caption": [
        {"timestamp": 2, "frame_name": "00005.jpg", "instance_level": {"1": "A man.", "02": "A dog."},
         "image_level": "[1] walks behind [02].", "temporal_change": "[2] moves ahead of [1]."},
        {"timestamp": 1, "frame_name": "00000.jpg", "instance_level": {"1": "A man in a coat.", "2": "A brown dog."},
         "image_level": "[1] walks [2].", "temporal_change": None}],
    "video_level_caption": "At <1> [1] walks [2]; at <02> [2] pulls ahead.",
    "question_answer_pairs": [{"question": "What is [1] wearing at <1>?", "answer": "A coat."},
                              {"question": "Who leads at <2>?", "answer": "[2] leads [1, 2] notation."}],
}
IMAGE = {"image_id": 9, "image_path": "images_vpt/sa_1.jpg",
         "instance_level_caption": {"1": {"short": "A mug.", "long": "A white mug with a chip."}, "2, 3": "Two pens."},
         "image_level_caption": "[1] stands left of [2] [3]."}


@pytest.fixture
def instit(tmp_path):
    png(tmp_path / "videos_vpt/v17/00000.jpg")
    png(tmp_path / "videos_vpt/v17/00005.jpg")
    png(tmp_path / "images_vpt/sa_1.jpg")
    return tmp_path


def test_instit_video_record_gives_the_four_conversation_kinds(instit):
    records = data.load_instit_dataset(write(instit / "video.json", [VIDEO]), str(instit))
    assert [f["timestamp"] for f in records[0]["frames"]] == [1, 2]
    samples = {s["id"]: s for s in data.instit_conversations(records[0])}
    f0, f5 = str(instit / "videos_vpt/v17/00000.jpg"), str(instit / "videos_vpt/v17/00005.jpg")
    assert sorted(samples) == ["video 17 change <1>-<2>", "video 17 frame <1>", "video 17 frame <2>",
                               "video 17 qa", "video 17 video"]
    frame = samples["video 17 frame <1>"]  # kind 1: instance captions, then the image caption
    assert frame["visuals"] == [{"frames": [f0], "pooled": False}]  # a single image is not pooled
    assert frame["messages"] == chat((U, "<image>\n" + INSTRUCTIONS["instance"]), (A, "[1]: A man in a coat.\n[2]: A brown dog."),
                                     (U, INSTRUCTIONS["image"]), (A, "[1] walks [2]."))
    assert samples["video 17 frame <2>"]["messages"][3]["content"] == "[1] walks behind [2]."  # [02] -> [2]
    change = samples["video 17 change <1>-<2>"]  # kind 2: two consecutive frames, pooled
    assert change["visuals"] == [{"frames": [f0, f5], "pooled": True}]
    assert change["messages"] == chat((U, "<image>\n" + INSTRUCTIONS["temporal"]), (A, "[2] moves ahead of [1]."))
    video = samples["video 17 video"]  # kind 3
    assert video["messages"] == chat((U, "<image>\n" + INSTRUCTIONS["video"].format(n=2)),
                                     (A, "At <1> [1] walks [2]; at <2> [2] pulls ahead."))
    qa = samples["video 17 qa"]  # kind 4: multi-turn, one placeholder
    assert qa["visuals"][0]["frames"] == [f0, f5]
    assert qa["messages"] == chat((U, "<image>\nWhat is [1] wearing at <1>?"), (A, "A coat."),
                                  (U, "Who leads at <2>?"), (A, "[2] leads [1] [2] notation."))


def test_instit_image_record_long_captions_and_multi_instance_keys(instit):
    records = data.load_instit_dataset(write(instit / "image.json", [IMAGE]), str(instit))
    (sample,) = data.instit_conversations(records[0])
    assert sample["id"] == "image 9 frame <1>"
    assert sample["messages"][1]["content"] == "[1]: A white mug with a chip.\n[2] [3]: Two pens."
    assert sample["messages"][3]["content"] == "[1] stands left of [2] [3]."


def test_instit_masked_release_draws_marks_and_checks_ids(instit, caplog):
    boxes = {"1": {"mask": {"size": [12, 16], "counts": [0, 192]}}, "2": {"box": [0, 0, 4, 4]}}
    record = dict(IMAGE, instance_level_caption={"1": "A mug.", "2": "A pen."}, image_level_caption="[1] near [2].",
                  segmentations=boxes)
    unmarked = dict(record, image_id=10, image_level_caption="[1] near [5].")  # [5] has no mask
    records = data.load_instit_dataset(write(instit / "masked.json", [record, unmarked]), str(instit))
    with caplog.at_level(logging.WARNING):
        samples = [s for r in records for s in data.instit_conversations(r, draw_marks=True)]
    assert [s["id"] for s in samples] == ["image 9 frame <1>"]
    assert "masked.json: record image 10: frame <1> conversation names [5], not marked on its frames" in caplog.text
    assert samples[0]["visuals"][0]["masks"] == [boxes]
    cfg = data.ModelConfig(image_size=32, patch_size=8)
    raw = np.array(data.open_image(samples[0]["visuals"][0]["frames"][0]))
    marked = np.array(data.load_visual(samples[0]["visuals"][0], cfg)[0])
    assert (marked != raw).any(-1).mean() > 0.2  # marks drawn at load time


def test_instit_bad_records_are_reported_and_skipped(instit, caplog):
    missing_frame = dict(VIDEO, video_id=18, frame_level_caption=[dict(VIDEO["frame_level_caption"][1], frame_name="00009.jpg")])
    bad_qa = dict(VIDEO, video_id=19, question_answer_pairs=[{"question": "Where?"}])
    bad_time = dict(VIDEO, video_id=20, frame_level_caption=[dict(VIDEO["frame_level_caption"][0], timestamp="two")])
    file = write(instit / "mixed.json", [VIDEO, missing_frame, 42, bad_qa, {"video_id": 21}, bad_time, IMAGE])
    with caplog.at_level(logging.WARNING):
        records = data.load_instit_dataset(file, str(instit))
    assert [r["id"] for r in records] == ["video 17", "image 9"]
    text = caplog.text
    assert f"{file}: record #1 (video_id 18): frame_level_caption[0].frame_name: " in text
    assert "videos_vpt/v17/00009.jpg not found" in text
    assert "record #2: record: expected a JSON object, got int" in text
    assert "record #3 (video_id 19): question_answer_pairs[0].answer: missing" in text
    assert "record #4 (video_id 21): image_path: missing" in text
    assert "frame_level_caption[0].timestamp: expected an integer, got 'two'" in text
    assert "skipped 5 of 7 records" in text


def test_normalize_text_quirks():
    assert data.normalize_text("[01] and [3, 4, 5] at <05>; <0> stays") == "[1] and [3] [4] [5] at <5>; <0> stays"
    assert data.instance_key("01") == "1" and data.instance_key("1, 2") == "1,2"


@pytest.fixture
def bench(tmp_path):
    png(tmp_path / "images/a.jpg")
    (tmp_path / "videos/v1").mkdir(parents=True)
    png(tmp_path / "videos/v1/0.jpg")
    mc = {"question_id": "001-01", "question": "What is [02] doing?", "answer": "B", "image": "images/a.jpg",
          **{f"choice_{c}": f"option {c}" for c in "abcd"}}
    write(tmp_path / "image_multi_choices.json", [
        mc, dict(mc, question_id="001-02", answer="option c"), dict(mc, question_id="001-03", answer="E"),
        {"question_id": "001-04", "question": "Lost its choices?", "answer": "B", "image": "images/a.jpg"}])
    write(tmp_path / "image_open_ended.json", [{"question_id": "001-01", "question": "What is [2] doing?",
                                                "answer": "[2] takes notes.", "image": "images/a.jpg"},
                                               dict(mc, question_id="001-05")])  # choices in an OE file
    write(tmp_path / "video_multi_choice.jsonl", [{"question_id": 5, "question": "When?", "answer": "(d)",
                                                   "video_path": "videos/v1",
                                                   "options": {"A": "<1>", "B": "<2>", "C": "<3>", "D": "<4>"}}])
    return tmp_path


def test_bench_both_shapes_splits_and_answers(bench, caplog):
    with caplog.at_level(logging.WARNING):
        questions = data.load_instit_bench(str(bench))
    by = {(q["split"], q["question_id"]): q for q in questions}
    assert sorted(by) == [("image_mc", "001-01"), ("image_mc", "001-02"), ("image_oe", "001-01"), ("video_mc", "5")]
    mc = by[("image_mc", "001-01")]
    assert mc["options"] == {"A": "option a", "B": "option b", "C": "option c", "D": "option d"}
    assert mc["answer"] == "B" and mc["question"] == "What is [2] doing?"
    assert mc["media"] == str(bench / "images/a.jpg")
    assert by[("image_mc", "001-02")]["answer"] == "C"  # the option's text -> its letter
    assert by[("image_oe", "001-01")]["options"] is None and by[("image_oe", "001-01")]["answer"] == "[2] takes notes."
    video = by[("video_mc", "5")]
    assert video["answer"] == "D" and video["media"] == str(bench / "videos/v1")
    assert "record #2 (question_id 001-03): answer: 'E' is neither an option letter" in caplog.text
    assert "record #3 (question_id 001-04): options: missing in a multiple-choice file" in caplog.text
    assert "image_open_ended.json: record #1 (question_id 001-05): options: given in an open-ended file" in caplog.text
    assert {q["split"] for q in data.load_instit_bench(str(bench), splits=["video_multi_choice", "image_oe"])} == {
        "video_mc", "image_oe"}
    with pytest.raises(ValueError, match="unknown bench split.*image_xx"):
        data.load_instit_bench(str(bench), splits=["image_xx"])
    records = [{"question_id": "1", "question": "Q?", "answer": "A", "options": ["x", "y", "z", "w"],
                "image": Image.new("RGB", (4, 4))}]  # records as a `datasets` split yields them
    (q,) = data.load_instit_bench(records)
    assert q["split"] == "image_mc" and q["options"]["D"] == "w" and isinstance(q["media"], Image.Image)


def test_llava_format(tmp_path, caplog):
    png(tmp_path / "coco/1.jpg")
    png(tmp_path / "coco/2.jpg")
    (tmp_path / "clips").mkdir()
    turn = lambda who, text: {"from": who, "value": text}
    records = [
        {"id": "text", "conversations": [turn("human", "Hi?"), turn("gpt", "Hello.")]},
        {"id": "one", "image": "coco/1.jpg", "conversations": [turn("human", "<image>\nWhat?"), turn("gpt", "A cup.")]},
        {"id": "two", "image": ["coco/1.jpg", "coco/2.jpg"],
         "conversations": [turn("human", "<image> vs <image>?"), turn("gpt", "Same.")]},
        {"id": "vid", "video": "clips", "conversations": [turn("human", "What happens?"), turn("gpt", "Nothing.")]},
        {"id": "bad", "image": "coco/1.jpg", "conversations": [turn("human", "<image><image>?"), turn("gpt", "x")]},
        {"id": "who", "conversations": [turn("robot", "?"), turn("gpt", "x")]},
    ]
    with caplog.at_level(logging.WARNING):
        samples = {s["id"]: s for s in data.load_llava(write(tmp_path / "llava.json", records))}
    assert sorted(samples) == ["one", "text", "two", "vid"]
    assert samples["text"]["visuals"] == [] and samples["text"]["messages"] == chat((U, "Hi?"), (A, "Hello."))
    assert samples["one"]["visuals"] == [{"frames": [str(tmp_path / "coco/1.jpg")]}]
    assert samples["vid"]["visuals"] == [{"video": str(tmp_path / "clips")}]
    inst_it, next_style = ModelConfig(), ModelConfig(image_grid_pinpoints=[[8, 16]], multi_image="anyres")
    two = samples["two"]["visuals"]  # several images: pooled (INST-IT), or each AnyRes (a LLaVA-NeXT model)
    assert [data.visual_layout(v, 1, 2, inst_it) for v in two] == [(True, None)] * 2
    assert [data.visual_layout(v, 1, 2, next_style)[0] for v in two] == [False] * 2
    assert samples["vid"]["messages"][0]["content"] == "<image>\nWhat happens?"  # placeholder added
    assert "record #4 (id bad): conversations: 2 <image> placeholders for 1 images/videos" in caplog.text
    assert "record #5 (id who): conversations[0].from: unknown speaker 'robot'" in caplog.text


def b64png(value):
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (value,) * 3).save(buf, "PNG")
    return base64.b64encode(buf.getvalue()).decode()


def test_mimicit_in_context_sequences(tmp_path, caplog):
    instructions = {"meta": {"version": "0.0.1"}, "data": {
        "SD_INS_1": {"instruction": "What differs?", "answer": "The cup moved.", "image_ids": ["a1", "a2"],
                     "rel_ins_ids": ["SD_INS_2"]},
        "SD_INS_2": {"instruction": "Any change?", "answer": "No.", "image_ids": ["b1"], "rel_ins_ids": []},
        "SD_INS_3": {"instruction": "Broken?", "answer": "x", "image_ids": ["zz"], "rel_ins_ids": []}}}
    images = {"a1": b64png(10), "a2": b64png(20), "b1": b64png(30)}
    ins, img = write(tmp_path / "SD_instructions.json", instructions), write(tmp_path / "SD.json", images)
    with caplog.at_level(logging.WARNING):
        samples = {s["id"]: s for s in data.load_mimicit(ins, img)}
    assert sorted(samples) == ["SD_INS_1", "SD_INS_2"]
    query = samples["SD_INS_1"]  # the in-context example first, then the query
    assert query["messages"] == chat((U, "<image>\nAny change?"), (A, "No."), (U, "<image>\nWhat differs?"), (A, "The cup moved."))
    assert [len(v["frames"]) for v in query["visuals"]] == [1, 2]
    assert [data.visual_layout(v, len(v["frames"]), 2, ModelConfig()) for v in query["visuals"]] == [(True, None)] * 2
    assert data.open_image(query["visuals"][1]["frames"][1]).getpixel((0, 0)) == (20, 20, 20)
    assert data.visual_layout(samples["SD_INS_2"]["visuals"][0], 1, 1, ModelConfig()) == (False, None)  # alone
    assert "record SD_INS_3: SD_INS_3.image_ids: image zz not in" in caplog.text
    paired = {s["id"] for s in data.load_conversations(ins)}  # SD.json found beside SD_instructions.json
    assert paired == {"SD_INS_1", "SD_INS_2"}
    config = write(tmp_path / "train_config.json", {"SD_INS_2": ["SD_INS_1"]})
    (only,) = data.load_mimicit(ins, img, train_config=config)
    assert only["id"] == "SD_INS_2" and len(only["visuals"]) == 2
    try:
        import pyarrow  # noqa: F401
    except ImportError:
        with pytest.raises(ImportError, match="pyarrow"):
            data.load_mimicit(ins, str(tmp_path / "SD.parquet"))


def test_mimicit_as_otter_reads_it(tmp_path, capsys):
    """Url-safe base64 and text-only instructions (no image_ids) load as Otter's loader reads them; the command line
    finds <name>.json (or .parquet) and <name>_train.json beside <name>_instructions.json (MIMIC-IT's README)."""
    noise = Image.fromarray(np.random.default_rng(0).integers(0, 255, (8, 8, 3), np.uint8))
    buf = io.BytesIO()
    noise.save(buf, "PNG")
    urlsafe = base64.urlsafe_b64encode(buf.getvalue()).decode()
    assert "-" in urlsafe or "_" in urlsafe  # a character the standard alphabet lacks
    ins = write(tmp_path / "DC_instructions.json", {"meta": {}, "data": {
        "DC_INS_1": {"instruction": "Say hi.", "answer": "Hi.", "rel_ins_ids": []},  # text-only
        "DC_INS_2": {"instruction": "What is it?", "answer": "Noise.", "image_ids": ["DC_IMG_1"],
                     "rel_ins_ids": []}}})
    write(tmp_path / "DC.json", {"DC_IMG_1": urlsafe})
    samples = {s["id"]: s for s in data.load_conversations(ins)}
    assert samples["DC_INS_1"]["visuals"] == [] and samples["DC_INS_1"]["messages"] == chat((U, "Say hi."), (A, "Hi."))
    frame = data.open_image(samples["DC_INS_2"]["visuals"][0]["frames"][0])
    assert np.array_equal(np.array(frame), np.array(noise))
    write(tmp_path / "DC_train.json", {"DC_INS_2": ["DC_INS_1"]})  # beside: the queries and their examples
    (query,) = data.load_conversations(ins)
    assert query["messages"] == chat((U, "Say hi."), (A, "Hi."), (U, "<image>\nWhat is it?"), (A, "Noise."))
    assert len(query["visuals"]) == 1  # the text-only example adds no visual
    data.main(["show", ins, "--train-config", write(tmp_path / "mine.json", {"DC_INS_1": []})])
    assert "1 conversations" in capsys.readouterr().out
    os.remove(tmp_path / "DC.json")
    (tmp_path / "DC.parquet").write_bytes(b"PAR1")
    try:
        import pyarrow  # noqa: F401
    except ImportError:
        with pytest.raises(ImportError, match="needs pyarrow"):
            data.load_conversations(ins)
    os.remove(tmp_path / "DC.parquet")
    with pytest.raises(ValueError, match="or <name>.parquet beside"):
        data.load_conversations(ins)


TEMPLATES = {"grounded_VQA": [f"T{k}: {{question}} in {{region}}" for k in range(5)],
             "image_caption": ["Caption it.", "Describe.", "What is shown?", "Tell me.", "Say it."]}


def test_multiinstruct_templates_drawn_per_instance_with_a_seed(tmp_path, caplog):
    png(tmp_path / "img/1.jpg")
    rec = {"unique_id": "v7w_1", "task_name": "grounded_VQA", "image_path": "img/1.jpg", "region": ["144 358 318 598"],
           "question": "Which item is the chair?", "options": ["3 8 43 537", "144 358 318 598"],
           "target_txt": "144 358 318 598"}
    records = [dict(rec, unique_id=f"v7w_{i}") for i in range(300)]
    records += [{"unique_id": "u1", "task_name": "unseen_task", "image_path": "img/1.jpg", "target_txt": "x"},
                {"unique_id": "u2", "task_name": "grounded_VQA", "image_path": "img/1.jpg", "target_txt": "x"}]
    file = write(tmp_path / "train.jsonl", records)
    with open(file, "a") as f:
        f.write('\n{"unique_id": "cut off", "task_na')
    with caplog.at_level(logging.WARNING):
        samples = data.load_multiinstruct(file, TEMPLATES, seed=3)
    assert len(samples) == 300
    assert "record #300 (unique_id u1): task_name: no instruction templates for task 'unseen_task'" in caplog.text
    assert "record #301 (unique_id u2): question: template" in caplog.text
    assert "train.jsonl:303: not valid JSON" in caplog.text and "skipped 3 of 303 records" in caplog.text
    first = samples[0]["messages"]
    k = first[0]["content"][len("<image>\nT")]
    assert first[0]["content"] == (f"<image>\nT{k}: Which item is the chair? in 144 358 318 598"
                                   "\n\n[Options]: 3 8 43 537||||144 358 318 598")
    assert first[1]["content"] == "144 358 318 598" and samples[0]["visuals"][0]["pooled"] is False
    drawn = Counter(s["messages"][0]["content"][len("<image>\nT")] for s in samples)
    assert sorted(drawn) == list("01234") and min(drawn.values()) > 35  # uniform over the five
    again = data.load_multiinstruct(file, TEMPLATES, seed=3)
    other = data.load_multiinstruct(file, TEMPLATES, seed=4)
    assert [s["messages"] for s in again] == [s["messages"] for s in samples]
    assert [s["messages"] for s in other] != [s["messages"] for s in samples]
    fixed = data.load_multiinstruct(file, write(tmp_path / "t.json", TEMPLATES), template_index=2)
    assert all(s["messages"][0]["content"].startswith("<image>\nT2: ") for s in fixed)


def test_natural_instructions_task_file(tmp_path, caplog):
    task = {"Definition": ["Answer with the capital of the country."],
            "Positive Examples": [{"input": "France", "output": "Paris", "explanation": "."},
                                  {"input": "Peru", "output": "Lima"}, {"input": "Chad", "output": "N'Djamena"}],
            "Instances": [{"id": "task1-1", "input": "Japan", "output": ["Tokyo"]}, {"id": "task1-2", "input": "Mali"}]}
    (tmp_path / "tasks").mkdir()
    write(tmp_path / "tasks/task001.json", task)
    (tmp_path / "tasks/task002.json").write_text('{"Definition": ["cut short')  # one broken file: reported, skipped
    with caplog.at_level(logging.WARNING):
        samples = data.load_natural_instructions(str(tmp_path / "tasks"))
    assert "task002.json: not valid JSON" in caplog.text and "(skipped)" in caplog.text
    assert len(samples) == 1 and samples[0]["visuals"] == []
    assert samples[0]["messages"] == chat((U, "Answer with the capital of the country.\n\nPositive example 1:\n"
                                              "Input: France\nOutput: Paris\n\nPositive example 2:\nInput: Peru\n"
                                              "Output: Lima\n\nNow complete the following example.\nInput: Japan\nOutput:"),
                                          (A, "Tokyo"))


def test_load_conversations_reads_each_format_by_its_shape(tmp_path, instit):
    png(tmp_path / "img/1.jpg")
    assert len(data.load_conversations(write(instit / "v.json", [VIDEO]))) == 5  # media root: the file's folder
    llava = [{"id": "1", "conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Yo"}]}]
    assert data.load_conversations(write(tmp_path / "l.json", llava))[0]["id"] == "1"
    ni = {"Definition": ["D"], "Instances": [{"id": "x", "input": "i", "output": ["o"]}]}
    assert data.load_conversations(write(tmp_path / "ni.json", ni))[0]["messages"][1]["content"] == "o"
    mi = [{"unique_id": "m", "task_name": "image_caption", "image_path": "img/1.jpg", "target_txt": "t"}]
    assert data.load_conversations(write(tmp_path / "m.jsonl", mi), templates=TEMPLATES)[0]["id"] == "m"
    with pytest.raises(ValueError, match="needs its instruction templates"):
        data.load_conversations(str(tmp_path / "m.jsonl"))
    with pytest.raises(ValueError, match="not a format data.py reads"):
        data.load_conversations(write(tmp_path / "x.json", [{"foo": 1}]))


def test_instit_masked_video_marks_every_frame_with_the_same_colour(instit, caplog):
    masks = {"00000.jpg": {"1": {"mask": {"size": [12, 16], "counts": [24, 48, 120]}}, "2": {"box": [10, 0, 16, 6]}},
             "00005.jpg": {"1": {"box": [4, 2, 12, 10]}, "02": {"box": [10, 0, 16, 6]}}}
    record = dict(VIDEO, segmentations=masks)
    half = dict(VIDEO, video_id=18, segmentations={"00000.jpg": masks["00000.jpg"]})
    with caplog.at_level(logging.WARNING):
        records = data.load_instit_dataset(write(instit / "masked_video.json", [record, half]), str(instit))
    assert [r["id"] for r in records] == ["video 17"]
    assert "record #1 (video_id 18): segmentations.00005.jpg: no masks for this annotated frame" in caplog.text
    samples = {s["id"]: s for s in data.instit_conversations(records[0], draw_marks=True)}
    video = samples["video 17 video"]["visuals"][0]
    assert [sorted(m) for m in video["masks"]] == [["1", "2"], ["1", "2"]]  # "02" -> "2"
    frames = [np.array(f) for f in data.load_visual(video, data.ModelConfig(image_size=32, patch_size=8))]
    for frame in frames:  # contour and label box of each ID in its own colour, on every frame
        assert all((frame == som.id_colour(i)).all(-1).sum() >= 6 for i in (1, 2))


@pytest.mark.parametrize("name", ["captions.json", "train.jsonl"])
def test_non_utf8_file_names_the_file_and_byte(tmp_path, name):
    """A file saved as Latin-1 (Windows' default): the error names it and the first bad byte, and says the fix."""
    record = {"id": "1", "conversations": [{"from": "human", "value": "Où?"}, {"from": "gpt", "value": "Ici."}]}
    text = json.dumps(record, ensure_ascii=False)
    (tmp_path / name).write_bytes(text.encode("latin-1"))
    offset = text.encode("latin-1").index("ù".encode("latin-1"))
    with pytest.raises(ValueError, match=rf"{name}: not UTF-8 text \(byte offset {offset}: .*save it with the UTF-8"):
        data.main(["show", str(tmp_path / name)])


def test_format_is_read_from_the_records_not_the_extension(tmp_path):
    """MultiInstruct in a .json, LLaVA in a .jsonl; LLaVA's question file (no answers) is refused, saying what it is."""
    png(tmp_path / "img/1.jpg")
    mi = [{"unique_id": "m", "task_name": "image_caption", "image_path": "img/1.jpg", "target_txt": "t"}]
    assert data.load_conversations(write(tmp_path / "m.json", mi), templates=TEMPLATES)[0]["id"] == "m"
    llava = [{"id": "1", "conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Yo"}]}]
    assert data.load_conversations(write(tmp_path / "llava.jsonl", llava))[0]["messages"][1]["content"] == "Yo"
    questions = [{"question_id": 0, "image": "img/1.jpg", "text": "What is in the image?", "category": "detail"}]
    for templates in (None, TEMPLATES):  # train.py passes its --templates with every source
        with pytest.raises(ValueError, match=r"questions.jsonl: a LLaVA question file \(question_id, image, text; no "
                                             r"answers\) is for evaluation, not training"):
            data.load_conversations(write(tmp_path / "questions.jsonl", questions), templates=templates)


# Records exactly as MultiInstruct releases them (VT-NLP/MultiInstruct, train.jsonl and test.jsonl, Apache-2.0), with
# the `prompt` the authors rendered, and the template they drew turned into ours by the rules in the README.
RELEASED = [
    ({"unique_id": "visualgenome_object_relationship_2374286_4310275", "image_source": "visualgenome",
      "task_name": "object_relationship", "image_path": "./raw_datasets/visual_genome/VG_100K/2374286.jpg",
      "region": ["6 386 332 498", "13 393 329 490"], "target_txt": "of",
      "meta_data": {"subject": "back", "object": "heads"},
      "prompt": "Tell me the relationship between the subject in 6 386 332 498 and the object in 13 393 329 490.",
      "target": "of"},
     "Tell me the relationship between the subject in {region[0]} and the object in {region[1]}."),
    ({"unique_id": "visualgenome_object_relationship_2372067_4156495", "image_source": "visualgenome",
      "task_name": "visual_object_region", "image_path": "./raw_datasets/visual_genome/VG_100K/2372067.jpg",
      "region": ["0 349 498 481"],
      "meta_data": {"subject": "shadow", "object": "ground", "relation": "on",
                    "object_regions": {"subject": ["2 444 462 474"], "object": ["0 349 498 481"]}},
      "target_txt": "0 349 498 481",
      "prompt": "Which object has the relationship \"on\" with the subject in 2 444 462 474? "
                "Answer the question by generating the region of the object.",
      "target": "0 349 498 481"},
     "Which object has the relationship \"{meta_data[relation]}\" with the subject in "
     "{meta_data[object_regions][subject]}? Answer the question by generating the region of the object."),
    ({"unique_id": "visualgenome_object_relationship_2388063_4770642", "image_source": "visualgenome",
      "task_name": "visual_object_identification", "image_path": "./raw_datasets/visual_genome/VG_100K_2/2388063.jpg",
      "region": ["268 303 288 326", "205 242 301 331"], "target_txt": "luggage",
      "meta_data": {"subject": "wheel", "object": "luggage", "relation": "on"},
      "prompt": "In this task, you are asked to identify the object given tne region of the subject in the image and "
                "their relationship. The subject is in 268 303 288 326 and relationship is on. The object is",
      "target": "luggage"},
     "In this task, you are asked to identify the object given tne region of the subject in the image and their "
     "relationship. The subject is in {region[0]} and relationship is {meta_data[relation]}. The object is"),
    ({"unique_id": "hateful_memes_test_unseen_15740", "image_source": "hateful_memes",
      "task_name": "visual_text_extraction",
      "image_path": "./raw_datasets/hateful_memes/img/15740.png", "target_txt": "when someone tells you how to bbq",
      "meta_data": {"label": "Yes"}, "prompt": "What is the text written on the image?",
      "target": "when someone tells you how to bbq"},
     "What is the text written on the image?"),
    ({"unique_id": "medic_test_0_disaster_types", "image_source": "medic", "task_name": "medic_disaster_types",
      "image_path": "/projects/nlp_lab/yings/mata_data/medic/data/ASONAM17_Damage_Image_Dataset/ecuador_eq/"
                    "ecuador_eq_mild_im_121.jpg", "target_txt": "earthquake",
      "options": ["little or none damage", "not informative", "hurricane", "informative", "fire", "severe damage",
                  "not disaster", "mild damage", "landslide", "other disaster", "flood", "earthquake"],
      "meta_data": {"task_cat": "disaster_types", "options": ["earthquake", "fire", "flood", "hurricane", "landslide",
                                                              "not disaster", "other disaster"]},
      "prompt": "What kind of disaster happens in the image? If no disaster happens in the image, select not disaster."
                "\n\n[Options]: little or none damage||||not informative||||hurricane||||informative||||fire||||severe "
                "damage||||not disaster||||mild damage||||landslide||||other disaster||||flood||||earthquake",
      "target": "earthquake"},
     "What kind of disaster happens in the image? If no disaster happens in the image, select not disaster."
     "\n\n[Options]: {options}"),
    ({"unique_id": "medic_test_0_damage_severity", "image_source": "medic", "task_name": "medic_damage_severity",
      "image_path": "/projects/nlp_lab/yings/mata_data/medic/data/ASONAM17_Damage_Image_Dataset/ecuador_eq/"
                    "ecuador_eq_mild_im_121.jpg", "target_txt": "mild damage",
      "options": ["informative", "landslide", "severe damage", "fire", "hurricane", "not informative", "mild damage",
                  "earthquake", "other disaster", "little or none damage", "not disaster", "flood"],
      "meta_data": {"task_cat": "damage_severity",
                    "options": ["severe damage", "mild damage", "little or none damage"]},
      "prompt": "What is the damage level in the image?", "target": "mild damage"},
     "What is the damage level in the image?{options:.0}"),  # this template hides the options: zero width
]


def test_multiinstruct_released_records_render_the_authors_prompt(tmp_path, caplog):
    """Ours equals the authors' prompt; list fields are indexed (`{region[0]}`, not its first character); image paths,
    relative or absolute on the authors' machine, resolve to their longest tail under --media-root."""
    root = tmp_path / "multiinstruct"
    images = {"./raw_datasets/visual_genome/VG_100K/2374286.jpg": "raw_datasets/visual_genome/VG_100K/2374286.jpg",
              "./raw_datasets/visual_genome/VG_100K/2372067.jpg": "visual_genome/VG_100K/2372067.jpg",
              "./raw_datasets/visual_genome/VG_100K_2/2388063.jpg": "visual_genome/VG_100K_2/2388063.jpg",
              "./raw_datasets/hateful_memes/img/15740.png": "hateful_memes/img/15740.png",
              RELEASED[4][0]["image_path"]: "medic/data/ASONAM17_Damage_Image_Dataset/ecuador_eq/"
                                            "ecuador_eq_mild_im_121.jpg"}
    for where in images.values():
        png(root / where)
    records = [record for record, _ in RELEASED]
    templates = {record["task_name"]: [template] for record, template in RELEASED}
    samples = data.load_multiinstruct(write(tmp_path / "train.jsonl", records), templates, str(root), template_index=0)
    assert [s["messages"][0]["content"] for s in samples] == ["<image>\n" + r["prompt"] for r in records]
    assert [s["messages"][1]["content"] for s in samples] == [r["target"] for r in records]
    for sample, record in zip(samples, records):
        assert os.path.samefile(sample["visuals"][0]["frames"][0], root / images[record["image_path"]])
    one_region = dict(RELEASED[0][0], region="6 386 332 498")  # one region as a string: still an item, not a letter
    (sample,) = data.load_multiinstruct(write(tmp_path / "one.jsonl", [one_region]),
                                        {"object_relationship": ["Subject in {region[0]}; all: {region}."]}, str(root))
    assert sample["messages"][0]["content"] == "<image>\nSubject in 6 386 332 498; all: 6 386 332 498."
    no_region = [dict(RELEASED[0][0], unique_id="null", region=None), {k: v for k, v in RELEASED[0][0].items()
                                                                         if k != "region"}]  # null, or no key
    samples = data.load_multiinstruct(write(tmp_path / "none.jsonl", no_region),
                                      {"object_relationship": ["Regions: {region}."]}, str(root))
    assert [s["messages"][0]["content"] for s in samples] == ["<image>\nRegions: ."] * 2  # written as nothing
    positional = {"unique_id": "p", "task_name": "VQA_positional_reasoning", "question": "What is left of the cup?",
                  "options": ["cake", "patio"], "target_txt": "cake",
                  "image_path": "./raw_datasets/hateful_memes/img/15740.png"}
    mid = "Question: {question}\n\n[Options]:\n\n Please answer by the positions of objects. {options}."
    missing = dict(positional, unique_id="gone", image_path="/projects/nlp_lab/elsewhere/nowhere.jpg")
    with caplog.at_level(logging.WARNING):
        samples = data.load_multiinstruct(write(tmp_path / "p.jsonl", [positional, missing]),
                                          {"VQA_positional_reasoning": [mid]}, str(root))
    assert [s["messages"][0]["content"] for s in samples] == [  # placed by the template, not appended again
        "<image>\nQuestion: What is left of the cup?\n\n[Options]:\n\n Please answer by the positions of objects. "
        "cake||||patio."]
    assert (f"p.jsonl: record #1 (unique_id gone): image_path: /projects/nlp_lab/elsewhere/nowhere.jpg: neither it nor "
            f"any tail of it is under {root}") in caplog.text
