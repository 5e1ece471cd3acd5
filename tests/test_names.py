"""The grammar of checkpoint names on the real names of public suites: what each name says, the training order of a
shuffled listing, and selections; the release (main) ends the trunk where its commit is no checkpoint's."""

from __future__ import annotations

import logging
import random

import pytest
from huggingface_hub import constants

from ckpt_trace.errors import SelectionError
from ckpt_trace.fetch import hub as hub_module
from ckpt_trace.fetch.revisions import lines, parse_revision, place, select, unplaced
from ckpt_trace.fetch.sources import revision_table
from ckpt_trace.testing import LoopbackHub

B, T = 10**9, 10**12


@pytest.mark.parametrize(
    "name, step, tokens, stage, phase, branch",
    [
        ("CrystalCoder_phase1_checkpoint_001500", 1500, None, 1, None, None),  # LLM360 CrystalCoder
        ("CrystalCoder_phase3_checkpoint_000000", 0, None, 3, None, None),
        ("base_0020000", 20000, None, None, "base", None),
        ("base_final", None, None, None, "base_final", None),  # no step, but it ends its line
        ("pretrain_iter_0373000", 373000, None, None, "pretrain", None),
        ("anneal_iter_0001000", 1000, None, None, "anneal", None),
        ("step-024000_tokens-0100B-phase1", 24000, 100 * B, 1, None, None),
        ("step_20k", 20000, None, None, None, None),  # directories, as MultiBERTs names its steps
        ("step_0k", 0, None, None, None, None),
        ("step143000", 143000, None, None, None, None),  # Pythia
        ("step20000-tokens84B", 20000, 84 * B, None, None, None),  # OLMo-1, OLMoE
        ("step150-tokens1B", 150, 1 * B, None, None, None),  # OLMo-2-7B, early and unprefixed
        ("stage1-step140000-tokens588B", 140000, 588 * B, 1, None, None),  # OLMo-2
        ("stage2-ingredient2-step11931-tokens50B", 11931, 50 * B, 2, None, "ingredient2"),
        ("stage3-step11921", 11921, None, 3, None, None),  # OLMo-3
        ("stage2-step47684-mix-round5-from-2T-ckpt", 47684, None, 2, None, "mix-round5-from-2T-ckpt"),
        ("fp32", None, None, None, None, None),  # OLMoE: main's weights in float32, no training point
        ("stage1-step-40000", 40000, None, 1, None, None),  # SmolLM3
        ("lc-32k-to-64k-step-4800000", 4800000, None, None, "lc-32k-to-64k", None),
        ("step-160000", 160000, None, None, None, None),  # SmolLM2
        ("ckpt_000", 0, None, None, None, None),  # LLM360 Amber
        ("checkpoint-400000", 400000, None, None, None, None),  # stanford-crfm (tags)
        ("global_step95000", 95000, None, None, None, None),  # BLOOM (tags)
        ("step-480k-token-1007B", 480000, 1007 * B, None, None, None),  # TinyLlama
        ("step1432000-tokens15T", 1432000, 15 * T, None, None, None),  # Apertus
        ("longctx-step1000", 1000, None, None, "longctx", None),
        ("step0753851", 753851, None, None, None, None),  # Lucie
        ("extension_step0000250", 250, None, None, "extension", None),
        ("annealing_step0000250", 250, None, None, "annealing", None),
        ("step-013500-28BT", 13500, 28 * B, None, None, None),  # FineWeb ablations
        ("step0", 0, None, None, None, None),  # Pythia
        ("stage2-ingredient3-step11931-tokens50B", 11931, 50 * B, 2, None, "ingredient3"),
        ("stage3-step-2000", 2000, None, 3, None, None),  # SmolLM3
        ("lc-32k-to-64k-step-3000", 3000, None, None, "lc-32k-to-64k", None),
        ("ckpt_358", 358, None, None, None, None),  # LLM360
        ("checkpoint-400", 400, None, None, None, None),  # stanford-crfm (tags)
        ("extension_step500", 500, None, None, "extension", None),  # Lucie
        ("step-001000-2BT", 1000, 2 * B, None, None, None),  # FineWeb ablations
        ("main", None, None, None, None, None),
        ("custom-branch", None, None, None, None, None),
    ],
)
def test_what_a_name_says(name, step, tokens, stage, phase, branch):
    rev = parse_revision(name)
    assert (rev.step, rev.tokens, rev.stage, rev.phase, rev.branch) == (step, tokens, stage, phase, branch)


