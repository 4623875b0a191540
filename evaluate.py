"""The INST-IT Bench scorer (INST-IT 3.2, App. B) and MultiInstruct's Sensitivity (MultiInstruct 5.1).

    python evaluate.py run --model DIR_OR_ID --bench PATH --splits image_mc,video_oe --out DIR
    python evaluate.py score --predictions P.jsonl --mode mc --out S.json     # also: instructions, ask (--help)

Multiple choice: the letter a free-form answer chose (`extract_choice`); no letter counts as wrong (the official
scorer drops such answers from the denominator, inflating scores). Open-ended: an LLM judge scores 0..1 against
the reference (annotate.py's client, cached); without one, an offline proxy (token F1 x [ID] agreement): oe_proxy."""
import argparse
import dataclasses
import json
import logging
import math
import os
import re
import sys
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from statistics import fmean, pstdev

from tqdm import tqdm

import data
from model import LlavaStyleModel, missing_folder
from som import IMAGE_EXTS, MarkStyle, frame_files, instance_key, instance_mask, named_ids, open_image, render_som

log = logging.getLogger("evaluate")
# INST-IT paper, Table 2 (a split left out: not reported).
PUBLISHED = {
    "GPT-4o": {"image_oe": 74.1, "image_mc": 84.8, "video_oe": 65.5, "video_mc": 81.0},
    "LLaVA-NeXT-7B": {"image_oe": 46.0, "image_mc": 42.4},
    "LLaVA-NeXT-Video-7B": {"image_oe": 46.5, "image_mc": 39.5, "video_oe": 25.8, "video_mc": 24.8},
    "INST-IT (Vicuna-7B)": {"image_oe": 68.6, "image_mc": 63.0, "video_oe": 49.3, "video_mc": 42.1},
    "INST-IT (Qwen2-7B)": {"image_oe": 67.9, "image_mc": 75.3, "video_oe": 45.7, "video_mc": 53.3},
}
PUBLISHED_ORDER = ("image_oe", "image_mc", "video_oe", "video_mc")
MC_RANDOM = 25.0

# ---------------------------------------------------------------------------------------------------
# The authors' protocol (--protocol instit). The prompt texts are verbatim from inst-it/inst-it
# inst-it-bench/prompts.py (prompt_template); the system text is LLaVA-NeXT's vicuna_v1 (llava/conversation.py).

INSTIT_ID_RULE = (  # both OE prompts
    "Use this ID in your response to specify objects, formatted as [ID] for a single object (e.g., “[8]”) or as "
    "[ID1] [ID2] ... for multiple objects, such as “[3] [4] [5]”. Avoid commas, ranges, or phrases like "
    "“[1, 2, 3]” or “[1] to [3]”. The IDs in the images and questions match directly.")
# both MC prompts, formatted with the media and the ID examples (a video's add the time rule)
INSTIT_MC = ("Based on the {}, select the best answer to the following multiple-choice question. In both the question "
             "and options, specific objects are represented using the format [ID] (e.g., {}. Respond with only the "
             "letter (A, B, C, or D) of the correct option.")
INSTIT_PROMPTS = {  # split -> (pre_prompt, post_prompt)
    "image_mc": (INSTIT_MC.format("image", "'[1]'', '[2]''"), "The best answer is: "),
    "image_oe": ("# Task Definition:\nYou are an expert in image analysis. In this task, you will receive an image, "
                 "and your task is to answer the given question based on the image content.\n# Guidelines and Rules:\n"
                 "- Object References: In the image, each object has a unique ID. " + INSTIT_ID_RULE,
                 "Based on the input image, please answer the question: "),
    "video_mc": (INSTIT_MC.format("video", '"[1]", "[2]"), and time references are shown using the format <timestamp> '
                                  '(e.g., "at <6>" or "during <7>-<8>")'), "The best answer is: "),
    "video_oe": (
        "# Task Definition:\nYou are an expert in video analysis. In this task, you will receive a series of frames "
        "as a video, and your task is to answer the given questions based on the video content.\n# Input Format:\n"
        "There are serveral images inputs as video frames. Each frame can be referenced by its timestamp (indicating "
        "when it appears in the video). For example, the first frame can be referred to as <1>.\n# Guidelines and "
        "Rules:\n- Object References: Each object has a unique ID. " + INSTIT_ID_RULE + "\n- Time References: Use "
        "timestamps to indicate moments or intervals in the video. For a specific moment, format as <timestamp> (e.g., "
        "“at <3>”). For an interval, use <start_timestamp>-<end_timestamp> (e.g., “during <5>-<7>”). "
        "Always enclose timestamps in <>.",
        "Based on the input video, please answer the question: "),
}
INSTIT_JUDGE_PROMPT = (  # gpt_eval: the video prompt adds the time rule, and its last line lacks the trailing space
    "\n# Task Description:\nYou are an expert evaluator tasked with scoring the accuracy of responses to open-ended "
    "questions. You will be provided with a set of questions, each with a corresponding ground-truth answer, as well "
    "as responses from a tester. Your job is to assess the accuracy of each response and provide a score between 0 "
    "and 1.\n# Guidelines:\n- Score Range: Your score for each test item must be between 0 and 1. A higher score "
    "means more correctness. Choose from the following: 0 (completely incorrect), 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, "
    "0.8, 0.9, 1.0 (completely correct)\n- For each test item, consider the question, the ground-truth answer, and "
    "the tester’s response together to determine correctness.\n- Objects in questions and answers may be referenced "
    "using the format [ID] (e.g., [1], [2]). Ensure that any objects referenced in the tester’s response match "
    "correctly with the ground-truth answer.\n{rule}# Input Format:\nThe input is a set of test items to be "
    "scored, where each item includes: \n- `question`; \n- `ground truth answer for the question`; \n- `response "
    "from the tester`.\nNow, let's begin the evaluation, here are the input test items:{end}\n")
