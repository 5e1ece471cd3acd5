"""Training dynamics: weight norms and changes read from the weight files, and linear CKA of each module's outputs
against the reference and the previous checkpoint, equal to a float64 computation of the definitions made one
sequence at a time, for every family; resumed, sharded and re-referenced scans store the same numbers."""

from __future__ import annotations

import importlib
from dataclasses import replace

import polars as pl
import pytest
import torch
import transformers
from conftest import FAMILIES, VOCAB, save_checkpoint, write_jsonl

from ckpt_trace.calibration.sets import CalibrationSet, CalibrationSpec
from ckpt_trace.cli import main
from ckpt_trace.model.loading import load_model
from ckpt_trace.scan.options import ScanConfig
from ckpt_trace.scoring import representations
from ckpt_trace.scoring.metrics import DYNAMICS, score
from ckpt_trace.scoring.representations import OutputSample, linear_cka
from ckpt_trace.store import Store

run = importlib.import_module("ckpt_trace.scan.run")

STEPS = (0, 10, 20)
SUBMODULES = {"gpt2": ("attn", "mlp"), "gpt_neox": ("attention", "mlp"), "gpt_neox_sequential": ("attention", "mlp")}
"""The attention and MLP sub-modules as transformers names them; self_attn and mlp elsewhere."""
DELTAS = {"gemma2": ("post_attention_layernorm", "post_feedforward_layernorm"),
          "gemma3_text": ("post_attention_layernorm", "post_feedforward_layernorm"),
          "olmo2": ("post_attention_layernorm", "post_feedforward_layernorm")}
"""Where a post-norm family's deltas are (the norm of each sub-layer's output); the sub-module itself elsewhere."""
CLI = ["--batch-size", "3", "--device", "cpu", "--metrics", ",".join(DYNAMICS)]


def suite(tmp_path, tokenizer_dir, family="llama", steps=STEPS):
    """A folder of checkpoints of one random model drifting over training (each step perturbs the one before)."""
    root = tmp_path / "suite"
    base = tmp_path / "base"
    save_checkpoint(base, family, seed=0, tokenizer_dir=tokenizer_dir)
    model = transformers.AutoModelForCausalLM.from_pretrained(base)
    generator = torch.Generator().manual_seed(1)
    for step in steps:
        if step:
            with torch.no_grad():
                for param in model.parameters():
                    param.add_(torch.randn(param.shape, generator=generator) * 0.03)
        model.save_pretrained(root / f"step{step}")
        for file in tokenizer_dir.iterdir():
            (root / f"step{step}" / file.name).write_bytes(file.read_bytes())
    return root


def calibration_file(tmp_path, padded=True):
    """Token ids of varied lengths (batches are padded) or of one length."""
    generator = torch.Generator().manual_seed(7)
    lengths = [9, 14, 5, 14, 11, 7, 12] if padded else [12] * 7
    return write_jsonl(tmp_path / "calibration.jsonl",
                       [{"input_ids": torch.randint(1, VOCAB, (n,), generator=generator).tolist()} for n in lengths])


def sequences(path) -> list[list[int]]:
    """The calibration's sequences in the order its batches hold them: longest first, ties in file order."""
    rows = pl.read_ndjson(path)["input_ids"].to_list()
    return sorted(rows, key=lambda s: -len(s))


def parts(family):
    attention, mlp = SUBMODULES.get(family, ("self_attn", "mlp"))
    delta_a, delta_m = DELTAS.get(family, (attention, mlp))
    return attention, mlp, delta_a, delta_m


def layers_of(model):
    base = model.base_model
    return base.h if hasattr(base, "h") else base.layers


def float64_outputs(folder, family, ids: list[list[int]]) -> dict[tuple[int, str], torch.Tensor]:
    """Each layer's output y, attention delta a and MLP delta m, in float64, one sequence at a time, tokens stacked."""
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float64).eval()
    _, _, delta_a, delta_m = parts(family)
    kept: dict[tuple[int, str], list] = {}
    hooks = []
    for i, layer in enumerate(layers_of(model)):
        for module, target in (("block", layer), ("attention", layer.get_submodule(delta_a)),
                               ("mlp", layer.get_submodule(delta_m))):
            hooks.append(target.register_forward_hook(
                lambda _m, _a, out, key=(i, module): kept.setdefault(key, []).append(
                    (out[0] if isinstance(out, tuple) else out)[0])))
    with torch.no_grad():
        for seq in ids:
            model.base_model(input_ids=torch.tensor([seq]))
    for hook in hooks:
        hook.remove()
    return {key: torch.cat(rows) for key, rows in kept.items()}


