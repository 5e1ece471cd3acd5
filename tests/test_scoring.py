"""The scorer against a straightforward reference computed from full activations."""

from __future__ import annotations

import math

import polars as pl
import pytest
import torch
import torch.nn.functional as F
from conftest import CONFIGS, LAYERS, make_model, random_ids

from ckpt_trace.calibration.sets import CalibrationSet
from ckpt_trace.model.adapters import locate
from ckpt_trace.scoring.metrics import score
from ckpt_trace.store import METRICS, MODULES

# How each family computes its MLP delta from the MLP's residual input, written out from
# the Hugging Face modeling code. If a tap sat on the wrong module, these would not hold.
MLP_RECIPES = {
    "llama": lambda layer, h: layer.mlp(layer.post_attention_layernorm(h)),
    "mistral": lambda layer, h: layer.mlp(layer.post_attention_layernorm(h)),
    "qwen2": lambda layer, h: layer.mlp(layer.post_attention_layernorm(h)),
    "qwen3": lambda layer, h: layer.mlp(layer.post_attention_layernorm(h)),
    "olmo": lambda layer, h: layer.mlp(layer.post_attention_layernorm(h)),
    "gemma2": lambda layer, h: layer.post_feedforward_layernorm(layer.mlp(layer.pre_feedforward_layernorm(h))),
    "gemma3_text": lambda layer, h: layer.post_feedforward_layernorm(layer.mlp(layer.pre_feedforward_layernorm(h))),
    "olmo2": lambda layer, h: layer.post_feedforward_layernorm(layer.mlp(h)),
    "gpt_neox": lambda layer, x: layer.mlp(layer.post_attention_layernorm(x)),
    "gpt_neox_sequential": lambda layer, h: layer.mlp(layer.post_attention_layernorm(h)),
    "gpt2": lambda layer, h: layer.mlp(layer.ln_2(h)),
}
PARALLEL = {"gpt_neox"}


def capture(model, input_ids, attention_mask=None):
    """Full activations of one forward pass: per layer x, attention delta, MLP delta, y."""
    layout = locate(model)
    store = [dict() for _ in layout.layers]
    handles = []
    for record, taps in zip(store, layout.layers):
        handles.append(taps.attention.register_forward_hook(lambda m, a, o, r=record: r.update(a=o[0] if isinstance(o, tuple) else o)))
        handles.append(taps.mlp.register_forward_hook(lambda m, a, o, r=record: r.update(m=o)))
    with torch.no_grad():
        out = model(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True)
    for h in handles:
        h.remove()
    hidden = out.hidden_states
    for l, record in enumerate(store):
        record["x"] = hidden[l]
        record["layer"] = layout.layers[l].block
    return store, hidden


def reference_metrics(records, mask, parallel):
    """Token-weighted means in float64, from F.cosine_similarity over stored activations."""
    w = mask.to(torch.float64).flatten()
    expected = torch.zeros(len(records), 3, 2, dtype=torch.float64)
    for l, r in enumerate(records):
        x, a, m, y = (r[k].double().flatten(0, 1) for k in ("x", "a", "m", "y"))
        h = x + a
        mlp_in = x if parallel else h
        pairs = [(x, y, y - x), (x, x + a, a), (mlp_in, mlp_in + m, m)]
        for i, (inp, out, delta) in enumerate(pairs):
            importance = 1 - F.cosine_similarity(inp, out, dim=-1)
            ratio = delta.norm(dim=-1) / inp.norm(dim=-1)
            expected[l, i, 0] = (importance * w).sum() / w.sum()
            expected[l, i, 1] = (ratio * w).sum() / w.sum()
    return expected


def as_tensor(frame):
    out = torch.zeros(frame["layer"].max() + 1, 3, 2, dtype=torch.float64)
    for row in frame.iter_rows(named=True):
        out[row["layer"], MODULES.index(row["module"]), METRICS.index(row["metric"])] = row["value"]
    return out


