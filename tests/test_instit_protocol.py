"""evaluate.py --protocol instit: the authors' INST-IT Bench protocol (inst-it/inst-it inst-it-bench: prompts.py,
inference_image.py, inference_video.py, evaluate.py) beside ours: prompts, conversation, pooling, frames, MC letters,
both denominators, and their judge request against a real chat-completions server on 127.0.0.1."""
import hashlib
import json
import re
from dataclasses import replace

import pytest
from PIL import Image

import data
import evaluate
from conftest import make_tokenizer
from model import ModelConfig, build_model, num_visual_tokens

# sha256 (first 16 hex) of the authors' texts: inst-it-bench/prompts.py at inst-it/inst-it 6d7bd50, and
# conv_vicuna_v1.system in LLaVA-VL/LLaVA-NeXT llava/conversation.py
AUTHORS_SHA256 = {  # split: (pre_prompt, post_prompt)
    "image_mc": ("514bbf63aff18ef7", "fda7ab516e630ccc"), "image_oe": ("db658cf221cfc1eb", "0d8b9fb7e3c98cce"),
    "video_mc": ("4d2c3cd539cddd56", "fda7ab516e630ccc"), "video_oe": ("65b99374d5cfd328", "af18f8b42a6f26d9"),
    "gpt_eval image": "f27bd8d96720e81e", "gpt_eval video": "b75b34b0c5fbfd81", "vicuna_v1": "1fa69e2371b762d1"}
SYSTEM = ("A chat between a curious user and an artificial intelligence assistant. The assistant gives helpful, "
          "detailed, and polite answers to the user's questions.")
CHOICES = {"choice_a": "[1] is red.", "choice_b": "[1] is blue.", "choice_c": "[2] is red.", "choice_d": "[2] is blue."}


def sha(text):
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def test_the_texts_are_the_authors_verbatim():
    texts = {split: tuple(map(sha, pair)) for split, pair in evaluate.INSTIT_PROMPTS.items()}
    texts.update({f"gpt_eval {k}": sha(v) for k, v in evaluate.INSTIT_JUDGE_PROMPTS.items()})
    assert {**texts, "vicuna_v1": sha(evaluate.VICUNA_V1_SYSTEM)} == AUTHORS_SHA256
    assert evaluate.VICUNA_V1_SYSTEM == SYSTEM


def authors_input(split, record):
    """The user turn as inference_image.py / inference_video.py write it (DEFAULT_IMAGE_TOKEN + "\\n" + input_text)."""
    pre, post = evaluate.INSTIT_PROMPTS[split]
    if split.endswith("mc"):
        options = (f"A. {record['choice_a']}\nB. {record['choice_b']}\nC. {record['choice_c']}\n"
                   f"D. {record['choice_d']}")
        return "<image>\n" + f"{pre}\n{record['question']}\n{options}\n{post}"
    return "<image>\n" + f"{pre}\n{post}\n{record['question']}"


def vicuna_v1(user):
    """conv_templates["vicuna_v1"].get_prompt() after (USER, user), (ASSISTANT, None): SeparatorStyle.TWO, sep " "."""
    return SYSTEM + " " + "USER: " + user + " " + "ASSISTANT:"


def record(split, question_id="q"):
    mc = split.endswith("mc")
    media = {"video_path": "vid"} if split.startswith("video") else {"image": "a.png"}
    return {"question_id": question_id, "question": "What do [1, 3] do next to [02]?",  # sent unnormalised
            "answer": "B" if mc else "[1] waits.", **media, **(CHOICES if mc else {})}