def cka_by_kernels(x: torch.Tensor, y: torch.Tensor) -> float:
    """Linear CKA as HSIC of token-by-token kernels with the centring matrix H: tr(KHLH) / sqrt(tr(KHKH) tr(LHLH))."""
    n = x.shape[0]
    h = torch.eye(n, dtype=torch.float64) - 1.0 / n
    kx, ky = h @ (x @ x.T) @ h, h @ (y @ y.T) @ h
    return float((kx * ky).sum() / ((kx * kx).sum() * (ky * ky).sum()).sqrt())


def float64_weights(folder, family) -> dict[tuple[int, str], torch.Tensor]:
    """Every layer's block, attention and MLP parameters as one float64 vector each."""
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float64)
    attention, mlp, _, _ = parts(family)
    flat = {}
    for i, layer in enumerate(layers_of(model)):
        for module, target in (("block", layer), ("attention", layer.get_submodule(attention)),
                               ("mlp", layer.get_submodule(mlp))):
            flat[i, module] = torch.cat([p.detach().flatten() for p in target.parameters()])
    return flat


def stored(store, metric: str, revision: str) -> pl.DataFrame:
    scores = Store(store).scores()
    return scores.filter((pl.col("metric") == metric) & (pl.col("revision") == revision)).sort("layer", "module")


def expected_frame(values: dict[tuple[int, str], float]) -> list[float]:
    return [values[key] for key in sorted(values)]


def check_against_float64(root, store, family, calibration, padded_ids):
    weights = {step: float64_weights(root / f"step{step}", family) for step in STEPS}
    outputs = {step: float64_outputs(root / f"step{step}", family, padded_ids) for step in STEPS}
    final = STEPS[-1]
    for index, step in enumerate(STEPS):
        name = f"step{step}"
        norm = {k: float(v.norm()) for k, v in weights[step].items()}
        change = {k: float((v - weights[final][k]).norm() / weights[final][k].norm()) for k, v in weights[step].items()}
        cka = {k: cka_by_kernels(v, outputs[final][k]) for k, v in outputs[step].items()}
        for metric, values in (("weight_norm", norm), ("weight_change_final", change), ("cka_final", cka)):
            rows = stored(store, metric, name)
            assert rows["value"].to_list() == pytest.approx(expected_frame(values), rel=2e-4, abs=1e-12), (name, metric)
        final_rows = stored(store, "cka_final", name)
        assert set(final_rows["reference"]) == {f"step{final}"}
        if index:
            before = STEPS[index - 1]
            change = {k: float((v - weights[before][k]).norm() / weights[before][k].norm())
                      for k, v in weights[step].items()}
            cka = {k: cka_by_kernels(v, outputs[before][k]) for k, v in outputs[step].items()}
            for metric, values in (("weight_change_prev", change), ("cka_prev", cka)):
                rows = stored(store, metric, name)
                assert rows["value"].to_list() == pytest.approx(expected_frame(values), rel=2e-4), (name, metric)
                assert set(rows["reference"]) == {f"step{before}"}
        else:
            assert stored(store, "cka_prev", name).height == stored(store, "weight_change_prev", name).height == 0
    assert set(stored(store, "cka_final", "step20")["n_tokens"]) == {sum(map(len, padded_ids))}


@pytest.mark.parametrize("family", FAMILIES)
def test_dynamics_equal_float64_definitions_one_sequence_at_a_time(tmp_path, tokenizer_dir, family):
    root = suite(tmp_path, tokenizer_dir, family)
    calibration = calibration_file(tmp_path)
    assert main(["scan", str(root), "--store", str(tmp_path / "store"), "--calibration", str(calibration), *CLI]) == 0
    check_against_float64(root, tmp_path / "store", family, calibration, sequences(calibration))
    # The reference itself: its outputs are its own, its weights unchanged.
    reference = stored(tmp_path / "store", "cka_final", "step20")["value"].to_list()
    assert reference == pytest.approx([1.0] * len(reference), abs=1e-12)
    assert set(stored(tmp_path / "store", "weight_change_final", "step20")["value"]) == {0.0}


