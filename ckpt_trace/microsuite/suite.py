"""The built-in micro checkpoint suite: a small model that ckpt-trace trains itself, for real.

A Pythia-style GPT-NeoX (parallel residual, rotary embeddings) or a Llama-style model
(pre-norm, sequential) is trained on the documentation bundled with Python
(``pydoc_data.topics``, read at run time) with a byte-level BPE tokenizer trained on the
same text. A share of the documents is held out for validation. Checkpoints follow a
Pythia-like schedule, log-spaced early and evenly spaced after, and each is a complete
Hugging Face model directory named like a Hub revision (``step0``, ``step1``, ...), with
the tokenizer and its validation loss; ``main`` points at the last.

The suite is built once into ``$CKPT_TRACE_HOME/micro-suite`` (default: the user's cache
directory) and found there afterwards. The same seed gives bit-identical checkpoints on
the same machine.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import re
import sys
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..calibration.local import pydoc_documents
from ..calibration.sets import CalibrationSet
from ..errors import ConfigError
from ..fetch.sources import EVAL_FILE
from ..paths import home, json_object, staged_folder

ARCHS = ("pythia", "llama")
EOS = "<|endoftext|>"


@dataclass(frozen=True)
class MicroSuiteConfig:
    """How the micro suite is built; every field takes part in the suite's cache key."""

    arch: str = "pythia"
    """pythia (GPT-NeoX, parallel residual) or llama (pre-norm, sequential)."""
    layers: int = 6
    """Decoder layers."""
    hidden: int = 128
    """Residual-stream width."""
    heads: int = 4
    """Attention heads."""
    vocab: int = 2048
    """Byte-level BPE vocabulary size."""
    seq_len: int = 128
    """Training sequence length, and the model's positions."""
    batch_size: int = 16
    """Sequences per optimizer step."""
    steps: int = 1000
    """Optimizer steps in all."""
    interval: int = 200
    """Steps between evenly spaced checkpoints; powers of two below it are saved too."""
    lr: float = 3e-3
    """Peak learning rate (linear warm-up, cosine decay to a tenth)."""
    holdout: float = 0.1
    """Share of the documents held out for validation."""
    seed: int = 0
    """Seed of the initialisation, the data order and the split."""

    def __post_init__(self):
        if self.arch not in ARCHS:
            raise ConfigError(f"unknown micro-suite architecture {self.arch!r}; use one of: {', '.join(ARCHS)}")
        if self.steps < 1 or self.interval < 1:
            raise ConfigError(f"steps and interval must be positive, got {self.steps} and {self.interval}")

    @property
    def name(self) -> str:
        return f"micro-{self.arch}"

    def key(self) -> str:
        """A short hash of the config and the text it trains on, naming the suite's cache directory."""
        payload = json.dumps(asdict(self), sort_keys=True) + _corpus_digest()
        return hashlib.sha256(payload.encode()).hexdigest()[:10]


def schedule(steps: int, interval: int) -> list[int]:
    """Checkpoint steps: 0, then powers of two below `interval`, then every `interval`, and the last step."""
    early = [0] + [2**i for i in range(int(math.log2(interval)) + 1) if 2**i < min(interval, steps + 1)]
    even = list(range(interval, steps + 1, interval))
    return sorted(set(early + even + [steps]))


SPLIT = "distinct-documents"
"""How the corpus is split; part of the suite's cache key, so a suite split another way is never reused."""


def _corpus_digest() -> str:
    return hashlib.sha256(("\x00".join(pydoc_documents()) + SPLIT).encode()).hexdigest()[:16]


def _documents() -> tuple[list[str], list[str]]:
    """The distinct pydoc documents in topic order, and the first topic naming each (some topics share a text)."""
    from pydoc_data.topics import topics

    first: dict[str, str] = {}
    for key in sorted(topics):
        first.setdefault(topics[key], key)
    return list(first), list(first.values())