def shuffled(listing: dict[str, str | None], seed: int = 0, per_step: int | None = None) -> list:
    """The listing's names, parsed with their commits, in an order that is not training order."""
    names = list(listing)
    random.Random(seed).shuffle(names)
    return [parse_revision(n, per_step, listing[n]) for n in names]


def names(revisions) -> list[str]:
    return [r.name for r in revisions]


def ordered(listing, release="main", per_step=None) -> list[str]:
    return names(place(shuffled(listing, per_step=per_step), per_step, release))


def chosen(listing, spec, branch=None, release="main") -> list[str]:
    return names(select(shuffled(listing, seed=1), spec, branch, release=release))


PYTHIA = {n: n for n in ["step0", "step1", "step2", "step4", "step8", "step512", "step1000", "step2000", "step143000"]}
PYTHIA["main"] = "step143000"  # main is step143000's commit


def test_pythia_main_is_its_last_checkpoint():
    assert ordered(PYTHIA) == ["step0", "step1", "step2", "step4", "step8", "step512", "step1000", "step2000",
                               "step143000", "main"]
    assert place(shuffled(PYTHIA), release="main")[-1].alias_of == "step143000"
    assert chosen(PYTHIA, "first:1") == ["step0"]
    assert chosen(PYTHIA, "last:1") == ["step143000"]
    assert chosen(PYTHIA, "log:4") == ["step0", "step1", "step512", "step143000"]
    assert chosen(PYTHIA, "step4..step1000") == ["step4", "step8", "step512", "step1000"]
    assert chosen(PYTHIA, "step2000..") == ["step2000", "step143000"]


AMBER = {"ckpt_000": "a0", "ckpt_001": "a1", "ckpt_010": "a10", "ckpt_100": "a100", "ckpt_358": "a358",
         "main": "a359"}  # main holds ckpt_359, which no branch names


def test_llm360_main_of_its_own_commit_is_the_release_after_the_last_checkpoint():
    assert ordered(AMBER) == ["ckpt_000", "ckpt_001", "ckpt_010", "ckpt_100", "ckpt_358", "main"]
    placed = place(shuffled(AMBER), release="main")
    assert (placed[-1].after, placed[-1].at) == ("ckpt_358", None) and unplaced(placed) == []
    assert names(lines(placed)[None]) == ["ckpt_000", "ckpt_001", "ckpt_010", "ckpt_100", "ckpt_358", "main"]
    assert chosen(AMBER, "first:1") == ["ckpt_000"]
    assert chosen(AMBER, "last:1") == ["main"]
    assert chosen(AMBER, "log:3") == ["ckpt_000", "ckpt_001", "main"]
    assert chosen(AMBER, "ckpt_100..") == ["ckpt_100", "ckpt_358", "main"]  # an open range runs to the release
    assert chosen(AMBER, "..ckpt_100") == chosen(AMBER, "..100") == ["ckpt_000", "ckpt_001", "ckpt_010", "ckpt_100"]
    assert chosen(AMBER, "ckpt_358..main") == ["ckpt_358", "main"]
    assert chosen(AMBER, "50..400") == ["ckpt_100", "ckpt_358"]  # the release is after every step, not at one
    # Without a release named, main is a name with no step: reported, and left out of ranges.
    assert chosen(AMBER, "last:1", release=None) == ["ckpt_358"]