@pytest.mark.parametrize("family", ["llama", "gpt_neox"])
def test_without_padding_and_in_another_batch_size_the_numbers_are_the_same(tmp_path, tokenizer_dir, family):
    root = suite(tmp_path, tokenizer_dir, family)
    calibration = calibration_file(tmp_path, padded=False)
    args = ["scan", str(root), "--calibration", str(calibration), *CLI]
    assert main([*args, "--store", str(tmp_path / "a")]) == 0
    check_against_float64(root, tmp_path / "a", family, calibration, sequences(calibration))
    assert main([*args, "--store", str(tmp_path / "b"), "--batch-size", "1"]) == 0
    a, b = (stored(tmp_path / s, "cka_final", "step0")["value"].to_list() for s in "ab")
    assert b == pytest.approx(a, rel=1e-6)


def test_outputs_of_a_model_split_by_a_device_map_are_those_of_one_device(tmp_path, tokenizer_dir):
    from test_identity import split_map

    folder = save_checkpoint(tmp_path / "m", "llama", seed=3, tokenizer_dir=tokenizer_dir)
    calibration = CalibrationSet.from_ids(sequences(calibration_file(tmp_path)))
    kept = []
    for model in (load_model(folder, torch.device("cpu"), torch.float32),
                  load_model(folder, dtype=torch.float32, device_map=split_map(3, "cpu"))):
        sample = OutputSample(calibration, 3)
        score(model, calibration, batch_size=3, sample=sample)
        kept.append(sample.tensors())
    assert kept[0].keys() == kept[1].keys()
    for key in kept[0]:
        torch.testing.assert_close(kept[1][key], kept[0][key], rtol=0, atol=1e-6)


def test_more_tokens_than_the_sample_are_measured_on_the_same_seeded_sample(tmp_path, tokenizer_dir, monkeypatch):
    monkeypatch.setattr(representations, "SAMPLE_TOKENS", 25)
    root = suite(tmp_path, tokenizer_dir)
    calibration = calibration_file(tmp_path)
    for store, batch in (("a", "3"), ("b", "2")):
        assert main(["scan", str(root), "--store", str(tmp_path / store), "--calibration", str(calibration), *CLI,
                     "--batch-size", batch]) == 0
    ids = sequences(calibration)
    chosen = representations.sampled(CalibrationSet.from_ids(ids))
    assert int(chosen.sum()) == 25
    outputs = {s: float64_outputs(root / f"step{s}", "llama", ids) for s in (0, 20)}
    expected = {k: cka_by_kernels(v[chosen], outputs[20][k][chosen]) for k, v in outputs[0].items()}
    for store in "ab":
        rows = stored(tmp_path / store, "cka_final", "step0")
        assert rows["value"].to_list() == pytest.approx(expected_frame(expected), rel=2e-4)
        assert set(rows["n_tokens"]) == {25}


def test_bfloat16_outputs_are_kept_in_bfloat16_and_measured_in_float64(tmp_path, tokenizer_dir):
    root = suite(tmp_path, tokenizer_dir)
    calibration = calibration_file(tmp_path)
    cal = CalibrationSet.from_ids(sequences(calibration))
    model = load_model(root / "step0", torch.device("cpu"), torch.bfloat16)
    sample = OutputSample(cal, 3)
    score(model, cal, batch_size=3, sample=sample)
    assert {t.dtype for t in sample.tensors().values()} == {torch.bfloat16}
    assert main(["scan", str(root), "--store", str(tmp_path / "s"), "--calibration", str(calibration), *CLI,
                 "--dtype", "bfloat16"]) == 0
    ids = sequences(calibration)
    outputs = {s: float64_outputs(root / f"step{s}", "llama", ids) for s in (0, 20)}
    expected = {k: cka_by_kernels(v, outputs[20][k]) for k, v in outputs[0].items()}
    rows = stored(tmp_path / "s", "cka_final", "step0")
    assert set(rows["dtype"]) == {"bfloat16"}
    assert rows["value"].to_list() == pytest.approx(expected_frame(expected), abs=2e-2)
    # The weight metrics read the files as stored (float32 here), whatever the scan's dtype.
    weights = float64_weights(root / "step0", "llama")
    assert stored(tmp_path / "s", "weight_norm", "step0")["value"].to_list() == pytest.approx(
        expected_frame({k: float(v.norm()) for k, v in weights.items()}), rel=1e-12)