def test_taps_add_up_and_sit_on_the_right_modules(family):
    model = make_model(family)
    ids = torch.tensor(random_ids(2, 24))
    records, hidden = capture(model, ids)
    # The last entry of hidden_states is after the final norm, so take y of the last layer from x of none:
    # every layer but the last is checked against the next layer's input; the last against its own hook.
    last_out = {}
    handle = locate(model).layers[-1].block.register_forward_hook(lambda m, a, o: last_out.update(y=o))
    with torch.no_grad():
        model(input_ids=ids)
    handle.remove()
    for l, r in enumerate(records):
        r["y"] = hidden[l + 1] if l + 1 < len(records) else last_out["y"]
        x, a, m, y = r["x"], r["a"], r["m"], r["y"]
        torch.testing.assert_close(x + a + m, y, atol=1e-5, rtol=1e-5)
        mlp_in = x if family in PARALLEL else x + a
        with torch.no_grad():
            torch.testing.assert_close(MLP_RECIPES[family](r["layer"], mlp_in), m, atol=1e-5, rtol=1e-5)
        assert a.abs().max() > 1e-3 and m.abs().max() > 1e-3  # both deltas carry signal


def test_metrics_match_reference(family):
    model = make_model(family)
    seqs = random_ids(3, 20, seed=1)
    calibration = CalibrationSet.from_ids(seqs)
    frame = score(model, calibration, batch_size=3)
    assert frame.height == LAYERS * 3 * 2
    assert set(frame["n_tokens"]) == {60}

    records, hidden = capture(model, torch.tensor(seqs))
    last_out = {}
    handle = locate(model).layers[-1].block.register_forward_hook(lambda m, a, o: last_out.update(y=o))
    with torch.no_grad():
        model(input_ids=torch.tensor(seqs))
    handle.remove()
    for l, r in enumerate(records):
        r["y"] = hidden[l + 1] if l + 1 < len(records) else last_out["y"]
    expected = reference_metrics(records, torch.ones(3, 20), family in PARALLEL)
    torch.testing.assert_close(as_tensor(frame), expected, atol=1e-5, rtol=0)
    assert (expected[:, :, 0] > 1e-4).all()  # a test of nothing would pass on zeros


def test_padding_gives_what_one_at_a_time_gives(family):
    model = make_model(family)
    lengths = [21, 9, 16, 4, 13]
    seqs = [ids[:n] for ids, n in zip(random_ids(len(lengths), max(lengths), seed=2), lengths)]
    calibration = CalibrationSet.from_ids(seqs)
    batched = score(model, calibration, batch_size=5)
    alone = score(model, calibration, batch_size=1)
    assert batched["n_tokens"][0] == alone["n_tokens"][0] == sum(lengths)
    torch.testing.assert_close(as_tensor(batched), as_tensor(alone), atol=1e-5, rtol=0)


def test_one_forward_pass_per_batch():
    model = make_model("llama")
    calls = []
    handle = model.base_model.register_forward_hook(lambda *a: calls.append(1))
    score(model, CalibrationSet.from_ids(random_ids(7, 10)), batch_size=3)
    handle.remove()
    assert len(calls) == 3


def _hook_count(model):
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def test_hooks_removed_and_mode_restored_when_forward_raises():
    model = make_model("gpt_neox").train()
    layout = locate(model)

    def boom(*args):
        raise RuntimeError("boom")

    failing = layout.layers[1].mlp.register_forward_hook(boom)
    with pytest.raises(RuntimeError, match="boom"):
        score(model, CalibrationSet.from_ids(random_ids(2, 8)))
    failing.remove()
    assert _hook_count(model) == 0
    assert model.training


