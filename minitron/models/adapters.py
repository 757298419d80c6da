"""Per-family facts that pruning needs: where the modules are, which axis of every weight is
which, and which config entries are per layer.

Llama, Mistral, Qwen2 and Qwen3 share one module layout in transformers; they differ in
q/k/v biases (Qwen2), per-head q/k norms (Qwen3) and sliding-window attention (Mistral for all
layers, Qwen2 per layer through `layer_types` / `max_window_layers`). A family whose layout
differs (fused qkv, LayerNorm with bias, scaled embeddings) gets its own entry here.

Axis names used in `axes`: `hidden` (model width), `q` (query heads x head_dim), `kv` (key/value
heads x head_dim), `mlp` (FFN neurons); None leaves a dimension whole.
"""
import re
from dataclasses import dataclass
from typing import Callable, Dict, Optional, Sequence, Tuple

from minitron.config import ConfigError

_LAYER = "model.layers.{i}."

_LLAMA_AXES: Dict[str, Tuple[Optional[str], ...]] = {
    "model.embed_tokens.weight": (None, "hidden"),
    "model.norm.weight": ("hidden",),
    "lm_head.weight": (None, "hidden"),
    _LAYER + "input_layernorm.weight": ("hidden",),
    _LAYER + "post_attention_layernorm.weight": ("hidden",),
    _LAYER + "self_attn.q_proj.weight": ("q", "hidden"),
    _LAYER + "self_attn.q_proj.bias": ("q",),
    _LAYER + "self_attn.k_proj.weight": ("kv", "hidden"),
    _LAYER + "self_attn.k_proj.bias": ("kv",),
    _LAYER + "self_attn.v_proj.weight": ("kv", "hidden"),
    _LAYER + "self_attn.v_proj.bias": ("kv",),
    _LAYER + "self_attn.o_proj.weight": ("hidden", "q"),
    _LAYER + "self_attn.o_proj.bias": ("hidden",),
    _LAYER + "mlp.gate_proj.weight": ("mlp", "hidden"),
    _LAYER + "mlp.gate_proj.bias": ("mlp",),
    _LAYER + "mlp.up_proj.weight": ("mlp", "hidden"),
    _LAYER + "mlp.up_proj.bias": ("mlp",),
    _LAYER + "mlp.down_proj.weight": ("hidden", "mlp"),
    _LAYER + "mlp.down_proj.bias": ("hidden",),
}


@dataclass(frozen=True)
class FamilyAdapter:
    model_type: str
    axes: Dict[str, Tuple[Optional[str], ...]]
    """Parameter name (with `{i}` for the layer index) -> the axis of each of its dimensions."""
    per_layer_config_keys: Sequence[str] = ()
    """Config entries that are lists with one item per layer; depth pruning keeps the kept layers'."""
    adjust_config: Optional[Callable] = None
    """fn(teacher_config, student_config, kept_layers): any other config fix-up after depth pruning."""
    layers: str = "model.layers"
    attn_output: str = "self_attn.o_proj"
    """Module whose input is the concatenated per-head attention output."""
    mlp_output: str = "mlp.down_proj"
    """Module whose input is the post-activation MLP output (act(gate) * up)."""
    mlp_preactivation: str = "mlp.gate_proj"
    """Module whose output is the pre-activation of the MLP neurons."""
    norms: Tuple[str, ...] = ("input_layernorm", "post_attention_layernorm")
    final_norm: str = "model.norm"

    def axes_of(self, name: str) -> Tuple[Tuple[Optional[str], ...], Optional[int]]:
        """(axes, layer index or None) for a parameter or buffer name; KeyError if unknown."""
        m = re.match(r"model\.layers\.(\d+)\.(.*)$", name)
        if m:
            return self.axes[_LAYER + m.group(2)], int(m.group(1))
        return self.axes[name], None


def _qwen2_window_layers(teacher, student, kept_layers) -> None:
    # Qwen2 derives layer_types from max_window_layers (full attention below it, sliding at and
    # above); tools that still read max_window_layers (vLLM) must see the same split.
    limit = getattr(teacher, "max_window_layers", None)
    if limit is not None:
        student.max_window_layers = sum(1 for i in kept_layers if i < limit)


ADAPTERS: Dict[str, FamilyAdapter] = {
    "llama": FamilyAdapter("llama", _LLAMA_AXES),
    "mistral": FamilyAdapter("mistral", _LLAMA_AXES),
    "qwen2": FamilyAdapter("qwen2", _LLAMA_AXES, per_layer_config_keys=("layer_types",),
                           adjust_config=_qwen2_window_layers),
    "qwen3": FamilyAdapter("qwen3", {**_LLAMA_AXES,
                                     _LAYER + "self_attn.q_norm.weight": (None,),
                                     _LAYER + "self_attn.k_norm.weight": (None,)},
                           per_layer_config_keys=("layer_types",),
                           adjust_config=_qwen2_window_layers),
}


def adapter_for(hf_config, key: str = "model.path") -> FamilyAdapter:
    model_type = getattr(hf_config, "model_type", None)
    if model_type not in ADAPTERS:
        raise ConfigError(f"{key}: model type {model_type!r} has no pruning adapter; "
                          f"supported: {', '.join(sorted(ADAPTERS))}")
    return ADAPTERS[model_type]