def test_linear_cka_is_invariant_to_rotation_and_scale_and_nan_for_a_constant_output():
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(40, 6, generator=generator, dtype=torch.float64)
    rotation, _ = torch.linalg.qr(torch.randn(6, 6, generator=generator, dtype=torch.float64))
    assert linear_cka(x, 3.0 * x @ rotation + 1.0) == pytest.approx(1.0, abs=1e-12)
    wide = torch.randn(5, 12, generator=generator, dtype=torch.float64)  # more features than tokens: kernels
    other = torch.randn(5, 12, generator=generator, dtype=torch.float64)
    assert linear_cka(wide, other) == pytest.approx(cka_by_kernels(wide, other), rel=1e-12)
    assert linear_cka(x, torch.ones(40, 6)) != linear_cka(x, torch.ones(40, 6))  # NaN


def dynamics_rows(store) -> pl.DataFrame:
    scores = Store(store).scores().filter(pl.col("metric").is_in(DYNAMICS))
    return scores.select("revision", "layer", "module", "metric", "reference", "reference_weights", "value").sort(
        "revision", "metric", "reference", "layer", "module")


def test_a_resumed_or_sharded_scan_stores_what_one_scan_does(tmp_path, tokenizer_dir, monkeypatch):
    from ckpt_trace.scan import dynamics

    extra = []  # passes made only for outputs another checkpoint is measured against
    monkeypatch.setattr(dynamics, "score", lambda *a, **k: extra.append(1) or score(*a, **k))
    root = suite(tmp_path, tokenizer_dir)
    calibration = calibration_file(tmp_path)
    args = ["scan", str(root), "--calibration", str(calibration), *CLI]
    assert main([*args, "--store", str(tmp_path / "one")]) == 0
    assert extra == []  # one pass per checkpoint: the reference's _prev rows wait for the checkpoint before it
    whole = dynamics_rows(tmp_path / "one")
    # Interrupted after the reference and step0: step10 is scored against outputs made again for it.
    (path,) = [p for p in (tmp_path / "one" / "scores").rglob("*.parquet") if p.parent.name == "step10"]
    path.unlink()
    assert main([*args, "--store", str(tmp_path / "one")]) == 0
    assert dynamics_rows(tmp_path / "one").equals(whole)
    assert len(extra) == 2  # the reference's outputs and step0's
    # Two shards, each making the reference's outputs (and each previous checkpoint's) itself.
    for index in (1, 2):
        assert main([*args, "--store", str(tmp_path / "shards"), "--shard", f"{index}/2"]) == 0
    assert dynamics_rows(tmp_path / "shards").equals(whole)
    config = ScanConfig(source=str(root), calibration=CalibrationSpec(str(calibration)), batch_size=3, device="cpu",
                        metrics=DYNAMICS, store=str(tmp_path / "one"), progress=False)
    assert run.scan(config)["status"].to_list() == ["stored"] * 3


def test_another_reference_is_stored_beside_the_first_and_a_longer_line_rescores(tmp_path, tokenizer_dir):
    root = suite(tmp_path, tokenizer_dir, steps=(0, 10, 20, 30))
    calibration = calibration_file(tmp_path)
    config = ScanConfig(source=str(root), calibration=CalibrationSpec(str(calibration)), batch_size=3, device="cpu",
                        metrics=DYNAMICS, store=str(tmp_path / "s"), progress=False)
    run.scan(replace(config, revisions="step0..step20"))
    first = dynamics_rows(tmp_path / "s")
    assert set(first.filter(pl.col("metric") == "cka_final")["reference"]) == {"step20"}
    summary = run.scan(replace(config, revisions="step0..step20", reference="step10"))
    assert summary["why"].to_list() == [
        "the stored weight_change_final, cka_final are measured against other checkpoints than step10"] * 3
    both = dynamics_rows(tmp_path / "s")
    final = both.filter(pl.col("metric") == "cka_final")
    assert set(final["reference"]) == {"step10", "step20"}
    # The first reference's rows are kept as they were.
    assert final.filter(pl.col("reference") == "step20").drop("reference_weights").equals(
        first.filter(pl.col("metric") == "cka_final").drop("reference_weights"))
    itself = final.filter((pl.col("reference") == "step10") & (pl.col("revision") == "step10"))["value"].to_list()
    assert itself == pytest.approx([1.0] * 9, abs=1e-12)
    # A line that reaches further has another last checkpoint: every revision is measured against it.
    summary = run.scan(config)
    assert summary["why"].to_list()[:3] == [
        "the stored weight_change_final, cka_final are measured against other checkpoints than step30"] * 3
    assert summary["why"][3] == "no scores yet"


