"""Tiny real models built offline, and a chat-completions server on 127.0.0.1.

Every model here is built from a config with random weights, saved with `save_pretrained` to a temp
folder and then loaded by path, so tests go through exactly the code a hub ID takes. The tokenizer is a
byte-level BPE trained in memory on a few sentences, with the special tokens and a chat template.
"""
import hashlib
import http.server
import json
import os
import sys
import threading
import time

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
torch.set_num_threads(2)  # CI has 2 cores; more threads only add contention

from data import CHATML  # noqa: E402  (ChatML, as Qwen2 uses; tests also cover tokenizers without a template)

CORPUS = [
    "Describe each marked instance. [1] is a small red circle left of [2], a large blue square.",
    "What changed between <1> and <2>? [2] moves right and [1] stays still.",
    "The answer is B. Option A, option C and option D are wrong.",
    "A man in a grey coat holding a red umbrella walks a brown dog along a wet street.",
    "user assistant system image video frame the a an of is in on to and with",
]


def make_tokenizer():
    """(PreTrainedTokenizerFast) byte-level BPE with <s>, </s>, <pad>, <unk>, <image>, ChatML markers."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<unk>", "<s>", "</s>", "<pad>", "<image>", "<|im_start|>", "<|im_end|>"]
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS * 4, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>",
        additional_special_tokens=["<image>", "<|im_start|>", "<|im_end|>"], chat_template=CHATML)


def vision_config(kind):
    """A 4-layer CLIP (32 px, patch 8: a 4x4 grid + CLS) or SigLIP (30 px, patch 6: an odd 5x5 grid)."""
    from transformers import CLIPVisionConfig, SiglipVisionConfig

    common = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=2)
    if kind == "clip":
        return CLIPVisionConfig(image_size=32, patch_size=8, projection_dim=32, **common)
    return SiglipVisionConfig(image_size=30, patch_size=6, **common)


def text_config(kind, vocab_size):
    """A 2-layer Llama or Qwen2 with grouped-query attention."""
    from transformers import LlamaConfig, Qwen2Config

    common = dict(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
                  bos_token_id=1, eos_token_id=2, pad_token_id=3, tie_word_embeddings=False)
    return LlamaConfig(**common) if kind == "llama" else Qwen2Config(**common)


@pytest.fixture(scope="session")
def tiny(tmp_path_factory):
    """Paths of saved tiny checkpoints: clip, siglip, clip_full (CLIPModel), llama, qwen2, llava."""
    from transformers import (AutoModel, AutoModelForCausalLM, CLIPConfig, CLIPModel, LlavaConfig,
                              LlavaForConditionalGeneration)

    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("tiny")
    tokenizer = make_tokenizer()
    paths = {}
    for kind in ("clip", "siglip"):
        paths[kind] = str(root / kind)
        AutoModel.from_config(vision_config(kind)).save_pretrained(paths[kind])
    paths["clip_full"] = str(root / "clip_full")  # a full CLIP (text + vision), as hub CLIP IDs are
    CLIPModel(CLIPConfig(vision_config=vision_config("clip").to_dict(),
                         text_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                          num_attention_heads=2), projection_dim=32)
              ).save_pretrained(paths["clip_full"])
    for kind in ("llama", "qwen2"):
        paths[kind] = str(root / kind)
        AutoModelForCausalLM.from_config(text_config(kind, len(tokenizer))).save_pretrained(paths[kind])
        tokenizer.save_pretrained(paths[kind])
    paths["llava"] = str(root / "llava")
    llava_cfg = LlavaConfig(vision_config=vision_config("clip"), text_config=text_config("llama", len(tokenizer)),
                            image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
                            vision_feature_layer=-2, vision_feature_select_strategy="default")
    LlavaForConditionalGeneration(llava_cfg).save_pretrained(paths["llava"])
    tokenizer.save_pretrained(paths["llava"])
    return paths


class FakeLLM(http.server.ThreadingHTTPServer):
    """A chat-completions server on 127.0.0.1 for the annotator and the judge. `answer(body)` gives the model's
    JSON answer; `script` lists how the next requests behave: "429", "500", "401" (echoing the key), "bad_body"
    (not JSON), "not_json" (a chat answer that is not JSON), "bad_id" (names an undrawn [99]), "slow", "hang"."""
    daemon_threads = True

    def __init__(self):
        super().__init__(("127.0.0.1", 0), _Handler)
        self.answer = lambda body: {}  # request body -> the JSON object the model answers (tests set it)
        self.script, self.lock = [], threading.Lock()
        self.log, self.bodies = [], []  # per request: (sha256 of the body, behaviour); the parsed body
        self.hang_after = None  # answer this many requests, then hang every later one
        self.hanging, self.release = threading.Event(), threading.Event()
        self.delay, self.inflight, self.max_inflight = 0.0, 0, 0  # seconds per answer; concurrency seen

    @property
    def url(self):
        return f"http://127.0.0.1:{self.server_port}/v1"

    def answered(self):
        """sha256 of each request body that got a valid answer."""
        return [h for h, outcome in self.log if outcome == "ok"]


class _Handler(http.server.BaseHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def _send(self, status, payload, headers=()):
        raw = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
        try:
            self.send_response(status)
            for k, v in [("content-type", "application/json"), ("content-length", str(len(raw))), *headers]:
                self.send_header(k, v)
            self.end_headers()
            self.wfile.write(raw)
        except (BrokenPipeError, ConnectionResetError):  # the client gave up (timeout) or was killed
            pass

    def do_POST(self):
        server, raw = self.server, self.rfile.read(int(self.headers["content-length"]))
        body, digest = json.loads(raw), hashlib.sha256(raw).hexdigest()
        with server.lock:
            server.auth = self.headers.get("authorization")
            behaviour = server.script.pop(0) if server.script else "ok"
            if server.hang_after is not None and len(server.log) >= server.hang_after:
                behaviour = "hang"
            server.log.append((digest, behaviour))
            server.bodies.append(body)
        retry_fast = [("retry-after-ms", "10")]  # the SDK honours it: keeps backoff short in tests
        if behaviour == "hang":
            server.hanging.set()
            server.release.wait(30)
            return
        if behaviour == "429":
            return self._send(429, {"error": {"message": "Rate limit reached", "type": "requests"}}, retry_fast)
        if behaviour == "500":
            return self._send(500, {"error": {"message": "internal error"}}, retry_fast)
        if behaviour == "401":  # echoes the key, as some servers do
            return self._send(401, {"error": {"message": f"Incorrect API key provided: {server.auth}"}})
        if behaviour == "bad_body":
            return self._send(200, b"{not json")
        with server.lock:
            server.inflight += 1
            server.max_inflight = max(server.max_inflight, server.inflight)
        time.sleep(2.0 if behaviour == "slow" else server.delay)
        with server.lock:
            server.inflight -= 1
        content = {"not_json": "Sure! Here are the captions: [1] is red.",
                   "bad_id": json.dumps({**server.answer(body), "image_level": "[1] is next to [99]."})
                   }.get(behaviour) or json.dumps(server.answer(body))
        self._send(200, {"id": "chatcmpl-1", "object": "chat.completion", "created": 0, "model": body["model"],
                         "choices": [{"index": 0, "finish_reason": "stop",
                                      "message": {"role": "assistant", "content": content}}],
                         "usage": {"prompt_tokens": 100, "completion_tokens": 20, "total_tokens": 120}})


@pytest.fixture
def llm_server():
    s = FakeLLM()
    threading.Thread(target=s.serve_forever, daemon=True).start()
    yield s
    s.release.set()
    s.shutdown()
    s.server_close()