def heldout_topics(seed: int, holdout: float) -> list[str]:
    """The pydoc topics whose documents a suite with this seed holds out from training, for validation."""
    _, keys = _documents()
    order = list(range(len(keys)))
    random.Random(seed).shuffle(order)
    return [keys[i] for i in sorted(order[: max(1, round(len(order) * holdout))])]


def split_documents(seed: int, holdout: float) -> tuple[list[str], list[str]]:
    """The distinct pydoc documents, split with `seed` into training and held-out validation documents:
    no held-out text is also a training text."""
    docs, keys = _documents()
    val = set(heldout_topics(seed, holdout))
    return [d for d, k in zip(docs, keys) if k not in val], [d for d, k in zip(docs, keys) if k in val]


# -- the built-in multiple-choice task, from held-out documents -----------------------------

TASK_CONTEXT_WORDS, TASK_ANSWER_WORDS, TASK_STRIDE = 16, 3, 12


def _prose(document: str) -> list[list[str]]:
    """The prose paragraphs of a pydoc document as word lists; grammar rules, code and headings left out."""
    paragraphs = []
    for block in re.split(r"\n\s*\n", document):
        lines = block.strip("\n").splitlines()
        if not lines or any(line.startswith(" ") for line in lines) or "::=" in block or set(lines[-1]) <= set("*=-"):
            continue
        if len(words := block.split()) >= 8:
            paragraphs.append(words)
    return paragraphs


def python_mc_items(topics: list[str], seed: int = 0) -> list[dict]:
    """Multiple-choice items from pydoc topics: a passage of up to 16 words, and four continuations of 3 words: the
    one that follows it, and three that follow other passages of the same topic, in a seeded order.

    Every 12th word of every prose paragraph (from its 7th on) starts an item, so items do not repeat
    a continuation. Built from the topics the micro suite holds out from training, a model that
    learned the documentation's language picks the true continuation; one that did not is at
    chance (25%).
    """
    from pydoc_data.topics import topics as texts

    rng = random.Random(seed)
    items = []
    for topic in topics:
        spans = [(" ".join(words[max(0, i - TASK_CONTEXT_WORDS):i]), " ".join(words[i:i + TASK_ANSWER_WORDS]))
                 for words in _prose(texts[topic])
                 for i in range(6, len(words) - TASK_ANSWER_WORDS + 1, TASK_STRIDE)]
        continuations = sorted({answer for _, answer in spans})
        if len(continuations) < 4:  # too short a topic to draw three distractors from
            continue
        for context, answer in spans:
            others = rng.sample([c for c in continuations if c != answer], 3)
            position = rng.randrange(4)
            items.append({"topic": topic, "context": context, "choices": [*others[:position], answer, *others[position:]],
                          "answer": position})
    return items


def builtin_task_items(config: MicroSuiteConfig | None = None) -> list[dict]:
    """The items of the built-in task `ckpt_trace_python_mc` (`ckpt_trace/evaluation/tasks/python_mc.jsonl`): built from the
    topics the default micro suite holds out from training."""
    config = config or MicroSuiteConfig()
    return python_mc_items(heldout_topics(config.seed, config.holdout))


def validation_blocks(tokenizer, documents: list[str], seq_len: int) -> torch.Tensor:
    """Held-out documents joined with EOS and cut into whole blocks [n, seq_len]: what validation loss is measured on."""
    ids = _stream(tokenizer, documents)
    n = len(ids) // seq_len
    return ids[: n * seq_len].view(n, seq_len)


def suite_of(model_dir: str | os.PathLike) -> tuple[dict, MicroSuiteConfig] | None:
    """The micro suite a checkpoint directory belongs to, or that a model was pruned from: its suite.json and
    config; else None."""
    model_dir = Path(model_dir)
    places = [model_dir, model_dir.parent]
    manifest = model_dir / "ckpt_trace_prune.json"
    try:
        record = json_object(manifest) if manifest.is_file() else {}
    except (OSError, ValueError):
        record = {}
    while record:  # a model pruned from a model pruned from a checkpoint: follow the earliest source
        source = Path(record.get("source", ""))
        places += [source, source.parent]
        record = record.get("previous") or {}
    for place in places:
        file = place / "suite.json"
        if file.is_file():
            try:
                meta = json_object(file)
                return meta, MicroSuiteConfig(**meta["config"])
            except (OSError, ValueError, KeyError, TypeError):
                return None
    return None