OLMO2 = {  # OLMo-2-1124-7B: early stage-1 names lack the prefix; main is the soup of the ingredients
    "step150-tokens1B": "a", "step1000-tokens5B": "b", "stage1-step140000-tokens588B": "c",
    "stage1-step928646-tokens3896B": "d", "stage2-ingredient1-step1000-tokens5B": "e",
    "stage2-ingredient1-step11931-tokens50B": "f", "stage2-ingredient2-step11931-tokens50B": "g",
    "stage2-ingredient3-step11931-tokens50B": "h", "main": "soup",
}
I1_START, I1_END, I2_END = ("stage2-ingredient1-step1000-tokens5B", "stage2-ingredient1-step11931-tokens50B",
                            "stage2-ingredient2-step11931-tokens50B")


def test_olmo2_order_stages_and_the_release():
    placed = place(shuffled(OLMO2), release="main")
    assert names(placed) == ["step150-tokens1B", "step1000-tokens5B", "stage1-step140000-tokens588B",
                             "stage1-step928646-tokens3896B", I1_START, I1_END, I2_END,
                             "stage2-ingredient3-step11931-tokens50B", "main"]
    assert [r.stage for r in placed] == [1, 1, 1, 1, 2, 2, 2, 2, None]  # the unprefixed names are stage 1's
    assert [r.tokens for r in placed] == [1 * B, 5 * B, 588 * B, 3896 * B, 3901 * B, 3946 * B, 3946 * B, 3946 * B, None]
    assert [r.at for r in placed] == [150, 1000, 140000, 928646, 929646, 940577, 940577, 940577, None]
    assert placed[-1].after == "stage1-step928646-tokens3896B"
    assert place(placed, release="main") == placed
    assert chosen(OLMO2, "first:1") == ["step150-tokens1B"]
    assert chosen(OLMO2, "last:2") == ["stage1-step928646-tokens3896B", "main"]
    assert chosen(OLMO2, "last:1", "ingredient3") == ["stage2-ingredient3-step11931-tokens50B"]


def test_ranges_and_counts_follow_the_line_their_ends_name():
    assert chosen(OLMO2, f"{I1_START}..{I1_END}") == [I1_START, I1_END]  # no --branch needed
    assert chosen(OLMO2, f"stage1-step140000-tokens588B..{I2_END}") == [
        "stage1-step140000-tokens588B", "stage1-step928646-tokens3896B", I2_END]
    assert chosen(OLMO2, f"..{I1_START}") == ["step150-tokens1B", "step1000-tokens5B", "stage1-step140000-tokens588B",
                                              "stage1-step928646-tokens3896B", I1_START]
    # log:4 on ingredient 1's line, which its range names (on the trunk it would end at main)
    assert chosen(OLMO2, f"{I1_START}..{I1_END},log:4") == ["step150-tokens1B", "step1000-tokens5B",
                                                             "stage1-step140000-tokens588B", I1_START, I1_END]
    assert chosen(OLMO2, "log:4") == ["step150-tokens1B", "step1000-tokens5B", "stage1-step140000-tokens588B", "main"]
    with pytest.raises(SelectionError, match=f"'{I1_START}..{I2_END}' .* from ingredient1 .* to ingredient2 "):
        chosen(OLMO2, f"{I1_START}..{I2_END}")
    with pytest.raises(SelectionError, match="ranges follow ingredient1 and ingredient2"):
        chosen(OLMO2, f"{I1_START}..{I1_END},..{I2_END},last:1")
    with pytest.raises(SelectionError, match=f"'{I1_START}' .* is no step number and no revision of this line"):
        chosen(OLMO2, f"{I1_START}..{I1_END}", "ingredient2")  # --branch says which line


OLMO3 = {"stage1-step1000": "a", "stage1-step1413814": "b", "stage2-step1000": "c", "stage2-step47684": "d",
         "stage3-step1000": "e", "stage3-step11921": "f", "stage2-step47684-mix-round5-from-2T-ckpt": "x", "main": "f"}