INSTIT_JUDGE_PROMPTS = {"image": INSTIT_JUDGE_PROMPT.format(rule="", end=" "), "video": INSTIT_JUDGE_PROMPT.format(
    rule="- Time points may be indicated with <timestamp> (e.g., <1>), and time intervals with <start_timestamp>-"
         "<end_timestamp> (e.g., <3>-<5>). Verify that the tester’s response includes accurate time expressions.\n",
    end="")}
INSTIT_JUDGE_MODEL, INSTIT_JUDGE_VERSION = "gpt-4o-2024-08-06", "inst-it-bench-gpt_eval"
VICUNA_V1_SYSTEM = data.FALLBACK_SYSTEM.replace("human", "user")  # vicuna_v1: llava_v1's text with "user" for "human"
# their overwrite_config (mm_spatial_pool_stride 2, bilinear, after the projector, mm_newline_position no_token);
# no frame cap: a video is every frame of its folder
INSTIT_MODEL = dict(pool_stride=2, pool_mode="bilinear", pool_position="after", video_newline=False,
                    max_frames=sys.maxsize)
# extract_characters_regex's prefixes (from VideoMME) as Python reads their list: two missing commas join
# "The best option is" + "The correct option is" and "Best answer:" + "Best option:"
INSTIT_ANSWER_PREFIXES = ("The best answer is", "The correct answer is", "The answer is", "The answer",
                          "The best option isThe correct option is", "Best answer:Best option:", "Answer", "Answer:",
                          "answer:", "answer", "Option:", "The correct answer", "The correct option")

# ---------------------------------------------------------------------------------------------------
# Multiple choice: which letter did a free-form answer choose?

_L = r"\(?\**([A-Za-z])\**\)?"  # a letter, maybe in parentheses or bold
# Patterns in order of trust; within one pattern the last match wins ("A? No: the answer is B").
_CHOICE_PATTERNS = [
    rf"answer\s*(?:is|would be|:)\s*(?:option\s*|choice\s*)?:?\s*{_L}(?![A-Za-z])",  # the (best) answer is: B
    rf"^\s*{_L}\s*(?:[.):]|$)",                                  # leading "B." "B)" "(B)" "B:" or a bare letter
    rf"\b(?:so|therefore|thus|hence)\s*,?\s*(?:it\s*is\s*|it's\s*)?{_L}(?![A-Za-z])",
    rf"\b(?:option|choice)\s*{_L}(?![A-Za-z])",                   # Option B, choice (c)
    r"\*\*\(?([A-Za-z])\)?[.):]?\*\*",                            # **B**
    r"\(([A-Za-z])\)",                                            # (B) anywhere
]


def normalise(text: str) -> str:
    """Lowercase words, punctuation dropped, padded with spaces so `in` matches whole words."""
    return " " + " ".join(re.findall(r"[a-z0-9]+", text.lower())) + " "


_REFERS_TO_LETTER = {"or", "nor", "and", "is", "seems", "looks", "because", "would", "could", "might", "was", "fits"}


def _is_article(text: str, m: re.Match) -> bool:
    """Is the letter an article ("A person", "is a dog": "A" or lowercase, then a word), not an option ("A or B")?"""
    letter, word = m.group(1), re.match(r"\**\)?\s+([a-z]+)", text[m.end(1):])
    return bool(word) and (letter.islower() or letter == "A") and word.group(1) not in _REFERS_TO_LETTER


def extract_choice(response: str, options) -> str | None:
    """Free-form answer -> the option letter it chose, or None (INST-IT Bench MC). `options`: letters ("ABCD" or
    a list) or a dict letter -> option text. An article chooses nothing ("the answer is a dog", "A person")."""
    letters = {o.upper() for o in options}
    text = (response or "").strip()
    for pattern in _CHOICE_PATTERNS:
        for m in reversed(list(re.finditer(pattern, text, flags=re.IGNORECASE | re.MULTILINE))):
            if not _is_article(text, m):
                return m.group(1).upper() if m.group(1).upper() in letters else None
    texts = options.items() if isinstance(options, dict) else ()  # one option's text repeated ("..." names none)
    repeated = [k.upper() for k, v in texts if normalise(v).strip() and normalise(v) in normalise(text)]
    if len(repeated) == 1:
        return repeated[0]
    standalone = {m.group(1) for m in re.finditer(r"(?<![A-Za-z'])([A-Z])(?![A-Za-z'])", text)
                  if not _is_article(text, m)} & letters  # the pronoun "I" is no option
    return standalone.pop() if len(standalone) == 1 else None


def instit_choice(response: str) -> str | None:
    """Free-form answer -> the letter the authors' extract_characters_regex takes, or None: the first capital A-D
    once INSTIT_ANSWER_PREFIXES are deleted, wherever it stands ("Based on the image, ..." chose B). Their rule for
    answers over 10 words returns no letter only where there is none, so it changes nothing."""
    for prefix in INSTIT_ANSWER_PREFIXES:
        response = response.replace(prefix, "")
    return next((c for c in response if c in "ABCD"), None)


