"""Where each architecture keeps its residual stream, as data.

An adapter names, for one family of Hugging Face models, the list of decoder layers and
the two sub-modules whose outputs are exactly what each layer adds to the residual
stream: the attention delta and the MLP delta. Together with the residual style it is
all the scorer needs; no modeling code is copied.

Module names do not mean the same thing across families: Llama's
``post_attention_layernorm`` is the MLP's *input* norm, while Gemma's and OLMo-2's norm
the attention *output* before it is added. So each adapter names its taps explicitly.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from torch import nn

from ..errors import UnsupportedArchitectureError

ResidualStyle = Literal["sequential", "parallel", "post-norm"]


@dataclass(frozen=True)
class Adapter:
    """The residual-stream layout of one model family."""

    name: str
    """Family name shown to users."""
    layers: str
    """Path of the decoder-layer list inside the base model (``model.base_model``)."""
    attention: str
    """Path, inside one decoder layer, of the module whose output is the attention delta."""
    mlp: str
    """Path, inside one decoder layer, of the module whose output is the MLP delta."""
    post_norm: bool = False
    """True when each delta is the output of a norm applied to the sub-layer's output."""
    parallel_flag: str | None = None
    """Config attribute that, when true, makes attention and MLP read the same input."""
    attention_module: str = ""
    """Path of the attention module itself, when the delta is taken after it (by a norm); default: `attention`."""
    mlp_module: str = ""
    """Path of the MLP module itself, when the delta is taken after it; default: `mlp`."""

    def module_path(self, kind: str) -> str:
        """The path, inside a decoder layer, of the `attention` or `mlp` module that pruning replaces."""
        return (self.attention_module or self.attention) if kind == "attention" else (self.mlp_module or self.mlp)

    def style(self, config) -> ResidualStyle:
        """The residual style of a model with this config."""
        if self.parallel_flag and getattr(config, self.parallel_flag, False):
            return "parallel"
        return "post-norm" if self.post_norm else "sequential"


_PRE_NORM = dict(layers="layers", attention="self_attn", mlp="mlp")
_SANDWICH = dict(
    layers="layers", attention="post_attention_layernorm", mlp="post_feedforward_layernorm", post_norm=True,
    attention_module="self_attn", mlp_module="mlp",
)

ADAPTERS: dict[str, Adapter] = {
    # Pre-norm, sequential: h = x + attn(norm(x)); y = h + mlp(norm(h)).
    "llama": Adapter("Llama", **_PRE_NORM),
    "mistral": Adapter("Mistral", **_PRE_NORM),
    "qwen2": Adapter("Qwen2", **_PRE_NORM),
    "qwen3": Adapter("Qwen3", **_PRE_NORM),
    # OLMo-1 is Llama-shaped with a non-parametric LayerNorm.
    "olmo": Adapter("OLMo", **_PRE_NORM),
    # Gemma-2 and Gemma-3 wrap each sub-layer in a sandwich of norms; the outer one is the delta.
    "gemma2": Adapter("Gemma-2", **_SANDWICH),
    "gemma3_text": Adapter("Gemma-3 (text)", **_SANDWICH),
    # OLMo-2 applies RMSNorm to each sub-layer's output before the residual add, and has no input norms.
    "olmo2": Adapter("OLMo-2", **_SANDWICH),
    # GPT-NeoX (Pythia) adds attn(ln1(x)) and mlp(ln2(x)) to the same x when use_parallel_residual is set.
    "gpt_neox": Adapter("GPT-NeoX", layers="layers", attention="attention", mlp="mlp", parallel_flag="use_parallel_residual"),
    # GPT-2 is pre-norm and sequential; attn and mlp end with their residual dropout.
    "gpt2": Adapter("GPT-2", layers="h", attention="attn", mlp="mlp"),
}


def supported() -> str:
    """The supported ``model_type`` values, as one comma-separated string."""
    return ", ".join(sorted(ADAPTERS))


def adapter_for_type(model_type: str | None) -> Adapter:
    """The adapter for a config's ``model_type``, or an error naming the supported ones."""
    try:
        return ADAPTERS[model_type]  # type: ignore[index]
    except KeyError:
        raise UnsupportedArchitectureError(
            f"unsupported architecture {model_type!r}; supported model types: {supported()}"
        ) from None


@dataclass(frozen=True)
class LayerTaps:
    """One decoder layer and the two modules whose outputs are its residual deltas."""

    block: nn.Module
    attention: nn.Module
    mlp: nn.Module


@dataclass(frozen=True)
class ResidualLayout:
    """The taps of every decoder layer of one loaded model."""

    adapter: Adapter
    style: ResidualStyle
    layers: tuple[LayerTaps, ...]

    @property
    def parallel(self) -> bool:
        return self.style == "parallel"


def locate(model: nn.Module) -> ResidualLayout:
    """Find the decoder layers and residual taps of a loaded causal LM or base model."""
    config = model.config
    adapter = adapter_for_type(getattr(config, "model_type", None))
    base = getattr(model, "base_model", model)
    layer_list = base.get_submodule(adapter.layers)
    taps = tuple(
        LayerTaps(layer, layer.get_submodule(adapter.attention), layer.get_submodule(adapter.mlp))
        for layer in layer_list
    )
    return ResidualLayout(adapter, adapter.style(config), taps)