@pytest.mark.parametrize("split", ["image_mc", "image_oe", "video_mc", "video_oe"])
def test_prompts_render_as_the_authors_write_them(split, tmp_path):
    Image.new("RGB", (40, 30)).save(tmp_path / "a.png")
    question = data.load_instit_bench([record(split)], media_root=str(tmp_path), check_media=False)[0]
    vicuna, chatml = make_tokenizer(), make_tokenizer()
    vicuna.chat_template = None  # a Vicuna checkpoint: their vicuna_v1 conversation, with its system text
    sample = evaluate.bench_sample(question, None, "instit", evaluate.VICUNA_V1_SYSTEM)
    rendered = "".join(piece for piece, _ in data.chat_pieces(sample["messages"], vicuna, add_generation_prompt=True))
    assert rendered == "<s>" + vicuna_v1(authors_input(split, record(split)))
    sample = evaluate.bench_sample(question, None, "instit")  # a chat-template (Qwen2) checkpoint: its own template
    rendered = "".join(piece for piece, _ in data.chat_pieces(sample["messages"], chatml, add_generation_prompt=True))
    assert rendered == f"<|im_start|>user\n{authors_input(split, record(split))}<|im_end|>\n<|im_start|>assistant\n"


# ---------------------------------------------------------------------------------------------------
# Multiple choice: their letter extractor, both denominators.

def extract_characters_regex(s):  # the authors' evaluate.py, verbatim (its two missing commas included)
    s = s.strip()
    answer_prefixes = [
        "The best answer is",
        "The correct answer is",
        "The answer is",
        "The answer",
        "The best option is"
        "The correct option is",
        "Best answer:"
        "Best option:",
        "Answer",
        "Answer:",
        "answer:",
        "answer",
        "Option:",
        "The correct answer",
        "The correct option",
    ]
    for answer_prefix in answer_prefixes:
        s = s.replace(answer_prefix, "")

    if len(s.split()) > 10 and not re.search("[ABCD]", s):
        return ""
    matches = re.search(r'[ABCD]', s)
    if matches is None:
        return ""
    return matches[0]


RESPONSES = ["B", " c ", "(D) [2] is asleep.", "The answer is C", "The best answer is: A", "Best answer: D",
             "Best option: C", "The best option is B", "The correct option is (D)", "Answer: A", "answer: b",
             "Based on the image, the answer is C.", "I cannot tell.", "",
             "a long answer of more than ten words that names no option letter at all here",
             "a long answer of more than ten words that still ends with the option D"]


def test_instit_choice_is_their_extractor():
    assert [evaluate.instit_choice(r) or "" for r in RESPONSES] == [extract_characters_regex(r) for r in RESPONSES]


def test_both_denominators_on_their_letters(tmp_path):
    rows = [("B", "B"), ("The answer is C", "C"),
            ("Best answer: D", "D"),  # "Best answer:" alone is no prefix of theirs: "answer:" goes, "B" of Best stays
            ("Based on the image, [1] is red.", "A"),  # a stray capital: "B" of Based
            ("I cannot tell.", "A"), ("no idea, sorry", "B")]  # no A-D capital: unparsed
    preds = [{"question_id": str(i), "question": "?", "model_prediction": p, "ground_truth": t}
             for i, (p, t) in enumerate(rows)]
    (tmp_path / "p.json").write_text(json.dumps(preds))
    result = evaluate.main(["score", "--protocol", "instit", "--predictions", str(tmp_path / "p.json"), "--mode", "mc",
                            "--out", str(tmp_path / "s.json")])
    assert result == {"score": pytest.approx(100 * 2 / 6), "total": 6, "unparsed": 2, "protocol": "instit",
                      "score_authors": 50.0}  # ours: unparsed count wrong (2 / 6); theirs: dropped (2 / 4)
    assert "score_authors" not in evaluate.score_mc(preds)  # without --protocol: as before


# ---------------------------------------------------------------------------------------------------
# Open-ended: their judge request, structured answers, failures.

OE = [{"question_id": "o1", "question": "What is [1] holding?", "model_prediction": "[1] holds an umbrella.",
       "ground_truth": "[1] is holding a red umbrella.", "split": "image_oe"},
      {"question_id": "o2", "question": "What does [2] do at <2>?", "model_prediction": "[2] sits.",
       "ground_truth": "[2] stands up at <2>.", "split": "video_oe"},
      {"question_id": "o3", "question": "Where is [3]?", "model_prediction": "[3] is outside.",
       "ground_truth": "[3] is at the door.", "split": "image_oe"}]
