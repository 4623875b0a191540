"""The INST-IT annotation pipeline (INST-IT 2.1, App. A.2) and a Syphus-style generator (MIMIC-IT 3.2).

SoM frames (`som.render_som`) go through three GPT stages, written out in the INST-IT dataset format (FORMATS.md):
    annotate_frame   Y_t^f = GPT(P^f,   X_t, X_{t-1})        (Eq. 1) instance, image and change captions
    summarize_video  Y^vid = GPT(P^vid, [Y_1^f ... Y_N^f])   (Eq. 2) one chronological video caption
    generate_qa      Y^qa  = GPT(P^qa,  [Y_1^f ... Y_N^f])   (Eq. 3) open-ended question-answer pairs
`syphus` turns annotations into MIMIC-IT instruction/answer pairs from a task (system message + in-context
examples) and `translate` translates them; `LLMClient` (shared with evaluate.py's judge) asks the model. Run:
    python annotate.py --input IN.json --media-root DIR --out OUT.json --base-url URL --model NAME
    python annotate.py review OUT.json    # OUT.html: each SoM frame beside its annotations
    python annotate.py syphus --input OUT.json --out PAIRS.json --base-url URL --model NAME [--languages ...]
OUT.json sits beside OUT.cache.jsonl (every answer, so a re-run pays nothing twice) and OUT_som/ (its frames)."""
import argparse
import base64
import contextlib
import copy
import hashlib
import io
import json
import os
import re
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from html import escape as esc  # esc(text): text made safe inside an HTML page
from pathlib import Path
from urllib.parse import quote

import openai
from tqdm import tqdm

import data
from som import MarkStyle, instance_mask, named_ids, natural_key, open_image, render_som

PROMPT_VERSION = "instit-a2-v1"
_RULES = ("Instances are marked with numeric IDs (Set-of-Marks): each ID is drawn on its instance, and an "
          "instance keeps its ID and colour in every frame. Always refer to an instance by its ID in square "
          "brackets, e.g. [3]; several as [3] [4], never [3, 4]. Describe only what is visible.")
_DESCRIBE = ("instance_level, for each marked instance large enough to describe (skip tiny ones), its category, "
             "colour, shape, texture and size; image_level, a dense description of the frame: the instances, "
             "their positions, relations and interactions, and the background")
_FROM_FRAMES = "You receive frame-by-frame annotations of a video, frames numbered <1>, <2>, ... " + _RULES
PROMPTS = {  # INST-IT App. A.2 (P^f, P^vid, P^qa); MIMIC-IT 3.2 (Syphus, translation)
    "frame": {"system": "You are an expert annotator of images and videos. " + _RULES,
              "previous": "The previous frame:",
              "current": "The current frame. Marked instances: {marks}.",
              "task_first": f"For this frame give: {_DESCRIBE}.",
              "task": f"For the current frame give: {_DESCRIBE}; temporal_change, what changed since the "
                      "previous frame: movements of instances, interactions between them, camera or scene changes."},
    "video": _FROM_FRAMES + " Write video_level_caption: one dense, chronological description of the whole "
                            "video, referring to times as <t> or intervals as <s>-<e>. Use only what the "
                            "annotations say; infer nothing beyond them.",
    "qa": _FROM_FRAMES + " Write {lo} to {hi} open-ended question-answer pairs about the instances: attributes, "
                         "positions, actions, interactions and changes over time, referring to times as <t>. "
                         "Every answer must follow from the annotations; no speculative questions or answers.",
    "fix": "Your answer was rejected: {reason}. Reply again with the corrected JSON object only.",
    "json_mode": "Reply with one JSON object that follows this JSON schema: {schema}",
    "translate": "Translate every instruction and answer into {language}. Keep each [ID] and <t> exactly as "
                 "written; return the same number of pairs in the same order.",
    "syphus": {  # the shape of a --prompts task file
        "system_message": "You are an AI visual assistant that sees an image or a video through its annotations. "
                          + _RULES + " Design a conversation between a person asking about the marked instances and "
                          "you answering as if you saw them: appearance, position, actions, relations and (for videos) "
                          "changes over time at <t>. Ask only what the annotations answer. Give 3 to 6 pairs.",
        "in_context": [{"context": "<1>\n[1]: A red ball.\n[2]: A small brown dog.\nFrame: [2] runs after [1] on "
                                   "a lawn.\n<2>\n[2]: A small brown dog.\nFrame: [2] holds [1] in its mouth.\n"
                                   "Change since the previous frame: [2] caught [1].",
                        "pairs": [{"instruction": "What is [2] doing at <1>?", "answer": "[2] is chasing [1]."},
                                  {"instruction": "Where is [1] at <2>?", "answer": "In the mouth of [2]."}]}]},
}


def schema_object(**properties):
    """A strict JSON-schema object: every property required, nothing else allowed (OpenAI strict mode)."""
    return {"type": "object", "properties": properties, "required": list(properties), "additionalProperties": False}


