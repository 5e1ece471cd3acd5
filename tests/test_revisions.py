"""Revision names of real checkpoint suites, placed in training order: trunk, side lines, and names placed by commit."""

from __future__ import annotations

import logging

import pytest

from ckpt_trace.errors import SelectionError
from ckpt_trace.fetch.revisions import lines, parse_revision, place, select, unplaced

B, T = 10**9, 10**12


def test_tokens_per_step_fills_in_tokens():
    assert parse_revision("step1000", tokens_per_step=2_097_152).tokens == 2_097_152_000
    assert parse_revision("step10-tokens5B", tokens_per_step=7).tokens == 5 * B


def names(revisions) -> list[str]:
    return [r.name for r in revisions]


OLMO2 = {  # name -> commit; main is the soup of the three ingredients: its own commit
    "step1000-tokens5B": "a1", "stage1-step140000-tokens588B": "a2", "stage1-step928646-tokens3896B": "a3",
    "stage2-ingredient1-step1000-tokens5B": "b1", "stage2-ingredient1-step11931-tokens50B": "b2",
    "stage2-ingredient2-step11931-tokens50B": "c2", "stage2-ingredient3-step11931-tokens50B": "d2", "main": "soup",
}


def olmo2():
    return [parse_revision(n, commit=c) for n, c in OLMO2.items()]


def test_olmo2_ingredients_are_lines_from_the_last_stage1_checkpoint(caplog):
    placed = place(olmo2())
    trunk = ["step1000-tokens5B", "stage1-step140000-tokens588B", "stage1-step928646-tokens3896B"]
    assert names(placed) == trunk + ["stage2-ingredient1-step1000-tokens5B", "stage2-ingredient1-step11931-tokens50B",
                                     "stage2-ingredient2-step11931-tokens50B", "stage2-ingredient3-step11931-tokens50B", "main"]
    by_name = {r.name: r for r in placed}
    # Stage 2 counts steps and tokens from zero: seen since the start, they continue from stage 1's end.
    assert by_name["stage2-ingredient1-step1000-tokens5B"].tokens == 3896 * B + 5 * B
    assert by_name["stage2-ingredient2-step11931-tokens50B"].at == 928646 + 11931
    assert by_name["stage2-ingredient2-step11931-tokens50B"].step == 11931  # as the name says
    assert names(lines(placed)["ingredient1"]) == trunk + ["stage2-ingredient1-step1000-tokens5B",
                                                          "stage2-ingredient1-step11931-tokens50B"]
    assert names(unplaced(placed)) == ["main"]
    assert place(placed) == placed  # placing what is placed changes nothing
    # Ranges and counts stay within one line, in training order.
    assert names(select(olmo2(), "last:3", "ingredient1")) == ["stage1-step928646-tokens3896B",
                                                               "stage2-ingredient1-step1000-tokens5B",
                                                               "stage2-ingredient1-step11931-tokens50B"]
    assert names(select(olmo2(), "929000..", "ingredient1")) == ["stage2-ingredient1-step1000-tokens5B",
                                                                 "stage2-ingredient1-step11931-tokens50B"]
    assert names(select(olmo2(), "log:3", "ingredient2")) == ["step1000-tokens5B", "stage1-step140000-tokens588B",
                                                              "stage2-ingredient2-step11931-tokens50B"]
    # Without a branch: ranges and counts on the trunk; main is left out of them, and said to be.
    with caplog.at_level(logging.WARNING, logger="ckpt_trace.fetch.revisions"):
        assert names(select(olmo2(), "last:1")) == ["stage1-step928646-tokens3896B"]
    assert "left out of ranges: main" in caplog.text
    assert names(select(olmo2(), "main")) == ["main"]
    assert len(select(olmo2(), "all")) == len(OLMO2) and len(select(olmo2(), "all", "ingredient3")) == 4
    with pytest.raises(SelectionError, match="no branch 'ingredient4'; branches: ingredient1, ingredient2, ingredient3"):
        select(olmo2(), None, "ingredient4")


def test_olmo3_stages_in_order_ablations_aside_and_main_beside_its_commit():
    listing = {"stage1-step1000": "s1a", "stage1-step1400000": "s1b", "stage2-step10000": "s2a", "stage2-step47684": "s2b",
               "stage3-step500": "s3a", "stage2-step47684-mix-round5-from-2T-ckpt": "x", "main": "s3a"}
    placed = place([parse_revision(n, commit=c) for n, c in listing.items()])
    assert names(placed) == ["stage1-step1000", "stage1-step1400000", "stage2-step10000", "stage2-step47684",
                             "stage3-step500", "main", "stage2-step47684-mix-round5-from-2T-ckpt"]
    by_name = {r.name: r for r in placed}
    assert by_name["main"].alias_of == "stage3-step500" and unplaced(placed) == []
    assert by_name["stage3-step500"].at == 1400000 + 47684 + 500
    assert by_name["stage2-step47684-mix-round5-from-2T-ckpt"].at == by_name["stage2-step47684"].at
    assert names(lines(placed)["mix-round5-from-2T-ckpt"])[-2:] == ["stage2-step47684", "stage2-step47684-mix-round5-from-2T-ckpt"]
    assert names(select(list(placed), "last:1")) == ["stage3-step500"]