@pytest.mark.parametrize("bad, words", [
    (["--reference", "step99"], ["step99"]),
    (["--metrics", "importance", "--reference", "step10"], ["--reference", "cka_final"]),
])
def test_a_bad_reference_is_one_line(tmp_path, tokenizer_dir, capsys, bad, words):
    root = suite(tmp_path, tokenizer_dir)
    args = ["scan", str(root), "--store", str(tmp_path / "s"), "--samples", "2", "--seq-len", "8", *CLI]
    assert main([*args, *bad]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and all(w in err for w in words)
    assert not (tmp_path / "s" / "scores").exists()


def test_a_broken_checkpoint_before_the_reference_fails_the_reference_too_and_nothing_else(tmp_path, tokenizer_dir,
                                                                                           capsys):
    root = suite(tmp_path, tokenizer_dir)
    (root / "step10" / "model.safetensors").write_bytes(b"not safetensors")
    args = ["scan", str(root), "--store", str(tmp_path / "s"), "--calibration", str(calibration_file(tmp_path)), *CLI]
    assert main([*args, "--keep-going"]) == 1
    err = capsys.readouterr().err
    assert "step10" in err and "Traceback" not in err
    runs = Store(tmp_path / "s").runs().sort("revision")
    assert dict(zip(runs["revision"], runs["status"])) == {"step0": "scored", "step10": "failed", "step20": "failed"}
    assert sorted(set(Store(tmp_path / "s").scores()["revision"])) == ["step0"]


def test_a_reference_rewritten_during_the_scan_is_never_measured_against(tmp_path, tokenizer_dir, capsys, monkeypatch):
    import shutil

    from ckpt_trace.scan import dynamics

    root = suite(tmp_path, tokenizer_dir)
    real, calls = dynamics.weight_metrics, []

    def then_rewritten(folder, *args, **kwargs):  # once the reference (scored first) is measured, it is replaced
        result = real(folder, *args, **kwargs)
        calls.append(folder)
        if len(calls) == 1:
            shutil.copy2(root / "step10" / "model.safetensors", root / "step20" / "model.safetensors")
        return result

    monkeypatch.setattr(dynamics, "weight_metrics", then_rewritten)
    args = ["scan", str(root), "--store", str(tmp_path / "s"), "--calibration", str(calibration_file(tmp_path)),
            "--device", "cpu", "--metrics", "weight_norm,weight_change_final"]
    assert main([*args, "--keep-going"]) == 1
    err = capsys.readouterr().err
    assert "the weights of step20" in err and "changed while they were measured against" in err
    runs = Store(tmp_path / "s").runs().sort("revision")
    # The reference itself changed while it was scored: tried again, it is no longer what was listed.
    assert dict(zip(runs["revision"], runs["status"])) == {"step0": "failed", "step10": "failed", "step20": "failed"}
    assert Store(tmp_path / "s").scores().height == 0


def test_only_the_prev_metrics_leave_the_first_checkpoint_with_none_of_them(tmp_path, tokenizer_dir):
    root = suite(tmp_path, tokenizer_dir)
    args = ["scan", str(root), "--store", str(tmp_path / "s"), "--calibration", str(calibration_file(tmp_path)),
            "--device", "cpu", "--metrics", "cka_prev"]
    assert main(args) == 0
    rows = Store(tmp_path / "s").scores().filter(pl.col("metric") == "cka_prev")
    assert sorted(set(rows["revision"])) == ["step10", "step20"]
    assert dict(rows.select("revision", "reference").unique().rows()) == {"step10": "step0", "step20": "step10"}
