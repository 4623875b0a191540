"""evaluate.py: multiple-choice extraction, MC scoring, the offline OE proxy, Sensitivity."""
import math

import pytest

from evaluate import extract_choice, oe_proxy, score_mc, sensitivity

OPTIONS = {"A": "[2] is erasing the board.", "B": "[2] is taking notes.",
           "C": "[2] is leaving the room.", "D": "[2] is asleep."}

PHRASINGS = [  # (response, chosen letter or None)
    ("B", "B"), ("b", "B"), (" C ", "C"), ("(B)", "B"), ("(b)", "B"), ("B.", "B"), ("B)", "B"), ("B:", "B"),
    ("**B**", "B"), ("**B.**", "B"), ("**(D)**", "D"), ("Option B", "B"), ("option c", "C"),
    ("Option (A)", "A"), ("Choice D", "D"), ("The answer is B", "B"), ("The answer is B.", "B"),
    ("the answer is b", "B"), ("The best answer is: C", "C"), ("Answer: D", "D"), ("answer: (a)", "A"),
    ("The correct answer is (C).", "C"), ("The answer is option D.", "D"),
    ("B. [2] is taking notes.", "B"), ("(C) [2] is leaving the room.", "C"),
    ("A person stands at the board, so B", "B"),
    ("A person is writing; therefore, C.", "C"),
    ("A man points at the board while [2] writes. The answer is B.", "B"),
    ("I think A, but looking again the answer is D", "D"),
    ("[2] is taking notes.", "B"), ("It seems [2] is asleep", "D"),
    ("The answer is E", None), ("E", None), ("(F)", None), ("", None), ("I don't know.", None),
    ("A or B, hard to say", None), ("A person is writing on the board.", None),
    ("The answer is a dog.", None), ("Answer: A", "A"), ("A", "A"), ("a.", "A"),
    ("B is correct because [2] takes notes.", "B"), ("Hence it is A.", "A"),
    ("So the answer is C", "C"), ("My choice: (B)", "B"),
    ("I think B", "B"), ("I think it is C.", "C"), ("I would choose B", "B"), ("Neither A nor B", None),
]


@pytest.mark.parametrize("response,expected", PHRASINGS)
def test_extract_choice_phrasings(response, expected):
    assert extract_choice(response, OPTIONS) == expected


def test_extract_choice_respects_the_option_letters():
    assert extract_choice("C", "AB") is None and extract_choice("C", ["a", "b", "c"]) == "C"
    assert len(PHRASINGS) >= 40


def test_mc_score_counts_unparsed_answers_as_wrong():
    preds = [{"model_prediction": "B", "ground_truth": "B"}, {"model_prediction": "The answer is C", "ground_truth": "C"},
             {"model_prediction": "no idea", "ground_truth": "A"}, {"model_prediction": "D", "ground_truth": "A"}]
    # The official scorer drops "no idea" and reports 2/3 = 66.7; here it is wrong: 2/4.
    assert score_mc(preds) == {"score": 50.0, "total": 4, "unparsed": 1}


def test_oe_proxy_needs_the_same_ids():
    ref = "[1] is holding a red umbrella."
    assert oe_proxy(ref, ref) == pytest.approx(1.0)
    assert oe_proxy("[2] is holding a red umbrella.", ref) == 0.0
    assert 0 < oe_proxy("[1] holds an umbrella", ref) < 1


def test_sensitivity_on_hand_computed_values():
    # task a: scores 1, 3 -> mean 2, population std 1 -> 0.5; task b: constant -> 0; mean 0.25
    assert sensitivity({"a": [1.0, 3.0], "b": [5.0, 5.0, 5.0]}) == pytest.approx(0.25)
    values = [10.0, 20.0, 30.0, 40.0, 50.0]  # mean 30, std sqrt(200)
    assert sensitivity({"t": values}) == pytest.approx(math.sqrt(200) / 30)
    with pytest.raises(ValueError, match="no scores"):
        sensitivity({"t": []})


# ---------------------------------------------------------------------------------------------------
# The judge against a real chat-completions server on 127.0.0.1.

import json  # noqa: E402

import evaluate  # noqa: E402
from som import named_ids  # noqa: E402


def judge(body):
    """Scores 1.0 when the model answer names the reference's [IDs], else 0.0."""
    ref, answer = body["messages"][1]["content"].split("Reference answer: ")[1].split("\nModel answer: ")
    return {"score": 1.0 if named_ids(ref) == named_ids(answer) else 0.0}


