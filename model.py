"""INST-IT's LLaVA-NeXT-style model (2.4, 3.1): ViT -> MLP projector -> 2x2-pooled videos / AnyRes images -> causal LM.

Read top to bottom as data flows: `ModelConfig` and `num_visual_tokens` (tokens per image or video), loading the three
parts, `LlavaStyleModel.forward` (features fill the `<image>` positions data.py expanded), generation, saving, merging.

Any transformers ViT-style encoder (CLIP, SigLIP) and causal LM compose; `LlavaStyleModel.from_llava_hf` adopts
transformers' LLaVA-1.5, -NeXT and -OneVision checkpoints and LLaVA-NeXT's original layout (INST-IT's models)."""
import ast
import itertools
import json
import logging
import math
import re
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from transformers.modeling_outputs import CausalLMOutputWithPast
from transformers.utils import cached_file, logging as hf_logging

log = logging.getLogger("model")


@dataclass
class ModelConfig:
    """Everything that defines the model. Defaults follow INST-IT (LLaVA-NeXT-Video recipe, Tab. 6)."""
    vision_model: str = "openai/clip-vit-large-patch14-336"  # any ViT-style encoder: CLIP, SigLIP
    language_model: str = "lmsys/vicuna-7b-v1.5"              # any causal LM
    tokenizer: str | None = None          # defaults to language_model (or the LLaVA checkpoint)
    llava_checkpoint: str | None = None   # set by from_llava_hf: vision, projector and LM come from here
    vision_feature_layer: int = -2        # LLaVA takes the penultimate layer's hidden states
    vision_feature_select_strategy: str = "default"  # "default": drop CLS (only if the encoder has one); "full": keep
    pool_stride: int = 2                  # 2x2 spatial pooling of video / multi-visual frames (INST-IT 2.4)
    pool_mode: str = "bilinear"           # "bilinear" (INST-IT's bench) or "average"; odd grids round up (27 -> 14)
    pool_position: str = "after"          # "after" the projector (LLaVA-NeXT's code) or "before" (LLaVA-NeXT-Video)
    image_grid_pinpoints: list | None = None  # AnyRes grids [[height, width], ...] in pixels; None: one square image
    anyres_max: int = 0                   # OneVision's anyres_max_9: shrink the tiles' grid to at most 9 tiles' worth
    multi_image: str = "pooled"           # images of a multi-image sample: "pooled" 2x2 (INST-IT), "anyres"
    #                                       (LLaVA-NeXT) or "tile": one unpooled square each (OneVision)
    video_newline: bool = False           # OneVision: one image_newline token after each video
    max_frames: int = 32                  # frames per video (INST-IT 3.1)
    trainable_vision_layers: int = 12     # last N of the encoder's layers trained; 0 = frozen (INST-IT: 12 of 24);
    #                                       all: nothing frozen, the patch and position embeddings train too
    lm_training: str = "lora"             # "lora", "full" or "frozen"
    lora_r: int = 128
    lora_alpha: int = 256
    lora_dropout: float = 0.05
    load_in_4bit: bool = False            # QLoRA: nf4 + double quant, language model only
    dtype: str = "auto"                   # weights: "auto" = bfloat16 on CUDA, float32 on CPU
    gradient_checkpointing: bool = False
    image_token: str = "<image>"
    mark_style: dict | None = None        # som.MarkStyle fields of the marks the model was trained on (None: INST-IT's)
    # Resolved from the vision encoder by build_model; num_visual_tokens reads them.
    image_size: int = 0
    patch_size: int = 0
    has_cls: bool = False
    image_mean: tuple = (0.5, 0.5, 0.5)   # pixel normalisation of the encoder's image processor
    image_std: tuple = (0.5, 0.5, 0.5)


def num_visual_tokens(cfg: ModelConfig, num_frames: int = 1, pooled: bool = False, image_size=None) -> int:
    """Tokens one visual of `num_frames` frames becomes: the single source of truth (INST-IT 2.4).

    Unpooled (a single image): grid^2 per frame (+1 with strategy "full" on an encoder with CLS).
    Pooled (videos, several visuals): ceil(grid / stride)^2 per frame; CLS never survives pooling.
    AnyRes (an image of `image_size` (height, width)): the base image's grid^2, then anyres_shape's rows of tiles'
    tokens, each row ending with an image_newline, which also ends a plain image (and a video with video_newline)."""
    if not cfg.image_size or not cfg.patch_size:
        raise ValueError("ModelConfig.image_size/patch_size are unset: take the config from build_model(cfg).cfg")
    grid = cfg.image_size // cfg.patch_size
    if pooled:
        return math.ceil(grid / cfg.pool_stride) ** 2 * num_frames + cfg.video_newline
    if image_size is not None:
        _, (rows, cols) = anyres_shape(cfg, image_size)
        return grid * grid + rows * (cols + 1)
    cls = int(cfg.has_cls and cfg.vision_feature_select_strategy == "full")
    return (grid * grid + cls) * num_frames + has_newline(cfg)


def has_newline(cfg: ModelConfig) -> bool:
    """LLaVA-NeXT and OneVision models learn an image_newline embedding; LLaVA-1.5 has none."""
    return bool(cfg.image_grid_pinpoints) or cfg.video_newline


def anyres_grid(cfg: ModelConfig, image_size) -> tuple[int, int]:
    """(rows, columns) of tiles AnyRes cuts an image of (height, width) into: the grid pinpoint that keeps the
    most of its pixels, then wastes the fewest (LLaVA-NeXT; transformers' select_best_resolution)."""
    from transformers.image_processing_utils import select_best_resolution

    height, width = select_best_resolution(tuple(image_size), [tuple(p) for p in cfg.image_grid_pinpoints])
    return height // cfg.image_size, width // cfg.image_size