_STR = {"type": "string"}
_PAIRS = schema_object(pairs={"type": "array", "items": schema_object(instruction=_STR, answer=_STR)})
_OBJECTS = {"type": "array", "items": schema_object()}  # a list of JSON objects: records, in-context examples
_COMPLETION = schema_object(choices={"type": "array", "items": schema_object(message=schema_object())})


def check_schema(value, schema, where="answer"):
    """Raise ValueError where `value` does not fit `schema` (the strict JSON-schema subset of schema_object)."""
    kind = {"object": dict, "array": list, "string": str, "integer": int, "number": (int, float)}[schema["type"]]
    if not isinstance(value, kind) or isinstance(value, bool):
        raise ValueError(f"{where} should be {schema['type']}, got {json.dumps(value)[:80]}")
    if isinstance(value, dict):
        for k, sub in schema["properties"].items():
            if k not in value:
                raise ValueError(f"{where} lacks {k!r}")
            check_schema(value[k], sub, f"{where}.{k}")
    if isinstance(value, list):
        for i, v in enumerate(value):
            check_schema(v, schema["items"], f"{where}[{i}]")


# ---------------------------------------------------------------------------------------------------
# Eq. 1-3, Syphus and translation: each a prompt, a schema and a check of the [IDs] and <t>s named.

def refs(text):
    """Text -> ({instance IDs named as [ID]}, {timestamps named as <t>}), read after data.normalize_text."""
    text = data.normalize_text(text)
    return named_ids(text), {int(t) for t in re.findall(r"<(\d+)>", text)}


def id_list(ids):
    """{3, 1} -> "[1] [3]": IDs as a text names them ("none" for no ID)."""
    return " ".join(f"[{i}]" for i in sorted(ids)) or "none"


def check_refs(text, ids, timestamps=None):
    """Raise ValueError if `text` names an [ID] not in `ids` or a <t> not in `timestamps` (None: any <t>)."""
    named, named_times = refs(text)
    if named - set(ids):
        raise ValueError(f"{id_list(named - set(ids))} named in {text[:60]!r} but not among the marks {id_list(ids)}")
    if timestamps is not None and named_times - set(timestamps):
        raise ValueError(f"{' '.join(f'<{t}>' for t in sorted(named_times - set(timestamps)))} named in "
                         f"{text[:60]!r} but the frames are {' '.join(f'<{t}>' for t in sorted(timestamps))}")


def annotate_frame(client, frame, prev_frame, ids, prev_ids=()):
    """Eq. 1 (INST-IT 2.1, App. A.2): SoM frames X_t, X_{t-1} -> {"instance_level": {id: caption}, "image_level":
    str, "temporal_change": str | None}. `ids`, `prev_ids`: the marks drawn on each; prev_frame None: first frame."""
    ids, first, p = set(ids), prev_frame is None, PROMPTS["frame"]
    content = [] if first else [{"type": "text", "text": p["previous"]}, client.image_part(prev_frame)]
    content += [{"type": "text", "text": p["current"].format(marks=id_list(ids))}, client.image_part(frame),
                {"type": "text", "text": p["task_first" if first else "task"]}]
    captions = {"type": "array", "items": schema_object(id={"type": "integer"}, caption=_STR)}
    schema = schema_object(instance_level=captions, image_level=_STR, **({} if first else {"temporal_change": _STR}))

    def validate(answer):
        for item in answer["instance_level"]:
            if item["id"] not in ids:
                raise ValueError(f"instance_level describes [{item['id']}], not among the marks {id_list(ids)}")
            check_refs(item["caption"], ids)
        check_refs(answer["image_level"], ids)
        if not first:  # an instance that just left the frame may still be named
            check_refs(answer["temporal_change"], ids | set(prev_ids))

    messages = [{"role": "system", "content": p["system"]}, {"role": "user", "content": content}]
    answer = client.complete_json(messages, schema, validate, "frame_annotation")
    return {"instance_level": {str(i["id"]): data.normalize_text(i["caption"]) for i in answer["instance_level"]},
            "image_level": data.normalize_text(answer["image_level"]),
            "temporal_change": None if first else data.normalize_text(answer["temporal_change"])}


def annotations_text(frame_annotations):
    """frame_level_caption entries -> the text GPT reads in Eq. 2, Eq. 3 and Syphus, frame by frame <t>."""
    lines = []
    for f in frame_annotations:
        if f.get("timestamp") is not None:
            lines.append(f"<{f['timestamp']}>")
        for i, c in f["instance_level"].items():  # a caption may be {"short", "long"} (masked release)
            lines.append(f"[{i}]: {c if isinstance(c, str) else c.get('long') or c.get('short')}")
        for key, label in (("image_level", "Frame"), ("temporal_change", "Change since the previous frame")):
            if f.get(key):  # the oracle leaves image_level empty for a frame with a single instance
                lines.append(f"{label}: {f[key]}")
    return data.normalize_text("\n".join(lines))


