"""annotate.py against a real chat-completions server on 127.0.0.1 (no API key, no network).

`FakeLLM` (conftest.py) is a stdlib HTTP server speaking the chat-completions protocol. It answers every request from
its content (marks and timestamps it reads in the prompt), so a re-run gets identical answers, and
`script` makes the next requests misbehave: 429, 500, a slow answer (client timeout), a body that is not
JSON, an answer that is not JSON, an answer naming an ID that was never drawn, or a hang (to kill a run).
"""
import base64
import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import annotate
import conftest
import data
import demo

KEY = "sk-test-7f3a9c2e51d84b06"  # must never appear in a file the annotator writes
REPO = Path(__file__).resolve().parent.parent


def _text(body):
    return "\n".join(part["text"] if isinstance(part, dict) else part
                     for m in body["messages"]
                     for part in (m["content"] if isinstance(m["content"], list) else [m["content"]])
                     if not isinstance(part, dict) or part.get("type") == "text")


def valid_answer(body):
    """The answer a careful annotator gives: only the marks listed, only the timestamps given."""
    user = [m for m in body["messages"] if m["role"] == "user"
            and not str(m["content"]).startswith("Your answer was rejected")][-1]  # the query, not a re-ask
    text, dump = _text(body), json.dumps(body)
    if "Translate every" in text:
        pairs = json.loads(user["content"])["pairs"]
        return {"pairs": [{k: "ZH " + p[k] for k in p} for p in pairs]}
    ids = sorted({int(i) for i in re.findall(r"\[(\d+)\]", _text({"messages": [user]}))})
    times = sorted({int(t) for t in re.findall(r"<(\d+)>", _text({"messages": [user]}))})
    if "instruction" in dump:
        return {"pairs": [{"instruction": f"Describe [{i}].", "answer": f"[{i}] is a shape at <{times[-1]}>."
                           if times else f"[{i}] is a shape."} for i in ids]}
    if "question_answer_pairs" in dump:
        return {"question_answer_pairs": [{"question": f"Where is [{i}] at <{t}>?", "answer": f"[{i}] is "
                                           f"in frame <{t}>."} for i in ids for t in times]}
    if "video_level_caption" in dump:
        return {"video_level_caption": " ".join(f"At <{t}> {' '.join(f'[{i}]' for i in ids)} move."
                                                for t in times)}
    answer = {"instance_level": [{"id": i, "caption": f"a coloured square number {i}"} for i in ids],
              "image_level": " and ".join(f"[{i}]" for i in ids) + " on a grey background."}
    if "temporal_change" in dump:
        answer["temporal_change"] = f"[{ids[0]}] moves right." if ids else "Nothing changes."
    return answer


@pytest.fixture
def server(llm_server):
    llm_server.answer = valid_answer
    return llm_server