def test_olmo3_stages_restart_and_an_ablation_is_a_side_line():
    placed = place(shuffled(OLMO3), release="main")
    assert names(placed) == ["stage1-step1000", "stage1-step1413814", "stage2-step1000", "stage2-step47684",
                             "stage3-step1000", "stage3-step11921", "main", "stage2-step47684-mix-round5-from-2T-ckpt"]
    assert [r.at for r in placed] == [1000, 1413814, 1414814, 1461498, 1462498, 1473419, None, 1461498]
    assert chosen(OLMO3, "last:1") == ["stage3-step11921"]  # main is its commit
    assert chosen(OLMO3, "stage2-step1000..stage2-step47684-mix-round5-from-2T-ckpt") == [
        "stage2-step1000", "stage2-step47684", "stage2-step47684-mix-round5-from-2T-ckpt"]
    with pytest.raises(SelectionError, match="from mix-round5-from-2T-ckpt .* to the trunk"):
        chosen(OLMO3, "stage2-step47684-mix-round5-from-2T-ckpt..stage3-step11921")


OLMOE = {"step5000-tokens20B": "a", "step600000-tokens2516B": "b", "step1220000-tokens5117B": "c", "fp32": "f32",
         "main": "c"}


def test_olmoe_fp32_has_no_number_and_is_reported_never_first_or_last(caplog):
    placed = place(shuffled(OLMOE), release="main")
    assert names(placed) == ["step5000-tokens20B", "step600000-tokens2516B", "step1220000-tokens5117B", "main", "fp32"]
    assert names(unplaced(placed)) == ["fp32"]
    assert chosen(OLMOE, "last:1") == ["step1220000-tokens5117B"]
    with caplog.at_level(logging.WARNING, logger="ckpt_trace.fetch.revisions"):
        assert chosen(OLMOE, "step5000-tokens20B..") == ["step5000-tokens20B", "step600000-tokens2516B",
                                                         "step1220000-tokens5117B"]
    assert "left out of ranges: fp32" in caplog.text
    assert chosen(OLMOE, "fp32") == ["fp32"]
    with pytest.raises(SelectionError, match="'fp32' in 'fp32..' is no step number"):
        chosen(OLMOE, "fp32..")


def test_phases_in_order_and_the_release_after_the_last():
    lucie = {"step0005000": "a", "step0753851": "b", "extension_step0000250": "c", "extension_step0000500": "d",
             "annealing_step0000250": "e", "main": "final"}
    assert ordered(lucie) == ["step0005000", "step0753851", "extension_step0000250", "extension_step0000500",
                              "annealing_step0000250", "main"]
    assert [r.at for r in place(shuffled(lucie))][:5] == [5000, 753851, 754101, 754351, 754601]
    assert chosen(lucie, "last:1") == ["main"] and chosen(lucie, "last:2") == ["annealing_step0000250", "main"]
    apertus = {"step200000-tokens2T": "a", "step1432000-tokens15T": "b", "longctx-step100": "c",
               "longctx-step1000": "d", "main": "e"}
    assert ordered(apertus) == ["step200000-tokens2T", "step1432000-tokens15T", "longctx-step100", "longctx-step1000",
                                "main"]
    assert chosen(apertus, "1432050..") == ["longctx-step100", "longctx-step1000", "main"]
    olmo_like = ["anneal_iter_0002000", "pretrain_iter_0001000", "anneal_iter_0001000", "pretrain_iter_0373000"]
    placed = place([parse_revision(n) for n in olmo_like])
    assert names(placed) == ["pretrain_iter_0001000", "pretrain_iter_0373000", "anneal_iter_0001000",
                             "anneal_iter_0002000"]
    assert [r.at for r in placed] == [1000, 373000, 374000, 375000]  # anneal counts from zero again
    assert names(select(placed, "373500..")) == ["anneal_iter_0001000", "anneal_iter_0002000"]
    smol3 = {"lc-32k-to-64k-step-4800000": "e", "stage3-step-4720000": "c", "lc-4k-to-32k-step-4760000": "d",
             "stage1-step-40000": "a", "stage2-step-4200000": "b"}
    assert ordered(smol3, per_step=2_359_296) == ["stage1-step-40000", "stage2-step-4200000", "stage3-step-4720000",
                                                   "lc-4k-to-32k-step-4760000", "lc-32k-to-64k-step-4800000"]
    # An anneal comes before a long-context phase; an extension (Lucie's) before an anneal.
    assert ordered({n: None for n in ["longctx-step10", "anneal-step10", "extension-step10", "step10"]}) == [
        "step10", "extension-step10", "anneal-step10", "longctx-step10"]