def _check_pairs(pairs, ids, times):
    if not pairs:
        raise ValueError("no pairs")
    for pair in pairs:
        check_refs(" ".join(pair.values()), ids, times)


def _from_annotations(client, system, frame_annotations, key, schema, check, name):
    """Eq. 2 and 3: frame annotations as text -> answer[key], passing `check(answer[key], their [ID]s, their <t>s)`."""
    text = annotations_text(frame_annotations)
    ids, times = refs(text)[0], {f["timestamp"] for f in frame_annotations}
    return client.complete_json([{"role": "system", "content": system}, {"role": "user", "content": text}],
                                schema_object(**{key: schema}), lambda a: check(a[key], ids, times), name)[key]


def summarize_video(client, frame_annotations):
    """Eq. 2 (INST-IT 2.1): frame annotations Y_1^f..Y_N^f -> one dense, chronological video caption."""
    return data.normalize_text(_from_annotations(client, PROMPTS["video"], frame_annotations, "video_level_caption",
                                                 _STR, check_refs, "video_summary"))


def generate_qa(client, frame_annotations, num_pairs=(10, 20)):
    """Eq. 3 (INST-IT 2.1): frame annotations -> [{"question", "answer"}], open-ended, with [ID] and <t>."""
    schema = {"type": "array", "items": schema_object(question=_STR, answer=_STR)}
    pairs = _from_annotations(client, PROMPTS["qa"].format(lo=num_pairs[0], hi=num_pairs[1]), frame_annotations,
                              "question_answer_pairs", schema, _check_pairs, "qa_pairs")
    return [{k: data.normalize_text(v) for k, v in qa.items()} for qa in pairs]


def syphus_messages(task, where="task"):
    """A Syphus task -> its chat messages: system message, in-context examples in our form (PROMPTS["syphus"]) or
    Otter's (mimic-it/syphus/prompts/*.json: {"role", "content"} turns, an assistant's content text or [{key: text}],
    sent as "key: text" lines as Otter's abstract_dataset.py does). ValueError names the bad example."""
    check_schema(task, schema_object(system_message=_STR, in_context=_OBJECTS), where)
    messages = [{"role": "system", "content": task["system_message"]}]
    for n, ex in enumerate(task["in_context"]):
        if "pairs" in ex and isinstance(ex.get("context"), str):
            check_schema(ex["pairs"], _PAIRS["properties"]["pairs"], f"{where}: in_context[{n}].pairs")
            messages += [{"role": "user", "content": ex["context"]},
                         {"role": "assistant", "content": json.dumps({"pairs": ex["pairs"]})}]
            continue
        content = ex.get("content")
        if ex.get("role") == "assistant" and isinstance(content, list) and all(isinstance(d, dict) for d in content):
            content = "".join(f"{k}: {v}\n" for d in content for k, v in d.items())
        if ex.get("role") not in ("user", "assistant") or not isinstance(content, str):
            raise ValueError(f"{where}: in_context[{n}] is incomplete: write {{context, pairs: [{{instruction, "
                             "answer}]} or Otter's {role: user | assistant, content: text (an assistant's: [{...}])}")
        messages.append({"role": ex["role"], "content": content})
    return messages


def syphus(client, task, context, ids, timestamps=None):
    """MIMIC-IT 3.2 (Syphus): a task (see syphus_messages) + annotations as text -> [{"instruction", "answer"}]."""
    answer = client.complete_json(syphus_messages(task) + [{"role": "user", "content": context}], _PAIRS,
                                  lambda a: _check_pairs(a["pairs"], ids, timestamps), "syphus_pairs")
    return [{k: data.normalize_text(v) for k, v in pair.items()} for pair in answer["pairs"]]


def translate(client, pairs, language):
    """MIMIC-IT 3.2: instruction/answer pairs -> the same pairs in `language`, [ID]s and <t>s unchanged."""
    def validate(answer):
        if len(answer["pairs"]) != len(pairs):
            raise ValueError(f"{len(answer['pairs'])} pairs returned for {len(pairs)}")
        for i, (src, dst) in enumerate(zip(pairs, answer["pairs"])):
            for k in ("instruction", "answer"):
                if refs(src[k]) != refs(dst[k]):
                    raise ValueError(f"pair {i} {k}: the [ID]s and <t>s of {src[k][:60]!r} were changed")

    messages = [{"role": "system", "content": PROMPTS["translate"].format(language=language)},
                {"role": "user", "content": json.dumps({"pairs": pairs}, ensure_ascii=False)}]
    answer = client.complete_json(messages, _PAIRS, validate, "translated_pairs")
    return [{k: data.normalize_text(v) for k, v in pair.items()} for pair in answer["pairs"]]


# ---------------------------------------------------------------------------------------------------
# The pipeline: IN.json records -> SoM frames -> Eq. 1-3 -> INST-IT records.

def file_safe(name):
    """An ID as a file or folder name: anything but letters, digits, "." and "-" becomes "_"."""
    return re.sub(r"[^\w.-]", "_", str(name))


