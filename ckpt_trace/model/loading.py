"""Loading checkpoints with transformers on the chosen device and dtype."""

from __future__ import annotations

import os
import re
from pathlib import Path

import torch

from ..errors import ConfigError, SourceError, one_line
from ..paths import json_object
from .adapters import adapter_for_type
from .portable import PREFIX, stock_config, stock_type
from .surgery import drop_modules_, layer_list, module_prefixes, pruned_record

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
        return json_object(file)
    except (OSError, ValueError) as err:
        raise SourceError(f"{file} is not a model config: {err}") from err


def _names(keys: list[str]) -> str:
    return ", ".join(sorted(keys)[:4]) + (f" and {len(keys) - 4} more" if len(keys) > 4 else "")


def load_errors() -> tuple[type[BaseException], ...]:
    """What loading raises for weight files that are cut short, empty or not weights, each library its own kind
    (transformers OSError or ValueError, torch RuntimeError, EOFError or an unpickling error, safetensors its own),
    and for the device running out of memory (RuntimeError); a bug is none of these."""
    from pickle import UnpicklingError

    from safetensors import SafetensorError

    return (OSError, ValueError, RuntimeError, EOFError, UnpicklingError, SafetensorError)


def load_model(path: str | os.PathLike, device: str | torch.device = "cpu", dtype: torch.dtype | None = None,
               trust_remote_code: bool = False, device_map: str | dict | None = None) -> torch.nn.Module:
    """A causal LM from a local directory, in eval mode, its weights checked against its config first.

    The weights are read straight onto `device` (no full copy on the CPU first), or placed by `device_map`:
    `auto`, `balanced` or `sequential` over every GPU (then the CPU) with accelerate, or an explicit map of module
    names to devices, for a model larger than one GPU.

    Every parameter the config calls for must be in the weight files with its shape, and the files
    must hold no decoder layer the config lacks: a model is never scored with random initialisation
    or with layers left out. Attention and MLP layers dropped by pruning (recorded in the config)
    are the exception: they stay dropped.

    Raises `SourceError` for a folder that is no model or weights that are damaged or do not fit the config (the
    device running out of memory too, as its cause), `UnsupportedArchitectureError` for a family without adapter.
    """
    import transformers
    from transformers import AutoModelForCausalLM

    raw = read_config(path)
    adapter = adapter_for_type(stock_type(raw))
    record = pruned_record(raw)
    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()  # what transformers would warn of is checked, and raised, below
    try:
        config = stock_config(path, raw, trust_remote_code)
        model_class = _dropping_class(config, record, trust_remote_code) if any(record.values()) else None
        mapped = _mapped_safely(path)
        # weights_only: .bin files go through torch's restricted unpickler, which runs no code.
        model, info = (model_class or AutoModelForCausalLM).from_pretrained(
            path, config=config, dtype=dtype, trust_remote_code=trust_remote_code, weights_only=True,
            output_loading_info=True,
            device_map=device_map if device_map is not None else str(torch.device(device)),
            disable_mmap=not mapped,
        )
        if not mapped and any(Path(path).glob("pytorch_model*.bin")):
            _unmap_(model)
    except load_errors() as err:
        raise SourceError(f"cannot load the weights in {str(path)!r}: {one_line(err, 300)}") from err
    finally:
        transformers.logging.set_verbosity(verbosity)
    prefixes = tuple(module_prefixes(model, record))
    missing = [k for k in info.get("missing_keys", []) if not k.startswith(prefixes)]
    if missing:
        raise SourceError(f"the weights in {str(path)!r} lack parameters its config calls for (they would be random): "
                          f"{_names(missing)}")
    if info.get("mismatched_keys"):
        raise SourceError(f"the weights in {str(path)!r} do not fit its config: {_names([str(k) for k in info['mismatched_keys']])}")
    n_layers = len(layer_list(model)[2])
    pattern = re.compile(rf"(?:^|\.){re.escape(adapter.layers)}\.(\d+)\.")
    extra = [k for k in info.get("unexpected_keys", []) if (m := pattern.search(k)) and int(m[1]) >= n_layers]
    if extra:
        raise SourceError(f"the weights in {str(path)!r} hold decoder layers its config ({n_layers} layers) lacks: "
                          f"{_names(extra)}")
    if n_layers == 0:
        raise SourceError(f"the model in {str(path)!r} has no decoder layers to score")
    drop_modules_(model, record["attention"], record["mlp"])
    if model_class is not None:
        model.__class__ = model_class.__base__  # the library's class, which pickles and compares as it should
    return model.eval()