def test_bfloat16_scores_close_to_float32():
    calibration = CalibrationSet.from_ids(random_ids(4, 32, seed=3))
    full = as_tensor(score(make_model("llama"), calibration))
    half = as_tensor(score(make_model("llama", dtype=torch.bfloat16), calibration))
    assert torch.isfinite(half).all()
    torch.testing.assert_close(half, full, atol=0.05, rtol=0.05)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_bfloat16_block_scores_agree_with_float64_at_small_update_ratios(family):
    """The same weights run in bfloat16 and in float64: block scores within 0.1% where updates are ~3% of the stream."""
    import copy

    model = make_model(family, dtype=torch.bfloat16)
    with torch.no_grad():  # small deltas, as in the late layers of a deep model
        for name, param in model.named_parameters():
            if any(part in name for part in ("o_proj", "down_proj", "c_proj")):  # the last linear of each branch
                param.mul_(0.05)
    ids = torch.tensor(random_ids(8, 64, seed=3))
    records, _ = capture(copy.deepcopy(model).double(), ids)
    got = as_tensor(score(model, CalibrationSet.from_ids(ids.tolist())))
    for layer, r in enumerate(records):
        x, delta = r["x"].flatten(0, 1), (r["a"] + r["m"]).flatten(0, 1)  # float64 throughout
        ratio = (delta.norm(dim=-1) / x.norm(dim=-1)).mean().item()
        importance = (1 - F.cosine_similarity(x, x + delta, dim=-1)).mean().item()
        assert 0.005 < ratio < 0.1
        assert got[layer, 0, 1].item() == pytest.approx(ratio, rel=1e-3)
        assert got[layer, 0, 0].item() == pytest.approx(importance, rel=1e-3)


def test_scores_do_not_depend_on_batch_order():
    model = make_model("qwen3")
    seqs = random_ids(6, 12, seed=4)
    forward = as_tensor(score(model, CalibrationSet.from_ids(seqs), batch_size=2))
    backward = as_tensor(score(model, CalibrationSet.from_ids(seqs[::-1]), batch_size=4))
    torch.testing.assert_close(forward, backward, atol=1e-6, rtol=0)


def test_every_family_has_a_recipe():
    assert set(MLP_RECIPES) == set(CONFIGS)


@pytest.mark.parametrize("scale", [0.0, 1e-4, 1e-2, 1.0, 100.0])
def test_importance_is_accurate_for_tiny_and_large_deltas(scale):
    """1 - cos near 0 (late layers of large models) keeps its relative accuracy; a zero delta scores exactly 0.

    At scale 1e-4, 1 - cos is about 6e-12, where the float64 reference is still accurate to ~2e-5 and
    the naive float32 1 - cos would be all rounding error.
    """
    from ckpt_trace.scoring.metrics import ResidualStats

    generator = torch.Generator().manual_seed(0)
    x = torch.randn(2, 8, 256, generator=generator) * 30
    d = torch.randn(2, 8, 256, generator=generator) * scale
    stats = ResidualStats(1)
    stats.begin_batch(torch.ones(2, 8))
    stats.update(0, 0, x, d)
    importance, ratio, angle = stats.compute()[0, 0, :, 0].tolist()
    xd, dd = x.double(), d.double()
    cos = F.cosine_similarity(xd, xd + dd, dim=-1)
    expected = (1 - cos).mean().item()
    expected_ratio = (dd.norm(dim=-1) / xd.norm(dim=-1)).mean().item()
    expected_angle = (torch.arccos(cos.clamp(-1, 1)) / math.pi).mean().item()
    if scale == 0.0:
        assert importance == 0.0 and ratio == 0.0 and angle == 0.0
    else:
        assert importance == pytest.approx(expected, rel=1e-4)
        assert ratio == pytest.approx(expected_ratio, rel=1e-5)
        assert angle == pytest.approx(expected_angle, rel=1e-4)


@pytest.mark.parametrize("family", sorted(CONFIGS))
def test_ablation_loss_equals_a_per_sequence_reference(family):
    """Loss with one module's delta removed minus the intact loss, mean over every predicted token, from
    unpadded sequences one at a time with an independent hook (the tests' `zeroed`)."""
    from test_pruning import zeroed

    from ckpt_trace.scoring.loss import ablation_losses

    model = make_model(family)
    lengths = [12, 7, 10]
    seqs = [ids[:n] for ids, n in zip(random_ids(3, 12, seed=6), lengths)]

    def mean_loss(chosen) -> float:
        total, count = 0.0, 0
        with zeroed(model, chosen), torch.no_grad():
            for seq in seqs:
                logp = torch.log_softmax(model(input_ids=torch.tensor([seq])).logits[0].double(), dim=-1)
                total -= sum(logp[t - 1, seq[t]].item() for t in range(1, len(seq)))
                count += len(seq) - 1
        return total / count

    frame = ablation_losses(model, CalibrationSet.from_ids(seqs), batch_size=2)  # padded batches
    intact = mean_loss([])
    assert frame.height == LAYERS * 3 and set(frame["n_tokens"]) == {sum(lengths) - 3}
    for layer, module, value in frame.select("layer", "module", "value").rows():
        assert value == pytest.approx(mean_loss([(module, layer)]) - intact, abs=1e-4), (layer, module)
    assert frame["value"].abs().max() > 1e-3  # removing modules changes the loss


