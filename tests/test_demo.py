"""demo.py: the synthetic world, its oracle annotator and a short run end to end."""
import dataclasses
import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import data
import evaluate
import som
import demo


@pytest.fixture(autouse=True)
def small_bench(monkeypatch):
    """The demo's bench is 200 scenes (2,000 questions); 40 keep these runs short."""
    monkeypatch.setattr(demo, "DEMO_BENCH_SCENES", 40)


def test_rle_round_trip():
    rng = np.random.default_rng(0)
    for shape in [(7, 5), (1, 1), (30, 40)]:
        mask = rng.random(shape) < 0.3
        mask[0, 0] = True  # a mask starting with 1s needs a leading 0-count
        assert (som.decode_rle(demo.encode_rle(mask)) == mask).all()


def test_world_is_reproducible_and_masks_match_the_frames(tmp_path):
    a = demo.synthetic_world(str(tmp_path / "a"), 6, seed=3, video_fraction=0.5, num_frames=8, size=64)
    b = demo.synthetic_world(str(tmp_path / "b"), 6, seed=3, video_fraction=0.5, num_frames=8, size=64)
    assert json.dumps(a) == json.dumps(b)
    for ra in a:
        for name in ra["frames"]:
            assert (tmp_path / "a" / ra["video_path"] / name).read_bytes() == (tmp_path / "b" / ra["video_path"] / name).read_bytes()
    assert {len(r["frames"]) for r in a} <= {1, 8} and len({len(r["frames"]) for r in a}) == 2
    rec = next(r for r in a if len(r["frames"]) == 8)
    frame = np.array(data.open_image(str(tmp_path / "a" / rec["video_path"] / "00000.png")))
    for i, entry in rec["segmentations"]["00000.png"].items():
        mask = som.decode_rle(entry["mask"])
        colour = demo.COLOURS[rec["truth"]["instances"][i]["colour"]]
        assert (frame[mask] == colour).all()  # the visible mask is exactly the shape's own pixels


def test_bench_distractors_come_from_the_scene_first():
    truth = {"size": 96, "instances": {"1": {"colour": "red", "shape": "circle", "size": "tiny", "motion": "left"},
                                       "2": {"colour": "blue", "shape": "square", "size": "large", "motion": "up"},
                                       "3": {"colour": "green", "shape": "diamond", "size": "tiny", "motion": "still"}},
             "centres": {"00000.png": {"1": [20, 20], "2": [70, 20], "3": [20, 70]}}}
    for seed in range(20):
        for q in demo.synthetic_questions(truth, random.Random(seed), ["colour", "shape", "motion", "relation"]):
            assert len(set(q["options"])) == 4 and q["value"] in q["options"]
            if q["kind"] == "colour":
                asked = q["question"][q["question"].index("[") + 1]
                others = {truth["instances"][i]["colour"] for i in "123" if i != asked}
                assert others <= set(q["options"])  # both other marked instances' colours are options


def test_oracle_annotations_pass_the_real_annotators_checks(tmp_path):
    records = demo.synthetic_world(str(tmp_path), 8, seed=1, num_frames=8, size=96)
    out = [demo.oracle_record(r, tmp_path, tmp_path / "som") for r in records]
    for rec in out:
        demo.check_record(rec)  # every [ID] is drawn on its frame, every <t> exists
        assert rec["question_answer_pairs"]
    data.write_json(tmp_path / "oracle.json", out)
    loaded = data.load_instit_dataset(str(tmp_path / "oracle.json"))
    conversations = [c for r in loaded for c in data.instit_conversations(r)]
    kinds = {c["id"].split(" ", 2)[2].split(" ")[0] for c in conversations}
    assert kinds == {"frame", "change", "video", "qa"}
    broken = dict(out[0], question_answer_pairs=[{"question": "What is [9] doing?", "answer": "[9] waits."}])
    try:
        demo.check_record(broken)
    except ValueError as e:
        assert "[9]" in str(e)
    else:
        raise AssertionError("an undrawn [9] passed check_record")