OE = [{"question_id": "1", "question": "What is [1] holding?", "model_prediction": "[1] holds an umbrella.",
       "ground_truth": "[1] is holding a red umbrella.", "split": "image_oe"},
      {"question_id": "2", "question": "Where is [2]?", "model_prediction": "[3] is at the door.",
       "ground_truth": "[2] stands at the door.", "split": "image_oe"}]


def test_judge_scores_retries_and_caches(tmp_path, monkeypatch, llm_server):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-judge-test")
    server, server.answer = llm_server, judge
    server.script = ["429", "not_json"]  # a rate limit, then an answer that is not JSON: both retried
    out = tmp_path / "s.json"
    preds = tmp_path / "p.jsonl"
    preds.write_text("\n".join(json.dumps(p) for p in OE))
    cli = ["score", "--predictions", str(preds), "--mode", "oe", "--out", str(out), "--judge-base-url", server.url,
           "--judge-model", "judge"]
    result = evaluate.main(cli)  # the CLI path: score --mode oe with a judge
    assert result["score"] == 50.0 and result["failed"] == 0 and result["total"] == 2
    sent = len(server.log)
    assert evaluate.main(cli)["score"] == 50.0 and len(server.log) == sent  # re-run: all from the cache
    assert "sk-judge-test" not in "".join(p.read_text() for p in tmp_path.iterdir())


def test_score_cli_mc_and_bad_prediction_files(tmp_path):
    preds = tmp_path / "p.json"
    preds.write_text(json.dumps([{"question_id": "1", "model_prediction": "(B)", "ground_truth": "B"},
                                 {"question_id": "2", "model_prediction": "unsure", "ground_truth": "A"}]))
    out = tmp_path / "s.json"
    evaluate.main(["score", "--predictions", str(preds), "--mode", "mc", "--out", str(out)])
    assert json.loads(out.read_text()) == {"score": 50.0, "total": 2, "unparsed": 1}
    preds.write_text(json.dumps([{"question_id": "1", "ground_truth": "B"}]))
    with pytest.raises(SystemExit, match=r"record 0 \(question_id '1'\) lacks \['model_prediction'\]"):
        evaluate.load_predictions(str(preds))
    preds.write_text("[]")
    with pytest.raises(SystemExit, match="no predictions"):
        evaluate.load_predictions(str(preds))



def test_score_refuses_repeats_and_ground_truths_that_are_no_option(tmp_path):
    preds, out = tmp_path / "p.json", str(tmp_path / "s.json")
    row = {"question_id": "7", "question": "?", "model_prediction": "A", "ground_truth": "A"}
    preds.write_text(json.dumps([row, row, row, {**row, "question_id": "8", "ground_truth": "B"}]))
    with pytest.raises(SystemExit, match="p.json: question_id '7' appears 3 times"):  # it scored 75.0 over 4
        evaluate.main(["score", "--predictions", str(preds), "--mode", "mc", "--out", out])
    options = {"A": "a red circle", "B": "a blue square"}  # a ground truth given as the option's text
    preds.write_text(json.dumps([{**row, "options": options, "ground_truth": "a red circle"}]))
    assert evaluate.main(["score", "--predictions", str(preds), "--mode", "mc", "--out", out])["score"] == 100.0
    preds.write_text(json.dumps([{**row, "options": options, "ground_truth": "E"}]))
    with pytest.raises(SystemExit, match=r"p.json: question 7: ground truth 'E' is none of the options \['A', 'B'\]"):
        evaluate.main(["score", "--predictions", str(preds), "--mode", "mc", "--out", out])


def test_offline_oe_is_reported_as_proxy_not_judge():
    result = evaluate.score_oe(OE)
    assert "score" not in result and result["total"] == 2 and 0 < result["oe_proxy"] < 100


# ---------------------------------------------------------------------------------------------------
# A tiny model end to end through `run` on a 4-question bench.

