"""Stable ids and seeds derived from content, so reruns and resumes agree without any state."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from contextlib import contextmanager

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


@contextmanager
def seeded(seed: int) -> Iterator[None]:
    """torch's global RNG seeded with `seed` inside the block (random weights that are the same on every
    machine and worker); the caller's RNG stream is left as it was."""
    import torch  # here: ids and seeds are also used where torch is not loaded (prompt reading)

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield
