"""evaluate.py on bad input: each fault is named (file, record, fix) before a model loads where it can be, and the
work already done survives (the judge's cache, predictions.jsonl)."""
import json
import os
import re

import pytest
from PIL import Image

import evaluate
from model import ModelConfig, build_model
from test_evaluate import OE, judge

HERE = os.path.dirname(os.path.abspath(__file__))
NOWHERE = "/nonexistent/model"  # a check that names the fault with this model ran before any model loaded


@pytest.fixture(scope="module")
def checkpoint(tiny, tmp_path_factory):
    folder = tmp_path_factory.mktemp("faults") / "model"
    build_model(ModelConfig(vision_model=tiny["clip"], language_model=tiny["llama"], lora_r=4,
                            trainable_vision_layers=0), device="cpu").save_pretrained(folder)
    return str(folder)


def write(path, records):
    path.write_text("\n".join(json.dumps(r) for r in records) if str(path).endswith(".jsonl") else json.dumps(records))
    return str(path)


# ---------------------------------------------------------------------------------------------------
# Issue 32.10: a judge paid for is cached even when --out names a folder that does not exist yet.

def test_judge_scores_survive_an_out_folder_to_create(tmp_path, monkeypatch, llm_server):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-judge-test")
    llm_server.answer = judge
    out = tmp_path / "new" / "deeper" / "s.json"
    cli = ["score", "--predictions", write(tmp_path / "p.jsonl", OE), "--mode", "oe", "--out", str(out),
           "--judge-base-url", llm_server.url, "--judge-model", "judge"]
    assert evaluate.main(cli)["score"] == 50.0
    assert json.loads(out.read_text())["score"] == 50.0
    assert len((out.parent / "judge.cache.jsonl").read_text().splitlines()) == 2  # both paid answers kept
    sent = len(llm_server.log)
    assert evaluate.main(cli)["score"] == 50.0 and len(llm_server.log) == sent  # a re-run pays nothing


# ---------------------------------------------------------------------------------------------------
# Issue 32.12: predictions files: encoding, one-line JSONL, the line of a JSON error.

ROW = {"question_id": "1", "model_prediction": "(B)", "ground_truth": "B"}


@pytest.mark.parametrize("name,content,message", [
    ("p.jsonl", json.dumps(ROW).replace("(B)", "\xe9").encode("latin-1"), r"p.jsonl: not UTF-8 text"),
    ("p.jsonl", "\n".join([json.dumps(ROW), "", '{"question_id": "2",'] + [json.dumps(ROW)]).encode(),
     r"p.jsonl: line 3 is not valid JSON"),
    ("p.json", json.dumps([ROW, ROW], indent=1).replace('"(B)"', "(B)", 1).encode(),
     r"p.json: line 4 is not valid JSON"),  # a JSON list over many lines: its own line, not line 1
])
def test_unreadable_predictions_name_the_file_and_line(tmp_path, name, content, message):
    (tmp_path / name).write_bytes(content)
    with pytest.raises(SystemExit, match=message):
        evaluate.load_predictions(str(tmp_path / name))


def test_a_one_line_jsonl_is_one_prediction(tmp_path):
    out = tmp_path / "s.json"
    evaluate.main(["score", "--predictions", write(tmp_path / "p.jsonl", [ROW]), "--out", str(out)])
    assert json.loads(out.read_text()) == {"score": 100.0, "total": 1, "unparsed": 0}


# ---------------------------------------------------------------------------------------------------
# Issue 32.16 and 17: a bench with bad media, repeated IDs, bad flags.