def score_mc(predictions: list[dict], protocol: str | None = None) -> dict:
    """Records (model_prediction, ground_truth: a letter, or an option's text where options map letters to texts)
    -> {score, total, unparsed (counted wrong)}; a ground truth that is no option is an error. Protocol "instit":
    letters by instit_choice, and the authors' figure beside ours: score_authors, unparsed answers dropped."""
    correct = unparsed = 0
    for p in predictions:
        options, truth = p.get("options") or "ABCD", str(p["ground_truth"]).strip()
        if isinstance(options, dict):
            truth = next((k for k, v in options.items() if str(v).strip().lower() == truth.lower()), truth)
        if truth.upper() not in [str(o).upper() for o in options]:
            raise ValueError(f"question {p['question_id']}: ground truth {truth!r} is none of the options "
                             f"{list(options)}")
        choice = instit_choice(p["model_prediction"]) if protocol else extract_choice(p["model_prediction"], options)
        unparsed += choice is None
        correct += choice == truth.upper()
    out = {"score": 100 * correct / max(len(predictions), 1), "total": len(predictions), "unparsed": unparsed}
    parsed = len(predictions) - unparsed  # the authors drop the unparsed answers
    return dict(out, protocol=protocol, score_authors=100 * correct / parsed if parsed else None) if protocol else out


# ---------------------------------------------------------------------------------------------------
# Open-ended: the offline proxy (the LLM judge is below).

def oe_proxy(prediction: str, reference: str) -> float:
    """Offline stand-in for the judge (reported as "oe_proxy", never as its score): token F1 x Jaccard of the [IDs]."""
    pred, ref = re.findall(r"\w+", prediction.lower()), re.findall(r"\w+", reference.lower())
    common = sum((Counter(pred) & Counter(ref)).values())
    a, b = named_ids(prediction), named_ids(reference)
    return 2 * common / max(len(pred) + len(ref), 1) * (len(a & b) / len(a | b) if a | b else 1.0)


# ---------------------------------------------------------------------------------------------------
# Sensitivity (MultiInstruct 5.1).

def sensitivity(scores: dict) -> float:
    """{task: [score per wording of its instruction]} -> mean over tasks of population std / mean; lower is better."""
    if not scores:
        raise ValueError("sensitivity: no tasks given")
    if empty := [task for task, values in scores.items() if not values]:
        raise ValueError(f"sensitivity: task {empty[0]!r} has no scores")
    return fmean(pstdev(values) / fmean(values) if fmean(values) else 0.0 for values in scores.values())


# ---------------------------------------------------------------------------------------------------
# Predictions files (the official shape) and re-scoring.

PREDICTION_FIELDS = ("question_id", "model_prediction", "ground_truth")


def load_predictions(path: str) -> list[dict]:
    """A predictions file (JSONL, a JSON list, or {"predictions": [...]}) in the official shape:
    question_id, question, model_prediction, ground_truth[, split]. Missing fields are an error."""
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
        records = json.loads(text)
    except UnicodeDecodeError as e:
        raise SystemExit(f"{path}: not UTF-8 text ({e}); save it as UTF-8") from None
    except json.JSONDecodeError as whole:  # JSONL, or JSON with an error
        records = []
        for n, line in enumerate(text.splitlines(), 1):
            try:
                records += [json.loads(line)] if line.strip() else []
            except json.JSONDecodeError as e:  # a JSON list's own error lies further on than its first line "["
                n, bad = (whole.lineno, whole) if whole.lineno > n else (n, e)
                raise SystemExit(f"{path}: line {n} is not valid JSON ({bad.msg}, column {bad.colno}); fix that line")
    records = records.get("predictions", [records]) if isinstance(records, dict) else records  # a 1-line JSONL: [it]
    if not isinstance(records, list) or not records:
        raise SystemExit(f"{path}: no predictions found")
    counts = Counter((r.get("split"), r.get("question_id")) for r in records if isinstance(r, dict))
    if repeated := [(qid, n) for (_, qid), n in counts.items() if n > 1]:  # it would count n times
        raise SystemExit(f"{path}: question_id {repeated[0][0]!r} appears {repeated[0][1]} times")
    for i, r in enumerate(records):
        if missing := [k for k in PREDICTION_FIELDS if not isinstance(r, dict) or k not in r]:
            name = r.get("question_id", "?") if isinstance(r, dict) else r
            raise SystemExit(f"{path}: record {i} (question_id {name!r}) lacks {missing} of {PREDICTION_FIELDS}")
        # a null prediction (a failed generation) is an empty, wrong answer; an int reference is compared as text
        r.update(model_prediction=str(r["model_prediction"] or ""), ground_truth=str(r["ground_truth"]))
    return records