def heldout_set(model_dir: str | os.PathLike, tokenizer) -> CalibrationSet | None:
    """The held-out validation blocks of the micro suite behind `model_dir` (see `suite_of`), or None.

    They are documents the suite never trained on, cut exactly as for its validation loss,
    so a checkpoint's perplexity on them is exp(its validation loss).
    """
    from pydoc_data.topics import topics

    found = suite_of(model_dir)
    if found is None:
        return None
    meta, config = found
    recorded = meta.get("heldout_topics")
    if recorded is None:  # a suite built before the split was recorded: the split its seed gives
        _, val_docs = split_documents(config.seed, config.holdout)
    elif missing := [t for t in recorded if t not in topics]:
        raise ConfigError(f"this Python's documentation lacks the held-out topics {', '.join(missing)} of the suite "
                          f"behind {str(model_dir)!r}; give --perplexity-data")
    else:  # the documents the suite held out, as recorded, whatever this Python's documentation adds
        val_docs = [topics[t] for t in recorded]
    blocks = validation_blocks(tokenizer, val_docs, config.seq_len)
    return CalibrationSet(tuple(blocks), f"{config.name} held-out documents ({len(blocks)}x{config.seq_len})")


def training_set(model_dir: str | os.PathLike, tokenizer) -> CalibrationSet | None:
    """The text the micro suite behind `model_dir` trained on (see `suite_of`), or None: every training document,
    streamed as for training and cut into consecutive blocks of its sequence length. No held-out document is in it."""
    from pydoc_data.topics import topics

    found = suite_of(model_dir)
    if found is None:
        return None
    meta, config = found
    heldout = meta.get("heldout_topics") or heldout_topics(config.seed, config.holdout)
    held_texts = {topics[t] for t in heldout if t in topics}
    stream = _stream(tokenizer, [d for d in _documents()[0] if d not in held_texts])
    blocks = stream[: len(stream) // config.seq_len * config.seq_len].view(-1, config.seq_len)
    return CalibrationSet(tuple(blocks), f"{config.name} training documents ({len(blocks)}x{config.seq_len})")


def byte_level_bpe(documents: Iterable[str], vocab: int, special_tokens: tuple[str, ...] = (EOS,)):
    """A byte-level BPE tokenizer (the tokenizers library's `Tokenizer`) trained on `documents`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=list(special_tokens), show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(documents, trainer)
    return tokenizer


def train_tokenizer(documents: list[str], vocab: int):
    """The micro suite's tokenizer: a byte-level BPE trained on `documents`, EOS its one special token."""
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(tokenizer_object=byte_level_bpe(documents, vocab), eos_token=EOS, bos_token=EOS,
                                   unk_token=EOS)


def _stream(tokenizer, documents: list[str]) -> torch.Tensor:
    ids: list[int] = []
    for doc_ids in tokenizer(documents, add_special_tokens=False)["input_ids"]:
        ids += doc_ids + [tokenizer.eos_token_id]
    return torch.tensor(ids, dtype=torch.int64)


def model_config(config: MicroSuiteConfig, eos_id: int):
    """The transformers config of the micro model."""
    import transformers

    common = dict(
        vocab_size=config.vocab, hidden_size=config.hidden, intermediate_size=4 * config.hidden,
        num_hidden_layers=config.layers, num_attention_heads=config.heads,
        max_position_embeddings=config.seq_len, bos_token_id=eos_id, eos_token_id=eos_id,
        tie_word_embeddings=False,
    )
    if config.arch == "pythia":
        return transformers.GPTNeoXConfig(**common, use_parallel_residual=True, rotary_pct=0.25)
    return transformers.LlamaConfig(**common, num_key_value_heads=config.heads)


@torch.no_grad()
def validation_loss(model, blocks: torch.Tensor, batch_size: int = 16) -> float:
    """Mean next-token loss over fixed held-out blocks."""
    model.eval()
    total, count = 0.0, 0
    for start in range(0, len(blocks), batch_size):
        batch = blocks[start : start + batch_size]
        loss = model(input_ids=batch, labels=batch).loss
        n = batch.numel() - len(batch)  # predicted tokens
        total += float(loss) * n
        count += n
    model.train()
    return total / count


def _lr_factor(step: int, steps: int, warmup: int) -> float:
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))