def record_name(rec):
    return f"video_id={rec['video_id']}" if "video_id" in rec else f"image_id={rec.get('image_id')}"


def record_frames(rec):
    """An INST-IT dataset record -> (frame annotations, [(image ID, SoM frame path)]); an image is one frame."""
    if "video_path" in rec:
        frames = rec["frame_level_caption"]
        return frames, [(f"{file_safe(rec['video_id'])}_{f['frame_name']}", f"{rec['video_path']}/{f['frame_name']}")
                        for f in frames]
    return ([{"timestamp": None, "instance_level": rec["instance_level_caption"],
              "image_level": rec["image_level_caption"]}], [(file_safe(rec["image_id"]), rec["image_path"])])


def read_dataset(path, media_root=None):
    """An INST-IT dataset JSON (OUT.json) -> records, checked for annotations and SoM frames (under media_root)."""
    records = data.read_json(str(path))  # invalid JSON: an error naming the file
    check_schema(records, _OBJECTS, f"{path}: records")
    for rec in records:
        try:
            frames = record_frames(rec)[1]
        except KeyError as e:
            raise ValueError(f"{path}: {record_name(rec)} has no {e}: is it annotate.py's OUT.json?") from None
        if missing := [p for _, p in frames if media_root and not (Path(media_root) / p).is_file()]:
            raise ValueError(f"{Path(media_root) / missing[0]}: SoM frame of {record_name(rec)} not found; "
                             "--media-root is the folder the OUT.json's paths are relative to")
    return records


def read_input(path):
    """IN.json (records shaped like the INST-IT masked release, FORMATS.md) -> list, checked before any request."""
    records, seen = data.read_json(str(path)), {}  # invalid JSON: an error naming the file
    check_schema(records, _OBJECTS, f"{path}: records")
    for n, rec in enumerate(records):
        kind = "video" if "video_path" in rec else "image"
        if f"{kind}_id" not in rec or f"{kind}_path" not in rec:
            raise ValueError(f"{path}: record {n} needs video_id + video_path or image_id + image_path")
        if seen.setdefault((kind, file_safe(rec[f"{kind}_id"])), n) != n:  # seen: (kind, ID) -> its first record
            raise ValueError(f"{path}: record {n}: {record_name(rec)} appears twice")
    return records


def load_frames(rec, media_root, num_frames):
    """IN.json record -> [(frame name, PIL image, its segmentation entries)], frames sampled uniformly."""
    segs = rec.get("segmentations") or {}
    if "image_path" in rec:
        return [(f"{file_safe(rec['image_id'])}.jpg", open_image(str(Path(media_root) / rec["image_path"])), segs)]
    source = Path(media_root) / rec["video_path"]
    if source.is_dir():
        names = rec.get("frames") or sorted(segs, key=natural_key)
        if (missing := [n for n in names if not (source / n).is_file()]) or not names:
            raise ValueError(f"{source / (missing or ['?'])[0]}: frame not found ({len(missing)} of {len(names)} "
                             "listed frames missing)")
        images, index = data.sample_frames([str(source / n) for n in names], num_frames)
        names = [names[i] for i in index]
    else:  # a video file, whose frames are named by index
        images, index = data.sample_frames(str(source), num_frames)
        names = [f"{i:05d}.jpg" for i in index]
        if any(n not in segs for n in names):
            raise ValueError(f"{source}: sampled frame {next(n for n in names if n not in segs)} has no "
                             "segmentations (frames of a video file are named 00000.jpg, 00001.jpg, ...)")
    return [(name, image, segs.get(name, {})) for name, image in zip(names, images)]


def _raise_all(errors):
    """The stage failures of one record -> one error (BatchPending if they all wait for a batch)."""
    if errors:
        cls = BatchPending if all(isinstance(e, BatchPending) for _, e in errors) else LLMError
        raise cls("; ".join(f"{where}: {e}" for where, e in errors))


def render_record(rec, media_root, som_dir, num_frames=8, style: MarkStyle = MarkStyle()):
    """IN.json record -> [(frame name, SoM frame, IDs drawn)], the SoM frames saved under som_dir/images/ or
    som_dir/videos/<video_id>/ (the same marks whoever annotates them: GPT or demo.py's oracle), in `style`."""
    folder = "images" if "image_path" in rec else f"videos/{file_safe(rec['video_id'])}"
    os.makedirs(som_dir / folder, exist_ok=True)
    rendered, places = [], {}  # one label_places per record: a label keeps its place across frames
    for name, image, entries in load_frames(rec, media_root, num_frames):
        try:  # {ID: {"mask"|"box"|"polygon": ...}} -> {int ID: entry}; an empty one is unmarked (naming it: error)
            drawn = {int(i): e for i, e in entries.items() if instance_mask(e, image.size, i).any()}
        except ValueError as e:
            raise ValueError(f"segmentations of {name}: {e}") from None
        som = render_som(image, drawn, style, label_places=places)
        som.save(som_dir / folder / name, quality=95)  # format from the frame's extension
        rendered.append((name, som, set(drawn)))
    return rendered