def anyres_shape(cfg: ModelConfig, image_size) -> tuple[tuple[int, int], tuple[int, int]]:
    """((rows, cols) unpadded, (rows, cols) kept) of an AnyRes image's tile tokens: the token grid cut to the image's
    aspect ratio (LLaVA-NeXT's "spatial_unpad"), then shrunk to at most `anyres_max` tiles' worth (OneVision)."""
    grid = cfg.image_size // cfg.patch_size
    rows, cols = (n * grid for n in anyres_grid(cfg, image_size))
    height, width = image_size
    if width / height > cols / rows:  # wider than the grid: padding above and below
        rows -= 2 * ((rows - int(round(height * (cols / width), 7))) // 2)
    else:
        cols -= 2 * ((cols - int(round(width * (rows / height), 7))) // 2)
    ratio = math.sqrt(rows * cols / (cfg.anyres_max * grid * grid)) if cfg.anyres_max else 0
    return (rows, cols), ((int(rows // ratio), int(cols // ratio)) if ratio > 1.1 else (rows, cols))


def preprocess_image(image: Image.Image, cfg: ModelConfig) -> torch.Tensor:
    """An RGB image -> (3, S, S) pixels: padded to a square of the mean colour (LLaVA's "pad"), resized, normalised."""
    side = max(image.size)
    square = Image.new("RGB", (side, side), tuple(int(255 * m) for m in cfg.image_mean))
    square.paste(image, ((side - image.width) // 2, (side - image.height) // 2))
    return normalize(square.resize((cfg.image_size, cfg.image_size), Image.BICUBIC), cfg)


def normalize(image: Image.Image, cfg: ModelConfig) -> torch.Tensor:
    x = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255).permute(2, 0, 1)
    return (x - torch.tensor(cfg.image_mean).view(3, 1, 1)) / torch.tensor(cfg.image_std).view(3, 1, 1)


def anyres_tiles(image: Image.Image, cfg: ModelConfig) -> list[torch.Tensor]:
    """An image -> its base view (squashed to S x S) and AnyRes tiles (row by row) as (3, S, S) pixels, as
    transformers' LlavaNextImageProcessor makes them (LLaVA-NeXT)."""
    side, (rows, cols) = cfg.image_size, anyres_grid(cfg, (image.height, image.width))
    width, height = cols * side, rows * side
    scale = min(width / image.width, height / image.height)  # the side that reaches its tile edge first
    size = (min(math.ceil(image.width * scale), width), min(math.ceil(image.height * scale), height))
    canvas = Image.new("RGB", (width, height))
    canvas.paste(image.resize(size, Image.BICUBIC), ((width - size[0]) // 2, (height - size[1]) // 2))
    tiles = [canvas.crop((c, r, c + side, r + side)) for r in range(0, height, side) for c in range(0, width, side)]
    return [normalize(t, cfg) for t in [image.resize((side, side), Image.BICUBIC), *tiles]]


def pool_frames(x: torch.Tensor, stride: int, mode: str) -> torch.Tensor:
    """(T, g*g, D) per-frame patch features -> (T, ceil(g/stride)^2, D), INST-IT's 2x2 video pooling.

    Odd grids (SigLIP-384: 27x27) round up: "average" averages the last, clipped window; "bilinear" resizes."""
    g = math.isqrt(x.shape[1])
    x = x.transpose(1, 2).unflatten(2, (g, g))  # (T, D, g, g)
    if mode not in ("average", "bilinear"):
        raise ValueError(f"pool_mode must be 'average' or 'bilinear', got {mode!r}")
    x = (F.avg_pool2d(x, stride, stride, ceil_mode=True) if mode == "average"
         else F.interpolate(x, size=math.ceil(g / stride), mode="bilinear", align_corners=False))
    return x.flatten(2).transpose(1, 2)


class Projector(nn.Module):
    """Linear-GELU-Linear from vision width to LM width (LLaVA-1.5); names match transformers' LLaVA. LLaVA-NeXT's
    image_newline embedding lives here, so it trains with the projector."""

    def __init__(self, vision_dim: int, lm_dim: int, newline: bool = False):
        super().__init__()
        self.linear_1 = nn.Linear(vision_dim, lm_dim)
        self.linear_2 = nn.Linear(lm_dim, lm_dim)
        self.image_newline = nn.Parameter(torch.randn(lm_dim) / math.sqrt(lm_dim)) if newline else None

    def forward(self, x):  # in the projector's own dtype: fp32 master weights while training
        return self.linear_2(F.gelu(self.linear_1(x.to(self.linear_1.weight.dtype))))


# ---------------------------------------------------------------------------------------------------
# Loading the parts. A LLaVA checkpoint is read with key mappings, so one path (build_model) serves both routes.

LLAVA_KEYS = {  # llava-hf checkpoints (old "language_model.model.*" and transformers 5 layouts) and LLaVA-NeXT's
    #             original layout (model.vision_tower.vision_tower.*, model.mm_projector.0/.2, the LM's own names)
    "vision": {r"^(model\.)?(vision_tower\.)+": ""},
    "language": {r"^language_model\.model\.": "model.", r"^language_model\.lm_head\.": "lm_head.",
                 r"^model\.language_model\.": "model."},
    "projector": {r"^(model\.)?(multi_modal_projector\.)?(?=linear_\d\.|image_newline$)": "",
                  r"^model\.mm_projector\.0\.": "linear_1.", r"^model\.mm_projector\.2\.": "linear_2."},
}


def resolve_dtype(name: str) -> torch.dtype:
    auto = "bfloat16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "float32"
    return getattr(torch, auto if name == "auto" else name)


def strict_from_pretrained(auto_class, path, **kwargs):
    """`auto_class.from_pretrained` with sdpa attention, quiet about a checkpoint's other parts (a LLaVA checkpoint
    holds three models) but an error when a weight of the model being loaded is missing."""
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        model, info = auto_class.from_pretrained(path, output_loading_info=True, attn_implementation="sdpa", **kwargs)
    finally:
        hf_logging.set_verbosity(verbosity)
    if info["missing_keys"]:
        raise ValueError(f"{path}: no weights for {sorted(info['missing_keys'])[:5]} (is this the right checkpoint?)")
    return model


def image_normalization(path: str) -> tuple[tuple, tuple]:
    """(mean, std) of the vision encoder's image processor; CLIP's values when the folder has none."""
    from transformers import AutoImageProcessor

    try:
        proc = AutoImageProcessor.from_pretrained(path)
        return tuple(proc.image_mean), tuple(proc.image_std)
    except (OSError, ValueError, AttributeError):
        log.warning("%s: no image processor config; using CLIP's normalisation", path)
        return (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)


def encoder_layers(vision: nn.Module) -> nn.ModuleList:
    """The transformer blocks of a vision encoder (CLIP/SigLIP: vision_model.encoder.layers)."""
    for name, module in vision.named_modules():
        if isinstance(module, nn.ModuleList) and re.search(r"encoder\.layers?$", name):
            return module
    raise ValueError(f"{type(vision).__name__}: no encoder.layers found; not a ViT-style encoder")


def checkpoint_tensors(path: str, mapping: dict) -> dict:
    """Tensors of a (sharded) safetensors checkpoint whose names match a pattern of `mapping`, renamed by it."""
    index = cached_file(path, "model.safetensors.index.json", _raise_exceptions_for_missing_entries=False)
    shards = sorted(set(json.load(open(index))["weight_map"].values())) if index else ["model.safetensors"]
    out = {}
    for shard in shards:
        with safe_open(cached_file(path, shard), "pt") as f:
            out.update({re.sub(p, new, key): f.get_tensor(key) for key in f.keys()
                        for p, new in mapping.items() if re.match(p, key)})
    return out


def missing_folder(path: str | None) -> str | None:
    """"PATH: no such folder" if `path` looks local (. / ~ first, or more parts than a hub ID's namespace/name) but
    is no folder: the hub would answer "Repo id must be in the form ..."."""
    if path and (path.startswith((".", "/", "~")) or len(Path(path).parts) > 2):
        return None if Path(path).expanduser().is_dir() else f"{path}: no such folder"


def llava_layout(path: str, tower: str | None = None) -> tuple[dict, object, object]:
    """A LLaVA checkpoint -> (ModelConfig fields, vision config, text config): transformers' Llava, LlavaNext or
    LlavaOnevision with its class's conventions for videos and multi-image samples, or LLaVA-NeXT's original layout,
    known by config.json's mm_vision_tower (original_layout; `tower` replaces that field)."""
    from transformers import AutoConfig, PretrainedConfig

    config, _ = PretrainedConfig.get_config_dict(path)
    if "mm_vision_tower" in config:
        return original_layout(path, config, tower or config["mm_vision_tower"])
    llava = AutoConfig.from_pretrained(path)
    if llava.model_type not in ("llava", "llava_next", "llava_onevision"):
        raise ValueError(f"{path}: a {llava.model_type!r} checkpoint ({', '.join(llava.architectures or [])}) is not "
                         "supported; model.py adopts transformers' Llava, LlavaNext and LlavaOnevision "
                         "ForConditionalGeneration checkpoints and LLaVA-NeXT's original layout (mm_vision_tower)")
    if not isinstance(llava.vision_feature_layer, int):
        raise ValueError(f"{path}: several vision feature layers {llava.vision_feature_layer} are not supported")
    layout = {} if llava.model_type == "llava" else dict(
        image_grid_pinpoints=[list(p) for p in llava.image_grid_pinpoints], multi_image="anyres")
    if llava.model_type == "llava_onevision":  # videos: ModelConfig's 2x2 bilinear after the projector, then a newline
        max_tiles = re.fullmatch(r"anyres_max_(\d+)", llava.vision_aspect_ratio)
        layout.update(anyres_max=int(max_tiles[1]) if max_tiles else 0, multi_image="tile", video_newline=True)
    return (dict(vision_model=path, vision_feature_layer=llava.vision_feature_layer,
                 vision_feature_select_strategy=llava.vision_feature_select_strategy, **layout),
            llava.vision_config, llava.text_config)


def original_layout(path: str, config: dict, tower: str) -> tuple[dict, object, object]:
    """llava_layout for the config.json of LLaVA-NeXT's original layout (LLaVA-VL/LLaVA-NeXT's code: INST-IT's models).

    The tower's config and image normalisation come from `tower`, its weights from the checkpoint; a SigLIP tower is
    cut as that code cuts it (last layer and head deleted). Grid pinpoints there are (width, height): a list, a list
    written out as a string, or "(1x1),...,(6x6)" in tower images. Videos and multi-image samples keep ModelConfig's
    defaults, as INST-IT's bench runs these checkpoints (overriding their mm_spatial_pool_* and mm_newline_position)."""
    from transformers import AutoConfig, LlamaConfig, Qwen2Config

    architecture = (config.get("architectures") or [config.get("model_type")])[0]
    text_class = {"LlavaLlamaForCausalLM": LlamaConfig, "LlavaQwenForCausalLM": Qwen2Config}.get(architecture)
    if text_class is None:
        raise ValueError(f"{path}: a {architecture!r} checkpoint in LLaVA-NeXT's original layout is not supported; "
                         "model.py adopts its LlavaLlamaForCausalLM and LlavaQwenForCausalLM (Vicuna, Qwen2)")
    anyres = re.fullmatch(r"anyres(_max_(\d+))?", config.get("image_aspect_ratio", "pad"))
    merging = dict(mm_projector_type="linear", mm_vision_select_feature="patch", mm_patch_merge_type="flat")
    merging = {k: config.get(k, default) for k, default in merging.items()}  # unset: the original code's defaults
    if merging != dict(mm_projector_type="mlp2x_gelu", mm_vision_select_feature="patch",
                       mm_patch_merge_type="spatial_unpad" if anyres else "flat"):
        raise ValueError(f"{path}: {merging} with image_aspect_ratio {config.get('image_aspect_ratio')!r} is not "
                         "supported; model.py adopts an mlp2x_gelu projector on patch features, and anyres[_max_N] "
                         "images with spatial_unpad or pad ones with flat")
    try:
        vision = AutoConfig.from_pretrained(tower)
    except (OSError, ValueError) as e:
        raise OSError(f"{path}: no config for its vision tower {tower!r} (config.json's mm_vision_tower): no folder, "
                      f"no hub ID in reach ({type(e).__name__}); give a folder or hub ID with the tower's config and "
                      "image processor as vision_model (train.py --vision-model) or as mm_vision_tower") from None
    vision = getattr(vision, "vision_config", vision)
    if siglip := vision.model_type == "siglip_vision_model":
        vision.num_hidden_layers, vision.vision_use_head = vision.num_hidden_layers - 1, False
    side, pinpoints = vision.image_size, config.get("image_grid_pinpoints") or []
    if isinstance(pinpoints, str) and "x" in pinpoints:  # every grid from the first to the last, e.g. (1x1) to (6x6)
        grids = [(int(w), int(h)) for w, h in re.findall(r"\((\d+)x(\d+)\)", pinpoints)]
        pinpoints = [[w * side, h * side] for w in range(grids[0][0], grids[-1][0] + 1)
                     for h in range(grids[0][1], grids[-1][1] + 1)]
    elif isinstance(pinpoints, str):  # a list written out, "[(336, 672), ...]": read as LLaVA-NeXT's code reads it
        try:
            pinpoints = ast.literal_eval(pinpoints)
        except (ValueError, SyntaxError):
            raise ValueError(f"{path}: config.json's image_grid_pinpoints {pinpoints!r} is neither a list of (width, "
                             'height) nor "(1x1),...,(6x6)"') from None
    return (dict(vision_model=tower, vision_feature_layer=-1 if siglip else config.get("mm_vision_select_layer", -2),
                 anyres_max=int(anyres[2] or 0) if anyres else 0,
                 image_grid_pinpoints=[[h, w] for w, h in pinpoints] if anyres else None),
            vision, text_class(**{k: v for k, v in config.items() if k not in ("model_type", "architectures")}))


def build_model(cfg: ModelConfig, device: str | None = None) -> "LlavaStyleModel":
    """Load vision encoder, projector and causal LM per `cfg` (all three from cfg.llava_checkpoint, if set, through
    LLAVA_KEYS); with load_in_4bit the LM alone is nf4, as in QLoRA; freeze and wrap them per `cfg`."""
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if cfg.load_in_4bit and cfg.lm_training == "full":
        raise ValueError("load_in_4bit trains LoRA adapters; set lm_training='lora' (or 'frozen')")
    for name, allowed in [("lm_training", ("lora", "full", "frozen")),  # pool_mode: pool_frames checks
                          ("vision_feature_select_strategy", ("default", "full")),
                          ("pool_position", ("before", "after")), ("multi_image", ("pooled", "anyres", "tile"))]:
        if getattr(cfg, name) not in allowed:
            raise ValueError(f"{name} must be one of {allowed}, got {getattr(cfg, name)!r}")
    dtype = resolve_dtype(cfg.dtype)
    llava = cfg.llava_checkpoint
    keys = LLAVA_KEYS if llava else {}
    _, vision_config, text_config = llava_layout(llava, cfg.vision_model) if llava else (None, None, None)
    vision_config = vision_config or AutoConfig.from_pretrained(cfg.vision_model)
    vision_config = getattr(vision_config, "vision_config", vision_config)  # a full CLIP/SigLIP: its vision half
    if not (getattr(vision_config, "image_size", None) and getattr(vision_config, "patch_size", None)):
        raise ValueError(f"{llava or cfg.vision_model}: vision model type {vision_config.model_type!r} has no "
                         "image_size/patch_size; model.py supports ViT-style encoders such as CLIP and SigLIP")
    vision = strict_from_pretrained(AutoModel, llava or cfg.vision_model, config=vision_config, dtype=dtype,
                                    device_map={"": device}, key_mapping=keys.get("vision"))
    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                               bnb_4bit_compute_dtype=dtype) if cfg.load_in_4bit else None
    lm = strict_from_pretrained(AutoModelForCausalLM, llava or cfg.language_model, config=text_config, dtype=dtype,
                                quantization_config=quant, device_map={"": device}, key_mapping=keys.get("language"))
    projector_state = checkpoint_tensors(llava, keys["projector"]) if llava else None
    tokenizer = AutoTokenizer.from_pretrained(cfg.tokenizer or llava or cfg.language_model)
    mean, std = image_normalization(cfg.vision_model)
    return LlavaStyleModel(replace(cfg, image_mean=mean, image_std=std), vision, lm, tokenizer, projector_state)


# ---------------------------------------------------------------------------------------------------
# The model.

class LlavaStyleModel(nn.Module):
    """Vision encoder + projector + causal LM; `<image>` positions in input_ids receive visual features."""

    def __init__(self, cfg, vision, lm, tokenizer, projector_state=None):
        super().__init__()
        vcfg = vision.config
        self.cfg = cfg = replace(cfg, image_size=vcfg.image_size, patch_size=vcfg.patch_size)
        self.tokenizer = tokenizer
        self.vision = self._truncate_vision(vision)
        self.cfg.has_cls = self._encoder_has_cls()
        self.projector = Projector(vcfg.hidden_size, lm.config.hidden_size, has_newline(cfg))
        self.projector.to(vision.device, vision.dtype)
        if projector_state is not None:
            self.projector.load_state_dict(projector_state)
        self.image_token_id = self._add_image_token(lm)
        self.lm = self._prepare_language_model(lm)
        self._freeze_vision()
        self._upcast_trainable()
        self._check_trainable()

    # -- set-up, in the order it runs ------------------------------------------------------------
    def _truncate_vision(self, vision):
        """Keep encoder layers up to the feature layer: later layers cost compute and never reach the LM."""
        layers = encoder_layers(vision)
        n = self.vision_depth = len(layers)
        used = self.cfg.vision_feature_layer % (n + 1)  # hidden_states has n+1 entries (embeddings first)
        del layers[used:]
        vision.config.num_hidden_layers = used
        return vision

    @torch.no_grad()
    def _encoder_has_cls(self) -> bool:
        """Shape-based: an encoder has a CLS token iff it emits grid^2 + 1 tokens (CLIP yes, SigLIP no)."""
        size = self.cfg.image_size
        pixels = torch.zeros(1, 3, size, size, dtype=self.vision.dtype, device=self.vision.device)
        return self.vision(pixels).last_hidden_state.shape[1] == (size // self.cfg.patch_size) ** 2 + 1

    def _add_image_token(self, lm) -> int:
        """Add `<image>` to the tokenizer if missing; new embedding rows are the mean of the old ones, so a
        rebuilt model (from_pretrained) gets the same rows without storing them."""
        tok = self.tokenizer
        if tok.pad_token is None:
            tok.pad_token = tok.eos_token
        if self.cfg.image_token not in tok.get_vocab():
            tok.add_special_tokens({"additional_special_tokens": [self.cfg.image_token]})
        old = lm.get_input_embeddings().weight.shape[0]
        if len(tok) > old:
            lm.resize_token_embeddings(len(tok), mean_resizing=False)
            for emb in (lm.get_input_embeddings(), lm.get_output_embeddings()):
                emb.weight.data[old:] = emb.weight.data[:old].mean(0)
        return tok.convert_tokens_to_ids(self.cfg.image_token)

    def _prepare_language_model(self, lm):
        """Freeze / LoRA-wrap the LM. k-bit preparation runs on the LM alone, before vision and projector
        are attached, so it cannot upcast the vision tower to fp32 (63 -> 81 GB in a bitsandbytes report)."""
        from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

        if self.cfg.load_in_4bit:
            lm = prepare_model_for_kbit_training(lm, use_gradient_checkpointing=self.cfg.gradient_checkpointing,
                                                 gradient_checkpointing_kwargs={"use_reentrant": False})
        elif self.cfg.gradient_checkpointing:
            lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        lm.requires_grad_(self.cfg.lm_training == "full")
        self._expected_lm_trainable = sum(p.numel() for p in lm.parameters()) if self.cfg.lm_training == "full" else 0
        if self.cfg.lm_training == "lora":
            self._expected_lm_trainable = sum(self.cfg.lora_r * (m.in_features + m.out_features) for m in lm.modules()
                                              if isinstance(m, nn.Linear) and m is not lm.get_output_embeddings())
            lm = get_peft_model(lm, LoraConfig(r=self.cfg.lora_r, lora_alpha=self.cfg.lora_alpha,
                                               lora_dropout=self.cfg.lora_dropout, target_modules="all-linear",
                                               task_type="CAUSAL_LM"))
            for module in lm.modules():  # adapters are fp32 master weights; autocast runs them in bf16, so
                if hasattr(module, "cast_input_dtype_enabled"):  # peft's fp32 copy of each input is wasted
                    module.cast_input_dtype_enabled = False       # (a 7B video step: 1.00 -> 0.88 s, H100)
        return lm

    def trainable_vision_tail(self) -> list:
        """The encoder blocks that train: the last `trainable_vision_layers` of the encoder's *original* depth, so
        INST-IT's "first 12 of 24 frozen" holds (with the penultimate feature layer, the 24th is cut and 11 train)."""
        return list(encoder_layers(self.vision)[max(0, self.vision_depth - self.cfg.trainable_vision_layers):])

    def trainable_vision_embeddings(self) -> list:
        """The patch and position embeddings, trained only when no block is frozen (trainable_vision_layers >=
        the depth): an encoder learned from scratch would otherwise keep its random ones."""
        embeddings = [module for name, module in self.vision.named_modules() if name.endswith("embeddings")]
        return embeddings if self.cfg.trainable_vision_layers >= self.vision_depth else []

    def _freeze_vision(self):
        """Freeze all but the trainable tail: frozen layers record no autograd graph, as no_grad would, but the tail
        does (LLaVA's tower was decorated with no_grad, so "unfreezing" it trained nothing)."""
        tail = self.trainable_vision_tail()
        self.vision.requires_grad_(False)
        for layer in tail + self.trainable_vision_embeddings():
            layer.requires_grad_(True)
        if tail and self.cfg.gradient_checkpointing:
            self.vision.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})

    def _upcast_trainable(self):
        """Trainable weights are kept in fp32 (master weights, autocast computes in bf16); frozen keep `dtype`."""
        for p in self.parameters():
            if p.requires_grad and p.dtype in (torch.float16, torch.bfloat16):
                p.data = p.data.float()

    def _check_trainable(self):
        """Trainable parameters must be exactly projector + LM (LoRA or full) + trainable vision tail and embeddings."""
        vision = self.trainable_vision_tail() + self.trainable_vision_embeddings()
        expected = {"projector": sum(p.numel() for p in self.projector.parameters()),
                    "vision": sum(p.numel() for part in vision for p in part.parameters()),
                    "language": self._expected_lm_trainable}
        actual = {name: sum(p.numel() for p in params) for name, params in self.parameter_groups().items()}
        if actual != expected:
            raise RuntimeError(f"trainable parameters {actual} differ from what the config implies {expected}")
        trained, total = sum(actual.values()), sum(p.numel() for p in self.parameters())
        log.info("trainable parameters: %s = %d of %d (%.2f%%)", actual, trained, total, 100 * trained / total)

    def compile_blocks(self, **options):
        """torch.compile each block of the vision encoder and the LM (regional compilation): alike blocks share one
        graph, compiled in seconds, that fuses element-wise work; names and checkpoints stay as they are."""
        for block in [*encoder_layers(self.vision), *self.lm.get_decoder().layers]:
            block.compile(**options)
        return self

    @property
    def device(self):
        return self.projector.linear_1.weight.device

    def parameter_groups(self) -> dict:
        """Trainable parameters by part, for separate learning rates: projector / vision / language."""
        parts = {"projector": self.projector, "vision": self.vision, "language": self.lm}
        return {name: [p for p in part.parameters() if p.requires_grad] for name, part in parts.items()}

    # -- forward ---------------------------------------------------------------------------------
    def encode_visuals(self, pixel_values, visual_frames, visual_pooled, image_sizes=None) -> torch.Tensor:
        """(F, 3, H, W) frames of all visuals in a batch -> (N, D_lm) features in placeholder order.

        `visual_frames[i]` frames belong to visual i: a video's, 2x2-pooled if `visual_pooled[i]` (cfg.pool_position),
        one image, or an AnyRes image's base view and tiles when `image_sizes[i]` is its (height, width)."""
        image_sizes = image_sizes or [None] * len(visual_frames)
        if sum(visual_frames) != len(pixel_values) or not len(visual_pooled) == len(image_sizes) == len(visual_frames):
            raise ValueError(f"visual_frames {visual_frames} / visual_pooled {visual_pooled} / image_sizes "
                             f"{image_sizes} do not describe {len(pixel_values)} frames")
        frames = max((n for n, size in zip(visual_frames, image_sizes) if size is None), default=0)
        if frames > self.cfg.max_frames:
            raise ValueError(f"a visual has {frames} frames, more than max_frames={self.cfg.max_frames}; "
                             "sample fewer frames (data.sample_frames)")
        hidden = self.vision(pixel_values.to(self.vision.dtype), output_hidden_states=True).hidden_states[-1]
        cfg, newline, features = self.cfg, self.projector.image_newline, []
        for x, pooled, size in zip(hidden.split(visual_frames), visual_pooled, image_sizes):
            pat = x[:, 1:] if cfg.has_cls else x  # (frames, grid^2, Dv)
            if pooled and cfg.pool_position == "before":
                x = self.projector(pool_frames(pat, cfg.pool_stride, cfg.pool_mode))
            elif pooled:
                x = pool_frames(self.projector(pat), cfg.pool_stride, cfg.pool_mode)
            elif size is not None:
                x = self.pack_anyres(self.projector(pat), size)
            else:
                x = self.projector(x if cfg.vision_feature_select_strategy == "full" else pat)
            x = x.reshape(-1, x.shape[-1])
            if newline is not None and size is None and (cfg.video_newline or not pooled):
                x = torch.cat([x, newline[None].to(x.dtype)])
            features.append(x)
        return torch.cat(features)

    def pack_anyres(self, x, image_size) -> torch.Tensor:
        """(1 + tiles, grid^2, D) projected base view and tiles -> (N, D): the base view's tokens, then the tiles'
        token grid unpadded (and shrunk) as anyres_shape says, an image_newline ending each row (LLaVA-NeXT)."""
        grid, dim = self.cfg.image_size // self.cfg.patch_size, x.shape[-1]
        rows, cols = anyres_grid(self.cfg, image_size)
        (height, width), kept = anyres_shape(self.cfg, image_size)
        tiles = x[1:].view(rows, cols, grid, grid, dim).permute(4, 0, 2, 1, 3).reshape(dim, rows * grid, cols * grid)
        tiles = tiles.narrow(1, (rows * grid - height) // 2, height).narrow(2, (cols * grid - width) // 2, width)
        if kept != (height, width):
            tiles = F.interpolate(tiles[None], size=kept, mode="bilinear")[0]
        newline = self.projector.image_newline.to(tiles.dtype)[:, None, None].expand(dim, kept[0], 1)
        return torch.cat([x[0], torch.cat([tiles, newline], 2).flatten(1).T])

    def embed(self, input_ids, pixel_values=None, visual_frames=None, visual_pooled=None,
              image_sizes=None) -> torch.Tensor:
        """(B, L) ids -> (B, L, D) embeddings with visual features written into the `<image>` positions.

        Each sample's `<image>` tokens must hold whole visuals, num_visual_tokens(...) each, in order: a
        batch whose total is right but whose samples are not (n+1 and n-1) is an error, not a silent shift."""
        embeds = self.lm.get_input_embeddings()(input_ids)
        slots = input_ids == self.image_token_id
        if pixel_values is None:
            if slots.any():
                raise ValueError(f"input_ids hold {int(slots.sum())} {self.cfg.image_token} tokens but no pixel_values")
            return embeds
        visual_frames = visual_frames or [1] * len(pixel_values)
        visual_pooled = visual_pooled or [False] * len(visual_frames)
        image_sizes = image_sizes or [None] * len(visual_frames)
        features = self.encode_visuals(pixel_values, visual_frames, visual_pooled, image_sizes)
        visual_ends = set(itertools.accumulate(num_visual_tokens(self.cfg, f, p, s)
                                               for f, p, s in zip(visual_frames, visual_pooled, image_sizes)))
        per_sample = slots.sum(1).tolist()
        if sum(per_sample) != len(features) or not set(itertools.accumulate(per_sample)) <= visual_ends | {0}:
            raise ValueError(
                f"{self.cfg.image_token} tokens per sample {per_sample} (total {sum(per_sample)}) do not hold "
                f"whole visuals of visual_frames={visual_frames} pooled={visual_pooled} ({len(features)} "
                f"features); expand each placeholder with num_visual_tokens (data.py does)")
        return embeds.masked_scatter(slots.unsqueeze(-1), features.to(embeds.dtype))

    def autocast(self):
        """bf16 autocast when the weights are bf16: the trained vision tail and projector are kept in fp32
        (master weights), so frozen bf16 layers feed fp32 ones; train.py's accelerate autocast does the same."""
        dtype = resolve_dtype(self.cfg.dtype)
        return torch.autocast(self.device.type, dtype=dtype, enabled=dtype != torch.float32)

    def forward(self, input_ids, pixel_values=None, attention_mask=None, labels=None, visual_frames=None,
                visual_pooled=None, image_sizes=None, pixel_values_videos=None, return_logits=True):
        """(B, L) ids with expanded `<image>` tokens (+ frames) -> logits (B, L, V) and the mean next-token loss over
        labels != -100, computed as transformers' LLaVA does (fp32 logits). transformers' LLaVA-NeXT / OneVision
        inputs (5-D pixel_values with image_sizes, or pixel_values_videos) are read by hf_visuals.

        return_logits=False (training): the LM head runs only where a label is set (at 6K context, full fp32 logits
        over a 32k vocabulary are ~0.8 GB per sample); same loss and gradients, .logits is None."""
        if pixel_values_videos is not None or (pixel_values is not None and pixel_values.dim() == 5):
            input_ids, pixel_values, visual_frames, visual_pooled, image_sizes = self.hf_visuals(
                input_ids, pixel_values, image_sizes, pixel_values_videos)
        with self.autocast():
            embeds = self.embed(input_ids, pixel_values, visual_frames, visual_pooled, image_sizes)
            hidden = self.lm.get_decoder()(inputs_embeds=embeds, attention_mask=attention_mask).last_hidden_state
            if not return_logits and labels is not None:
                targets = labels[:, 1:].to(hidden.device)
                labelled = targets != -100
                logits = self.lm.get_output_embeddings()(hidden[:, :-1][labelled])  # (N labelled, V)
                return CausalLMOutputWithPast(loss=F.cross_entropy(logits.float(), targets[labelled]), logits=None)
            logits = self.lm.get_output_embeddings()(hidden)
        loss = None if labels is None else F.cross_entropy(logits[:, :-1].flatten(0, 1).float(),
                                                           labels[:, 1:].flatten().to(logits.device))
        return CausalLMOutputWithPast(loss=loss, logits=logits)

    def hf_visuals(self, input_ids, pixel_values, image_sizes, videos):
        """transformers' LlavaNext / LlavaOnevision inputs, one visual per sample -> (input_ids, frames, visual_frames,
        visual_pooled, image_sizes) for encode_visuals. Images: (B, max tiles, 3, S, S) zero-padded past each image's
        tiles, with image_sizes (B, 2) as (height, width); videos: (B, T, 3, S, S) at OneVision's `<video>` tokens."""
        if videos is None:
            sizes = [tuple(s) for s in torch.as_tensor(image_sizes).tolist()]
            tiles = [1 + math.prod(anyres_grid(self.cfg, s)) for s in sizes]
            frames = torch.cat([p[:n] for p, n in zip(pixel_values, tiles)])
            return input_ids, frames, tiles, [False] * len(tiles), sizes
        if pixel_values is not None or "<video>" not in self.tokenizer.get_vocab():
            raise ValueError("videos as transformers gives them: one per sample, no images beside them, at the "
                             "tokenizer's <video> token")
        ids = input_ids.masked_fill(input_ids == self.tokenizer.convert_tokens_to_ids("<video>"), self.image_token_id)
        return ids, videos.flatten(0, 1), [videos.shape[1]] * len(videos), [True] * len(videos), None

    @torch.no_grad()
    def generate(self, input_ids, pixel_values=None, attention_mask=None, visual_frames=None, visual_pooled=None,
                 image_sizes=None, max_new_tokens=64, do_sample=False, temperature=1.0, top_p=1.0, streamer=None):
        """Left-padded prompts (B, L) -> new token ids (B, <= max_new_tokens), greedy, sampled, or with do_sample=None
        as the checkpoint's generation config says (INST-IT's bench passes no sampling arguments), ending at EOS;
        a transformers `streamer` (TextStreamer) receives the tokens as they come."""
        vocab = self.tokenizer.get_vocab()
        eos = [self.tokenizer.eos_token_id] + [vocab[t] for t in ("<|im_end|>", "<|eot_id|>") if t in vocab]
        sampling = (dict(do_sample=True, temperature=temperature, top_p=top_p) if do_sample else {} if do_sample is None
                    else dict(do_sample=False, temperature=None, top_p=None, top_k=None))
        with self.autocast():
            embeds = self.embed(input_ids, pixel_values, visual_frames, visual_pooled, image_sizes)
            return self.lm.generate(inputs_embeds=embeds, attention_mask=attention_mask,
                                    max_new_tokens=max_new_tokens, eos_token_id=eos,
                                    pad_token_id=self.tokenizer.pad_token_id, streamer=streamer, **sampling)

    # -- checkpoints -----------------------------------------------------------------------------
    def trained_state_dict(self) -> dict:
        """Every trained tensor: projector, unfrozen vision layers, LoRA adapter (or the full LM)."""
        return {name: p.detach() for name, p in self.named_parameters() if p.requires_grad}

    def save_pretrained(self, out_dir: str):
        """The config, trained tensors and tokenizer (its added tokens): all a reload needs besides the base weights."""
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        Path(out_dir, "model_config.json").write_text(json.dumps(asdict(self.cfg), indent=1))
        save_file({k: v.contiguous().cpu() for k, v in self.trained_state_dict().items()},
                  str(Path(out_dir, "trained.safetensors")))
        self.tokenizer.save_pretrained(out_dir)

    @classmethod
    def from_pretrained(cls, path: str, device: str | None = None, strict: bool = True,
                        **overrides) -> "LlavaStyleModel":
        """Rebuild from a save_pretrained folder (base weights from the config's paths, trained tensors from
        the folder); a folder holding a LLaVA checkpoint goes to from_llava_hf. `overrides` change the
        config (e.g. a later training stage); strict=False lets parameters the folder lacks start fresh."""
        config_file = Path(path, "model_config.json")
        if not config_file.exists():  # e.g. written by merge_to_llava_hf
            return cls.from_llava_hf(path, device=device, **overrides)
        # a config saved before pooling could come after the projector pooled before it
        saved = {"pool_position": "before", **json.loads(config_file.read_text())}
        names = {f.name for f in fields(ModelConfig)}
        cfg = replace(ModelConfig(**{k: v for k, v in saved.items() if k in names}), tokenizer=path, **overrides)
        return build_model(cfg, device).load_trained(str(Path(path, "trained.safetensors")), strict)

    def load_trained(self, file: str, strict: bool = True) -> "LlavaStyleModel":
        """Load trained tensors. strict: their names must be exactly this model's trainable parameters;
        otherwise each must name a parameter of this model, and trainable ones it lacks keep their init."""
        try:
            state = load_file(file, device=str(self.device))
        except SafetensorError as e:  # a cut or overwritten file: its header no longer matches its size
            raise ValueError(f"{file}: corrupt ({e}); save it again, or load an earlier checkpoint") from None
        expected = set(self.trained_state_dict())
        missing = expected - set(state)
        unexpected = set(state) - (expected if strict else {name for name, _ in self.named_parameters()})
        if unexpected or (strict and missing):
            raise ValueError(f"{file}: trained tensors do not fit this model's config (missing "
                             f"{sorted(missing)[:3]}, unexpected {sorted(unexpected)[:3]})")
        self.load_state_dict(state, strict=False)  # the names were checked above
        return self

    @classmethod
    def from_llava_hf(cls, path_or_id: str, device: str | None = None, **overrides) -> "LlavaStyleModel":
        """Adopt a transformers LLaVA-1.5, LLaVA-NeXT or LLaVA-OneVision checkpoint (llava-hf/llava-1.5-7b-hf,
        llava-hf/llava-v1.6-vicuna-7b-hf, llava-hf/llava-onevision-qwen2-7b-ov-hf) or one in LLaVA-NeXT's original
        layout (Inst-IT/LLaVA-Next-Inst-It-Vicuna-7B), as llava_layout reads it."""
        if problem := missing_folder(path_or_id):  # from_pretrained sends a folder without model_config.json here
            raise FileNotFoundError(problem)
        layout, _, _ = llava_layout(path_or_id, overrides.get("vision_model"))
        cfg = ModelConfig(language_model=path_or_id, llava_checkpoint=path_or_id, **layout)
        return build_model(replace(cfg, **overrides), device)

    def merge_to_llava_hf(self, out_dir: str):
        """Write a transformers Llava, LlavaNext or LlavaOnevision checkpoint, LoRA folded in, vision cut to the used
        layers (feature layer -1); from_llava_hf loads it with that class's conventions for videos and many images."""
        from transformers import AutoConfig, AutoModelForImageTextToText, CLIPImageProcessor

        cfg = self.cfg
        full = build_model(replace(cfg, load_in_4bit=False), "cpu")  # unquantized base, same vocabulary
        if unexpected := full.load_state_dict(self.trained_state_dict(), strict=False).unexpected_keys:  # trained only
            raise ValueError(f"trained tensors {unexpected[:3]} have no place in the unquantized model")
        lm = full.lm.merge_and_unload() if cfg.lm_training == "lora" else full.lm
        kind = "llava_onevision" if cfg.anyres_max else "llava_next" if cfg.image_grid_pinpoints else "llava"
        layout = {} if kind == "llava" else {"image_grid_pinpoints": cfg.image_grid_pinpoints}
        if kind == "llava_onevision":  # without a <video> token, videos use the image token
            layout.update(vision_aspect_ratio=f"anyres_max_{cfg.anyres_max}",
                          video_token_index=self.tokenizer.get_vocab().get("<video>", self.image_token_id))
        config = AutoConfig.for_model(kind, vision_config=full.vision.config.to_dict(), text_config=lm.config.to_dict(),
                                      image_token_index=self.image_token_id, vision_feature_layer=-1,
                                      vision_feature_select_strategy="default" if cfg.has_cls else "full",
                                      projector_hidden_act="gelu", multimodal_projector_bias=True, **layout)
        llava = AutoModelForImageTextToText.from_config(config)
        projector = full.projector.state_dict()
        if (newline := projector.pop("image_newline", None)) is not None:
            llava.model.image_newline.data.copy_(newline)
        llava.model.vision_tower.load_state_dict(full.vision.state_dict())
        llava.model.multi_modal_projector.load_state_dict(projector)
        llava.model.language_model.load_state_dict(lm.get_decoder().state_dict())
        llava.lm_head.load_state_dict(lm.get_output_embeddings().state_dict())
        llava.save_pretrained(out_dir)
        self.tokenizer.save_pretrained(out_dir)
        CLIPImageProcessor(size={"shortest_edge": cfg.image_size}, crop_size=cfg.image_size, image_mean=cfg.image_mean,
                           image_std=cfg.image_std).save_pretrained(out_dir)  # from_llava_hf reads its mean and std