def test_run_on_a_tiny_bench(tiny, tmp_path, capsys):
    from PIL import Image

    from model import ModelConfig, build_model

    model = build_model(ModelConfig(vision_model=tiny["clip"], language_model=tiny["llama"], lora_r=4,
                                    trainable_vision_layers=0), device="cpu")
    model.save_pretrained(tmp_path / "model")
    Image.new("RGB", (40, 30), (200, 30, 30)).save(tmp_path / "a.png")
    (tmp_path / "vid").mkdir()
    for t in range(4):
        Image.new("RGB", (40, 30), (30, 30, 60 * t)).save(tmp_path / "vid" / f"{t:05d}.jpg")
    options = {"choice_a": "[1] is red.", "choice_b": "[1] is blue.", "choice_c": "[1] is green.", "choice_d": "[2]."}
    bench = [{"question_id": "i1", "question": "What colour is [1]?", "answer": "A", "image": "a.png", **options},
             {"question_id": "i2", "question": "What colour is [1]?", "answer": "[1] is red.", "image": "a.png"},
             {"question_id": "v1", "question": "What does [1] do?", "answer": "B", "video_path": "vid", **options},
             {"question_id": "v2", "question": "What does [1] do at <2>?", "answer": "[1] darkens.", "video_path": "vid"}]
    (tmp_path / "bench.json").write_text(json.dumps(bench))
    summary = evaluate.main(["run", "--model", str(tmp_path / "model"), "--bench", str(tmp_path / "bench.json"),
                             "--out", str(tmp_path / "out"), "--max-new-tokens", "4", "--num-frames", "4",
                             "--batch-size", "2"])
    assert set(summary) == {"image_mc", "image_oe", "video_mc", "video_oe"}
    assert summary["image_mc"]["total"] == 1 and "unparsed" in summary["image_mc"]
    rows = [json.loads(line) for line in open(tmp_path / "out" / "predictions.jsonl")]
    assert [r["question_id"] for r in rows] == ["i1", "i2", "v1", "v2"]
    assert all(set(r) >= {"question_id", "question", "model_prediction", "ground_truth", "split"} for r in rows)
    saved = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert saved == json.loads(json.dumps(summary)) and "score" not in saved["image_oe"]  # no judge: proxy only
    assert (tmp_path / "out" / "scores.png").stat().st_size > 0
    printed = capsys.readouterr().out
    assert "no judge configured: oe_proxy" in printed and "INST-IT (Qwen2-7B)" in printed and "75.3" in printed
    with pytest.raises(SystemExit, match="unknown split"):
        evaluate.main(["run", "--model", "x", "--bench", "y", "--splits", "image_xx", "--out", str(tmp_path)])
    (tmp_path / "empty.json").write_text("[]")
    with pytest.raises((SystemExit, ValueError), match="no questions|empty|no bench"):
        evaluate.main(["run", "--model", str(tmp_path / "model"), "--bench", str(tmp_path / "empty.json"),
                       "--out", str(tmp_path / "o2")])


def test_instructions_reports_each_template_and_the_sensitivity(tiny, tmp_path):
    from PIL import Image

    from model import ModelConfig, build_model

    model = build_model(ModelConfig(vision_model=tiny["clip"], language_model=tiny["llama"], lora_r=4,
                                    trainable_vision_layers=0), device="cpu")
    model.save_pretrained(tmp_path / "model")
    Image.new("RGB", (32, 32), (9, 9, 9)).save(tmp_path / "a.png")
    tasks = [{"unique_id": f"{task}{i}", "task_name": task, "image_path": "a.png", "question": "Which?",
              "target_txt": "yes"} for task in ("vqa", "caption") for i in range(3)]
    (tmp_path / "tasks.jsonl").write_text("\n".join(json.dumps(t) for t in tasks))
    templates = {"vqa": ["{question}", "Answer: {question}", "Q: {question}"],
                 "caption": ["Describe it.", "Say what it is.", "Caption."]}
    (tmp_path / "templates.json").write_text(json.dumps(templates))
    report = evaluate.main(["instructions", "--model", str(tmp_path / "model"), "--tasks", str(tmp_path / "tasks.jsonl"),
                            "--templates", str(tmp_path / "templates.json"), "--out", str(tmp_path / "out")])
    assert set(report["tasks"]) == {"vqa", "caption"}
    assert all(len(r["scores"]) == 3 and 0 <= r["mean"] <= r["max"] <= 100 for r in report["tasks"].values())
    assert report["sensitivity"] == evaluate.sensitivity({t: r["scores"] for t, r in report["tasks"].items()})
    assert json.loads((tmp_path / "out" / "instructions.json").read_text())["sensitivity"] == report["sensitivity"]
