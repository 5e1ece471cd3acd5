"""Revision names parsed into training order."""

from __future__ import annotations

import pytest

from ckpt_trace.revisions import parse_revision, training_order


@pytest.mark.parametrize(
    "name, step, tokens, stage, ingredient",
    [
        ("step0", 0, None, None, None),
        ("step143000", 143000, None, None, None),
        ("step20000-tokens84B", 20000, 84 * 10**9, None, None),
        ("stage1-step140000-tokens588B", 140000, 588 * 10**9, 1, None),
        ("stage2-ingredient3-step11931-tokens50B", 11931, 50 * 10**9, 2, 3),
        ("ckpt_358", 358, None, None, None),
        ("step-160000", 160000, None, None, None),
        ("checkpoint-400", 400, None, None, None),
        ("step-480k-token-1007B", 480000, 1007 * 10**9, None, None),
        ("main", None, None, None, None),
        ("my-branch", None, None, None, None),
    ],
)
def test_parse(name, step, tokens, stage, ingredient):
    rev = parse_revision(name)
    assert (rev.step, rev.tokens, rev.stage, rev.ingredient) == (step, tokens, stage, ingredient)


def test_tokens_per_step_fills_in_tokens():
    assert parse_revision("step1000", tokens_per_step=2_097_152).tokens == 2_097_152_000
    assert parse_revision("step10-tokens5B", tokens_per_step=7).tokens == 5 * 10**9


def test_training_order_is_numeric_by_stage_then_step():
    names = ["step1000", "zzz", "step2", "main", "step512", "step0",
             "stage2-ingredient1-step100-tokens1B", "stage1-step5000-tokens20B", "step4000-tokens16B"]
    ordered = [r.name for r in training_order([parse_revision(n) for n in names])]
    assert ordered == ["step0", "step2", "step512", "step1000", "step4000-tokens16B",
                       "stage1-step5000-tokens20B", "stage2-ingredient1-step100-tokens1B", "main", "zzz"]
