"""Healing: a short LoRA fine-tune (peft) of a pruned model's kept modules, which recovers some of the quality dropping
cost.

Every linear layer of the kept attention layers and MLPs gets a LoRA adapter of rank r (alpha = 2r, no dropout);
embeddings, norms and the output head stay frozen. Each step trains on `batch_size` blocks of the training text drawn
with the seed, AdamW at a constant learning rate after a linear warm-up over the first tenth of the steps. On the
CPU the result is the same, bit for bit, for the same seed. `heal` merges the adapters into the weights and saves a
folder that loads like any pruned one; `lora` keeps them apart, for a caller that measures a drop set healed and then
takes the adapters out again (`ckpt-trace curves --heal`).
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..calibration.sets import CalibrationSet
from ..errors import ConfigError
from ..paths import staged_folder
from ..scoring.options import ScoringOptions

WARMUP = 0.1
"""Share of the steps over which the learning rate rises linearly to `lr`."""


@dataclass(frozen=True)
class Healing:
    """How a model is healed: every field is recorded with the result."""

    steps: int = 200
    """Optimizer steps."""
    rank: int = 8
    """LoRA rank (alpha is twice the rank)."""
    lr: float = 2e-3
    """Learning rate of AdamW, after the warm-up."""
    seed: int = 0
    """Seed of the adapters' initialisation and of the order of the training blocks."""

    def __post_init__(self):
        for name, least in (("steps", 1), ("rank", 1)):
            if getattr(self, name) < least:
                raise ConfigError(f"--{name} {getattr(self, name)} is too small; give {least} or more")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ConfigError(f"--lr {self.lr} must be a number greater than 0")

    def label(self, data_id: str, batch_size: int) -> str:
        """How a healed model is named in the store's `healed` column."""
        return (f"LoRA rank {self.rank}, {self.steps} steps of {batch_size}, lr {self.lr:g}, seed {self.seed}, "
                f"on {data_id}")


def lora_targets(model: torch.nn.Module) -> list[str]:
    """The names of the linear layers inside the decoder layers (those of dropped modules are gone already)."""
    from transformers.pytorch_utils import Conv1D

    from ..model.surgery import layer_list

    parent, name, layers = layer_list(model)
    prefix = {id(m): n for n, m in model.named_modules()}[id(layers)]
    return [f"{prefix}.{n}" for n, m in layers.named_modules() if isinstance(m, (torch.nn.Linear, Conv1D))]


@contextmanager
def lora(model: torch.nn.Module, data: CalibrationSet, healing: Healing, batch_size: int = 8,
         progress: bool | str = True) -> Iterator[tuple[torch.nn.Module, list[float]]]:
    """The model itself with LoRA adapters trained on `data` (blocks of equal length) in its linear layers, and the
    loss of every step. On exit the adapters are taken out, which leaves the model as it was, trainable parameters
    and the global random state included (also on error), unless `merge_adapters` merged them into its weights
    first. Raises `ConfigError` where the loss stops being finite (the learning rate is too high)."""
    from peft import LoraConfig, get_peft_model

    lengths = {len(s) for s in data.sequences}
    if len(lengths) != 1 or lengths == {1}:
        raise ConfigError(f"healing data {data.source!r} must be blocks of one length of 2 or more tokens; give a text "
                          "source or a pre-tokenized jsonl of equal-length sequences")
    blocks = torch.stack(list(data.sequences))
    device = next(model.parameters()).device
    config = LoraConfig(r=healing.rank, lora_alpha=2 * healing.rank, lora_dropout=0.0,
                        target_modules=lora_targets(model), fan_in_fan_out=model.config.model_type == "gpt2")
    was_training = model.training
    trainable = {name: p.requires_grad for name, p in model.named_parameters()}
    with ExitStack() as scope:
        scope.enter_context(torch.random.fork_rng(devices=[device] if device.type == "cuda" else []))
        torch.manual_seed(healing.seed)
        with warnings.catch_warnings():  # peft asks transformers a deprecated question; nothing for the user to do
            warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
            healed = get_peft_model(model, config)
        scope.callback(_restore, model, healed, trainable, was_training)
        losses = _train(healed, blocks, device, healing, batch_size, progress)
        model.eval()
        yield model, losses


def _restore(model, healed, trainable: dict[str, bool], was_training: bool) -> None:
    """Take the adapters out and give every parameter back the trainability it had."""
    healed.unload()
    for name, param in model.named_parameters():
        param.requires_grad_(trainable.get(name, param.requires_grad))
    model.train(was_training)