def test_short_demo_writes_results_pictures_and_a_model(tmp_path, capsys):
    result = demo.main(["--out", str(tmp_path), "--scenes", "24", "--max-steps", "6", "--log-every", "2",
                         "--eval-every", "3", "--vision-pretrain-steps", "3"])
    assert result["step"] == 6
    assert "too few steps to read the marks; --scenes 8000 --max-steps 4000" in capsys.readouterr().out
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["som"] is True and results["chance_mc"] == 25.0
    assert set(results["splits"]) == {"image_mc", "image_oe", "video_mc", "video_oe"}
    for split, scores in results["splits"].items():
        assert scores["total"] > 0 and scores["by_kind"]
        values = [scores["score"]] if split.endswith("mc") else [scores["oe_proxy"], scores["exact"]]
        assert all(0 <= v <= 100 for v in values)
    for split, b in results["binding"].items():  # right vs the ID-blind guess on colour/shape/size questions
        assert split in results["splits"] and b["total"] > 0 and 0 < b["id_blind"] <= 100
        assert 0 <= b["right"] <= b["in_scene"] <= 100  # a right answer names a value of the scene
    assert [c["step"] for c in results["curve"]] == [3, 6]  # --eval-every: the learning curve on the bench
    assert set(results["curve"][0]["eval"]) == {"image_mc", "video_mc"}
    minutes = [c["minutes"] for c in results["curve"]]  # wall-clock minutes since the demo started, at each score
    assert 0 < minutes[0] <= minutes[1] <= results["minutes"]
    for name in ("loss.png", "som_frames.png", "answers.png", "final/trained.safetensors", "bench/predictions.jsonl",
                 "reading/final/trained.safetensors", "reading/metrics.jsonl"):
        assert (tmp_path / name).stat().st_size > 0
    from safetensors.torch import load_file
    random_vit, pretrained = (load_file(tmp_path / f / "model.safetensors") for f in ("base/vision", "vision"))
    assert any(not torch.equal(random_vit[k], pretrained[k]) for k in random_vit)  # the ViT's pretraining ran
    stages = [json.loads((tmp_path / f / "config.json").read_text())["model"] for f in ("reading", ".")]
    assert all(m["vision_model"] == str(tmp_path / "vision") for m in stages)  # and both stages start from it
    reading = json.loads((tmp_path / "reading" / "config.json").read_text())["train"]  # the first stage, then the mixture from it
    assert reading["max_steps"] == round(demo.DEMO_READING_SHARE * 6)
    assert reading["data"] == [str(tmp_path / "world" / "reading.json")]
    mixture = json.loads((tmp_path / "config.json").read_text())["train"]
    assert mixture["init_from"] == str(tmp_path / "reading" / "final")
    assert len(mixture["data"]) == 3 and mixture["data"][2].startswith(reading["data"][0])  # reading chats kept
    bench = json.loads((tmp_path / "world" / "bench" / "image_multi_choice.json").read_text())
    assert all(Path(tmp_path / "world" / "bench" / q["image"]).is_file() for q in bench)
    assert "bench_som" in bench[0]["image"]  # the model is asked about marked frames
    import subprocess
    import sys
    script = Path(__file__).parent.parent / "benchmarks" / "demo_optimizer.py"  # AdamW's share of a step, on it
    run = subprocess.run([sys.executable, str(script), str(tmp_path / "final"), "--steps", "2", "--rounds", "1"],
                         capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert "58 trained tensors" in run.stdout
    assert all(path in run.stdout for path in ("median: single-tensor", "foreach", "fused"))
    run = subprocess.run([sys.executable, str(script), str(tmp_path)], capture_output=True, text=True)  # no model
    assert run.returncode == 2 and f"{tmp_path / 'trained.safetensors'}: no such file" in run.stderr


def test_no_som_demo_shows_raw_frames(tmp_path):
    demo.main(["--no-som", "--out", str(tmp_path), "--scenes", "12", "--max-steps", "2",
                "--vision-pretrain-steps", "1"])
    bench = json.loads((tmp_path / "world" / "bench" / "video_multi_choice.json").read_text())
    assert bench and all("/media/" in "/" + q["video_path"] for q in bench)
    records = json.loads((tmp_path / "world" / "train.json").read_text())
    assert all(r["video_path"].startswith("media/") for r in records)
    for row in json.loads((tmp_path / "world" / "reading.json").read_text()):  # the raw first frame, unmarked
        scene, i = row["id"].rsplit("-", 1)
        shown = tmp_path / "world" / row.get("image", row.get("video", "") + "/00000.png")
        raw = tmp_path / "world" / "media" / scene / "00000.png"
        assert (np.array(data.open_image(str(shown))) == np.array(data.open_image(str(raw)))).all()


def test_demo_pins_every_field_of_its_mark_style():
    """A change of som.MarkStyle's defaults (INST-IT's small labels) must not change the demo's frames."""
    assert None not in dataclasses.astuple(demo.DEMO_MARKS)
    frame = som.render_som(Image.new("RGB", (96, 96)), {1: [20, 20, 60, 60]}, demo.DEMO_MARKS)
    x, y, w, h = frame.info["label_boxes"]["1"]
    assert (x + w // 2, y + h // 2) == (40, 40) and max(w, h) <= demo.DEMO_PATCH  # whole in the patch at (32..48)


def test_token_targets_name_the_instance_covering_most_of_each_patch():
    p = demo.DEMO_PATCH
    big, small = np.zeros((demo.DEMO_IMAGE_SIZE,) * 2, bool), np.zeros((demo.DEMO_IMAGE_SIZE,) * 2, bool)
    big[:p, :p + 4] = True            # all of patch 0, a quarter of patch 1 (below the 30% floor)
    small[:p // 2, :p // 2 + 1] = True  # 28% of patch 0, under the big one
    small[:p, p:2 * p] = True          # but all of patch 1
    instances = {"1": {"colour": "red", "shape": "square", "size": "large"},
                 "2": {"colour": "blue", "shape": "circle", "size": "tiny"}}
    masks = {i: {"mask": demo.encode_rle(m)} for i, m in (("1", big), ("2", small))}
    target = demo.token_targets(masks, instances)
    index = lambda i: [list(v).index(instances[i][k]) for k, v in demo.ATTRIBUTES.items()]  # noqa: E731
    assert target[0].tolist() == index("1") and target[1].tolist() == index("2")
    assert (target[2:] == -100).all()  # no instance there


def test_demo_resume_skips_a_finished_reading_stage(tmp_path):
    args = ["--out", str(tmp_path), "--scenes", "12", "--max-steps", "4", "--save-every", "2",
            "--log-every", "1", "--vision-pretrain-steps", "1"]
    demo.main(args)
    reading_log = (tmp_path / "reading" / "metrics.jsonl").read_text()
    vit = (tmp_path / "vision" / "model.safetensors").stat().st_mtime_ns
    (tmp_path / "results.json").unlink()
    result = demo.main(args + ["--resume"])  # the mixture resumes from its checkpoint-4: nothing left to train
    assert result["step"] == 4 and (tmp_path / "results.json").is_file()
    assert (tmp_path / "reading" / "metrics.jsonl").read_text() == reading_log  # the reading stage did not run again
    assert (tmp_path / "vision" / "model.safetensors").stat().st_mtime_ns == vit  # nor the ViT's pretraining
    assert [json.loads(line)["step"] for line in open(tmp_path / "metrics.jsonl")] == [1, 2, 3, 4]
    with pytest.raises(SystemExit, match="holds a demo run already: add --resume"):  # a second run, not resumed
        demo.main(args)


def test_reading_data_marks_one_instance_and_asks_its_number_first(tmp_path):
    records = demo.synthetic_world(str(tmp_path), 6, seed=4, num_frames=8, size=96, prefix="train")
    rows = demo.reading_data(records, tmp_path, som=True)
    visible = sum(len(r["segmentations"][r["frames"][0]]) for r in records)
    assert len(rows) == visible  # one chat per instance on the first frame
    by_scene = {r["video_id"]: r for r in records}
    for row in rows:
        scene, i = row["id"].rsplit("-", 1)
        rec, turns = by_scene[scene], row["conversations"]
        assert turns[0]["value"] == "<image>\nWhich number is marked?" and turns[1]["value"] == f"[{i}]."
        facts, name, video = rec["truth"]["instances"][i], rec["frames"][0], len(rec["frames"]) > 1
        x, y = rec["truth"]["centres"][name][i]
        where = ("top" if y < 48 else "bottom") + (" left" if x < 48 else " right")
        assert [t["value"] for t in turns[3::2]] == [f"[{i}] is {facts['colour']}.", f"[{i}] is a {facts['shape']}.",
                                                     f"[{i}] is {facts['size']}.", f"[{i}] is at the {where} at <1>."]
        assert ("video" in row) == video  # a video scene's frame is shown pooled, as a one-frame video
        shown = tmp_path / (f"{row['video']}/{name}" if video else row["image"])
        raw = np.array(data.open_image(str(tmp_path / rec["video_path"] / name)))
        changed = (np.array(data.open_image(str(shown))) != raw).any(-1)
        ys, xs = np.nonzero(som.decode_rle(rec["segmentations"][name][i]["mask"]))
        box = np.zeros_like(changed)
        box[ys.min():ys.max() + 1, xs.min():xs.max() + 1] = True
        assert changed.any() and not (changed & ~box).any()  # the mark of [i] alone, drawn inside its box


def test_general_data_asks_about_training_scenes_and_names_the_right_option(tmp_path):
    records = demo.synthetic_world(str(tmp_path), 10, seed=2, num_frames=8, size=96, prefix="train")
    rows = demo.general_data(records, "media", seed=0)
    truth = {r["video_id"]: r["truth"]["instances"] for r in records}
    checked = 0
    for row in rows:  # one multi-turn chat per scene, the frames announced once
        scene, turns = row["id"], row["conversations"]
        assert scene.startswith("train")  # never a bench scene
        assert turns[0]["value"].startswith("<image>\n") and not any("<image>" in t["value"] for t in turns[1:])
        assert len(turns) > 2 * len(demo.SYNTHETIC_KINDS["image"])  # several draws of each kind
        for human, gpt in zip(turns[::2], turns[1::2]):
            question, answer = human["value"], gpt["value"]
            if question.removeprefix("<image>\n").startswith("What colour") and "\nA. " in question:
                asked = question[question.index("[") + 1:question.index("]")]
                options = dict(line.split(". ", 1) for line in question.splitlines()
                               if line[:3] in ("A. ", "B. ", "C. ", "D. "))
                assert answer == truth[scene][asked]["colour"] and answer in options.values()
                assert evaluate.extract_choice(answer, options) == next(k for k, v in options.items() if v == answer)
                checked += 1
    assert checked > 0


def test_binding_tells_seeing_the_scene_from_reading_the_mark():
    """Colour of [1] (red) in a scene of a red [1] and a blue [2]: red is right, blue is seen but unbound,
    green is not in the scene; the ID-blind guess is right half the time."""
    records = [{"video_id": "bench00000", "truth": {"instances": {
        "1": {"colour": "red", "shape": "circle", "size": "tiny"},
        "2": {"colour": "blue", "shape": "circle", "size": "large"}}}}]
    options = {"A": "blue", "B": "green", "C": "red", "D": "white"}
    asked = {"question_id": "bench00000-colour", "question": "What colour is [1]?"}
    predictions = [{**asked, "split": "image_mc", "options": options, "model_prediction": said}
                   for said in ("C", "blue", "B", "no idea")]
    predictions += [{**asked, "split": "image_oe", "options": None, "model_prediction": said}
                    for said in ("[1] is red .", "[1] is blue.", "[1] is red or blue.")]
    predictions.append({"question_id": "bench00000-shape", "question": "What shape is [2]?", "split": "image_oe",
                        "options": None, "model_prediction": "[2] is a circle."})  # one shape in the scene
    predictions.append({"question_id": "bench00000-position", "question": "Where is [2] at <1>?",
                        "split": "image_oe", "options": None, "model_prediction": "top left"})  # not an attribute
    binding = demo.binding(predictions, records)
    assert binding["image_mc"] == {"right": 25.0, "in_scene": 50.0, "id_blind": 50.0, "total": 4}
    assert binding["image_oe"] == {"right": 50.0, "in_scene": 75.0, "id_blind": 62.5, "total": 4}


def test_demo_curves_names_a_results_file_without_a_curve(tmp_path):
    """benchmarks/demo_curves.py refuses a results.json written without --eval-every, naming it."""
    import subprocess
    import sys
    results = tmp_path / "results.json"
    results.write_text(json.dumps({"som": True, "seed": 0, "steps": 10}))
    script = Path(__file__).parent.parent / "benchmarks" / "demo_curves.py"
    run = subprocess.run([sys.executable, str(script), str(results), "--out", str(tmp_path / "c.png")],
                         capture_output=True, text=True)
    assert run.returncode == 2 and f"{results}: no learning curve" in run.stderr
    assert not (tmp_path / "c.png").exists()


def test_two_runs_with_one_seed_agree(tmp_path):
    """Same seed, same run: the losses of both stages at every step, the bench's answers and the world's files
    (the check behind moving the demo into demo.py: a refactor must not change a run)."""
    args = ["--scenes", "12", "--max-steps", "3", "--log-every", "1", "--vision-pretrain-steps", "2", "--seed", "5"]
    for run in ("a", "b"):
        demo.main(args + ["--out", str(tmp_path / run)])

    def losses(run):
        return [(r["step"], r["loss"]) for stage in ("reading/", "") for r in
                map(json.loads, open(tmp_path / run / f"{stage}metrics.jsonl"))]

    def answers(run):
        return [(p["question_id"], p["model_prediction"]) for p in
                map(json.loads, open(tmp_path / run / "bench" / "predictions.jsonl"))]

    assert losses("a") == losses("b") and len(losses("a")) == 6
    assert answers("a") == answers("b") and answers("a")
    world = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a" / "world").rglob("*") if p.is_file())
    assert world and all((tmp_path / "a" / p).read_bytes() == (tmp_path / "b" / p).read_bytes() for p in world)


def test_demo_curves_against_minutes_leaves_out_runs_without_them(tmp_path):
    """demo_curves.py --x minutes draws the curves that carry wall-clock minutes and names the ones left out."""
    import subprocess
    import sys
    curve = [{"step": s, "eval": {"image_mc": 30.0 + s, "video_mc": 28.0 + s}} for s in (1, 2)]
    old, new = tmp_path / "demo_som_seed0_10x2.json", tmp_path / "demo_som_seed1_10x2_rerun.json"
    old.write_text(json.dumps({"som": True, "seed": 0, "steps": 2, "curve": curve}))
    new.write_text(json.dumps({"som": True, "seed": 1, "steps": 2,
                               "curve": [{**c, "minutes": 5.0 * c["step"]} for c in curve]}))
    script = Path(__file__).parent.parent / "benchmarks" / "demo_curves.py"
    run = subprocess.run([sys.executable, str(script), str(old), str(new), "--x", "minutes",
                          "--out", str(tmp_path / "c.png")], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert f"left out: {old}" in run.stdout and "seed 1, 10x2 rerun" in run.stdout and "seed 0" not in run.stdout
    assert "image_mc: 5.0: 31.0, 10.0: 32.0" in run.stdout  # minutes on the x axis
    assert (tmp_path / "c.png").stat().st_size > 0
    run = subprocess.run([sys.executable, str(script), str(old), "--x", "minutes", "--out", str(tmp_path / "d.png")],
                         capture_output=True, text=True)
    assert run.returncode == 2 and "no results.json whose curve carries minutes" in run.stderr
