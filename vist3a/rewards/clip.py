"""CLIP-family image-text scorer for reward fine-tuning, on transformers' `CLIPModel`.

Any checkpoint in transformers' CLIP format works: OpenAI CLIP, PickScore (`yuvalkirstain/PickScore_v1`,
whose tokenizer and preprocessor files live in `laion/CLIP-ViT-H-14-laion2B-s32B-b79K`), DFN/LAION CLIPs
converted to transformers. The image preprocessing (shortest-edge resize, centre crop, normalise)
is done here in torch rather than by `CLIPProcessor`, because the processor works on PIL/numpy
images and would cut the gradient from the score back to the rendered views.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vist3a.ids import seeded

#: OpenAI CLIP's normalisation, used when a checkpoint ships no preprocessor_config.json.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
#: What `require` fetches of a hub/s3 scorer: configs, tokenizer files and safetensors weights.
SCORER_PATTERNS = ["*.json", "*.txt", "*.model", "*.safetensors"]


def _size_value(value, default: int) -> int:
    """preprocessor_config sizes are ints or dicts ({"shortest_edge": n} / {"height": h, "width": w})."""
    if value is None:
        return default
    if isinstance(value, dict):
        return int(value.get("shortest_edge") or value.get("height") or default)
    return int(value)


class ClipScorer(nn.Module):
    """images [N,3,H,W] in [0,1] + N prompts -> cosine similarity [N] in [-1, 1] (differentiable in the images).

    Frozen: the reward trains the generator, never the scorer."""

    def __init__(self, model: nn.Module, tokenizer, resize: int, crop: int,
                 mean: tuple[float, ...] = CLIP_MEAN, std: tuple[float, ...] = CLIP_STD):
        super().__init__()
        self.model = model.eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.resize, self.crop = int(resize), int(crop)
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.max_length = int(model.config.text_config.max_position_embeddings)

    @classmethod
    def load(cls, spec: str, storage=None, tokenizer: str | None = None, device: torch.device | str = "cpu",
             dtype: torch.dtype = torch.float32, what: str = "align.scorer") -> ClipScorer:
        """From a local directory, an s3:// prefix or a hub id in transformers' format. `tokenizer` names
        where the tokenizer and preprocessor_config.json are when the model directory lacks them; `what`
        is the config key named when either is missing."""
        from transformers import AutoTokenizer, CLIPModel

        from vist3a.weights.locate import require

        root = require(spec, storage, what=what, allow_patterns=SCORER_PATTERNS)
        tok_root = require(tokenizer, storage, what=f"{what}_tokenizer", allow_patterns=SCORER_PATTERNS) \
            if tokenizer else root
        try:
            tok = AutoTokenizer.from_pretrained(str(tok_root))
        except (OSError, ValueError) as exc:
            raise FileNotFoundError(f"no CLIP tokenizer at {tok_root} ({exc}); set {what}_tokenizer to the "
                                    f"directory or hub id holding it (PickScore: laion/CLIP-ViT-H-14-laion2B-s32B-b79K)") from None
        model = CLIPModel.from_pretrained(str(root), torch_dtype=dtype)
        image_size = int(model.config.vision_config.image_size)
        pre = {}
        for candidate in (Path(tok_root) / "preprocessor_config.json", Path(root) / "preprocessor_config.json"):
            if candidate.is_file():
                pre = json.loads(candidate.read_text())
                break
        return cls(model, tok, resize=_size_value(pre.get("size"), image_size),
                   crop=_size_value(pre.get("crop_size"), image_size),
                   mean=tuple(pre.get("image_mean", CLIP_MEAN)), std=tuple(pre.get("image_std", CLIP_STD))).to(device)

    @property
    def logit_scale(self) -> float:
        """The model's learnt temperature (100 for OpenAI CLIP and PickScore): score = scale * cosine."""
        return float(self.model.logit_scale.exp())

    def preprocess(self, images: Tensor) -> Tensor:
        """[N,3,H,W] in [0,1] -> CLIP pixel values: resize the shortest edge (bicubic, antialiased), centre crop, normalise."""
        _, _, h, w = images.shape
        scale = self.resize / min(h, w)
        size = (max(self.crop, round(h * scale)), max(self.crop, round(w * scale)))
        x = images.float()
        if size != (h, w):
            x = F.interpolate(x, size=size, mode="bicubic", align_corners=False, antialias=scale < 1)
        top, left = (size[0] - self.crop) // 2, (size[1] - self.crop) // 2
        x = x[..., top:top + self.crop, left:left + self.crop]
        return (x - self.mean) / self.std

    @staticmethod
    def _features(out) -> Tensor:
        return out if isinstance(out, Tensor) else out.pooler_output

    def text_embeddings(self, prompts: list[str]) -> Tensor:
        tokens = self.tokenizer(list(prompts), padding=True, truncation=True, max_length=self.max_length,
                                return_tensors="pt").to(self.mean.device)
        with torch.no_grad():
            feats = self._features(self.model.get_text_features(input_ids=tokens["input_ids"],
                                                                attention_mask=tokens["attention_mask"]))
        return F.normalize(feats.float(), dim=-1)

    def image_embeddings(self, images: Tensor) -> Tensor:
        pixels = self.preprocess(images).to(self.model.dtype)
        return F.normalize(self._features(self.model.get_image_features(pixel_values=pixels)).float(), dim=-1)

    def forward(self, images: Tensor, prompts: list[str]) -> Tensor:
        if images.shape[0] != len(prompts):
            raise ValueError(f"{images.shape[0]} images but {len(prompts)} prompts")
        return (self.image_embeddings(images) * self.text_embeddings(prompts)).sum(-1)