SCORES = {"[1] holds an umbrella.": 0.8, "[2] sits.": 0.5, "[3] is outside.": 1.5}  # 1.5: out of range, a failure


def their_judge(body):
    item = json.loads(body["messages"][0]["content"][1]["text"])
    return {"sample_score": SCORES[item["tester_response"]]}


def test_their_judge_request_and_both_figures(tmp_path, monkeypatch, llm_server, capsys):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-judge-test")
    llm_server.answer = their_judge
    (tmp_path / "p.jsonl").write_text("\n".join(json.dumps(p) for p in OE))
    result = evaluate.main(["score", "--protocol", "instit", "--predictions", str(tmp_path / "p.jsonl"), "--mode", "oe",
                            "--out", str(tmp_path / "s.json"), "--judge-base-url", llm_server.url])
    assert result["score"] == pytest.approx(100 * (0.8 + 0.5) / 3) and result["failed"] == 1  # ours: failure = 0
    assert result["score_authors"] == pytest.approx(100 * (0.8 + 0.5) / 2)  # theirs: the failure dropped
    assert (result["protocol"], result["judge_model"], result["judge_prompt"]) == (
        "instit", "gpt-4o-2024-08-06", evaluate.INSTIT_JUDGE_VERSION)
    assert "judge failed on o3" in capsys.readouterr().err
    first = {json.loads(b["messages"][0]["content"][1]["text"])["tester_response"]: b for b in llm_server.bodies[::-1]}
    for p in OE:
        body = first[p["model_prediction"]]
        item = json.dumps({"question": p["question"], "ground_truth_answer": p["ground_truth"],
                           "tester_response": p["model_prediction"]})
        prompt = evaluate.INSTIT_JUDGE_PROMPTS["video" if p["split"] == "video_oe" else "image"]
        assert body["messages"][:1] == [{"role": "user", "content": [{"type": "text", "text": prompt},
                                                                     {"type": "text", "text": item}]}]
        assert body["model"] == "gpt-4o-2024-08-06" and body["response_format"]["type"] == "json_schema"
        assert body["response_format"]["json_schema"]["name"] == "SampleScore"
    assert len(llm_server.bodies) == 2 + 3  # the out-of-range answer was asked again twice, then failed


def test_the_schema_is_what_the_sdk_sends_for_their_pydantic_model_titles_aside(tmp_path, monkeypatch, llm_server):
    completions = pytest.importorskip("openai.lib._parsing._completions")
    from pydantic import BaseModel

    class SampleScore(BaseModel):  # the authors' evaluate.py
        sample_score: float

    monkeypatch.setenv("OPENAI_API_KEY", "sk-judge-test")
    llm_server.answer = lambda body: {"sample_score": 1.0}
    from annotate import LLMClient

    client = LLMClient(llm_server.url, evaluate.INSTIT_JUDGE_MODEL, prompt_version=evaluate.INSTIT_JUDGE_VERSION)
    assert evaluate.judge_score(client, "q?", "[1] a.", "[1] a.", video=False, protocol="instit") == 1.0
    def untitled(x):  # pydantic's titles constrain nothing; our schema leaves them out
        return {k: untitled(v) for k, v in x.items() if k != "title"} if isinstance(x, dict) else x

    sent, theirs = llm_server.bodies[0]["response_format"], completions.type_to_response_format_param(SampleScore)
    assert untitled(sent) == untitled(theirs)


# ---------------------------------------------------------------------------------------------------
# `run --protocol instit` on tiny checkpoints saved with other pooling and a frame cap of 4.

OTHER_POOLING = dict(pool_stride=4, pool_mode="average", pool_position="before", video_newline=True, max_frames=4,
                     image_grid_pinpoints=[[32, 64], [64, 32], [64, 64]])