def annotate_record(client, rec, media_root, som_dir, num_frames=8, style: MarkStyle = MarkStyle()):
    """One IN.json record -> one INST-IT dataset record (Eq. 1-3), its SoM frames saved under som_dir."""
    rendered = render_record(rec, media_root, som_dir, num_frames, style)
    errors, captions = [], []  # every stage is tried, so one re-run (or one batch) covers all that is missing
    for t, (name, som, ids) in enumerate(rendered, 1):
        prev_som, prev_ids = rendered[t - 2][1:] if t > 1 else (None, ())
        try:
            caption = annotate_frame(client, som, prev_som, ids, prev_ids)
            captions.append({"timestamp": t, "frame_name": name, **caption})
        except LLMError as e:
            errors.append((f"frame {name}", e))
    _raise_all(errors)
    segs = rec.get("segmentations") or {}
    if "image_path" in rec:
        return {"image_id": rec["image_id"], "image_path": f"{som_dir.name}/images/{rendered[0][0]}",
                "instance_level_caption": captions[0]["instance_level"],
                "image_level_caption": captions[0]["image_level"], "segmentations": segs}
    out = {"video_id": rec["video_id"], "video_path": f"{som_dir.name}/videos/{file_safe(rec['video_id'])}",
           "frame_level_caption": captions}
    for key, stage in (("video_level_caption", summarize_video), ("question_answer_pairs", generate_qa)):
        try:
            out[key] = stage(client, captions)
        except LLMError as e:
            errors.append((key, e))
    _raise_all(errors)
    out["segmentations"] = {name: segs.get(name, {}) for name, _, _ in rendered}
    return out


def run_all(fn, items, names, workers, client, desc):
    """fn over items on a thread pool, with a progress bar -> (results, {name: error}), None where failed."""
    results, failures = [None] * len(items), {}
    pool = ThreadPoolExecutor(max(1, workers))
    try:
        futures = {pool.submit(fn, item): n for n, item in enumerate(items)}
        with tqdm(total=len(items), desc=desc, unit="record") as bar:
            for future in as_completed(futures):
                n = futures[future]
                try:
                    results[n] = future.result()
                except (LLMError, ValueError, OSError) as e:  # bad media or a failed stage: this record only
                    failures[names[n]] = e
                bar.set_postfix_str(f"{client.progress()} failed_records={len(failures)}")
                bar.update()
    finally:
        pool.shutdown(cancel_futures=True)
    return results, failures


# ---------------------------------------------------------------------------------------------------
# The client: one OpenAI-compatible chat client with a request cache, JSON answers and usage counters.

class LLMError(RuntimeError):
    """A request or an answer that failed for good (after the SDK's and our retries); says why."""


class BatchPending(LLMError):
    """The request went into the batch file; its answer arrives with `import_batch_results`."""


def _read_jsonl(path):
    """The entries of a JSONL file; a last line cut short by a killed run is skipped (and ended)."""
    if not path or not os.path.exists(path):
        return []
    raw = Path(path).read_bytes()
    if raw and not raw.endswith(b"\n"):
        with open(path, "ab") as f:
            f.write(b"\n")
    entries = []
    for line in raw.splitlines():
        with contextlib.suppress(ValueError):
            entries.append(json.loads(line))
    return entries


