"""Tiny random models of every supported family, built with from_config; no download."""

from __future__ import annotations

import copy
import json
import logging
import os
from pathlib import Path

import pytest
import torch
import transformers

VOCAB = 384
HIDDEN = 32
LAYERS = 3

_TOKENS = dict(bos_token_id=0, eos_token_id=0)
_NEOX = dict(
    vocab_size=VOCAB,
    hidden_size=HIDDEN,
    intermediate_size=64,
    num_hidden_layers=LAYERS,
    num_attention_heads=4,
    max_position_embeddings=128,
    **_TOKENS,
)
_LLAMA_LIKE = dict(_NEOX, num_key_value_heads=2, pad_token_id=0)

# model_type -> config. Every family the adapters support appears here, with both
# GPT-NeoX residual styles.
CONFIGS: dict[str, transformers.PretrainedConfig] = {
    "llama": transformers.LlamaConfig(**_LLAMA_LIKE),
    "mistral": transformers.MistralConfig(**_LLAMA_LIKE, sliding_window=None),
    "qwen2": transformers.Qwen2Config(**_LLAMA_LIKE),
    "qwen3": transformers.Qwen3Config(**_LLAMA_LIKE, head_dim=8),
    "gemma2": transformers.Gemma2Config(**_LLAMA_LIKE, head_dim=8, sliding_window=16),
    "gemma3_text": transformers.Gemma3TextConfig(**_LLAMA_LIKE, head_dim=8, sliding_window=16),
    "olmo": transformers.OlmoConfig(**_LLAMA_LIKE),
    "olmo2": transformers.Olmo2Config(**_LLAMA_LIKE),
    "gpt_neox": transformers.GPTNeoXConfig(**_NEOX, use_parallel_residual=True, rotary_pct=0.25),
    "gpt_neox_sequential": transformers.GPTNeoXConfig(**_NEOX, use_parallel_residual=False),
    "gpt2": transformers.GPT2Config(vocab_size=VOCAB, n_embd=HIDDEN, n_layer=LAYERS, n_head=4, n_positions=128, **_TOKENS),
}

FAMILIES = sorted(CONFIGS)


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: the test uses a GPU where there is one; every other test sees none")
    if os.environ.get("CKPT_TRACE_CANARY"):  # .ci/latest: show what pyproject's filters ignore, instead of hiding it
        for line in ("default::DeprecationWarning:torch.*", "default::FutureWarning:transformers.*"):
            config.addinivalue_line("filterwarnings", line)


class _Deprecations(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        if "deprecat" in record.getMessage().lower():
            self.messages.append(record.getMessage())


@pytest.fixture(autouse=True)
def private_home(tmp_path_factory, monkeypatch):
    """ckpt-trace's own cache (file hashes, download ledger, micro suites) in a temporary folder, never the user's."""
    monkeypatch.setenv("CKPT_TRACE_HOME", str(tmp_path_factory.getbasetemp() / "ckpt-trace-home"))


@pytest.fixture(autouse=True)
def cpu_only(request, monkeypatch):
    """On a machine with a GPU, every test but those marked `gpu` sees none: `--device auto`, `--dtype auto` and
    accelerate's `auto` map take the CPU in float32, as the references the tests compare with do."""
    if request.node.get_closest_marker("gpu") is None and torch.cuda.is_available():
        monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)


@pytest.fixture(autouse=True)
def no_deprecated_calls():
    """Fail a test in which transformers logs a deprecation (it logs some instead of warning, once per process)."""
    handler = _Deprecations()
    logger = logging.getLogger("transformers")  # it does not propagate, so pytest's capture never sees it
    logger.addHandler(handler)
    try:
        yield
    finally:
        logger.removeHandler(handler)
    assert not handler.messages, handler.messages


def make_model(family: str, seed: int = 0, dtype: torch.dtype = torch.float32, **config_changes):
    """A tiny random causal LM of one family, in eval mode; `config_changes` are set on its config first."""
    torch.manual_seed(seed)
    config = copy.deepcopy(CONFIGS[family])  # the model keeps its config, and pruning edits it
    for key, value in config_changes.items():
        setattr(config, key, value)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=dtype)
    # Random init makes layer norms identity and some biases zero; perturb every parameter so
    # that each tap carries a distinct, non-trivial signal.
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn_like(param) * 0.05)
    return model.eval()


@pytest.fixture(params=FAMILIES)
def family(request) -> str:
    return request.param


def random_ids(n: int, length: int, seed: int = 0) -> list[list[int]]:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (n, length), generator=generator).tolist()


def write_tokenizer(path: Path, bos: bool = False, eos: bool = True) -> None:
    """Save a small byte-level BPE tokenizer, trained on a little pydoc text, into `path`.

    With `bos`, its template puts ``<bos>`` before every text, as Llama's, Gemma's and OLMo-2's do;
    without `eos`, it has no EOS token.
    """
    from pydoc_data.topics import topics

    from tokenizers import processors
    from transformers import PreTrainedTokenizerFast

    from ckpt_trace.microsuite.suite import byte_level_bpe

    tokenizer = byte_level_bpe([topics[k] for k in sorted(topics)[:20]], VOCAB, ("<|endoftext|>", "<bos>"))
    if bos:
        tokenizer.post_processor = processors.TemplateProcessing(
            single="<bos> $A", special_tokens=[("<bos>", tokenizer.token_to_id("<bos>"))])
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<|endoftext|>" if eos else None,
                                   bos_token="<bos>" if bos else None)
    fast.save_pretrained(path)


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("tokenizer")
    write_tokenizer(path)
    return path


def save_checkpoint(path: Path, family: str = "llama", seed: int = 0, tokenizer_dir: Path | None = None) -> Path:
    """Save a tiny random checkpoint (and optionally a tokenizer) as a Hugging Face model directory."""
    make_model(family, seed).save_pretrained(path)
    if tokenizer_dir is not None:
        for file in tokenizer_dir.iterdir():
            (path / file.name).write_bytes(file.read_bytes())
    return path


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path