def test_phases_after_pretraining_and_numeric_order_never_alphabetical():
    apertus = ["longctx-step150", "step1432000-tokens15T", "longctx-step1000", "longctx-step100", "step2000-tokens8B"]
    assert names(place([parse_revision(n) for n in apertus])) == [
        "step2000-tokens8B", "step1432000-tokens15T", "longctx-step100", "longctx-step150", "longctx-step1000"]
    lucie = ["annealing_step10", "extension_step500", "step100000", "step5000"]
    assert names(place([parse_revision(n) for n in lucie])) == ["step5000", "step100000", "extension_step500",
                                                                "annealing_step10"]
    smol3 = ["lc-32k-to-64k-step-100", "stage2-step-3000", "stage1-step-2000", "stage3-step-4000"]
    assert names(place([parse_revision(n, tokens_per_step=2_359_296) for n in smol3], 2_359_296)) == [
        "stage1-step-2000", "stage2-step-3000", "stage3-step-4000", "lc-32k-to-64k-step-100"]
    bloom = ["global_step1000", "global_step95000", "global_step200"]
    assert names(place([parse_revision(n) for n in bloom])) == ["global_step200", "global_step1000", "global_step95000"]
    pythia = ["step1000", "step512", "step2", "step143000", "step0"]
    assert names(select([parse_revision(n) for n in pythia], "step2..step1000")) == ["step2", "step512", "step1000"]


def test_a_name_that_fits_no_scheme_is_never_silently_first_or_last():
    listing = {"step-160000": "a", "step-2000": "b", "main": "readme", "fp32": "f", "zzz": "a"}
    placed = place([parse_revision(n, commit=c) for n, c in listing.items()])
    assert names(placed) == ["step-2000", "step-160000", "zzz", "fp32", "main"]  # zzz has step-160000's commit
    assert names(unplaced(placed)) == ["fp32", "main"]
    assert names(select(list(placed), "first:5")) == ["step-2000", "step-160000"]
    with pytest.raises(SelectionError, match="names nothing"):
        select(list(placed), ",")


def test_smollm3_long_context_phases_in_order_with_global_steps():
    per_step = 2_359_296
    names_ = ["lc-32k-to-64k-step-4800000", "stage3-step-4700000", "lc-4k-to-32k-step-4760000", "stage1-step-3440000",
              "stage2-step-4200000", "lc-4k-to-32k-step-4720000"]
    placed = place([parse_revision(n, per_step) for n in names_], per_step)
    assert names(placed) == ["stage1-step-3440000", "stage2-step-4200000", "stage3-step-4700000",
                             "lc-4k-to-32k-step-4720000", "lc-4k-to-32k-step-4760000", "lc-32k-to-64k-step-4800000"]
    assert [r.at for r in placed] == [r.step for r in placed]  # steps count from the start: nothing restarts
    assert placed[-1].tokens == 4800000 * per_step


def test_a_side_line_on_a_trunk_stage_counts_tokens_as_that_stage():
    names_ = ["stage1-step1000-tokens4B", "stage2-step300-tokens1B", "stage2-step500-tokens2B", "stage2-step500-tokens2B-mixA"]
    placed = {r.name: r for r in place([parse_revision(n) for n in names_])}
    assert placed["stage2-step500-tokens2B"].tokens == 6 * B and placed["stage2-step500-tokens2B"].at == 1500
    assert placed["stage2-step500-tokens2B-mixA"].tokens == 6 * B and placed["stage2-step500-tokens2B-mixA"].at == 1500
    assert place(list(placed.values())) == place([parse_revision(n) for n in names_])


def test_range_ends_must_be_steps_or_revisions_of_the_line():
    olmo3 = [parse_revision(n) for n in ["stage1-step1000", "stage1-step1400000", "stage2-step10000", "stage2-step47684"]]
    assert names(select(olmo3, "stage2-step10000..stage2-step47684")) == ["stage2-step10000", "stage2-step47684"]
    with pytest.raises(SelectionError, match="'stage2-step0' in 'stage2-step0..stage2-step20000' is no step number and no revision"):
        select(olmo3, "stage2-step0..stage2-step20000")
    with pytest.raises(SelectionError, match="is no step number and no revision of this line"):
        select(olmo2(), "stage2-ingredient1-step1000-tokens5B..")  # a side line's revision, the trunk selected
    assert names(select(olmo2(), "stage2-ingredient1-step1000-tokens5B..", "ingredient1")) == [
        "stage2-ingredient1-step1000-tokens5B", "stage2-ingredient1-step11931-tokens50B"]
    assert names(select(olmo3, "1000..1400000")) == ["stage1-step1000", "stage1-step1400000"]