def stream(model, seq: list[int]) -> tuple[list[dict], list[torch.Tensor]]:
    """One unpadded sequence in float64: per layer x, a, m, y [T, D]; and the residual stream entering each layer,
    the last layer's output last."""
    records, hidden = capture(model, torch.tensor([seq]))
    last_out = {}
    handle = locate(model).layers[-1].block.register_forward_hook(lambda m, a, o: last_out.update(y=o[0] if isinstance(o, tuple) else o))
    with torch.no_grad():
        model(input_ids=torch.tensor([seq]))
    handle.remove()
    for l, r in enumerate(records):
        r["y"] = hidden[l + 1] if l + 1 < len(records) else last_out["y"]
    layers = [{k: r[k][0].double() for k in ("x", "a", "m", "y")} for r in records]
    return layers, [r["x"] for r in layers] + [layers[-1]["y"]]


def angular(u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return torch.arccos(F.cosine_similarity(u, v, dim=-1).clamp(-1, 1)) / math.pi


@pytest.mark.parametrize("family", ["llama", "gpt_neox", "olmo2", "gpt2"])
def test_every_one_pass_metric_matches_a_float64_reference(family):
    """importance, update_ratio, angular_distance and span_distance, over every real token and over each
    sequence's last, from padded batches, against float64 values from each sequence run alone."""
    from ckpt_trace.scoring.metrics import ABLATION, ALL_METRICS, DYNAMICS, MAX_SPAN

    model = make_model(family)
    lengths = [17, 6, 12]
    seqs = [ids[:n] for ids, n in zip(random_ids(3, 17, seed=4), lengths)]
    metrics = tuple(m for m in ALL_METRICS if m != ABLATION and m not in DYNAMICS)
    frame = score(model, CalibrationSet.from_ids(seqs), batch_size=2, metrics=metrics)
    assert set(frame["metric"]) == set(metrics)
    spans = min(MAX_SPAN, LAYERS)
    assert frame.height == 2 * (3 * 3 * LAYERS + sum(LAYERS - n + 1 for n in range(1, spans + 1)))
    per_token: dict[tuple, list[torch.Tensor]] = {}  # (layer, module, metric) -> per-sequence [T] values
    for seq in seqs:
        layers, xs = stream(model, seq)
        for l, r in enumerate(layers):
            x, a, m, y = r["x"], r["a"], r["m"], r["y"]
            mlp_in = x if family in PARALLEL else x + a
            for module, (inp, out) in zip(MODULES, [(x, y), (x, x + a), (mlp_in, mlp_in + m)]):
                per_token.setdefault((l, module, "importance"), []).append(1 - F.cosine_similarity(inp, out, dim=-1))
                per_token.setdefault((l, module, "update_ratio"), []).append((out - inp).norm(dim=-1) / inp.norm(dim=-1))
                per_token.setdefault((l, module, "angular_distance"), []).append(angular(inp, out))
        for n in range(1, spans + 1):
            for l in range(LAYERS - n + 1):
                per_token.setdefault((l, f"span{n}", "span_distance"), []).append(angular(xs[l], xs[l + n]))
    checked = 0
    for (layer, module, metric), values in per_token.items():
        everything = torch.cat(values).mean().item()
        last = torch.stack([v[-1] for v in values]).mean().item()
        for name, expected, n in ((metric, everything, sum(lengths)), (metric + "_last", last, len(seqs))):
            row = frame.filter((pl.col("layer") == layer) & (pl.col("module") == module) & (pl.col("metric") == name))
            assert row.height == 1 and row["n_tokens"][0] == n, (layer, module, name)
            assert row["value"][0] == pytest.approx(expected, abs=2e-5), (layer, module, name)
            checked += 1
    assert checked == frame.height
    # A span of one block is the block's angular distance; every score carries signal.
    one = frame.filter(pl.col("metric") == "span_distance").filter(pl.col("module") == "span1").sort("layer")
    block = frame.filter((pl.col("module") == "block") & (pl.col("metric") == "angular_distance")).sort("layer")
    assert block["value"].to_list() == pytest.approx(one["value"].to_list(), abs=1e-5)
    assert frame.filter(pl.col("metric").str.starts_with("span") | pl.col("metric").str.starts_with("angular"))[
        "value"].min() > 1e-4


@pytest.mark.parametrize("padding", ["right", "left"])
def test_spans_beyond_the_window_and_last_tokens_on_either_side(padding):
    """11 layers (more than MAX_SPAN): spans of 1 .. 8 from every layer where one starts, over every real token and
    over each row's last, with padding on either side, equal float64 angles; keeping only the last rows gives the
    same last-token spans."""
    from ckpt_trace.scoring.metrics import MAX_SPAN, ResidualStats

    layers, lengths, width = 11, [7, 3, 5], 32
    generator = torch.Generator().manual_seed(3)
    xs = [torch.randn(3, 7, width, generator=generator) * (1 + l) for l in range(layers + 1)]
    mask = torch.zeros(3, 7)
    for row, n in enumerate(lengths):
        if padding == "right":
            mask[row, :n] = 1
        else:
            mask[row, 7 - n:] = 1
    last = [n - 1 if padding == "right" else 6 for n in lengths]
    frames = {}
    for spans, metrics in ((True, ("span_distance", "span_distance_last")), ("last", ("span_distance_last",))):
        stats = ResidualStats(layers, spans=spans)
        stats.begin_batch(mask)
        for l, x in enumerate(xs):
            stats.arrive(l, x)
        assert stats.inputs == {}  # nothing held once the batch has passed the last layer
        frames[spans] = stats.frame(metrics)
    both = frames[True]
    assert both.height == 2 * sum(layers - n + 1 for n in range(1, MAX_SPAN + 1))
    assert set(both["module"]) == {f"span{n}" for n in range(1, MAX_SPAN + 1)}
    real = mask.bool()
    for row in both.iter_rows(named=True):
        n, l = int(row["module"][4:]), row["layer"]
        angles = angular(xs[l].double(), xs[l + n].double())  # [B, T]
        if row["metric"] == "span_distance":
            expected = angles[real].mean().item()
        else:
            expected = torch.stack([angles[b, t] for b, t in enumerate(last)]).mean().item()
        assert row["value"] == pytest.approx(expected, abs=1e-6), row
    mine = both.filter(pl.col("metric") == "span_distance_last").sort("module", "layer")["value"].to_list()
    assert frames["last"].sort("module", "layer")["value"].to_list() == pytest.approx(mine, abs=1e-7)
    with pytest.raises(ValueError, match="span_distance needs"):
        stats.frame(("span_distance",))


def test_losses_a_chunk_of_positions_at_a_time_equal_the_full_logits(family, monkeypatch):
    """The per-position loss from the decoder and the LM head applied a few positions at a time (soft-capping
    included) equals cross-entropy of the model's own full logits, with padding."""
    from ckpt_trace.scoring import loss as scoring

    model = make_model(family)
    lengths = [13, 6]
    ids = torch.tensor([row[:13] for row in random_ids(2, 13, seed=12)])
    mask = torch.tensor([[1] * n + [0] * (13 - n) for n in lengths])
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].double()
    expected = F.cross_entropy(logits.transpose(1, 2), ids[:, 1:], reduction="none") * mask[:, 1:]
    # 5 positions per chunk at this vocabulary: chunks of 5, 5 and 2 positions.
    monkeypatch.setattr(scoring, "LOGITS_CHUNK_BYTES", 4 * 2 * model.get_output_embeddings().out_features * 5)
    with torch.no_grad():
        chunked = scoring.next_token_losses(model, ids, mask)
    assert chunked.shape == (2, 12)
    torch.testing.assert_close(chunked.double(), expected, atol=1e-5, rtol=1e-5)
    assert (chunked[1, 5:] == 0).all() and (chunked[0] > 0).all()
