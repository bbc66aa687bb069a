"""Stable ids and seeds derived from content, so reruns and resumes agree without any state."""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterator
from contextlib import contextmanager

SEED_BITS = 31  # fits int32 and every torch.Generator

#: The one rule for ids given by users (bulk rows; any id a path is built from): 1-128 characters of
#: A-Z a-z 0-9 . _ -, starting with a letter or a digit. Such an id is one plain file-name part
#: everywhere (no "/", no "..", no NUL, no leading dot, short enough for any file system and S3 key).
#: Ids outside it are refused, never mapped: a mapped id would no longer be the id the user looks for.
ID_MAX_CHARS = 128
ID_RULE = f"1-{ID_MAX_CHARS} characters of A-Z a-z 0-9 . _ -, starting with a letter or digit"
_SAFE_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


def id_problem(value) -> str | None:
    """None when `value` is a safe id, else why not (naming the value, shortened, and the rule)."""
    if not isinstance(value, str):
        return f"id {value!r:.80} is not text ({type(value).__name__})"
    if len(value) > ID_MAX_CHARS or not _SAFE_ID.fullmatch(value):
        shown = repr(value) if len(value) <= 80 else repr(value[:80]) + f"... ({len(value)} characters)"
        return f"bad id {shown}: ids must be {ID_RULE}"
    return None


def check_id(value) -> str:
    """`value` when it is a safe id (see ID_RULE), else ValueError saying why: call it before any path
    is built from an id that came from outside."""
    if (problem := id_problem(value)) is not None:
        raise ValueError(problem)
    return value


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
