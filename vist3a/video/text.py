"""Prompt checking and encoding the way Wan conditions its transformer: UMT5 hidden states,
padded to a fixed length with zeros after each prompt's last token (Wan's cross-attention takes
no mask, so the fixed length also keeps each item independent of the rest of the batch)."""

from __future__ import annotations

import html
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from transformers import AutoTokenizer, ByT5Tokenizer, PreTrainedTokenizerBase

from vist3a.config import VideoModelConfig

if TYPE_CHECKING:  # components imports diffusers (slow); prompt checks need only the tokenizer
    from vist3a.video.components import WanComponents


def load_tokenizer(cfg: VideoModelConfig) -> PreTrainedTokenizerBase:
    """The tokenizer alone (cheap): what prompt validation needs, without loading any model."""
    if cfg.source == "pretrained":
        root = _weights_root(cfg)
        return AutoTokenizer.from_pretrained(root / "tokenizer")
    if cfg.text_encoder.tokenizer != "byt5":
        raise ValueError("model.video.text_encoder.tokenizer: 'pretrained' needs model.video.source: pretrained")
    return ByT5Tokenizer()


def _weights_root(cfg: VideoModelConfig) -> Path:
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


def check_prompt(tokenizer: PreTrainedTokenizerBase, prompt: object, max_length: int) -> str | None:
    """Why `prompt` cannot be generated (None when it can): checked before any GPU time is spent."""
    if not isinstance(prompt, str):
        return f"prompt must be a string, got {type(prompt).__name__}"
    if not prompt.strip():
        return "prompt is empty" if not prompt else "prompt is only whitespace"
    n = count_tokens(tokenizer, prompt)
    if n > max_length:
        return f"prompt has {n} tokens, over the limit of {max_length}"
    return None


@torch.no_grad()
def encode_prompts(components: WanComponents, prompts: list[str], max_length: int | None = None
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """-> (embeds [B,L,D] in the transformer's dtype, mask [B,L] bool), L = max_length.

    Empty prompts are allowed here (the usual negative prompt); over-long ones raise, since
    silently truncating would generate something other than what was asked."""
    max_length = max_length or components.max_length
    texts = [clean_prompt(p) for p in prompts]
    tok = components.tokenizer(texts, padding="max_length", max_length=max_length, truncation=False,
                               add_special_tokens=True, return_attention_mask=True, return_tensors="pt")
    ids, mask = tok["input_ids"], tok["attention_mask"]
    if ids.shape[1] > max_length:
        lengths = mask.sum(1).tolist()
        bad = [(i, n) for i, n in enumerate(lengths) if n > max_length]
        raise ValueError(f"prompts over the limit of {max_length} tokens (index, tokens): {bad}")
    te = components.text_encoder
    ids, mask = ids.to(te.device), mask.to(te.device)
    hidden = te(input_ids=ids, attention_mask=mask).last_hidden_state
    mask = mask.bool()
    hidden = hidden * mask.unsqueeze(-1).to(hidden.dtype)
    return hidden.to(components.transformer.dtype), mask