def save_checkpoint(tiny, folder, chat_template):
    """A tiny Vicuna-style (no chat template) or chat-template checkpoint whose tokenizer's model_max_length (8) every
    prompt exceeds, so encode_prompt warns with each prompt's length -> (folder, its config)."""
    model = build_model(ModelConfig(vision_model=tiny["clip"], language_model=tiny["llama"], lora_r=4,
                                    trainable_vision_layers=0, **OTHER_POOLING), device="cpu")
    if not chat_template:
        model.tokenizer.chat_template = None
    model.tokenizer.model_max_length = 8
    model.save_pretrained(folder)
    return str(folder), model.cfg


def write_bench(tmp_path, splits):
    Image.new("RGB", (40, 30), (200, 30, 30)).save(tmp_path / "a.png")
    (tmp_path / "vid").mkdir()
    for t in range(10):  # more than the checkpoint's max_frames (4) and than run's default --num-frames (8)
        Image.new("RGB", (40, 30), (30, 30, 20 * t)).save(tmp_path / "vid" / f"{t:05d}.jpg")
    (tmp_path / "bench.json").write_text(json.dumps([record(split, split) for split in splits]))
    return str(tmp_path / "bench.json")


def prompt_lengths(caplog):
    return {m[1]: int(m[2]) for r in caplog.records
            if (m := re.search(r"sample (\w+): its prompt of (\d+) tokens", r.getMessage()))}


def expected_length(text, tokenizer, visual_tokens):
    """Tokens of the rendered prompt, its <image> expanded to the visual's tokens."""
    return len(tokenizer(text, add_special_tokens=False)["input_ids"]) - 1 + visual_tokens


def test_run_instit_end_to_end_on_a_vicuna_checkpoint(tiny, tmp_path, caplog, monkeypatch, llm_server):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-judge-test")
    llm_server.answer = lambda body: {"sample_score": 1.0}
    folder, cfg = save_checkpoint(tiny, tmp_path / "model", chat_template=False)
    splits = ["image_mc", "image_oe", "video_mc", "video_oe"]
    summary = evaluate.main(["run", "--protocol", "instit", "--model", folder, "--bench", write_bench(tmp_path, splits),
                             "--out", str(tmp_path / "out"), "--judge-base-url", llm_server.url, "--batch-size", "2"])
    assert all(summary[s]["protocol"] == "instit" and "score_authors" in summary[s] for s in splits)
    assert summary["image_oe"]["score"] == summary["video_oe"]["score_authors"] == 100.0
    assert {b["model"] for b in llm_server.bodies} == {"gpt-4o-2024-08-06"}
    tokenizer = make_tokenizer()
    instit = replace(cfg, **evaluate.INSTIT_MODEL)
    visual = {"image": num_visual_tokens(instit, 1, False, (30, 40)),  # AnyRes, the model's image path
              "video": 10 * 2 * 2}  # every frame, 4x4 patches pooled 2x2, no newline token
    assert prompt_lengths(caplog) == {  # the whole prompt, vicuna_v1's system text first, as the authors render it
        s: expected_length("<s>" + vicuna_v1(authors_input(s, record(s))), tokenizer, visual[s.split("_")[0]])
        for s in splits}
    assert "exceeds the model's context of 8" in caplog.text


def test_a_chat_template_checkpoint_keeps_its_template_and_gets_their_pooling(tiny, tmp_path, caplog):
    folder, _ = save_checkpoint(tiny, tmp_path / "model", chat_template=True)
    model = evaluate.load_model(folder)
    evaluate.run_bench(model, write_bench(tmp_path, ["video_oe"]), ["video_oe"], str(tmp_path / "out"),
                       protocol="instit")
    assert (model.cfg.pool_stride, model.cfg.pool_mode, model.cfg.pool_position, model.cfg.video_newline) == (
        2, "bilinear", "after", False)  # their overwrite_config, whatever the checkpoint says
    text = f"<|im_start|>user\n{authors_input('video_oe', record('video_oe'))}<|im_end|>\n<|im_start|>assistant\n"
    assert prompt_lengths(caplog) == {"video_oe": expected_length(text, model.tokenizer, 10 * 2 * 2)}