def test_phases_counted_by_number():
    crystal = {n: None for n in ["CrystalCoder_phase2_checkpoint_001500", "CrystalCoder_phase1_checkpoint_001500",
                                 "CrystalCoder_phase3_checkpoint_000500", "CrystalCoder_phase1_checkpoint_003000",
                                 "CrystalCoder_phase2_checkpoint_000750"]}
    placed = place(shuffled(crystal))
    assert names(placed) == ["CrystalCoder_phase1_checkpoint_001500", "CrystalCoder_phase1_checkpoint_003000",
                             "CrystalCoder_phase2_checkpoint_000750", "CrystalCoder_phase2_checkpoint_001500",
                             "CrystalCoder_phase3_checkpoint_000500"]
    assert [r.at for r in placed] == [1500, 3000, 3750, 4500, 5000]
    assert chosen(crystal, "first:1") == ["CrystalCoder_phase1_checkpoint_001500"]
    assert chosen(crystal, "last:1") == ["CrystalCoder_phase3_checkpoint_000500"]
    phased = {"step-048000_tokens-0201B-phase1": None, "step-001000_tokens-0004B-phase2": None,
              "step-024000_tokens-0100B-phase1": None}
    placed = place(shuffled(phased))
    assert names(placed) == ["step-024000_tokens-0100B-phase1", "step-048000_tokens-0201B-phase1",
                             "step-001000_tokens-0004B-phase2"]
    assert [(r.at, r.tokens) for r in placed] == [(24000, 100 * B), (48000, 201 * B), (49000, 205 * B)]


def test_base_final_ends_its_line():
    base = {"base_0100000": "c", "base_final": "f", "base_0020000": "a", "base_0040000": "b", "main": "f"}
    assert ordered(base) == ["base_0020000", "base_0040000", "base_0100000", "base_final", "main"]
    assert chosen(base, "last:1") == ["base_final"]  # main is base_final's commit
    assert chosen(base, "first:1") == ["base_0020000"]
    assert chosen(base, "base_0040000..") == ["base_0040000", "base_0100000", "base_final"]
    assert chosen(base, "..100000") == ["base_0020000", "base_0040000", "base_0100000"]
    assert chosen(base, "log:2") == ["base_0020000", "base_final"]


def test_steps_in_numeric_order_never_alphabetical():
    assert ordered({n: None for n in ["step-20000", "step-1000000", "step-160000"]}) == [
        "step-20000", "step-160000", "step-1000000"]  # SmolLM2
    assert ordered({n: None for n in ["checkpoint-20", "checkpoint-400000", "checkpoint-100", "checkpoint-10"]}) == [
        "checkpoint-10", "checkpoint-20", "checkpoint-100", "checkpoint-400000"]  # stanford-crfm
    assert ordered({n: None for n in ["global_step95000", "global_step200", "global_step1000"]}) == [
        "global_step200", "global_step1000", "global_step95000"]  # BLOOM
    tiny = {n: None for n in ["step-480k-token-1007B", "step-1195k-token-2500B", "step-50k-token-105B"]}
    assert ordered(tiny) == ["step-50k-token-105B", "step-480k-token-1007B", "step-1195k-token-2500B"]  # TinyLlama
    assert chosen(tiny, "100000..500000") == ["step-480k-token-1007B"]
    fineweb = {n: None for n in ["step-010000-21BT", "step-000000-0BT", "step-002000-4BT", "step-001000-2BT"]}
    assert ordered(fineweb) == ["step-000000-0BT", "step-001000-2BT", "step-002000-4BT", "step-010000-21BT"]
    assert chosen(fineweb, "log:3") == ["step-000000-0BT", "step-001000-2BT", "step-010000-21BT"]
    dirs = {n: None for n in ["step_20k", "step_2000k", "step_0k", "step_100k"]}
    assert ordered(dirs) == ["step_0k", "step_20k", "step_100k", "step_2000k"]
    olmo1 = {n: None for n in ["step330000-tokens1384B", "step20000-tokens84B", "step117850-tokens494B"]}
    assert ordered(olmo1) == ["step20000-tokens84B", "step117850-tokens494B", "step330000-tokens1384B"]