class LLMClient:
    """One OpenAI-compatible chat client (OpenAI, vLLM, Ollama, llama.cpp through the `openai` SDK, which retries
    429, 5xx and timeouts). Every answer and failure is cached by `key` in an append-only JSONL: a re-run sends only
    what is missing (`batch_file`: collected for the Batch API). API key: OPENAI_API_KEY, never printed or written."""

    def __init__(self, base_url, model, cache_path=None, *, json_mode=False, max_retries=5, timeout=120.0,
                 answer_retries=2, image_detail="auto", max_image_side=768, price_per_mtok=(2.5, 10.0),
                 prompt_version=PROMPT_VERSION, batch_file=None):
        self._key = os.environ.get("OPENAI_API_KEY")  # never printed, logged or stored
        self.sdk = openai.OpenAI(base_url=base_url, api_key=self._key or "none",  # local servers take any key
                                 max_retries=max_retries, timeout=timeout)
        self.model, self.json_mode, self.answer_retries = model, json_mode, answer_retries
        self.image_detail, self.max_image_side, self.price = image_detail, max_image_side, price_per_mtok
        self.prompt_version, self.cache_path, self.batch_file = prompt_version, cache_path, batch_file
        if batch_file:  # a fresh file per run: exactly the requests still missing
            open(batch_file, "w").close()
        self.requests = self.cached = self.failed = self.prompt_tokens = self.completion_tokens = 0
        self._lock, self._batched = threading.Lock(), set()  # _batched: the keys already in batch_file
        # cache key -> answer text; None where the key's last entry failed (a re-run asks again)
        self._answers = {e.get("key"): e["content"] if e.get("status") == "ok" else None
                         for e in _read_jsonl(cache_path)}

    @property
    def cost(self):
        """Estimated USD of this run's requests (price_per_mtok: USD per 1M input, output tokens)."""
        return (self.prompt_tokens * self.price[0] + self.completion_tokens * self.price[1]) / 1e6

    def progress(self):
        return (f"sent={self.requests} cached={self.cached} failed={self.failed} "
                f"tokens={self.prompt_tokens + self.completion_tokens} cost=${self.cost:.2f}")

    def image_part(self, image):
        """PIL image -> a chat content part: a base64 JPEG data URL, longest side <= max_image_side."""
        image = image.convert("RGB")
        image.thumbnail((self.max_image_side, self.max_image_side))
        buf = io.BytesIO()
        image.save(buf, "JPEG", quality=90)
        url = "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode()
        return {"type": "image_url", "image_url": {"url": url, "detail": self.image_detail}}

    def complete_json(self, messages, schema, validate=lambda answer: None, name="answer"):
        """(chat messages, JSON schema) -> the answer dict fitting it (strict output, or `json_mode` for servers
        without) and passing `validate`; else re-asked with the reason `answer_retries` times, then LLMError."""
        fmt = {"type": "json_schema", "json_schema": {"name": name, "schema": schema, "strict": True}}
        if self.json_mode:  # the schema goes into the (first) system message: some chat templates allow one
            fmt, note = {"type": "json_object"}, PROMPTS["json_mode"].format(schema=json.dumps(schema))
            messages = ([{**messages[0], "content": f"{messages[0]['content']}\n\n{note}"}, *messages[1:]]
                        if messages[0]["role"] == "system" else [{"role": "system", "content": note}, *messages])
        keys = []
        for _ in range(self.answer_retries + 1):
            body = {"model": self.model, "messages": messages, "temperature": 0.0, "max_tokens": 4096,
                    "response_format": fmt}
            keys.append(self.key(body))
            content = self._answer(keys[-1], body)
            try:
                answer = json.loads(content)
                check_schema(answer, schema)
                validate(answer)
                return answer
            except ValueError as e:
                reason = f"invalid answer: {e}"
            messages = [*messages, {"role": "assistant", "content": content},
                        {"role": "user", "content": PROMPTS["fix"].format(reason=reason)}]
        self._record(keys, "failed", reason=reason)  # so a re-run asks again instead of replaying them
        raise LLMError(f"{reason} (after {len(keys)} attempts)")

    def key(self, body):
        """sha256 of (prompt version, request body with each image data URL replaced by its sha256)."""
        body = copy.deepcopy(body)  # the request itself goes out with its images
        for part in (p for m in body["messages"] if isinstance(m["content"], list) for p in m["content"]):
            if part.get("type") == "image_url":
                part["image_url"]["url"] = hashlib.sha256(part["image_url"]["url"].encode()).hexdigest()
        blob = json.dumps([self.prompt_version, body], sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()

    def _answer(self, key, body):
        """The answer text of one request: from the cache, else the batch file, else the server."""
        with self._lock:
            if self._answers.get(key) is not None:
                self.cached += 1
                return self._answers[key]
            if self.batch_file:
                if key not in self._batched:
                    with open(self.batch_file, "a") as f:
                        f.write(json.dumps({"custom_id": key, "method": "POST", "url": "/v1/chat/completions",
                                            "body": body}) + "\n")
                    self._batched.add(key)
                raise BatchPending(f"waiting for the batch answer of request {key[:12]}")
        try:
            # the SDK's retries still apply; its raw text is plain JSON: no pydantic parse and dump per answer
            return self._accept(key, json.loads(self.sdk.chat.completions.with_raw_response.create(**body).text))
        except (openai.OpenAIError, ValueError, LLMError) as e:  # ValueError: a response body that is not JSON
            reason = f"{type(e).__name__}: {e}"
            reason = reason.replace(self._key, "***") if self._key else reason
            self._record([key], "failed", reason=reason)
            raise LLMError(reason) from None

    def _accept(self, key, response):
        """Record a chat.completion dict (live or batch) as the answer of `key` -> its text (ValueError: not one)."""
        check_schema(response, _COMPLETION, "response body")
        if not response["choices"]:
            raise LLMError("response without choices")
        usage = response.get("usage") or {}
        with self._lock:
            self.requests += 1
            self.prompt_tokens += usage.get("prompt_tokens") or 0
            self.completion_tokens += usage.get("completion_tokens") or 0
        content = response["choices"][0]["message"].get("content") or ""
        self._record([key], "ok", content=content)
        return content

    def _record(self, keys, status, **fields):
        """Append one cache entry per key: status "ok" with the answer, or "failed" with the reason."""
        lines = [json.dumps({"key": key, "status": status, "time": time.time(), **fields}) + "\n" for key in keys]
        with self._lock:
            self.failed += status == "failed"
            self._answers.update(dict.fromkeys(keys, fields.get("content")))  # "failed": None, asked again
            if self.cache_path:
                with open(self.cache_path, "a", encoding="utf-8") as f:
                    f.writelines(lines)

    def import_batch_results(self, path):
        """Read an OpenAI Batch API output JSONL into the cache -> (answers, failures)."""
        lines, failures = _read_jsonl(path), 0
        for line in lines:
            response = line.get("response") or {}
            try:
                if response.get("status_code") != 200:
                    raise LLMError(json.dumps(line.get("error") or response.get("body"))[:300])
                self._accept(line["custom_id"], response["body"])
            except (LLMError, ValueError) as e:  # ValueError: a body that is not a chat completion
                self._record([line["custom_id"]], "failed", reason=f"batch: {e}")
                failures += 1
        return len(lines) - failures, failures


# ---------------------------------------------------------------------------------------------------
# Command line.

def add_client_args(p):
    """The LLMClient options as command-line flags (for every command that calls a model)."""
    p.add_argument("--base-url", required=True, help="OpenAI-compatible endpoint, e.g. https://api.openai.com/v1")
    p.add_argument("--model", required=True, help="e.g. gpt-4o; the API key is read from OPENAI_API_KEY")
    p.add_argument("--workers", type=int, default=8, help="records annotated at once")
    p.add_argument("--json-mode", action="store_true", help="for servers without JSON-schema output")
    p.add_argument("--timeout", type=float, default=120.0, help="seconds per request")
    p.add_argument("--max-retries", type=int, default=5, help="SDK retries on 429, 5xx and timeouts")
    p.add_argument("--answer-retries", type=int, default=2, help="re-asks after an invalid answer")
    p.add_argument("--detail", default="auto", choices=["auto", "low", "high"], help="image detail")
    p.add_argument("--max-image-side", type=int, default=768, help="images are downscaled to this")
    p.add_argument("--price", type=float, nargs=2, default=(2.5, 10.0), metavar=("IN", "OUT"),
                   help="USD per 1M input, output tokens, for the cost estimate (default: gpt-4o)")
    p.add_argument("--batch-file", help="write uncached requests here as Batch API JSONL instead of sending them")
    p.add_argument("--batch-results", help="a Batch API output JSONL to read into the cache first")


def client_from_args(args, cache_path):
    """The flags of add_client_args -> an LLMClient caching in cache_path (folder made), --batch-results read in."""
    cache_path.parent.mkdir(parents=True, exist_ok=True)  # before any request is paid for
    client = LLMClient(args.base_url, args.model, cache_path, json_mode=args.json_mode, max_retries=args.max_retries,
                       timeout=args.timeout, answer_retries=args.answer_retries, image_detail=args.detail,
                       max_image_side=args.max_image_side, price_per_mtok=tuple(args.price), batch_file=args.batch_file)
    if args.batch_results:
        print("batch results read: %d answers, %d failures" % client.import_batch_results(args.batch_results))
    return client


def _report(out, results, failures, client):
    """Print what a run did -> exit code: 1 if a record failed (a re-run retries it), else 0."""
    print(f"{out}: {sum(r is not None for r in results)} records written; {client.progress()}")
    if pending := [n for n, e in failures.items() if isinstance(e, BatchPending)]:
        print(f"{len(pending)} records wait for batch answers: submit {client.batch_file} to the Batch API, then "
              "re-run with --batch-results <its output JSONL>")
    if failed := [f"FAILED {n}: {e}" for n, e in failures.items() if n not in pending]:
        print("\n".join(failed) + f"\n{len(failed)} records failed; re-run the same command to retry them "
              f"(answers received are cached in {client.cache_path})", file=sys.stderr)
    return 1 if failed else 0


def syphus_main(argv):
    """`annotate.py syphus`: INST-IT records -> MIMIC-IT instructions JSON, its images JSON, translations."""
    p = argparse.ArgumentParser(prog="annotate.py syphus", description=syphus.__doc__)
    p.add_argument("--input", required=True, help="INST-IT dataset JSON, e.g. the OUT.json of annotate.py")
    p.add_argument("--media-root", help="folder the input's paths are relative to (default: its folder)")
    p.add_argument("--out", required=True, help="PAIRS.json, in the MIMIC-IT instructions format")
    p.add_argument("--prompts", help="task JSON {system_message, in_context} (default: PROMPTS['syphus'])")
    p.add_argument("--languages", default="", help="comma-separated; each writes PAIRS_<language>.json")
    add_client_args(p)
    args = p.parse_args(argv)  # the task, records and SoM frames are checked before any request is paid
    task = data.read_json(args.prompts) if args.prompts else PROMPTS["syphus"]
    syphus_messages(task, args.prompts)  # ValueError: a malformed task, before it goes with every request
    otter = any("role" in example for example in task["in_context"])
    print(f"{args.prompts or 'PROMPTS[syphus]'}: in-context examples read in", "Otter's form" if otter else "our form")
    root = Path(args.media_root or Path(args.input).parent)
    records = read_dataset(args.input, root)
    out, languages = Path(args.out), [x for x in args.languages.split(",") if x]
    client = client_from_args(args, out.with_suffix(".cache.jsonl"))

    def syphus_record(rec):
        frames = record_frames(rec)[0]
        context = annotations_text(frames)
        if rec.get("video_level_caption"):
            context += f"\nVideo: {rec['video_level_caption']}"
        pairs = syphus(client, task, context, refs(context)[0], {f["timestamp"] for f in frames} - {None})
        return [pairs] + [translate(client, pairs, language) for language in languages]

    results, failures = run_all(syphus_record, records, [record_name(r) for r in records], args.workers,
                                client, "syphus")
    paths = [out] + [out.with_name(f"{out.stem}_{language}.json") for language in languages]
    files, images = {path: {} for path in paths}, {}
    for rec, result in zip(records, results):
        if result is None:
            continue
        frames = record_frames(rec)[1]
        images.update({image_id: base64.b64encode((root / path).read_bytes()).decode() for image_id, path in frames})
        ins_ids = [f"SY_INS_{len(files[out]) + n:06d}" for n in range(len(result[0]))]
        for path, pairs in zip(paths, result):
            for ins_id, pair in zip(ins_ids, pairs):  # in-context examples: the other pairs on the same visuals
                files[path][ins_id] = {**pair, "image_ids": [i for i, _ in frames],
                                       "rel_ins_ids": [i for i in ins_ids if i != ins_id]}
    meta = {"version": PROMPT_VERSION, "time": time.strftime("%Y-%m"), "author": "annotate.py syphus"}
    for path, entries in files.items():
        data.write_json(path, {"meta": meta, "data": entries})
    data.write_json(out.with_name(f"{out.stem}_images.json"), images)
    return _report(out, results, failures, client)


def review(out_json):
    """OUT.json -> OUT.html, each SoM frame beside its annotations (HTML-escaped; INST-IT 2.1's human check)."""
    page = ["<!doctype html><meta charset='utf-8'><title>INST-IT annotations</title>"
            "<style>td{vertical-align:top;padding:6px}img{max-width:420px}</style>"]
    for rec in read_dataset(out_json):
        page.append(f"<h2>{esc(record_name(rec))}</h2><table>")
        for frame, (_, path) in zip(*record_frames(rec)):
            time_label = "" if frame["timestamp"] is None else esc(f"<{frame['timestamp']}>")
            captions = "".join(f"<li>[{esc(str(i))}] {esc(str(c))}</li>" for i, c in frame["instance_level"].items())
            change = f"<p><i>change:</i> {esc(c)}</p>" if (c := frame.get("temporal_change")) else ""
            page.append(f"<tr><td><img src='{esc(quote(path))}'></td><td>{time_label}<ul>{captions}</ul>"
                        f"<p>{esc(frame.get('image_level') or '')}</p>{change}</td></tr>")
        page.append("</table>")
        if rec.get("video_level_caption"):
            page.append(f"<p><b>video:</b> {esc(rec['video_level_caption'])}</p>")
        page.append("<ol>" + "".join(f"<li>Q: {esc(qa['question'])}<br>A: {esc(qa['answer'])}</li>"
                                     for qa in rec.get("question_answer_pairs", [])) + "</ol>")
    html_path = Path(out_json).with_suffix(".html")
    html_path.write_text("\n".join(page), encoding="utf-8")
    print(html_path)
    return 0


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    data.log_to_stderr()
    if argv[:1] == ["review"]:
        p = argparse.ArgumentParser(prog="annotate.py review", description=review.__doc__)
        p.add_argument("out_json", help="OUT.json of annotate.py; the page is written beside it as OUT.html")
        return review(p.parse_args(argv[1:]).out_json)
    if argv[:1] == ["syphus"]:
        return syphus_main(argv[1:])
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                epilog="other commands: `annotate.py review OUT.json`, `annotate.py syphus --help`")
    p.add_argument("--input", required=True, help="IN.json: video/image records with segmentations")
    p.add_argument("--media-root", required=True, help="folder the records' paths are relative to")
    p.add_argument("--out", required=True, help="OUT.json, in the INST-IT dataset format")
    p.add_argument("--num-frames", type=int, default=8, help="frames sampled per video")
    add_client_args(p)
    args = p.parse_args(argv)
    out = Path(args.out)
    records = read_input(args.input)
    client = client_from_args(args, out.with_suffix(".cache.jsonl"))
    som_dir = out.parent / f"{out.stem}_som"
    results, failures = run_all(lambda r: annotate_record(client, r, args.media_root, som_dir, args.num_frames),
                                records, [record_name(r) for r in records], args.workers, client, "annotate")
    data.write_json(out, [r for r in results if r is not None])
    return _report(out, results, failures, client)


if __name__ == "__main__":
    sys.exit(main())
