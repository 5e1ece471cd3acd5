"""Loading checkpoints with transformers on the chosen device and dtype."""

from __future__ import annotations

import json
import os
import pickle
from pathlib import Path

import torch

from .adapters import adapter_for_type
from .errors import ConfigError, SourceError
from .surgery import PRUNED_KEY, drop_modules_, module_prefixes, pruned_record

DEVICES = "auto, cpu, cuda or cuda:N"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(name: str = "auto") -> torch.device:
    """`auto` is the GPU when there is one, else the CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cpu" or name == "cuda" or (name.startswith("cuda:") and name[5:].isdigit()):
        if name != "cpu" and not torch.cuda.is_available():
            raise ConfigError(f"device {name!r} asked for, but CUDA is not available here; use --device cpu")
        return torch.device(name)
    raise ConfigError(f"unknown device {name!r}; use {DEVICES}")


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """`auto` is bfloat16 on a GPU that supports it, else float32."""
    if name == "auto":
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    if name not in DTYPES:
        raise ConfigError(f"unknown dtype {name!r}; use auto, {', '.join(DTYPES)}")
    return DTYPES[name]


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def max_positions(config: dict) -> int | None:
    """The longest sequence a model's config allows, where it says."""
    for key in ("max_position_embeddings", "n_positions"):
        if isinstance(config.get(key), int):
            return config[key]
    return None


def read_config(path: str | os.PathLike) -> dict:
    """The raw config.json of a model directory, or a clear error if it is no model."""
    file = Path(path) / "config.json"
    if not file.is_file():
        raise SourceError(f"{str(path)!r} is not a model directory: it has no config.json")
    try:
        return json.loads(file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise SourceError(f"cannot read {file}: {err}") from err


def load_model(path: str | os.PathLike, device: torch.device, dtype: torch.dtype, trust_remote_code: bool = False):
    """A causal LM from a local directory, in eval mode, checked for a supported architecture first."""
    from transformers import AutoModelForCausalLM

    config = read_config(path)
    adapter_for_type(config.get("model_type"))
    if config.get(PRUNED_KEY):
        return load_pruned(path, device, dtype, trust_remote_code)
    try:
        # weights_only: .bin files go through torch's restricted unpickler, which runs no code.
        model = AutoModelForCausalLM.from_pretrained(
            path, dtype=dtype, trust_remote_code=trust_remote_code, weights_only=True
        )
    except (OSError, ValueError, RuntimeError, pickle.UnpicklingError) as err:
        raise SourceError(f"cannot load the model in {str(path)!r}: {err}") from err
    return model.to(device).eval()


def load_pruned(path: str | os.PathLike, device: str | torch.device = "cpu", dtype: torch.dtype | None = None,
                trust_remote_code: bool = False) -> torch.nn.Module:
    """Load a model saved with attention or MLP layers dropped (or none); they stay dropped, and every other weight must be there."""
    import transformers
    from transformers import AutoModelForCausalLM

    config = transformers.AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    record = pruned_record(config)
    verbosity = transformers.logging.get_verbosity()
    if any(record.values()):  # the dropped modules' weights are missing by design; they are checked below
        transformers.logging.set_verbosity_error()
    try:
        model, info = AutoModelForCausalLM.from_pretrained(
            path, dtype=dtype, trust_remote_code=trust_remote_code, weights_only=True, output_loading_info=True
        )
    finally:
        transformers.logging.set_verbosity(verbosity)
    prefixes = module_prefixes(model, record)
    unexpected = [k for k in info.get("missing_keys", []) if not k.startswith(tuple(prefixes))]
    if unexpected:
        raise SourceError(f"{str(path)!r} lacks weights that were not dropped: {', '.join(sorted(unexpected)[:5])}")
    drop_modules_(model, record["attention"], record["mlp"])
    return model.to(device).eval()


def load_tokenizer(path: str | os.PathLike):
    """The tokenizer saved beside a model, or None when there is none."""
    from transformers import AutoTokenizer

    names = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model")
    if not any((Path(path) / name).is_file() for name in names):
        return None
    try:
        return AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as err:
        raise SourceError(f"cannot load the tokenizer in {str(path)!r}: {err}") from err