def test_a_directory_of_revisions_with_a_final_model_in_main(tmp_path, monkeypatch):
    monkeypatch.setenv("CKPT_TRACE_HOME", str(tmp_path / "home"))
    for name in ["step_0k", "step_20k", "step_100k", "step_2000k", "main"]:
        (tmp_path / "suite" / name).mkdir(parents=True)
        (tmp_path / "suite" / name / "config.json").write_text("{}")
        (tmp_path / "suite" / name / "model.safetensors").write_bytes(name.encode())
    table = revision_table(tmp_path / "suite")
    assert table.select("revision", "step", "after").rows() == [
        ("step_0k", 0, None), ("step_20k", 20000, None), ("step_100k", 100000, None), ("step_2000k", 2000000, None),
        ("main", None, "step_2000k")]
    assert revision_table(tmp_path / "suite", "last:1")["revision"].to_list() == ["main"]


@pytest.fixture
def hub(monkeypatch, tmp_path):
    with LoopbackHub() as server:
        monkeypatch.setattr(constants, "ENDPOINT", server.url)
        template = server.url + "/{repo_id}/resolve/{revision}/{filename}"
        monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", template)
        monkeypatch.setenv("CKPT_TRACE_HOME", str(tmp_path / "home"))
        monkeypatch.setattr(hub_module, "BACKOFF_S", 0.01)
        yield server


def weights(text: str) -> dict[str, bytes]:
    return {"config.json": b"{}", "model.safetensors": text.encode()}


@pytest.mark.parametrize("main, last, after", [
    ("own", "main", "ckpt_358"),  # the final model, of a commit of its own
    ("ckpt_358", "ckpt_358", None),  # the last checkpoint under a second name
    ("readme", "ckpt_358", None),  # a README only: no model, so not the end of the trunk; a scan skips it
])
def test_main_on_the_hub(hub, main, last, after, capsys):
    repo = "LLM360/tiny-amber"
    commits = {n: hub.add_revision(repo, n, weights(n)) for n in ["ckpt_001", "ckpt_000", "ckpt_358"]}
    if main == "own":
        hub.add_revision(repo, "main", weights("ckpt_359"))
    elif main == "readme":
        hub.add_revision(repo, "main", {"README.md": b"# checkpoints live in the branches\n"})
    else:
        hub.add_ref(repo, "main", commits[main])
    table = revision_table(repo)
    assert table.select("revision", "after").rows() == [("ckpt_000", None), ("ckpt_001", None), ("ckpt_358", None),
                                                        ("main", after)]
    assert revision_table(repo, "last:1")["revision"].to_list() == [last]
    from ckpt_trace.cli import main as command_line

    assert command_line(["revisions", repo]) == 0
    said = f"main: the release, after {after}; its commit matches no checkpoint"
    assert (said in capsys.readouterr().out) is (after is not None)
    assert revision_table(repo, "ckpt_001..")["revision"].to_list() == ["ckpt_001", "ckpt_358"] + (
        ["main"] if main == "own" else [])
