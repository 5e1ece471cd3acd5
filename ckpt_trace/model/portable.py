"""Pruned model folders that plain transformers loads right, on a machine without ckpt-trace.

A folder whose attention layers or MLPs were dropped holds weights that the stock class of its
family cannot take: loaded by it, the dropped modules would be built with random weights. Such a
folder ships its own modeling code, the way model repositories do: ``modeling_ckpt_trace_pruned.py``
(`ckpt_trace.model.dropped` verbatim, then a config class and a model class that subclass the
family's stock ones and put the stand-ins in place as the model is built), named by ``auto_map`` in
its config.json. Its model type is one of its own (``ckpt_trace_pruned_<family>``), so that
``AutoModelForCausalLM.from_pretrained(folder)`` without ``trust_remote_code=True`` refuses it
instead of loading another model. A block-dropped model is a plain model of its family and stays one.

ckpt-trace itself never runs the folder's code: it loads such a folder with the stock class (see
`ckpt_trace.model.loading`).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from string import Template

from ..paths import atomic_write_bytes, json_object
from . import dropped
from .adapters import adapter_for_type
from .surgery import pruned_record

PREFIX = "ckpt_trace_pruned_"
"""Model types of pruned folders: the prefix, then the family's own model type."""
CODE_FILE = "modeling_ckpt_trace_pruned.py"
CONFIG_CLASS = "CkptTracePrunedConfig"
MODEL_CLASS = "CkptTracePrunedForCausalLM"

TRANSFORMERS = 5
"""The transformers major version the folder's code needs (its cache layers and weight names are those of 5.x)."""

_CLASSES = Template('''

# The model of this folder: a $family model whose attention layers and MLPs listed under
# "ckpt_trace_pruned" in config.json are dropped (written by ckpt-trace $version with transformers $written_with).

import transformers as _transformers  # noqa: E402

if int(_transformers.__version__.split(".")[0]) < $major:
    raise ImportError(f"this pruned model needs transformers $major or later; this is {_transformers.__version__}")

from transformers import $stock_config as _StockConfig  # noqa: E402
from transformers import $stock_model as _StockModel  # noqa: E402


class $config_class(_StockConfig):
    model_type = "$model_type"


class $model_class(_StockModel):
    config_class = $config_class

    def __init__(self, config, *args, **kwargs):
        super().__init__(config, *args, **kwargs)
        swap_(self.base_model.get_submodule("$layers"), {"attention": "$attention", "mlp": "$mlp"},
              config.ckpt_trace_pruned)
''')


def stock_type(config: dict) -> str | None:
    """The model type of a config.json's family: its own, or for a pruned folder's the family's."""
    model_type = config.get("model_type")
    return model_type.removeprefix(PREFIX) if isinstance(model_type, str) else model_type


def stock_classes(model_type: str) -> tuple[type, type]:
    """The transformers config class and causal-LM class of a supported family."""
    from transformers import CONFIG_MAPPING
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    config_class = CONFIG_MAPPING[model_type]
    return config_class, MODEL_FOR_CAUSAL_LM_MAPPING[config_class]


def modeling_code(model_type: str) -> str:
    """The modeling code a pruned folder of this family ships."""
    import transformers

    from ..store import VERSION

    adapter = adapter_for_type(model_type)
    stock_config, stock_model = stock_classes(model_type)
    return Path(dropped.__file__).read_text(encoding="utf-8") + _CLASSES.substitute(
        family=adapter.name, version=VERSION, written_with=transformers.__version__, major=TRANSFORMERS,
        stock_config=stock_config.__name__, stock_model=stock_model.__name__,
        config_class=CONFIG_CLASS, model_class=MODEL_CLASS, model_type=PREFIX + model_type, layers=adapter.layers,
        attention=adapter.module_path("attention"), mlp=adapter.module_path("mlp"))


def save(model, folder: str | os.PathLike) -> None:
    """Save a model, pruned or not, as a folder that plain transformers loads right (see `make_portable`). Weights of
    a model with dropped attention layers or MLPs keep the names they have in memory: transformers renames a
    family's legacy names (GPT-NeoX's ``embed_out``) only for its stock classes, not for the folder's own."""
    portable = any(pruned_record(model.config).values())
    model.save_pretrained(folder, save_original_format=not portable)
    make_portable(folder)


def make_portable(folder: str | os.PathLike) -> bool:
    """Make a saved model folder load right with plain transformers: where attention layers or MLPs are dropped, write
    its modeling code and name it in config.json (model type, ``auto_map``, ``architectures``). Return whether it
    needed code; a folder without such drops is left as it is."""
    folder = Path(folder)
    config = json_object(folder / "config.json")
    if not any(pruned_record(config).values()):
        return False
    model_type = stock_type(config)
    code = modeling_code(model_type)
    module = CODE_FILE.removesuffix(".py")
    auto_map = {"AutoConfig": f"{module}.{CONFIG_CLASS}", "AutoModelForCausalLM": f"{module}.{MODEL_CLASS}"}
    config.update(model_type=PREFIX + model_type, architectures=[MODEL_CLASS], auto_map=auto_map)
    atomic_write_bytes(folder / CODE_FILE, code.encode())
    atomic_write_bytes(folder / "config.json", (json.dumps(config, indent=2, sort_keys=True) + "\n").encode())
    return True


def stock_config(path: str | os.PathLike, config: dict, trust_remote_code: bool = False):
    """The transformers config of a model folder as its family's stock class reads it: a pruned folder's own model
    type, ``auto_map`` and ``architectures`` are set aside, so its code is never run."""
    from transformers import AutoConfig

    if not str(config.get("model_type", "")).startswith(PREFIX):
        return AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    stock = {k: v for k, v in config.items() if k not in ("auto_map", "architectures", "model_type")}
    return stock_classes(stock_type(config))[0].from_dict(stock)