def train_suite(config: MicroSuiteConfig, out: Path, progress: bool = True) -> list[dict]:
    """Train the micro model and save every scheduled checkpoint under `out`; return their records."""
    import transformers

    torch.manual_seed(config.seed)
    deterministic = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        train_docs, val_docs = split_documents(config.seed, config.holdout)
        tokenizer = train_tokenizer(train_docs, config.vocab)
        train_ids, val_blocks = _stream(tokenizer, train_docs), validation_blocks(tokenizer, val_docs, config.seq_len)

        model = transformers.AutoModelForCausalLM.from_config(model_config(config, tokenizer.eos_token_id))
        model.train()
        decay = [p for p in model.parameters() if p.dim() >= 2]
        no_decay = [p for p in model.parameters() if p.dim() < 2]
        optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
            lr=config.lr, betas=(0.9, 0.95),
        )
        warmup = max(1, config.steps // 20)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: _lr_factor(s, config.steps, warmup))
        generator = torch.Generator().manual_seed(config.seed)
        saves = set(schedule(config.steps, config.interval))
        records = []

        def save(step: int) -> None:
            loss = validation_loss(model, val_blocks)
            path = out / f"step{step}"
            model.save_pretrained(path)
            tokenizer.save_pretrained(path)
            record = {"revision": f"step{step}", "step": step, "tokens": step * config.batch_size * config.seq_len,
                      "val_loss": loss}
            (path / EVAL_FILE).write_text(json.dumps(record, indent=2) + "\n")
            records.append(record)

        transformers.utils.logging.disable_progress_bar()  # one bar for the whole build, not one per save
        bar = tqdm(total=config.steps, desc=f"training {config.name}", unit="step", disable=None if progress else True)
        save(0)
        for step in range(1, config.steps + 1):
            starts = torch.randint(0, len(train_ids) - config.seq_len, (config.batch_size,), generator=generator)
            batch = torch.stack([train_ids[s : s + config.seq_len] for s in starts.tolist()])
            loss = model(input_ids=batch, labels=batch).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            bar.update()
            if step in saves:
                save(step)
                bar.set_postfix(val_loss=f"{records[-1]['val_loss']:.3f}")
        bar.close()
        return records
    finally:
        torch.use_deterministic_algorithms(deterministic)


def suite_path(config: MicroSuiteConfig) -> Path:
    """Where the suite built from `config` lives."""
    return home() / "micro-suite" / config.key() / config.name


def build(config: MicroSuiteConfig | None = None, force: bool = False, progress: bool = True) -> Path:
    """The suite's directory, trained first if it is not already built (or if `force`)."""
    config = config or MicroSuiteConfig()
    target = suite_path(config)
    if target.is_dir() and (target / "suite.json").is_file() and not force:
        return target
    if progress:  # said once, also where the bar is hidden (no terminal): the build takes minutes
        tqdm.write(f"building the micro suite {config.name} into {target} ({config.steps} training steps, "
                   "minutes on a CPU); later runs find it there", file=sys.stderr)
    with staged_folder(target, replace=True) as staging:
        start = time.perf_counter()
        records = train_suite(config, staging, progress)
        (staging / "main").symlink_to(records[-1]["revision"], target_is_directory=True)
        meta = {"config": asdict(config), "heldout_topics": heldout_topics(config.seed, config.holdout), "revisions": records,
                "seconds": round(time.perf_counter() - start, 1)}
        (staging / "suite.json").write_text(json.dumps(meta, indent=2) + "\n")
    return target