def plot_scores(summary: dict, path: str):
    """PNG bar chart: this run beside the published INST-IT Table 2 numbers, per split (no matplotlib: a warning)."""
    if (plt := data.pyplot()) is None:
        return
    splits = [s for s in PUBLISHED_ORDER if s in summary]
    rows = {**PUBLISHED, "this run": {s: summary[s].get("score", math.nan) for s in splits}}  # nan: no bar
    fig, ax = plt.subplots(figsize=(2 + 2 * len(splits), 4))
    width = 0.8 / len(rows)
    for i, (name, vals) in enumerate(rows.items()):  # no bar where a row has no number (OE without a judge)
        ax.bar([j + i * width for j in range(len(splits))], [vals.get(s, math.nan) for s in splits], width, label=name)
    ax.axhline(MC_RANDOM, color="grey", linestyle=":", linewidth=1)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(splits))], splits)
    ax.set(ylabel="score", title="INST-IT Bench (published: INST-IT Table 2; dotted: random MC)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------------
# The LLM judge for open-ended answers (annotate.py's client: one client, one cache design).

JUDGE_VERSION = "instit-judge-v1"
JUDGE_PROMPT = (
    "You grade answers to questions about numbered instances in {media}. Instances are referred to as [ID] (the number "
    "drawn on them){time}. Compare the model's answer with the reference answer and give a score from 0 to 1 in steps "
    "of 0.1: 1.0 = same meaning as the reference; 0.0 = wrong or unrelated. The answer must refer to the same instance "
    "IDs as the reference{time_rule}; an answer about a different [ID] is wrong even if the description fits. Extra "
    "correct detail is not penalised; contradictions are. Reply with JSON {{\"score\": number}}.")


def judge_score(client, question: str, reference: str, prediction: str, video: bool, protocol=None) -> float:
    """One OE answer -> the judge's score in {0, 0.1, ..., 1} (INST-IT App. B criteria); protocol "instit": in 0..1,
    asked as the authors' evaluate.py asks (their prompt, then the item as JSON; a structured {"sample_score"})."""
    from annotate import schema_object

    if protocol:
        prompt = INSTIT_JUDGE_PROMPTS["video" if video else "image"]
        item = json.dumps({"question": question, "ground_truth_answer": reference, "tester_response": prediction})
        messages = [{"role": "user", "content": [{"type": "text", "text": prompt}, {"type": "text", "text": item}]}]
        key, schema, name = "sample_score", schema_object(sample_score={"type": "number"}), "SampleScore"
    else:
        system = JUDGE_PROMPT.format(media="a video" if video else "an image",
                                     time=", and frames as <t> (intervals <s>-<e>)" if video else "",
                                     time_rule=" and the same frame times <t>" if video else "")
        user = f"Question: {question}\nReference answer: {reference}\nModel answer: {prediction}"
        messages = [{"role": "system", "content": system}, {"role": "user", "content": user}]
        key, schema, name = "score", schema_object(score={"type": "number"}), "score"

    def on_the_scale(answer):
        s = answer[key]
        if not 0 <= s <= 1 or not protocol and abs(s * 10 - round(s * 10)) > 1e-6:
            raise ValueError(f"score {s} is not in 0..1" if protocol else f"score {s} is not one of 0, 0.1, ..., 1")

    return float(client.complete_json(messages, schema, validate=on_the_scale, name=name)[key])


def score_oe(predictions: list[dict], client=None, workers: int = 8, protocol=None) -> dict:
    """OE records -> {"oe_proxy", "total"} and, with a judge client, {"score", "failed"}: 100 x the mean
    judge score, failed judge calls counted as 0 and reported (never dropped from the denominator). Protocol "instit":
    the authors' judge request (judge_score); their figure beside ours (score_authors: failures dropped)."""
    total = len(predictions)
    proxy = sum(oe_proxy(p["model_prediction"], p["ground_truth"]) for p in predictions)
    out = {"total": total, "oe_proxy": 100 * proxy / max(total, 1), **({"protocol": protocol} if protocol else {})}
    if client is None:
        return out
    from annotate import LLMError

    def one(p):
        try:
            return judge_score(client, p.get("question", ""), p["ground_truth"], p["model_prediction"],
                               video=str(p.get("split", "")).startswith("video"), protocol=protocol)
        except LLMError as e:
            print(f"judge failed on {p['question_id']}: {e}", file=sys.stderr)  # None: counted as 0

    with ThreadPoolExecutor(workers) as pool:
        judged = [s for s in tqdm(pool.map(one, predictions), total=total, desc="judge") if s is not None]
    out.update(score=100 * sum(judged) / max(total, 1), failed=total - len(judged))
    return dict(out, score_authors=100 * sum(judged) / len(judged) if judged else None, judge_model=client.model,
                judge_prompt=client.prompt_version) if protocol else out


def judge_client(args):
    """The --judge-* flags -> an annotate.LLMClient for the judge, or None (offline proxy only)."""
    if not args.judge_base_url:
        return None
    from annotate import LLMClient

    folder = args.out if args.command == "run" else os.path.dirname(os.path.abspath(args.out))  # run: a folder
    cache = args.judge_cache or os.path.join(folder, "judge.cache.jsonl")
    os.makedirs(os.path.dirname(os.path.abspath(cache)), exist_ok=True)  # before a paid answer is cached there
    return LLMClient(args.judge_base_url, args.judge_model or (INSTIT_JUDGE_MODEL if args.protocol else "gpt-4o"),
                     cache, json_mode=args.judge_json_mode,
                     prompt_version=INSTIT_JUDGE_VERSION if args.protocol else JUDGE_VERSION)


# ---------------------------------------------------------------------------------------------------
# Running a model on the bench.

BENCH_PROMPTS = {  # the bench's answer conventions (INST-IT App. B)
    "mc": "{question}\n{options}\nAnswer with the option's letter from the given choices directly.",
    "image_oe": "{question}\nAnswer in a sentence. Refer to instances by their IDs in brackets, e.g. [1].",
    "video_oe": "The video has {n} frames, <1> to <{n}>. {question}\nAnswer in a sentence. Refer to instances "
                "by their IDs in brackets, e.g. [1], and to times as <t> or <s>-<e>.",
}


def bench_sample(question: dict, num_frames: int | None, protocol=None, system: str | None = None) -> dict:
    """A bench question (data.load_instit_bench) -> a generation prompt sample with its visual (num_frames None: up to
    cfg.max_frames), asked by BENCH_PROMPTS, or by the authors' INSTIT_PROMPTS (protocol "instit"); `system` first."""
    video = question["split"].startswith("video")
    visual = {"video": question["media"], "num_frames": num_frames, "pooled": True} if video else \
        {"frames": [question["media"]], "pooled": False}
    options = "\n".join(f"{k}. {v}" for k, v in (question["options"] or {}).items())
    if protocol:
        # the question as published: theirs is not normalised ([3, 4] stays)
        (pre, post), asked = INSTIT_PROMPTS[question["split"]], question["raw_question"]
        text = "\n".join([pre, asked, options, post] if options else [pre, post, asked])
    else:
        kind = "mc" if options else "video_oe" if video else "image_oe"
        text = BENCH_PROMPTS[kind].format(question=question["question"], options=options, n=num_frames)
    return {"id": question["question_id"], "source": question["file"], "visuals": [visual],
            "messages": ([{"role": "system", "content": system}] if system else []) +
                        [{"role": "user", "content": "<image>\n" + text}]}


def encode_prompt(sample: dict, model) -> dict | None:
    """A prompt -> data.encode_sample's tensors, or None if its media won't read (warned, as overlong prompts are)."""
    try:
        encoded = data.encode_sample(sample, model.tokenizer, model.cfg, max_length=10**9, add_generation_prompt=True)
    except (OSError, ValueError) as e:  # log.warning returns the None that marks it skipped
        return log.warning("%s: sample %s: %s (skipped)", sample.get("source", "?"), sample.get("id", "?"), e)
    limit = min(model.tokenizer.model_max_length, getattr(model.lm.config, "max_position_embeddings", math.inf))
    if len(encoded["input_ids"]) > limit:
        log.warning("%s: sample %s: its prompt of %d tokens exceeds the model's context of %d (too many frames?)",
                    sample.get("source", "?"), sample.get("id", "?"), len(encoded["input_ids"]), limit)
    return encoded


def generate_answers(model, samples: list[dict], batch_size: int = 8, max_new_tokens: int = 256,
                     desc: str = "generate", **sampling) -> list[str | None]:
    """Prompt samples -> decoded answers, in left-padded batches: greedy, or `sampling` (do_sample, temperature,
    top_p, streamer) as model.generate takes it; None for a sample whose media cannot be read (encode_prompt)."""
    answers = []
    for k in tqdm(range(0, len(samples), batch_size), desc=desc, disable=len(samples) <= batch_size):
        encoded = [encode_prompt(s, model) for s in samples[k:k + batch_size]]
        if batch := data.collate(encoded, model.tokenizer.pad_token_id, padding_side="left"):  # None: none readable
            batch = {key: v.to(model.device) if hasattr(v, "to") else v for key, v in batch.items() if key != "labels"}
            out = iter(model.tokenizer.batch_decode(model.generate(**batch, max_new_tokens=max_new_tokens, **sampling),
                                                    skip_special_tokens=True))
        answers += [None if e is None else next(out).strip() for e in encoded]
    return answers


def bench_questions(bench: str, splits: list[str], media_root=None, max_bad_fraction=0.05) -> list[dict]:
    """An INST-IT Bench path -> its questions, checked before a model loads (repeated IDs, missing media)."""
    questions = data.load_instit_bench(bench, splits, media_root, check_media=False)
    if not questions:
        raise SystemExit(f"{bench}: no questions in splits {splits}")
    if repeated := [key for key, n in Counter((q["split"], q["question_id"]) for q in questions).items() if n > 1]:
        raise SystemExit(f"{bench}: question_id {repeated[0][1]!r} repeats in {repeated[0][0]}; give each its own ID")
    missing = [q["media"] for q in questions if isinstance(q["media"], str) and not os.path.exists(q["media"])]
    if len(missing) > max_bad_fraction * len(questions):
        raise SystemExit(f"{bench}: {len(missing)} of {len(questions)} questions' media not found ({missing[0]}, ...), "
                         f"over --max-bad-fraction {max_bad_fraction}; fix --media-root, or raise the fraction")
    return questions


def run_bench(model, bench: str, splits: list[str], out_dir: str, media_root=None, batch_size=8, max_new_tokens=256,
              num_frames=8, client=None, max_bad_fraction=0.05, checked=None, protocol=None) -> dict:
    """Model x bench (or `checked`: its bench_questions) -> predictions.jsonl, summary.json, scores.png; the summary.
    Protocol "instit": the authors' inference scripts (INSTIT_MODEL forced on `model`, vicuna_v1's system where the
    tokenizer has no chat template) in place of `num_frames`, `max_new_tokens`; their scoring (score_mc, score_oe)."""
    questions = checked or bench_questions(bench, splits, media_root, max_bad_fraction)
    if protocol:
        model.cfg = dataclasses.replace(model.cfg, **INSTIT_MODEL)
        num_frames, max_new_tokens = None, 128  # None: every frame of a video
    system = VICUNA_V1_SYSTEM if protocol and not model.tokenizer.chat_template else None
    answers = generate_answers(model, [bench_sample(q, num_frames, protocol, system) for q in questions], batch_size,
                               max_new_tokens, **({"do_sample": None} if protocol else {}))  # its generation config
    predictions = [{"question_id": q["question_id"], "question": q["raw_question" if protocol else "question"],
                    "model_prediction": a, "ground_truth": q["answer"], "split": q["split"], "options": q["options"]}
                   for q, a in zip(questions, answers) if a is not None]
    data.write_json(os.path.join(out_dir, "predictions.jsonl"), predictions)
    skipped = [q for q, a in zip(questions, answers) if a is None]
    if len(skipped) > max_bad_fraction * len(questions):
        raise SystemExit(f"{bench}: {len(skipped)} of {len(questions)} questions skipped (media named above), over "
                         f"--max-bad-fraction {max_bad_fraction}; predictions.jsonl holds the rest: fix the media")
    by_split = {s: [p for p in predictions if p["split"] == s] for s in sorted({q["split"] for q in questions})}
    summary = {split: {**score_mc(rows, protocol), "chance": MC_RANDOM} if split.endswith("mc")
               else score_oe(rows, client, protocol=protocol) for split, rows in by_split.items()}
    for split, s in summary.items():
        s["skipped"] = sum(q["split"] == split for q in skipped)  # questions whose media is missing or unreadable
    data.write_json(os.path.join(out_dir, "summary.json"), summary)
    plot_scores(summary, os.path.join(out_dir, "scores.png"))
    print_summary(summary)
    return summary


def print_summary(summary: dict):
    """The run's scores per split, then the published INST-IT Table 2 rows for the same splits."""
    print(f"{'split':10} {'score':>7} {'total':>6}  notes")
    for split, s in summary.items():
        if "unparsed" in s:
            note = f"{s['unparsed']} answers had no option letter (counted wrong); chance {MC_RANDOM:.0f}"
        elif "score" in s:
            note = f"judge; {s['failed']} failed calls counted 0; oe_proxy {s['oe_proxy']:.1f}"
        else:
            note = f"no judge configured: oe_proxy {s['oe_proxy']:.1f} (token F1 x [ID] agreement, not a judge's score)"
        if s.get("score_authors") is not None:
            note += f"; the authors' count (those dropped): {s['score_authors']:.1f}"
        score = f"{s['score']:7.1f}" if "score" in s else f"{'-':>7}"
        print(f"{split:10} {score} {s['total']:6}  {note}")
    splits = [s for s in PUBLISHED_ORDER if s in summary]
    print("published, INST-IT Table 2: " + "  ".join(f"{s:>8}" for s in splits))
    for name, row in PUBLISHED.items():
        print(f"  {name:25} " + "  ".join(f"{row[s]:8.1f}" if s in row else f"{'-':>8}" for s in splits))


# ---------------------------------------------------------------------------------------------------
# MultiInstruct: each task under each of its instructions, and the Sensitivity.

def instruction_templates(path: str) -> dict:
    """A templates JSON file -> {task_name: [instruction templates]}, checked before a model loads."""
    templates = data.read_json(path)
    if not isinstance(templates, dict) or not templates:
        raise SystemExit(f"{path}: expected {{task_name: [instruction templates]}}, got {str(templates)[:40]}")
    if empty := [task for task, v in templates.items() if not isinstance(v, list) or not v]:
        raise SystemExit(f"{path}: task {empty[0]!r} has no instruction templates; give it a list of one or more")
    return templates


def evaluate_instructions(model, tasks: str, templates, media_root=None, batch_size=8, max_new_tokens=32) -> dict:
    """MultiInstruct .jsonl + {task: [templates]} -> per task: accuracy under each of its own templates (normalised
    exact match with target_txt), templates and samples counted; the aggregate, the Sensitivity (5.1)."""
    hits = {}  # task -> template -> [exact match per sample]
    for k in range(max(map(len, templates.values()))):
        # a task with fewer templates gets its last: its samples are built (cheap) but not generated
        kth = {task: [v[min(k, len(v) - 1)]] for task, v in templates.items()}
        samples = data.load_multiinstruct(tasks, kth, media_root, template_index=0)
        samples = [(s["task"], s) for s in samples if k < len(templates[s["task"]])]  # tasks share instance ids
        prompts = [{**s, "messages": s["messages"][:-1]} for _, s in samples]
        answers = generate_answers(model, prompts, batch_size, max_new_tokens, desc=f"instruction {k + 1}")
        scored = [(task, s, a) for (task, s), a in zip(samples, answers) if a is not None]  # None: image unreadable
        for task, s, a in scored:
            hits.setdefault(task, {}).setdefault(k, []).append(normalise(a) == normalise(s["messages"][-1]["content"]))
    if not hits:
        raise SystemExit(f"{tasks}: no sample could be scored (the warnings above say why)")
    scores = {task: [100 * sum(h) / len(h) for h in by_template.values()] for task, by_template in hits.items()}
    report = {task: {"scores": v, "templates": len(v), "samples": [len(h) for h in hits[task].values()],
                     "mean": fmean(v), "max": max(v), "std": pstdev(v)} for task, v in scores.items()}
    return {"tasks": report, "aggregate": sum(r["mean"] for r in report.values()) / len(report),
            "sensitivity": sensitivity(scores)}


def load_model(path: str, **kwargs) -> LlavaStyleModel:
    """--model -> the model, in eval mode; a local path that is no folder stops here (not at the hub's "Repo id")."""
    if problem := missing_folder(path):
        raise SystemExit(problem)
    return LlavaStyleModel.from_pretrained(path, **kwargs).eval()


# ---------------------------------------------------------------------------------------------------
# Ask: one question about your own image or video, marks drawn from your masks or boxes.

def parse_box(spec: str) -> tuple[str, list[float]]:
    """--box "2:40,60,200,310" -> ("2", [40.0, 60.0, 200.0, 310.0]): an instance ID and its box in pixels."""
    instance, _, numbers = spec.partition(":")
    try:
        box = [float(v) for v in numbers.split(",")]
    except ValueError:
        box = []
    if not instance.strip().isdigit() or len(box) != 4 or box[0] >= box[2] or box[1] >= box[3]:
        raise SystemExit(f"--box {spec!r}: expected ID:x0,y0,x1,y1 in pixels, with x0 < x1 and y0 < y1")
    return instance_key(instance), box


def ask_frames(image: str | None, video: str | None, num_frames: int) -> tuple[list, list[str]]:
    """--image FILE, or --video (a video file or a frame folder) -> (frames, names), sampled as `run` samples a bench
    video. Names key --masks: a folder's file names; a video file's 00012.jpg by source index, as annotate.py's."""
    if image or video.lower().endswith(IMAGE_EXTS):  # a one-frame video is named by its file, as an image is
        return [open_image(image or video)], [os.path.basename(image or video)]
    frames, index = data.sample_frames(video, num_frames)
    return frames, [frame_files(video)[i] for i in index] if os.path.isdir(video) else [f"{i:05d}.jpg" for i in index]


def frame_marks(frames: list, names: list[str], masks: dict, boxes: dict, video: bool) -> tuple[list, set]:
    """Masks ({ID: mask | box | polygon} for an image; {frame name: {ID: ...}} for a video) + boxes (on every frame)
    -> ([{ID: spec} per frame], the IDs with pixels on some frame); a spec that does not fit its frame: ValueError."""
    marks, drawn = [], set()
    for name, frame in zip(names, frames):
        instances = {**((masks.get(name) or {}) if video else masks), **boxes}
        if not all(instance_key(i).isdigit() for i in instances):
            raise ValueError(f"instance IDs must be numbers, as the marks show them: {sorted(instances)}")
        drawn |= {int(instance_key(i)) for i, spec in instances.items() if instance_mask(spec, frame.size, i).any()}
        marks.append(instances)
    return marks, drawn


def ask(model, frames: list, history: list[dict], question: str, video: bool, verbatim: bool = False,
        streamer=None, **sampling) -> str:
    """Marked frames + the chat so far + a question -> the model's answer; the question in the bench's open-ended
    form (BENCH_PROMPTS: the form a model is evaluated in) unless `verbatim`; the frames go with the first turn."""
    text = question if verbatim else BENCH_PROMPTS["video_oe" if video else "image_oe"].format(
        question=question, n=len(frames))
    history.append({"role": "user", "content": (data.PLACEHOLDER + "\n" if not history else "") + text})
    sample = {"id": "ask", "visuals": [{"frames": frames, "pooled": video}], "messages": history}
    answer = generate_answers(model, [sample], 1, streamer=streamer, **sampling)[0]
    history.append({"role": "assistant", "content": answer})
    return answer


def next_question(chat: bool) -> str:
    """--chat: the next line typed on stdin ("" at an empty line or the end); otherwise ""."""
    if not chat:
        return ""
    print("> ", end="", file=sys.stderr, flush=True)
    return sys.stdin.readline().strip()


def ask_main(args) -> dict:
    """`evaluate.py ask`: inputs checked before the model loads, marks in the checkpoint's style, answers streamed."""
    from transformers import TextStreamer

    boxes, video = dict(parse_box(spec) for spec in args.box), args.video is not None
    try:  # every input is read and checked before the model loads
        frames, names = ask_frames(args.image, args.video, args.num_frames)
        w, h = frames[0].size
        for i, (x0, y0, x1, y1) in boxes.items():
            if x0 < 0 or y0 < 0 or x1 > w or y1 > h:
                raise ValueError(f"--box {i}:{x0:g},{y0:g},{x1:g},{y1:g} lies outside the {w}x{h} frame {names[0]}")
        masks = data.read_json(args.masks) if args.masks else {}
        marks, drawn = frame_marks(frames, names, masks, boxes, video)
        style = None if args.mark_style is None else MarkStyle(**args.mark_style)
    except (OSError, ValueError, TypeError) as e:
        raise SystemExit(f"evaluate.py ask: {e}")
    if masks and video and not set(masks) & set(names):
        log.warning("%s: no key names a sampled frame (%s, ...): a video's masks are keyed by frame file name, "
                    "or by source index as 00012.jpg", args.masks, ", ".join(names[:3]))
    model = load_model(args.model, **({"load_in_4bit": True} if args.load_in_4bit else {}))
    if len(frames) > model.cfg.max_frames:
        raise SystemExit(f"--num-frames {args.num_frames}: the model reads at most {model.cfg.max_frames} frames")
    style = style or MarkStyle(**model.cfg.mark_style or {})  # the style the model was trained with
    places = {}  # one label place per ID across the frames (som.render_som)
    marked = [render_som(frame, instances, style, label_places=places) for frame, instances in zip(frames, marks)]
    if args.save_marked:
        os.makedirs(args.save_marked, exist_ok=True)
        for name, frame in zip(names, marked):
            frame.save(os.path.join(args.save_marked, os.path.splitext(name)[0] + ".png"))
    sampling = {"max_new_tokens": args.max_new_tokens, "do_sample": args.temperature > 0,
                "temperature": args.temperature or 1.0, "top_p": args.top_p}
    streamer = None if args.json else TextStreamer(model.tokenizer, skip_prompt=True, skip_special_tokens=True)
    history, turns, question = [], [], args.question or next_question(args.chat)
    if not question:
        raise SystemExit("evaluate.py ask: give a question (or --chat and type one)")
    while question:
        if undrawn := named_ids(question) - drawn:
            log.warning("the question names %s, not drawn on the frames (drawn: %s)",
                        " ".join(f"[{i}]" for i in sorted(undrawn)), " ".join(f"[{i}]" for i in sorted(drawn)))
        answer = ask(model, marked, history, question, video, args.verbatim, streamer, **sampling)
        turns.append({"question": question, "answer": answer})
        question = next_question(args.chat)
    result = {"model": args.model, "media": args.image or args.video, "frames": names, "marks": sorted(drawn),
              "turns": turns, "settings": {"num_frames": args.num_frames, "mark_style": dataclasses.asdict(style),
                                           "verbatim": args.verbatim, **sampling, "temperature": args.temperature}}
    if args.json:
        print(json.dumps(result, ensure_ascii=False))
    return result


# ---------------------------------------------------------------------------------------------------
# Command line.

def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="generate answers on INST-IT Bench splits and score them")
    score = sub.add_parser("score", help="re-score an existing predictions file (official shape)")
    instr = sub.add_parser("instructions", help="MultiInstruct tasks under each instruction: Sensitivity")
    ask_cmd = sub.add_parser("ask", help="ask a model about your own image or video, marks drawn from masks or boxes")
    for cmd in (run, instr, ask_cmd):
        cmd.add_argument("--model", required=True, help="a train.py output (final/), merged or llava-hf checkpoint")
    for cmd in (run, instr):
        cmd.add_argument("--media-root")
    run.add_argument("--bench", required=True, help="bench file or folder (data.load_instit_bench)")
    run.add_argument("--splits", default="image_mc,image_oe,video_mc,video_oe")
    run.add_argument("--batch-size", type=int, default=8)
    run.add_argument("--max-bad-fraction", type=float, default=0.05, help="skip unreadable media up to this fraction")
    for cmd in (run, ask_cmd):
        cmd.add_argument("--max-new-tokens", type=int, default=256)
        cmd.add_argument("--num-frames", type=int, default=8, help="frames sampled per video")
    score.add_argument("--predictions", required=True)
    score.add_argument("--mode", choices=["mc", "oe"], help="default: from the file (MC ground truths are letters)")
    instr.add_argument("--tasks", required=True, help="MultiInstruct .jsonl")
    instr.add_argument("--templates", required=True, help="JSON {task_name: [instruction templates]}")
    for cmd in (run, score, instr):
        cmd.add_argument("--out", required=True)
    ask_cmd.add_argument("question", nargs="?", help="e.g. \"What does [2] do after <3>?\" (--chat: optional)")
    media = ask_cmd.add_mutually_exclusive_group(required=True)
    media.add_argument("--image", help="an image file")
    media.add_argument("--video", help="a video file or a folder of frames")
    ask_cmd.add_argument("--masks", help="JSON as som.py reads it: {ID: mask | box | polygon} for an image, {frame "
                                         "file name: {ID: ...}} for a video (a video file's frames: 00012.jpg ...)")
    ask_cmd.add_argument("--box", action="append", default=[], metavar="ID:x0,y0,x1,y1",
                         help="a box mark in pixels, the same on every frame; repeat for several instances")
    ask_cmd.add_argument("--mark-style", type=json.loads, metavar="JSON", help="som.MarkStyle fields, e.g. "
                         "'{\"fill\": 0}' (default: the style the checkpoint records, else INST-IT's)")
    ask_cmd.add_argument("--verbatim", action="store_true", help="send the question as typed, not in the bench's "
                                                                "open-ended form (BENCH_PROMPTS)")
    ask_cmd.add_argument("--temperature", type=float, default=0.0, help="0: greedy (default); > 0: sample")
    ask_cmd.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling, with --temperature > 0")
    ask_cmd.add_argument("--load-in-4bit", action="store_true", help="the language model in nf4 (bitsandbytes)")
    ask_cmd.add_argument("--chat", action="store_true", help="keep asking: each line on stdin is the next "
                                                            "question, the marked frames stay in context")
    ask_cmd.add_argument("--json", action="store_true", help="print one JSON object on stdout and nothing else")
    ask_cmd.add_argument("--save-marked", metavar="DIR", help="write the marked frames the model saw to DIR")
    for cmd in (run, score):
        cmd.add_argument("--protocol", choices=["instit"], help="the authors' bench protocol (run_bench: it ignores "
                         "--num-frames, --max-new-tokens), scored as we count and as they do (default: ours)")
        cmd.add_argument("--judge-base-url", help="OpenAI-compatible server for the OE judge (key: OPENAI_API_KEY)")
        cmd.add_argument("--judge-model", help=f"default: gpt-4o; {INSTIT_JUDGE_MODEL} with --protocol instit")
        cmd.add_argument("--judge-cache", help="judge cache file (default: beside --out)")
        cmd.add_argument("--judge-json-mode", action="store_true", help="for servers without JSON-schema output")
    args = p.parse_args(argv)
    data.log_to_stderr()
    if bad := [flag for flag in ("num_frames", "batch_size") if getattr(args, flag, 1) < 1]:  # before a model loads
        raise SystemExit(f"--{bad[0].replace('_', '-')} {getattr(args, bad[0])}: give at least 1")
    if args.command == "ask":
        return ask_main(args)
    if args.command == "score":
        predictions = load_predictions(args.predictions)
        mc = [bool(p.get("options") or re.fullmatch(r"[A-Za-z]", p["ground_truth"].strip())) for p in predictions]
        mode = args.mode or ("mc" if all(mc) else "oe")  # MC ground truths are letters: the file says its mode
        if wrong := [p["question_id"] for p, m in zip(predictions, mc) if m != (mode == "mc")]:
            raise SystemExit(f"{args.predictions}: question_id {wrong[0]!r} and {len(wrong) - 1} more are not "
                             f"{mode.upper()} (MC ground truths are letters); give the --mode they are, or score apart")
        try:
            result = (score_mc(predictions, args.protocol) if mode == "mc"
                      else score_oe(predictions, judge_client(args), protocol=args.protocol))
        except ValueError as e:
            raise SystemExit(f"{args.predictions}: {e}")
        data.write_json(args.out, result)
        print(json.dumps(result))
        return result

    splits = [s.strip() for s in getattr(args, "splits", "").split(",") if s.strip()]
    # checked before the model is loaded
    if unknown := [s for s in splits if s not in data.BENCH_SPLITS and s not in data.BENCH_SPLITS.values()]:
        raise SystemExit(f"unknown split(s) {unknown}; choose from {list(data.BENCH_SPLITS)}")
    if args.command == "run":  # the bench is read and checked before the model loads, as the templates are
        checked = bench_questions(args.bench, splits, args.media_root, args.max_bad_fraction)
        return run_bench(load_model(args.model), args.bench, splits, args.out, args.media_root, args.batch_size,
                         args.max_new_tokens, args.num_frames, judge_client(args), args.max_bad_fraction, checked,
                         args.protocol)
    templates = instruction_templates(args.templates)
    result = evaluate_instructions(load_model(args.model), args.tasks, templates, args.media_root)
    data.write_json(os.path.join(args.out, "instructions.json"), result)
    for task, r in result["tasks"].items():
        print(f"{task:30} mean {r['mean']:5.1f}  max {r['max']:5.1f}  std {r['std']:5.1f}")
    print(f"aggregate {result['aggregate']:.1f}  sensitivity {result['sensitivity']:.3f} (lower is better)")
    return result


if __name__ == "__main__":
    main()
