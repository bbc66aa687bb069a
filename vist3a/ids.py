"""Stable ids and seeds derived from content, so reruns and resumes agree without any state."""

from __future__ import annotations

import hashlib
import json

SEED_BITS = 31  # fits int32 and every torch.Generator


def prompt_id(prompt: str, negative_prompt: str = "") -> str:
    """16 hex chars of SHA-256 over the normalised prompt pair; equal prompts collapse to one id."""
    key = json.dumps([" ".join(prompt.split()), " ".join((negative_prompt or "").split())], ensure_ascii=False)
    return hashlib.sha256(key.encode("utf-8")).hexdigest()[:16]


def seed_from(text: str) -> int:
    """A deterministic seed in [0, 2^31) from any string (an id or a prompt)."""
    return int.from_bytes(hashlib.sha256(("seed:" + text).encode("utf-8")).digest()[:8], "big") % (1 << SEED_BITS)


def fingerprint(obj) -> str:
    """Short SHA-256 of a JSON-able object (e.g. the model config and weight URIs)."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode("utf-8")).hexdigest()[:16]
