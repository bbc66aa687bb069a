"""Prompts before any model: the tokenizer, cleaning, token counts and the checks that refuse a prompt.

Only transformers here (no diffusers, no model weights): validation stages and the Serve ingress
check prompts with it. Encoding them for the transformer is `vist3a.video.pipeline.encode_prompts`."""

from __future__ import annotations

import html
from pathlib import Path

from transformers import AutoTokenizer, ByT5Tokenizer, PreTrainedTokenizerBase

from vist3a.config import VideoModelConfig


def load_tokenizer(cfg: VideoModelConfig) -> PreTrainedTokenizerBase:
    """The tokenizer alone (cheap): what prompt validation needs, without loading any model."""
    if cfg.source == "pretrained":
        root = video_weights_root(cfg)
        return AutoTokenizer.from_pretrained(root / "tokenizer")
    if cfg.text_encoder.tokenizer != "byt5":
        raise ValueError("model.video.text_encoder.tokenizer: 'pretrained' needs model.video.source: pretrained")
    return ByT5Tokenizer()


def video_weights_root(cfg: VideoModelConfig) -> Path:
    """The local diffusers-format directory of model.video.weights (the tokenizer and the components load from it)."""
    if not cfg.weights:
        raise ValueError("model.video.weights must name a diffusers-format directory when model.video.source is 'pretrained'")
    if "://" in cfg.weights:
        raise ValueError(f"model.video.weights {cfg.weights!r} is a URI; fetch it to a local directory first")
    root = Path(cfg.weights).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(f"video weights directory not found: {root}")
    return root


def clean_prompt(prompt: str) -> str:
    """HTML entities unescaped, whitespace runs collapsed (as Wan's pipeline cleans prompts)."""
    return " ".join(html.unescape(prompt).split())


def count_tokens(tokenizer: PreTrainedTokenizerBase, prompt: str) -> int:
    """Tokens the encoder sees, end-of-sequence token included."""
    return len(tokenizer(clean_prompt(prompt), add_special_tokens=True)["input_ids"])


def check_prompt(tokenizer: PreTrainedTokenizerBase, prompt: object, max_length: int,
                 template: str = "{prompt}") -> str | None:
    """Why `prompt` cannot be generated (None when it can): checked before any GPU time is spent. The
    limit counts the prompt inside `template` (sampling.prompt_template): that is what the encoder reads.
    Reasons put a stable class before the colon, so summaries can count them."""
    if not isinstance(prompt, str):
        return f"prompt must be a string, got {type(prompt).__name__}"
    if not prompt.strip():
        return "prompt is empty" if not prompt else "prompt is only whitespace"
    n = count_tokens(tokenizer, template.replace("{prompt}", prompt))
    if n > max_length:
        wrapped = " with sampling.prompt_template around it" if template != "{prompt}" else ""
        return f"prompt too long: {n} tokens{wrapped}, over the limit of {max_length}"
    return None