def _mapped_safely(path: str | os.PathLike) -> bool:
    """Whether the weight files of a model directory may be memory-mapped: those of a Hugging Face cache snapshot
    may (links to blobs that huggingface_hub writes whole, then renames, and never rewrites). Others may be rewritten
    in place while they are read (a training run saving over a checkpoint, a `cp`), which under a map kills the
    process with a bus error, during the load or long after it (a model on the CPU in the files' dtype keeps
    reading the map): they are read into memory instead, at the cost of holding the checkpoint there once."""
    files = [p for p in Path(path).iterdir() if p.name.endswith((".safetensors", ".bin"))]
    return bool(files) and all(p.is_symlink() and p.resolve().parent.name == "blobs" for p in files)


def _unmap_(model: torch.nn.Module) -> None:
    """Copy into memory the tensors of a model on the CPU that torch may have left mapped from ``.bin`` files
    (it maps those it loads, whatever transformers is told)."""
    with torch.no_grad():
        for tensor in [*model.parameters(), *model.buffers()]:
            if tensor.device.type == "cpu":
                tensor.data = tensor.data.clone()


def _dropping_class(config, record: dict[str, list[int]], trust_remote_code: bool):
    """The model class of a checkpoint's `config`, made to drop the recorded attention and MLP layers as it is
    built: transformers builds a model on the meta device before it reads any weight, so the dropped modules are
    never allocated, never initialized and never placed by a device map. None where the class comes with the
    checkpoint's own code (the model is then loaded whole and its modules dropped after)."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    remote = trust_remote_code and "AutoModelForCausalLM" in (getattr(config, "auto_map", None) or {})
    if remote or type(config) not in MODEL_FOR_CAUSAL_LM_MAPPING:
        return None
    base = MODEL_FOR_CAUSAL_LM_MAPPING[type(config)]

    def __init__(self, config, *args, **kwargs):
        base.__init__(self, config, *args, **kwargs)
        drop_modules_(self, record["attention"], record["mlp"])

    # Named as its base; `load_model` makes the loaded model an instance of the base again.
    return type(base.__name__, (base,), {"__init__": __init__, "__module__": base.__module__,
                                         "__qualname__": base.__qualname__})


def load_pruned(path: str | os.PathLike, device: str | torch.device = "cpu", dtype: torch.dtype | None = None,
                trust_remote_code: bool = False, device_map: str | dict | None = None) -> torch.nn.Module:
    """Load a model saved by ckpt-trace, pruned or not: `load_model`, with what was dropped still dropped."""
    return load_model(path, device, dtype, trust_remote_code, device_map)


def load_tokenizer(path: str | os.PathLike):
    """The tokenizer saved beside a model, or None when there is none."""
    from transformers import AutoTokenizer

    names = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model")
    if not any((Path(path) / name).is_file() for name in names):
        return None
    try:
        # A pruned folder's config is read as its family's, so that its own code is never asked for.
        raw = read_config(path) if (Path(path) / "config.json").is_file() else {}
        given = {"config": stock_config(path, raw)} if str(raw.get("model_type", "")).startswith(PREFIX) else {}
        return AutoTokenizer.from_pretrained(path, **given)
    except (OSError, ValueError) as err:
        raise SourceError(f"cannot load the tokenizer in {str(path)!r}: {err}") from err