def _train(healed, blocks: torch.Tensor, device, healing: Healing, batch_size: int, progress) -> list[float]:
    """The optimizer steps; the loss of each."""
    optimizer = torch.optim.AdamW([p for p in healed.parameters() if p.requires_grad], lr=healing.lr, weight_decay=0.0)
    warmup = max(1, round(WARMUP * healing.steps))
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / warmup))
    generator = torch.Generator().manual_seed(healing.seed)
    losses = []
    healed.train()
    with tqdm(range(healing.steps), desc=progress if isinstance(progress, str) else "healing", unit="step",
              disable=None if progress else True, leave=False) as bar:
        for step in bar:
            batch = blocks[torch.randint(0, len(blocks), (batch_size,), generator=generator)].to(device)
            loss = healed(input_ids=batch, labels=batch).loss
            if not torch.isfinite(loss):
                raise ConfigError(f"healing diverged: the loss is {loss.item()} at step {step + 1} of {healing.steps}; "
                                  f"give a lower --lr than {healing.lr:g}")
            loss.backward()
            optimizer.step()
            schedule.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(loss.item())
            bar.set_postfix(loss=f"{loss.item():.4f}")
    return losses


def merge_adapters(model: torch.nn.Module) -> None:
    """Merge the LoRA adapters of a model inside `lora` into the weights they adapt, which keep them on exit."""
    from peft.tuners.lora import LoraLayer

    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, LoraLayer):
                module.merge()


@dataclass
class HealConfig(ScoringOptions):
    """A healing job; the command line only fills this in."""

    pruned: str | os.PathLike
    """A pruned model folder (made by `ckpt-trace prune`)."""
    out: str | os.PathLike
    """Output folder for the healed model; must not exist or be empty."""
    data: str | None = None
    """Training text, in the calibration spec syntax (with --samples and --seq-len); None: for a micro-suite model
    the documents its suite trained on (never the held-out ones), else the default calibration text."""
    steps: int = Healing.steps
    """Optimizer steps."""
    rank: int = Healing.rank
    """LoRA rank (alpha is twice the rank)."""
    lr: float = Healing.lr
    """Learning rate."""
    seed: int = Healing.seed
    """Seed of the adapters and of the order of the training blocks."""

    def __post_init__(self):
        super().__post_init__()
        from .run import MANIFEST, check_out

        self.healing = Healing(self.steps, self.rank, self.lr, self.seed)
        if not (Path(self.pruned) / MANIFEST).is_file():
            raise ConfigError(f"{str(self.pruned)!r} is no pruned model folder (it has no {MANIFEST}); prune it first "
                              "with `ckpt-trace prune`")
        check_out(self.out)


def training_data(model_dir: str | os.PathLike, tokenizer, spec, data: str | None) -> CalibrationSet:
    """What a model is healed on: `data` (a calibration spec, cut to the model's positions) where given, else a micro
    suite's training documents, else the calibration text; checked against the model's vocabulary."""
    from dataclasses import replace

    from ..calibration.blocks import load_calibration
    from ..calibration.sets import fit_seq_len
    from ..microsuite.suite import training_set
    from ..model.loading import max_positions, read_config

    config = read_config(model_dir)
    found = training_set(model_dir, tokenizer) if data is None and tokenizer is not None else None
    if found is None:
        spec = fit_seq_len(replace(spec, source=data) if data else spec, max_positions(config))
        found = load_calibration(spec, tokenizer)
    if isinstance(config.get("vocab_size"), int):
        found.check_vocab(config["vocab_size"])
    return found


def heal(config: HealConfig) -> Path:
    """Heal a pruned folder and save the healed model, its manifest recording how, and its model card; return the
    output folder."""
    from ..model.loading import dtype_name, load_tokenizer
    from ..scoring.options import loaded
    from ..store import VERSION, Store
    from .run import manifest, write_folder

    record = manifest(config.pruned)
    if record.get("healed"):
        raise ConfigError(f"{str(config.pruned)!r} is healed already; heal the pruned folder it came from, with more "
                          "--steps if need be")
    tokenizer = load_tokenizer(config.pruned)
    data = training_data(config.pruned, tokenizer, config.calibration, config.data)
    with loaded(config, config.pruned, None) as at:
        model = at.model
        with lora(model, data, config.healing, config.batch_size, config.progress and "healing") as (_, losses):
            merge_adapters(model)
        if not all(torch.isfinite(p).all() for p in model.parameters()):
            raise ConfigError(f"healing diverged: the merged weights are not finite; give a lower --lr than "
                              f"{config.lr:g}")
        at.check("healed")
        tail = losses[-max(1, len(losses) // 10):]
        record = {**record, "healed": {
            "data": data.id, "data_source": data.source, "steps": config.steps, "rank": config.rank,
            "alpha": 2 * config.rank, "lr": config.lr, "seed": config.seed, "batch_size": config.batch_size,
            "first_loss": losses[0], "final_loss": sum(tail) / len(tail),
            "label": config.healing.label(data.id, config.batch_size),
            "from": str(config.pruned), "from_weights": at.checkpoint.weights,
            "dtype": dtype_name(at.dtype), "version": VERSION,
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds")}}
        out = Path(config.out)
        with staged_folder(out) as staging:
            write_folder(staging, model, tokenizer, record, Store(config.store), out.name)
    return out