@pytest.fixture
def bench(tmp_path):
    """A bench of 3 good questions and 3 whose media cannot be read: a corrupt image, a truncated video, an empty
    frame folder."""
    Image.new("RGB", (40, 30), (200, 30, 30)).save(tmp_path / "a.png")
    (tmp_path / "bad.png").write_bytes(b"\x89PNG\r\n not an image")
    (tmp_path / "cut.mov").write_bytes(open(os.path.join(HERE, "data", "rotated", "video_0.mov"), "rb").read()[:6000])
    (tmp_path / "vid").mkdir()
    (tmp_path / "empty").mkdir()
    for t in range(3):
        Image.new("RGB", (40, 30), (30, 30, 60 * t)).save(tmp_path / "vid" / f"{t:05d}.jpg")
    options = {"choice_a": "[1] is red.", "choice_b": "[1] is blue."}
    return [{"question_id": "i1", "question": "What colour is [1]?", "answer": "A", "image": "a.png", **options},
            {"question_id": "i2", "question": "What is [1]?", "answer": "[1] is red.", "image": "a.png"},
            {"question_id": "v1", "question": "What does [1] do?", "answer": "B", "video_path": "vid", **options},
            {"question_id": "i3", "question": "What is [1]?", "answer": "A", "image": "bad.png", **options},
            {"question_id": "v2", "question": "What does [1] do?", "answer": "[1] waits.", "video_path": "cut.mov"},
            {"question_id": "v3", "question": "What does [1] do?", "answer": "[1] runs.", "video_path": "empty"}]


def run(tmp_path, records, model, *flags):
    return evaluate.main(["run", "--model", model, "--bench", write(tmp_path / "bench.json", records), "--out",
                          str(tmp_path / "out"), "--max-new-tokens", "2", "--num-frames", "2", *flags])


def test_unreadable_media_are_skipped_and_counted(checkpoint, bench, tmp_path, caplog):
    with pytest.raises(SystemExit, match=r"bench.json: 3 of 6 questions skipped .* --max-bad-fraction 0.05"):
        run(tmp_path, bench, checkpoint)  # half the bench unreadable: no score, but the answers are kept
    rows = [json.loads(line) for line in open(tmp_path / "out" / "predictions.jsonl")]
    assert [r["question_id"] for r in rows] == ["i1", "i2", "v1"]
    assert all(name in caplog.text for name in ("bad.png", "cut.mov", "empty"))
    missing = {"question_id": "i4", "question": "What is [1]?", "answer": "[1] hides.", "image": "gone.png"}
    summary = run(tmp_path, bench + [missing], checkpoint, "--max-bad-fraction", "0.6")
    assert {split: (s["total"], s["skipped"]) for split, s in summary.items()} == {
        "image_mc": (1, 1), "image_oe": (1, 1), "video_mc": (1, 0), "video_oe": (0, 2)}  # a split all skipped
    assert json.loads((tmp_path / "out" / "summary.json").read_text())["image_oe"]["skipped"] == 1  # gone.png
    assert "gone.png: frame not found (skipped)" in caplog.text


def test_bench_faults_stop_before_the_model_loads(bench, tmp_path):
    missing = {"question_id": "i4", "question": "What is [1]?", "answer": "[1] hides.", "image": "gone.png"}
    with pytest.raises(SystemExit, match=r"bench.json: 1 of 7 questions' media not found \(.*gone.png, ...\), over"):
        run(tmp_path, bench + [missing], NOWHERE)
    with pytest.raises(SystemExit, match=r"bench.json: question_id 'i1' repeats in image_mc; give each its own ID"):
        run(tmp_path, bench + bench[:1], NOWHERE)
    for flag in ("--num-frames", "--batch-size"):
        with pytest.raises(SystemExit, match=f"{flag} 0: give at least 1"):
            run(tmp_path, bench, NOWHERE, flag, "0")
    # all checked, then a --model path that is no folder is named as such (not the hub's "Repo id must be ...")
    with pytest.raises(SystemExit, match=f"{re.escape(NOWHERE)}: no such folder"):
        run(tmp_path, bench, NOWHERE, "--max-bad-fraction", "1")


