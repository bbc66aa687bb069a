"""The bulk job's end-of-run bookkeeping without Ray: failure reasons counted by class, and prompt
validation that counts the prompt template's tokens as the generator does."""

from __future__ import annotations

import pyarrow as pa
from transformers import ByT5Tokenizer

from pipelines.generate import Progress, failure_class
from vist3a.video import check_prompt


def test_failure_reasons_are_counted_by_class():
    reasons = ["prompt too long: 317 tokens, over the limit of 128", "prompt too long: 316 tokens, over the limit of 128",
               "bad seed 'nope': not an integer", "bad seed 'x1': not an integer", "empty prompt",
               "generation failed: RuntimeError: boom"]
    assert failure_class(reasons[0]) == failure_class(reasons[1]) == "prompt too long"
    assert failure_class(reasons[2]) == failure_class(reasons[3]) == "bad seed '…'"
    progress = Progress(total=len(reasons), every_s=1e9)
    progress.update(pa.table({"status": ["failed"] * len(reasons), "error": reasons}))
    assert dict(progress.reasons) == {"prompt too long": 2, "bad seed '…'": 2, "empty prompt": 1, "generation failed": 1}


def test_validation_counts_the_templated_prompt():
    tok = ByT5Tokenizer()
    template = "An orbit around `{prompt}`."
    assert check_prompt(tok, "x" * 40, 64) is None
    reason = check_prompt(tok, "x" * 40, 64, template)  # 40 + 19 bytes of template + the end token = 60: fits
    assert reason is None
    reason = check_prompt(tok, "x" * 50, 64, template)
    assert reason == "prompt too long: 70 tokens with sampling.prompt_template around it, over the limit of 64"
    assert check_prompt(tok, "", 64, template) == "prompt is empty"  # the user's prompt, not the template


def test_progress_bar_on_a_terminal_counts_every_row_accounted_for(capsys):
    """tqdm over ≈ the set's rows: scenes done or failed, rows refused at validation, rows skipped."""
    progress = Progress(total=10, every_s=1e9, bar=True)
    progress.update(pa.table({"status": ["done", "done", "failed"], "error": [None, None, "generation failed: x"]}))
    progress.ledger({"refused": 2, "refused_parts": 1, "duplicates": 1, "recorded": 3, "reasons": {"empty prompt": 2}})
    progress.close()
    err = capsys.readouterr().err
    assert progress.seen == 9 and "9/10" in err and "done=2" in err and "failed=3" in err and "skipped=4" in err
    assert "done 2, failed 3, skipped 4" in progress.line() and "of ≈10" in progress.line()
    quiet = Progress(total=None, every_s=1e9, bar=False)
    assert quiet.bar is None and "9" not in quiet.line().split(":")[0]


def test_generator_tasks_are_commit_sized_but_spread_a_small_set_over_every_actor():
    from pipelines.generate import task_rows
    from vist3a.config import GenerateJobConfig

    job = GenerateJobConfig(actors=2, batch_size=2, commit_scenes=32)
    assert task_rows(job, 10**6) == 32            # a large set: one commit per 32 scenes
    assert task_rows(job, 32) == 4                # 32 prompts, 2 actors: 8 tasks, each actor busy to the end
    assert task_rows(job, 3) == 2                 # never less than one full batch
    assert task_rows(job, None) == 32             # unknown size (CSV counted as lines is still a size)