# ----------------------------------------------------------------------------- a tiny random scorer


def _byte_level_vocab() -> dict[str, int]:
    """CLIP's byte-level BPE vocabulary without merges: every byte as a token, alone and word-final."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    chars, extra = [], 0
    for b in range(256):
        if b in printable:
            chars.append(chr(b))
        else:
            chars.append(chr(256 + extra))
            extra += 1
    tokens = ["<|startoftext|>", "<|endoftext|>"] + chars + [c + "</w>" for c in chars]
    return {t: i for i, t in enumerate(tokens)}


def write_tiny_clip(directory: str | Path, seed: int = 0, image_size: int = 32, width: int = 32,
                    layers: int = 2) -> Path:
    """A small random CLIP in transformers' format (model, tokenizer, preprocessor_config.json) at
    `directory`: what the tiny preset's reward runs and the tests load, with no download."""
    from transformers import CLIPConfig, CLIPModel, CLIPTokenizer

    directory = Path(directory)
    vocab = _byte_level_vocab()
    tokenizer = CLIPTokenizer(vocab=vocab, merges=[])
    common = {"hidden_size": width, "intermediate_size": 2 * width, "num_hidden_layers": layers,
              "num_attention_heads": max(1, width // 16)}
    config = CLIPConfig(
        text_config=dict(common, vocab_size=len(vocab), max_position_embeddings=77,
                         bos_token_id=vocab["<|startoftext|>"], eos_token_id=vocab["<|endoftext|>"],
                         pad_token_id=vocab["<|endoftext|>"]),
        vision_config=dict(common, image_size=image_size, patch_size=max(1, image_size // 4)),
        projection_dim=width, logit_scale_init_value=math.log(100.0))
    with seeded(seed):
        model = CLIPModel(config)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    (directory / "preprocessor_config.json").write_text(json.dumps({
        "size": {"shortest_edge": image_size}, "crop_size": {"height": image_size, "width": image_size},
        "image_mean": list(CLIP_MEAN), "image_std": list(CLIP_STD), "do_resize": True, "do_center_crop": True,
        "do_normalize": True, "image_processor_type": "CLIPImageProcessor"}, indent=1))
    return directory