def test_int_references_and_null_predictions_are_scored(tmp_path):
    rows = [{**OE[0], "ground_truth": 42}, {**OE[1], "model_prediction": None}]
    result = evaluate.main(["score", "--predictions", write(tmp_path / "p.json", rows), "--out", str(tmp_path / "s")])
    assert result["total"] == 2 and result["oe_proxy"] == 0.0  # both wrong, neither a crash
    # an empty answer chooses nothing, even where an option's text is only punctuation
    assert evaluate.extract_choice("", {"A": "...", "B": "dog"}) is None
    mc = [{"question_id": 1, "question": "q", "model_prediction": None, "ground_truth": "A",
           "options": {"A": "...", "B": "dog"}}]
    result = evaluate.main(["score", "--predictions", write(tmp_path / "m.json", mc), "--out", str(tmp_path / "t")])
    assert result["score"] == 0.0 and result["unparsed"] == 1


# ---------------------------------------------------------------------------------------------------
# Issue 31.3 and 32.17: Sensitivity per (task, instance), each task under all of its own templates.

def test_sensitivity_keeps_tasks_that_share_ids(checkpoint, tmp_path):
    Image.new("RGB", (32, 32), (9, 9, 9)).save(tmp_path / "a.png")
    tasks = [{"unique_id": str(i), "task_name": task, "image_path": "a.png", "question": "Which?", "target_txt": "yes"}
             for task in ("vqa", "caption") for i in range(2)]  # both tasks use instance ids 0 and 1
    (tmp_path / "tasks.jsonl").write_text("\n".join(json.dumps(t) for t in tasks) + "\n{not json\n")
    templates = {"vqa": ["{question}", "Answer: {question}", "Q: {question}"], "caption": ["Describe.", "Caption."]}
    cli = ["instructions", "--model", checkpoint, "--tasks", str(tmp_path / "tasks.jsonl"), "--templates",
           write(tmp_path / "templates.json", templates), "--out", str(tmp_path / "out")]
    report = evaluate.main(cli)["tasks"]
    assert {t: (r["templates"], r["samples"]) for t, r in report.items()} == {"vqa": (3, [2, 2, 2]),
                                                                             "caption": (2, [2, 2])}


@pytest.mark.parametrize("templates,message", [({}, r"templates.json: expected \{task_name"),
                                                ({"vqa": ["{question}"], "caption": []},
                                                 r"templates.json: task 'caption' has no instruction templates")])
def test_bad_templates_stop_before_the_model_loads(tmp_path, templates, message):
    (tmp_path / "tasks.jsonl").write_text("{}")
    with pytest.raises(SystemExit, match=message):
        evaluate.main(["instructions", "--model", NOWHERE, "--tasks", str(tmp_path / "tasks.jsonl"), "--templates",
                       write(tmp_path / "templates.json", templates), "--out", str(tmp_path / "out")])


# ---------------------------------------------------------------------------------------------------
# Issue 31.7: the scoring mode follows the file; a contradicting --mode is refused.

MC = [{"question_id": "1", "model_prediction": "B", "ground_truth": "B"},
      {"question_id": "2", "model_prediction": "C", "ground_truth": "A"}]


@pytest.mark.parametrize("rows,mode,expected", [
    (OE, "mc", r"p.json: question_id '1' and 1 more are not MC \(MC ground truths are letters\)"),
    (MC, "oe", r"p.json: question_id '1' and 1 more are not OE"),
    (OE + MC, None, r"p.json: question_id '1' and 1 more are not OE"),  # mixed: no mode fits every record
    (MC, None, {"score": 50.0, "total": 2, "unparsed": 0}),
    (OE, None, "oe_proxy"),
])
def test_score_mode_follows_the_file(tmp_path, rows, mode, expected):
    cli = ["score", "--predictions", write(tmp_path / "p.json", rows), "--out", str(tmp_path / "s.json")]
    cli += ["--mode", mode] if mode else []
    if isinstance(expected, str) and expected.startswith("p.json"):
        with pytest.raises(SystemExit, match=expected):
            evaluate.main(cli)
    else:
        result = evaluate.main(cli)
        assert result == expected if isinstance(expected, dict) else expected in result