@pytest.fixture(autouse=True)
def api_key(monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", KEY)


def rle(mask):
    """Uncompressed COCO RLE of a bool mask (column-major runs, starting with zeros)."""
    flat, counts, value, run = mask.T.reshape(-1), [], False, 0
    for v in flat:
        if v != value:
            counts.append(run)
            value, run = v, 0
        run += 1
    counts.append(run)
    return {"size": list(mask.shape), "counts": counts}


def square(x, y, size=12, shape=(48, 64)):
    mask = np.zeros(shape, bool)
    mask[y:y + size, x:x + size] = True
    return mask


@pytest.fixture
def media(tmp_path):
    """Two 3-frame videos (RLE masks; boxes) with a 4th frame on disk that is not listed, and one image."""
    root = tmp_path / "media"
    records = []
    for v, kind in ((1, "mask"), (2, "box")):
        folder = root / "videos" / f"v{v}"
        folder.mkdir(parents=True)
        segs = {}
        for t in range(4):
            Image.fromarray(np.full((48, 64, 3), 40 * t + 20 * v, np.uint8)).save(folder / f"{t * 5:05d}.jpg")
            boxes = {1: (4 + 6 * t, 8), 2: (40, 30 - 4 * t)}
            if v == 2 and t == 2:
                boxes[3] = (20, 20)  # appears in one frame only
            segs[f"{t * 5:05d}.jpg"] = {str(i): {"mask": rle(square(x, y))} if kind == "mask"
                                        else {"box": [x, y, x + 12, y + 12]} for i, (x, y) in boxes.items()}
        records.append({"video_id": v, "video_path": f"videos/v{v}",
                        "frames": ["00000.jpg", "00005.jpg", "00010.jpg"], "segmentations": segs})
    Image.fromarray(np.full((48, 64, 3), 200, np.uint8)).save(root / "img.jpg")
    records.append({"image_id": 9, "image_path": "img.jpg",
                    "segmentations": {"1": {"mask": rle(square(5, 5))}, "2": {"box": [30, 20, 50, 40]},
                                      "3": {"mask": rle(np.zeros((48, 64), bool))}}})  # 3: empty, no mark
    (tmp_path / "in.json").write_text(json.dumps(records))
    return tmp_path


def cli(media, server, out="out/out.json", *extra):
    return ["--input", str(media / "in.json"), "--media-root", str(media / "media"), "--out", str(media / out),
            "--base-url", server.url, "--model", "gpt-test", "--workers", "3", "--num-frames", "3",
            "--timeout", "5", *extra]


def assert_no_key(folder, *texts):
    for path in Path(folder).rglob("*"):
        if path.is_file():
            assert KEY.encode() not in path.read_bytes(), path
    for text in texts:
        assert KEY not in text


def test_three_stages_end_to_end_and_rerun_sends_nothing(media, server, capsys):
    server.delay = 0.05
    assert annotate.main(cli(media, server)) == 0
    assert server.max_inflight >= 2  # --workers 3: records are annotated concurrently
    assert "tokens=1320 cost=$0.00" in capsys.readouterr().err  # the progress bar: 11 requests x 120 tokens
    out = media / "out" / "out.json"
    records = json.loads(out.read_text())
    assert [r.get("video_id", r.get("image_id")) for r in records] == [1, 2, 9]
    assert len(server.log) == 2 * (3 + 2) + 1  # Eq. 1 per frame, Eq. 2 and 3 per video; one image
    assert server.auth == f"Bearer {KEY}"
    first = server.bodies[0]
    assert first["response_format"]["type"] == "json_schema" and first["response_format"]["json_schema"]["strict"]
    assert any(p.get("image_url", {}).get("url", "").startswith("data:image/jpeg;base64,")
               for m in first["messages"] if isinstance(m["content"], list) for p in m["content"])

    v2 = records[1]
    assert [f["timestamp"] for f in v2["frame_level_caption"]] == [1, 2, 3]
    assert [f["frame_name"] for f in v2["frame_level_caption"]] == ["00000.jpg", "00005.jpg", "00010.jpg"]
    assert v2["frame_level_caption"][0]["temporal_change"] is None
    assert v2["frame_level_caption"][1]["temporal_change"] == "[1] moves right."
    assert set(v2["frame_level_caption"][2]["instance_level"]) == {"1", "2", "3"}  # [3] drawn on <3> only
    assert set(v2["frame_level_caption"][1]["instance_level"]) == {"1", "2"}
    assert "<3>" in v2["video_level_caption"] and len(v2["question_answer_pairs"]) == 3 * 3
    assert set(v2["segmentations"]) == {"00000.jpg", "00005.jpg", "00010.jpg"}
    for f in v2["frame_level_caption"]:  # the SoM frames are saved where the record points
        assert Image.open(out.parent / v2["video_path"] / f["frame_name"]).size == (64, 48)
    image = records[2]
    assert set(image["instance_level_caption"]) == {"1", "2"}  # the empty mask [3] is not drawn
    assert (out.parent / image["image_path"]).is_file() and "temporal_change" not in image

    for record in records:  # what demo.py's oracle records must pass too
        demo.check_record(record)
    records[1]["frame_level_caption"][1]["image_level"] = "[3] appears."  # [3] is marked on <3> only
    with pytest.raises(ValueError, match=r"video_id=2 frame 00005.jpg: \[3\] named"):
        demo.check_record(records[1])
    records[1]["frame_level_caption"][1]["image_level"] = "[1] waits."
    records[1]["question_answer_pairs"][0]["answer"] = "At <4>."
    with pytest.raises(ValueError, match=r"video_id=2 video caption or QA: <4> named"):
        demo.check_record(records[1])
    loaded = data.load_instit_dataset(str(out))  # the loader of the published data reads what we wrote
    assert [len(r["frames"]) for r in loaded] == [3, 3, 1] and loaded[1]["frames"][2]["masks"]["3"]

    before, n = out.read_bytes(), len(server.log)
    assert annotate.main(cli(media, server)) == 0
    assert len(server.log) == n and out.read_bytes() == before  # all from the cache
    captured = capsys.readouterr()
    assert "sent=0 cached=11" in captured.out
    assert_no_key(media, captured.out, captured.err)


def test_rate_limit_then_success(tmp_path, server):
    client = annotate.LLMClient(server.url, "m", tmp_path / "c.jsonl", max_retries=3)
    server.script = ["429", "429"]
    answer = annotate.summarize_video(client, [{"timestamp": 1, "instance_level": {"1": "a cat"},
                                                 "image_level": "[1] sits."}])
    assert answer == "At <1> [1] move."
    assert [b for _, b in server.log] == ["429", "429", "ok"] and client.requests == 1 and client.failed == 0
    assert client.prompt_tokens == 100 and client.cost == pytest.approx((100 * 2.5 + 20 * 10) / 1e6)


FRAMES = [{"timestamp": 1, "instance_level": {"1": "a cat", "2": "a dog"}, "image_level": "[1] and [2]."}]


def test_server_error_is_recorded_and_retried_on_rerun(tmp_path, server):
    cache = tmp_path / "c.jsonl"
    server.script = ["500"] * 3
    with pytest.raises(annotate.LLMError, match="500"):
        annotate.generate_qa(annotate.LLMClient(server.url, "m", cache, max_retries=2), FRAMES)
    failed = [json.loads(line) for line in cache.read_text().splitlines()]
    assert len(server.log) == 3 and [e["status"] for e in failed] == ["failed"] and "500" in failed[0]["reason"]
    client = annotate.LLMClient(server.url, "m", cache, max_retries=2)  # a re-run asks again
    assert len(annotate.generate_qa(client, FRAMES)) == 2 and len(server.log) == 4
    assert annotate.generate_qa(annotate.LLMClient(server.url, "m", cache), FRAMES)  # then it is cached
    assert len(server.log) == 4


def test_timeout_is_retried_then_fails(tmp_path, server):
    server.script = ["slow"]
    client = annotate.LLMClient(server.url, "m", tmp_path / "c.jsonl", timeout=0.5, max_retries=1)
    assert annotate.summarize_video(client, FRAMES) == "At <1> [1] [2] move."
    assert [b for _, b in server.log] == ["slow", "ok"]
    server.script = ["slow"]
    client = annotate.LLMClient(server.url, "m", tmp_path / "c2.jsonl", timeout=0.5, max_retries=0)
    with pytest.raises(annotate.LLMError, match="Timeout"):
        annotate.summarize_video(client, FRAMES)


def test_malformed_json_is_asked_again_with_the_reason(tmp_path, server):
    server.script = ["not_json"]
    client = annotate.LLMClient(server.url, "m", tmp_path / "c.jsonl")
    assert annotate.summarize_video(client, FRAMES) == "At <1> [1] [2] move."
    retry = server.bodies[1]["messages"]
    assert retry[-2] == {"role": "assistant", "content": "Sure! Here are the captions: [1] is red."}
    assert "rejected: invalid answer" in retry[-1]["content"]
    server.script = ["bad_body"]  # an HTTP body that is not JSON at all
    client = annotate.LLMClient(server.url, "m", tmp_path / "c2.jsonl", max_retries=0)
    with pytest.raises(annotate.LLMError, match="JSONDecodeError"):
        annotate.summarize_video(client, FRAMES)


def test_unknown_id_is_rejected_retried_then_recorded(tmp_path, server):
    frame = Image.new("RGB", (32, 32))
    client = annotate.LLMClient(server.url, "m", tmp_path / "c.jsonl", answer_retries=2)
    server.script = ["bad_id"]
    answer = annotate.annotate_frame(client, frame, None, {1, 2})
    assert answer["image_level"] == "[1] and [2] on a grey background." and answer["temporal_change"] is None
    assert "[99] named in" in server.bodies[1]["messages"][-1]["content"]
    server.script = ["bad_id"] * 3
    with pytest.raises(annotate.LLMError, match=r"\[99\].*not among the marks \[1\] \[2\].*3 attempts"):
        annotate.annotate_frame(client, frame, frame, {1, 2}, {1})
    entries = [json.loads(line) for line in (tmp_path / "c.jsonl").read_text().splitlines()]
    assert [e["status"] for e in entries[-3:]] == ["failed"] * 3  # so a re-run asks again
    n = len(server.log)
    client = annotate.LLMClient(server.url, "m", tmp_path / "c.jsonl")
    assert annotate.annotate_frame(client, frame, frame, {1, 2}, {1})["temporal_change"] == "[1] moves right."
    assert len(server.log) == n + 1


def test_json_mode_validates_locally(tmp_path, server):
    client = annotate.LLMClient(server.url, "m", tmp_path / "c.jsonl", json_mode=True)
    server.script = ["not_json"]
    assert annotate.summarize_video(client, FRAMES) == "At <1> [1] [2] move."  # asked again after not_json
    body = server.bodies[0]
    assert body["response_format"] == {"type": "json_object"}
    assert [m["role"] for m in body["messages"]] == ["system", "user"]  # the schema joins the one system message
    assert "JSON schema" in body["messages"][0]["content"] and "video_level_caption" in body["messages"][0]["content"]
    with pytest.raises(ValueError, match="lacks 'score'"):
        annotate.check_schema({}, annotate.schema_object(score={"type": "number"}))
    with pytest.raises(ValueError, match=r"answer\.pairs\[0\]\.answer should be string"):
        annotate.check_schema({"pairs": [{"instruction": "a", "answer": 3}]}, annotate._PAIRS)


def test_key_never_written_even_when_the_server_echoes_it(tmp_path, server, capsys):
    server.script = ["401"]
    with pytest.raises(annotate.LLMError) as error:
        annotate.summarize_video(annotate.LLMClient(server.url, "m", tmp_path / "c.jsonl"), FRAMES)
    assert "***" in str(error.value) and KEY not in str(error.value)
    assert_no_key(tmp_path, *capsys.readouterr())


def test_killed_run_resumes_without_resending(media, server):
    server.hang_after = 4  # the 5th request hangs; the 4 answered ones are in the cache by then
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.Popen([sys.executable, str(REPO / "annotate.py"), *cli(media, server, "out/out.json",
                             "--workers", "1")], cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert server.hanging.wait(60)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    server.release.set()
    first_run = set(server.answered())
    assert len(first_run) == 4 and not (media / "out" / "out.json").exists()
    server.hang_after, server.log[:] = None, []
    assert annotate.main(cli(media, server)) == 0
    assert not first_run & set(h for h, _ in server.log)  # no answered request sent again
    assert len(server.log) == 11 - 4
    assert annotate.main(cli(media, server, "fresh/out.json")) == 0  # an uninterrupted run, fresh cache
    assert (media / "out" / "out.json").read_text() == (media / "fresh" / "out.json").read_text()


def test_cache_line_cut_by_a_kill_is_skipped(tmp_path, server):
    cache = tmp_path / "c.jsonl"
    annotate.summarize_video(annotate.LLMClient(server.url, "m", cache), FRAMES)
    cache.write_bytes(cache.read_bytes() + b'{"key": "abc", "stat')
    client = annotate.LLMClient(server.url, "m", cache)
    assert annotate.summarize_video(client, FRAMES) and client.cached == 1 and len(server.log) == 1
    annotate.generate_qa(client, FRAMES)
    assert [json.loads(line)["status"] for line in cache.read_text().splitlines()[-1:]] == ["ok"]


def test_batch_file_round_trip(media, server):
    batch, results = media / "batch.jsonl", media / "results.jsonl"
    live = media / "live" / "out.json"
    assert annotate.main(cli(media, server, "live/out.json")) == 0
    server.log[:] = []
    rounds = 0
    while True:
        extra = ["--batch-file", str(batch)] + (["--batch-results", str(results)] if rounds else [])
        assert annotate.main(cli(media, server, "out/out.json", *extra)) == 0
        lines = [json.loads(line) for line in batch.read_text().splitlines()]
        if not lines or rounds == 3:
            break
        assert all(line["url"] == "/v1/chat/completions" and len(line["custom_id"]) == 64 for line in lines)
        with open(results, "w") as f:  # what the Batch API returns for these lines (here: our server)
            for line in lines:
                request = urllib.request.Request(server.url + "/chat/completions", json.dumps(line["body"]).encode(),
                                                 {"content-type": "application/json"})
                body = json.loads(urllib.request.urlopen(request).read())
                f.write(json.dumps({"id": "r", "custom_id": line["custom_id"], "error": None,
                                    "response": {"status_code": 200, "body": body}}) + "\n")
        rounds += 1
    assert rounds == 2  # frames first, then video summaries and QA, which read the frame annotations
    assert (media / "out" / "out.json").read_text() == live.read_text()
    assert len(server.log) == 11  # each request once, all through the batch file


def test_frames_default_to_the_segmented_ones_and_are_sampled_uniformly(media, server):
    records = json.loads((media / "in.json").read_text())
    del records[1]["frames"]  # then every frame with segmentations is a candidate: 00000 ... 00015
    (media / "in.json").write_text(json.dumps(records[1:2]))
    assert annotate.main(cli(media, server, "out/out.json", "--num-frames", "2")) == 0
    [video] = json.loads((media / "out" / "out.json").read_text())
    assert [(f["timestamp"], f["frame_name"]) for f in video["frame_level_caption"]] == [(1, "00000.jpg"),
                                                                                         (2, "00015.jpg")]
    assert len(server.log) == 2 + 2


def test_bad_input_names_the_file_and_record(media, server, capsys):
    records = json.loads((media / "in.json").read_text())
    os.remove(media / "media" / "videos" / "v1" / "00005.jpg")
    records[1]["segmentations"]["00000.jpg"]["2"] = {"points": [1, 2]}
    (media / "in.json").write_text(json.dumps(records))
    assert annotate.main(cli(media, server)) == 1
    err = capsys.readouterr().err
    assert "FAILED video_id=1: " in err and "videos/v1/00005.jpg: frame not found" in err
    assert "FAILED video_id=2: segmentations of 00000.jpg: instance 2: expected an RLE or a dict" in err
    assert [r["image_id"] for r in json.loads((media / "out" / "out.json").read_text())] == [9]
    (media / "dup.json").write_text(json.dumps([records[2], records[2]]))
    with pytest.raises(ValueError, match=r"dup.json: record 1: image_id=9 appears twice"):
        annotate.read_input(media / "dup.json")
    (media / "cut.json").write_text(json.dumps(records)[:-20])  # a file cut short, as by a killed copy
    with pytest.raises(ValueError, match=r"cut.json: not valid JSON"):
        annotate.read_input(media / "cut.json")
    records[2]["segmentations"]["2"] = {"box": [50, 20, 30, 40]}  # reversed: was dropped, the others still named
    (media / "in.json").write_text(json.dumps(records))
    assert annotate.main(cli(media, server, "out2/out.json")) == 1
    assert ("FAILED image_id=9: segmentations of 9.jpg: instance 2: box [50, 20, 30, 40] has x1 < x0"
            in capsys.readouterr().err)


def test_refs_are_normalised_and_checked():
    assert annotate.refs("[3, 4] near [01] at <02>") == ({1, 3, 4}, {2})
    annotate.check_refs("[3, 4] at <1>-<2>", {3, 4}, {1, 2})
    with pytest.raises(ValueError, match="<0>"):
        annotate.check_refs("[3] at <0>", {3}, {1, 2})
    with pytest.raises(ValueError, match=r"\[5\] named"):
        annotate.check_refs("[05] waves", {3, 4})


def test_syphus_with_a_task_file_and_translation(media, server):
    assert annotate.main(cli(media, server)) == 0
    task = {"system_message": "Make pairs about the marks.", "in_context": [
        {"context": "[1]: a cat", "pairs": [{"instruction": "What is [1]?", "answer": "A cat."}]}]}
    (media / "task.json").write_text(json.dumps(task))
    args = ["--input", str(media / "out" / "out.json"), "--out", str(media / "pairs.json"), "--prompts",
            str(media / "task.json"), "--languages", "Chinese", "--base-url", server.url, "--model", "m"]
    assert annotate.main(["syphus", *args]) == 0
    request = next(b["messages"] for b in server.bodies if b["messages"][0]["content"] == task["system_message"])
    assert request[0]["content"] == "Make pairs about the marks." and request[1]["content"] == "[1]: a cat"
    assert json.loads(request[2]["content"]) == {"pairs": task["in_context"][0]["pairs"]}
    pairs, chinese = (json.loads((media / n).read_text()) for n in ("pairs.json", "pairs_Chinese.json"))
    images = json.loads((media / "pairs_images.json").read_text())
    assert len(pairs["data"]) == 2 + 3 + 2 and set(pairs["data"]) == set(chinese["data"])
    first = pairs["data"]["SY_INS_000000"]
    assert first["instruction"] == "Describe [1]." and first["rel_ins_ids"] == ["SY_INS_000001"]
    assert chinese["data"]["SY_INS_000000"]["instruction"] == "ZH Describe [1]."
    assert first["image_ids"] == ["1_00000.jpg", "1_00005.jpg", "1_00010.jpg"]
    som = media / "out" / "out_som" / "videos" / "1" / "00005.jpg"
    assert base64.b64decode(images["1_00005.jpg"]) == som.read_bytes()
    samples = data.load_mimicit(str(media / "pairs.json"), str(media / "pairs_images.json"))
    assert len(samples) == 7 and len(samples[0]["messages"]) == 2 * 2  # one in-context pair, then the query
    (media / "task.json").write_text(json.dumps({"system_message": "x", "in_context": [{"context": "y"}]}))
    with pytest.raises(ValueError, match=r"task.json: .*in_context\[0\] is incomplete"):
        annotate.main(["syphus", *args])


def test_review_page_escapes_text(media, server):
    assert annotate.main(cli(media, server)) == 0
    out = media / "out" / "out.json"
    records = json.loads(out.read_text())
    records[0]["frame_level_caption"][0]["image_level"] = "<script>alert(1)</script> [1]"
    records[0]["frame_level_caption"][1]["image_level"] = None  # the oracle writes none for a lone instance
    out.write_text(json.dumps(records))
    assert annotate.main(["review", str(out)]) == 0
    page = (media / "out" / "out.html").read_text()
    assert "<script>" not in page and "&lt;script&gt;alert(1)&lt;/script&gt; [1]" in page
    assert page.count("<img src=") == 3 + 3 + 1 and "out_som/videos/2/00010.jpg" in page


def test_batch_error_lines_are_recorded_as_failures(tmp_path, server):
    lines = [{"custom_id": "k1", "error": None,
              "response": {"status_code": 500, "body": {"error": {"message": "boom"}}}},
             {"custom_id": "k2", "error": None, "response": {"status_code": 200, "body": {
                 "choices": [{"message": {"role": "assistant", "content": "{}"}}], "usage": None}}}]
    (tmp_path / "results.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    client = annotate.LLMClient(server.url, "m", tmp_path / "c.jsonl")
    assert client.import_batch_results(tmp_path / "results.jsonl") == (1, 1)
    entries = {e["key"]: e for e in map(json.loads, (tmp_path / "c.jsonl").read_text().splitlines())}
    assert entries["k2"] == {**entries["k2"], "status": "ok", "content": "{}"}
    assert entries["k1"]["status"] == "failed" and "boom" in entries["k1"]["reason"]


def test_video_file_frames_are_named_by_index(tmp_path, server, capsys):
    pytest.importorskip("decord")
    from test_data_frames import write_avi  # a minimal MJPEG AVI writer; no encoder library needed

    write_avi(tmp_path / "clip.avi", [Image.fromarray(np.full((48, 64, 3), 30 * i, np.uint8)) for i in range(6)])
    segs = {f"{i:05d}.jpg": {"1": {"box": [4 + 4 * i, 8, 16 + 4 * i, 20]}} for i in range(6) if i != 2}
    record = {"video_id": "clip", "video_path": "clip.avi", "segmentations": segs}
    (tmp_path / "in.json").write_text(json.dumps([record]))
    args = ["--input", str(tmp_path / "in.json"), "--media-root", str(tmp_path), "--out", str(tmp_path / "o.json"),
            "--base-url", server.url, "--model", "m", "--num-frames", "3"]
    assert annotate.main(args) == 1 and not server.log
    assert "clip.avi: sampled frame 00002.jpg has no segmentations" in capsys.readouterr().err
    segs["00002.jpg"] = segs["00000.jpg"]
    (tmp_path / "in.json").write_text(json.dumps([record]))
    assert annotate.main(args) == 0
    [video] = json.loads((tmp_path / "o.json").read_text())
    assert [f["frame_name"] for f in video["frame_level_caption"]] == ["00000.jpg", "00002.jpg", "00005.jpg"]
    assert (tmp_path / "o_som" / "videos" / "clip" / "00005.jpg").is_file()


# ---------------------------------------------------------------------------------------------------
# Bad input and faults (issue 32: 9-14; issue 31: 4). Each names the file and the fix, or keeps the work.

class MalformedBodyHandler(conftest._Handler):
    """conftest's server, where a script entry {"body": ...} answers 200 with that JSON body (no chat completion)."""

    def do_POST(self):
        with self.server.lock:
            entry = self.server.script[0] if self.server.script else None
            if isinstance(entry, dict):
                self.server.script.pop(0)
        if not isinstance(entry, dict):
            return super().do_POST()
        raw = self.rfile.read(int(self.headers["content-length"]))
        with self.server.lock:
            self.server.log.append((hashlib.sha256(raw).hexdigest(), "malformed"))
        self._send(200, entry["body"])


MALFORMED = [[], {"choices": ["s"]}, {"choices": [{"message": None}]}]


@pytest.mark.parametrize("body", MALFORMED, ids=["list", "choice-string", "message-null"])
def test_malformed_server_body_fails_one_record_and_keeps_the_cache(media, server, body, capsys):
    server.RequestHandlerClass = MalformedBodyHandler
    records = json.loads((media / "in.json").read_text())
    (media / "in.json").write_text(json.dumps(records[2:] + records[:1]))  # the image (1 request), then video 1
    server.script = ["ok", {"body": body}]  # the image's answer, then a bad body for video 1's first frame
    assert annotate.main(cli(media, server, "out/out.json", "--workers", "1", "--max-retries", "0")) == 1
    err = capsys.readouterr().err
    assert "FAILED video_id=1: frame 00000.jpg: ValueError: response body" in err and "re-run" in err
    assert [r["image_id"] for r in json.loads((media / "out" / "out.json").read_text())] == [9]
    entries = [json.loads(line) for line in (media / "out" / "out.cache.jsonl").read_text().splitlines()]
    assert [e["status"] for e in entries[:2]] == ["ok", "failed"]
    n = len(server.log)
    assert annotate.main(cli(media, server, "out/out.json")) == 0  # the answers received survive: not asked again
    assert "sent=3 cached=3" in capsys.readouterr().out  # the image, frames 2 and 3 cached; frame 1, Eq. 2, 3 sent
    assert len(server.log) == n + 3 and len(json.loads((media / "out" / "out.json").read_text())) == 2


def test_malformed_batch_result_bodies_are_recorded_as_failures(media, server, capsys):
    assert annotate.main(cli(media, server)) == 0  # every answer cached
    n, cache = len(server.log), media / "out" / "out.cache.jsonl"
    lines = [{"custom_id": f"k{i}", "response": {"status_code": 200, "body": body}} for i, body in enumerate(MALFORMED)]
    (media / "results.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    assert annotate.main(cli(media, server, "out/out.json", "--batch-results", str(media / "results.jsonl"))) == 0
    assert "batch results read: 0 answers, 3 failures" in capsys.readouterr().out
    assert len(server.log) == n  # the answers cached before the import still answer every request
    entries = [json.loads(line) for line in cache.read_text().splitlines()]
    assert [e["status"] for e in entries[-3:]] == ["failed"] * 3 and "response body" in entries[-1]["reason"]


@pytest.fixture
def dataset(tmp_path):
    """A tiny annotate.py OUT.json: one image record and one 2-frame video record, SoM frames beside it."""
    for path in ("som/images/1.jpg", "som/videos/7/00000.jpg", "som/videos/7/00005.jpg"):
        (tmp_path / path).parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (16, 16), "grey").save(tmp_path / path)
    records = [{"image_id": 1, "image_path": "som/images/1.jpg", "instance_level_caption": {"1": "a cup"},
                "image_level_caption": "[1] on a table."},
               {"video_id": 7, "video_path": "som/videos/7", "video_level_caption": "At <1> [2] walks.",
                "frame_level_caption": [{"timestamp": t, "frame_name": f"{5 * (t - 1):05d}.jpg",
                                         "instance_level": {"2": "a man"}, "image_level": "[2] walks."}
                                        for t in (1, 2)]}]
    (tmp_path / "out.json").write_text(json.dumps(records))
    return tmp_path


def syphus_cli(folder, server, out="pairs.json", *extra):
    return ["syphus", "--input", str(folder / "out.json"), "--out", str(folder / out), "--base-url", server.url,
            "--model", "m", "--workers", "1", *extra]


def test_syphus_makes_the_output_folder_before_writing(dataset, server):
    assert annotate.main(syphus_cli(dataset, server, "new/dir/pairs.json")) == 0
    assert len(json.loads((dataset / "new" / "dir" / "pairs.json").read_text())["data"]) == 1 + 1
    assert (dataset / "new" / "dir" / "pairs.cache.jsonl").read_text().count('"ok"') == 2  # the paid answers kept


@pytest.mark.parametrize("fault", ["no_frame_level_caption", "som_frame_missing", "answer_not_text",
                                   "pairs_not_a_list"])
def test_syphus_checks_records_frames_and_task_before_any_request(dataset, server, fault):
    records = json.loads((dataset / "out.json").read_text())
    task = {"system_message": "Make pairs.", "in_context": [{"context": "[1]: a cat", "pairs": [
        {"instruction": "What is [1]?", "answer": "A cat."}]}]}
    expected = {"no_frame_level_caption": r"out.json: video_id=7 has no 'frame_level_caption'",
                "som_frame_missing": r"som/videos/7/00005.jpg: SoM frame of video_id=7 not found; --media-root",
                "answer_not_text": r"task.json: in_context\[0\].pairs\[0\].answer should be string, got 3",
                "pairs_not_a_list": r"task.json: in_context\[0\].pairs should be array"}[fault]
    if fault == "no_frame_level_caption":
        del records[1]["frame_level_caption"]
    if fault == "som_frame_missing":
        os.remove(dataset / "som" / "videos" / "7" / "00005.jpg")
    if fault == "answer_not_text":
        task["in_context"][0]["pairs"][0]["answer"] = 3
    if fault == "pairs_not_a_list":
        task["in_context"][0]["pairs"] = "What is [1]? A cat."
    (dataset / "out.json").write_text(json.dumps(records))
    (dataset / "task.json").write_text(json.dumps(task))
    with pytest.raises(ValueError, match=expected):
        annotate.main(syphus_cli(dataset, server, "pairs.json", "--prompts", str(dataset / "task.json")))
    assert not server.log and not (dataset / "pairs.cache.jsonl").exists()  # nothing paid for


def test_non_utf8_input_names_the_file(media, server):
    """Passes once data.read_json names the file on non-UTF-8 input (data.py, another branch)."""
    (media / "in.json").write_bytes('[{"image_id": 9, "image_path": "caf\u00e9.jpg"}]'.encode("latin-1"))
    with pytest.raises(ValueError, match="in.json"):
        annotate.main(cli(media, server))
    assert not server.log


def test_input_record_that_is_not_an_object_names_the_file_and_record(media, server):
    records = json.loads((media / "in.json").read_text())
    (media / "in.json").write_text(json.dumps([records[2], 5]))
    with pytest.raises(ValueError, match=r"in.json: records\[1\] should be object, got 5"):
        annotate.main(cli(media, server))
    assert not server.log


def test_review_help_and_a_record_without_frames(dataset, capsys):
    with pytest.raises(SystemExit) as stop:
        annotate.main(["review", "--help"])
    assert stop.value.code == 0 and "OUT.json" in capsys.readouterr().out  # help, not a file named --help
    records = json.loads((dataset / "out.json").read_text())
    del records[1]["frame_level_caption"]
    (dataset / "out.json").write_text(json.dumps(records))
    with pytest.raises(ValueError, match=r"out.json: video_id=7 has no 'frame_level_caption'"):
        annotate.main(["review", str(dataset / "out.json")])
    assert not (dataset / "out.html").exists()


# The assistant turns of Otter's published Syphus prompts (mimic-it/syphus/prompts/*.json), in their shapes,
# with our own text; Otter sends a list of dicts as "key: text" lines (abstract_dataset.py).
OTTER_TURNS = {
    "Question/Answer": [{"Question": "What does [1] hold?", "Answer": "A cup."},
                        {"Question": "Where is [1]?", "Answer": "At a table."}],
    "question/answer": [{"question": "Is [1] moving?", "answer": "No, it stands still."}],
    "Options 1..5": [{"Question": "Why is it odd?", **{f"Options {i}": f"reason {i}" for i in range(1, 6)},
                      "Answer": "2"}],
    "CH2Eng Translation": [{"CH2Eng Translation": "A grey cup.",
                            **{f"Expansion_with_Eng_{i}": f"A grey mug, take {i}." for i in range(1, 6)}}],
    "free text": "Question: What colour is [1]?\nAnswer: Grey.",
}


@pytest.mark.parametrize("shape", list(OTTER_TURNS) + ["ours"])
def test_syphus_reads_otter_prompt_files(dataset, server, shape, capsys):
    if shape == "ours":
        task = annotate.PROMPTS["syphus"]
        sent = [{"role": "user", "content": task["in_context"][0]["context"]},
                {"role": "assistant", "content": json.dumps({"pairs": task["in_context"][0]["pairs"]})}]
    else:
        turns = OTTER_TURNS[shape]
        task = {"system_message": "You design questions.",
                "in_context": [{"role": "user", "content": "1. A person sets a grey cup down."},
                               {"role": "assistant", "content": turns}]}
        text = turns if isinstance(turns, str) else "".join(f"{k}: {v}\n" for d in turns for k, v in d.items())
        sent = [task["in_context"][0], {"role": "assistant", "content": text}]
    (dataset / "task.json").write_text(json.dumps(task))
    assert annotate.main(syphus_cli(dataset, server, "pairs.json", "--prompts", str(dataset / "task.json"))) == 0
    assert ("in-context examples read in " + ("our form" if shape == "ours" else "Otter's form")
            in capsys.readouterr().out)
    for body in server.bodies:  # system message, the example turns as Otter sends them, then the record
        assert body["messages"][0] == {"role": "system", "content": task["system_message"]}
        assert body["messages"][1:3] == sent and body["messages"][3]["role"] == "user"
    assert len(server.bodies) == 2 and len(json.loads((dataset / "pairs.json").read_text())["data"]) == 2
    if shape == "Options 1..5":
        assert "Options 5: reason 5\nAnswer: 2\n" in server.bodies[0]["messages"][2]["content"]


def test_otter_prompt_with_a_bad_turn_is_refused(dataset, server):
    task = {"system_message": "x", "in_context": [{"role": "user", "content": "a"},
                                                  {"role": "assistant", "content": [["Question", "Answer"]]}]}
    (dataset / "task.json").write_text(json.dumps(task))
    with pytest.raises(ValueError, match=r"task.json: in_context\[1\] is incomplete: .*Otter's \{role"):
        annotate.main(syphus_cli(dataset, server, "pairs.json", "--prompts", str(dataset / "task.json")))
    assert not server.log
