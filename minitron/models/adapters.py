"""Per-family facts that pruning and distillation need: where the modules are, which axis of
every weight is which, which config entries are per layer, and how logits come from the final
hidden states. Everything family-specific lives here; the rest of minitron reads an adapter.

Adding a family is one `ADAPTERS` entry. It must state:
  - `axes`: every parameter the transformers model has (a name not listed is refused when the
    teacher is sized), with the axis of each dimension:
      `hidden` model width, `q` query heads x head_dim, `kv` key/value heads x head_dim,
      `mlp` FFN neurons, `expert` experts and `moe` each expert's FFN neurons (mixtures of
      experts), None for a dimension that is never pruned (the vocabulary, head_dim of per-head
      norms). A fused weight names its parts in order: Phi-3's qkv_proj rows are
      ("q", "kv", "kv"), its gate_up_proj rows ("mlp", "mlp").
  - the modules importance hooks read: `attn_output` (input = concatenated per-head outputs),
    `mlp_output` (input = post-activation neurons), `mlp_preactivation` (output = pre-activation
    neurons, cut out of a fused output by `preactivation`), and `norms`, the two per-layer norms
    whose outputs are the residual stream entering attention and the MLP (embedding channels).
  - `per_layer_config_keys` (lists depth pruning must follow) and `adjust_config` for any other
    config entry that depends on the kept layers.
  - `adjust_weights` when a student of a narrower width must change weights to compute what the
    teacher computes (Gemma's embedding scale follows hidden_size).
  - `logit_softcap`: the final logit soft-cap, when logits are not just lm_head(h).
  - `moe`: for a mixture of experts, the config entries with the expert count and width and the
    router and experts modules; `check_config` for layouts the entry does not cover.
Then add a tiny config to tests/prune/random_models.py: the slicing, export and generation tests
run over every family listed there.

Llama, Mistral, Qwen2 and Qwen3 share one module layout; they differ in q/k/v biases (Qwen2),
per-head q/k norms (Qwen3) and sliding-window attention (Mistral for all layers, Qwen2 per layer).
"""
import math
import re
from dataclasses import dataclass
from typing import Callable, Dict, Optional, Sequence, Tuple, Union

import torch

from minitron.config import ConfigError

_LAYER = "model.layers.{i}."

Axis = Union[None, str, Tuple[str, ...]]
"""One dimension: never pruned (None), one axis, or a fused dimension made of several axes'
ranges one after another."""

_OUTER = {
    "model.embed_tokens.weight": (None, "hidden"),
    "model.norm.weight": ("hidden",),
    "lm_head.weight": (None, "hidden"),
}
_ATTENTION = {
    _LAYER + "self_attn.q_proj.weight": ("q", "hidden"),
    _LAYER + "self_attn.q_proj.bias": ("q",),
    _LAYER + "self_attn.k_proj.weight": ("kv", "hidden"),
    _LAYER + "self_attn.k_proj.bias": ("kv",),
    _LAYER + "self_attn.v_proj.weight": ("kv", "hidden"),
    _LAYER + "self_attn.v_proj.bias": ("kv",),
    _LAYER + "self_attn.o_proj.weight": ("hidden", "q"),
    _LAYER + "self_attn.o_proj.bias": ("hidden",),
}
_QK_NORMS = {
    _LAYER + "self_attn.q_norm.weight": (None,),
    _LAYER + "self_attn.k_norm.weight": (None,),
}
_GATED_MLP = {
    _LAYER + "mlp.gate_proj.weight": ("mlp", "hidden"),
    _LAYER + "mlp.gate_proj.bias": ("mlp",),
    _LAYER + "mlp.up_proj.weight": ("mlp", "hidden"),
    _LAYER + "mlp.up_proj.bias": ("mlp",),
    _LAYER + "mlp.down_proj.weight": ("hidden", "mlp"),
    _LAYER + "mlp.down_proj.bias": ("hidden",),
}
_TWO_NORMS = {
    _LAYER + "input_layernorm.weight": ("hidden",),
    _LAYER + "post_attention_layernorm.weight": ("hidden",),
}
_LLAMA_AXES: Dict[str, Tuple[Axis, ...]] = {**_OUTER, **_ATTENTION, **_GATED_MLP, **_TWO_NORMS}


@dataclass(frozen=True)
class MixtureOfExperts:
    """Where a sparse MLP keeps its experts. The layout transformers uses for Mixtral and
    Qwen3-MoE: a router whose weight has one row per expert and returns (logits, top-k weights,
    top-k expert indices), and an experts module called with (tokens, top-k indices, top-k
    weights) that holds every expert's `gate_up_proj` [E, 2F, H] and `down_proj` [E, H, F]."""
    num_experts_key: str
    """Config entry with the number of experts."""
    ffn_key: str
    """Config entry with each expert's FFN width."""
    router: str = "mlp.gate"
    experts: str = "mlp.experts"
    module: str = ""
    """The transformers module (models.<module>.modeling_<module>) with the family's router loss."""

    def router_aux_loss(self, config, router_logits) -> torch.Tensor:
        """The family's load-balancing loss over the layers' router logits (unscaled: the caller
        multiplies by config.router_aux_loss_coef, as the family's own forward does)."""
        import importlib

        family = importlib.import_module(f"transformers.models.{self.module}.modeling_{self.module}")
        return family.load_balancing_loss_func(router_logits, getattr(config, self.num_experts_key),
                                               config.num_experts_per_tok)


@dataclass(frozen=True)
class FamilyAdapter:
    model_type: str
    axes: Dict[str, Tuple[Axis, ...]]
    """Parameter name (with `{i}` for the layer index) -> the axis of each of its dimensions."""
    per_layer_config_keys: Sequence[str] = ()
    """Config entries that are lists with one item per layer; depth pruning keeps the kept layers'."""
    adjust_config: Optional[Callable] = None
    """fn(teacher_config, student_config, kept_layers): any other config fix-up after depth pruning."""
    adjust_weights: Optional[Callable] = None
    """fn(teacher shape, student): in place, after the kept weights are copied in."""
    layers: str = "model.layers"
    attn_output: str = "self_attn.o_proj"
    """Module whose input is the concatenated per-head attention output."""
    mlp_output: str = "mlp.down_proj"
    """Module whose input is the post-activation MLP output (act(gate) * up)."""
    mlp_preactivation: str = "mlp.gate_proj"
    """Module whose output holds the pre-activation of the MLP neurons."""
    preactivation: Callable[[torch.Tensor], torch.Tensor] = lambda out: out
    """The pre-activation neurons from that module's output (a fused gate_up output's first half)."""
    norms: Tuple[str, str] = ("input_layernorm", "post_attention_layernorm")
    """The per-layer norms applied to the residual stream before attention and before the MLP."""
    final_norm: str = "model.norm"
    logit_softcap: Callable[[object], Optional[float]] = lambda config: None
    """fn(config): c when logits are c * tanh(lm_head(h) / c), else None."""
    moe: Optional[MixtureOfExperts] = None
    """Set for a family whose every MLP is a mixture of experts (then no dense `mlp` axis)."""
    check_config: Optional[Callable] = None
    """fn(config) -> a reason this checkpoint's layout is not supported, or None."""

    def axes_of(self, name: str) -> Tuple[Tuple[Axis, ...], Optional[int]]:
        """(axes, layer index or None) for a parameter name; KeyError if unknown."""
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


@torch.no_grad()
def _gemma_embedding_scale(teacher, student) -> None:
    """Gemma multiplies the embeddings by sqrt(hidden_size), so a narrower student would scale them
    by less than its teacher did. The embedding takes the ratio k = sqrt(teacher / student width),
    restoring the teacher's residual stream; with tied embeddings the output projection grows by k
    too, which the final norm's weight (applied as 1 + w) absorbs by shrinking by k."""
    k = math.sqrt(teacher.hidden_size / student.config.hidden_size)
    if k == 1.0:
        return
    student.get_input_embeddings().weight.mul_(k)
    if student.config.tie_word_embeddings:
        norm = student.model.norm.weight
        norm.copy_((1 + norm.float()) / k - 1)


_GEMMA_AXES = {**_LLAMA_AXES, **_QK_NORMS,
               _LAYER + "pre_feedforward_layernorm.weight": ("hidden",),
               _LAYER + "post_feedforward_layernorm.weight": ("hidden",)}
_GEMMA = dict(per_layer_config_keys=("layer_types",), adjust_weights=_gemma_embedding_scale,
              # post_attention_layernorm normalises the attention output, not the residual stream
              norms=("input_layernorm", "pre_feedforward_layernorm"),
              logit_softcap=lambda config: getattr(config, "final_logit_softcapping", None))

_NEMOTRON_AXES = {
    **_OUTER, **_ATTENTION, **_TWO_NORMS,
    **{name: axes for name, axes in _GATED_MLP.items() if ".gate_proj." not in name},  # up, act, down
    "model.norm.bias": ("hidden",),
    _LAYER + "input_layernorm.bias": ("hidden",),
    _LAYER + "post_attention_layernorm.bias": ("hidden",),
}

_PHI3_AXES = {
    **_OUTER, **_TWO_NORMS,
    _LAYER + "self_attn.qkv_proj.weight": (("q", "kv", "kv"), "hidden"),
    _LAYER + "self_attn.o_proj.weight": ("hidden", "q"),
    _LAYER + "mlp.gate_up_proj.weight": (("mlp", "mlp"), "hidden"),
    _LAYER + "mlp.down_proj.weight": ("hidden", "mlp"),
}

_EXPERTS = {
    _LAYER + "mlp.gate.weight": ("expert", "hidden"),  # the router: one row per expert
    _LAYER + "mlp.experts.gate_up_proj": ("expert", ("moe", "moe"), "hidden"),
    _LAYER + "mlp.experts.down_proj": ("expert", "hidden", "moe"),
}


def _qwen3_moe_dense_layers(config) -> Optional[str]:
    if getattr(config, "mlp_only_layers", None) or getattr(config, "decoder_sparse_step", 1) != 1:
        return "dense MLP layers between the sparse ones (mlp_only_layers, decoder_sparse_step) are not supported"
    return None


ADAPTERS: Dict[str, FamilyAdapter] = {
    "llama": FamilyAdapter("llama", _LLAMA_AXES),
    "mistral": FamilyAdapter("mistral", _LLAMA_AXES),
    "qwen2": FamilyAdapter("qwen2", _LLAMA_AXES, per_layer_config_keys=("layer_types",),
                           adjust_config=_qwen2_window_layers),
    "qwen3": FamilyAdapter("qwen3", {**_LLAMA_AXES, **_QK_NORMS}, per_layer_config_keys=("layer_types",),
                           adjust_config=_qwen2_window_layers),
    # Non-gated squared-ReLU MLP, LayerNorm with bias and the weight applied as 1 + w.
    "nemotron": FamilyAdapter("nemotron", _NEMOTRON_AXES, mlp_preactivation="mlp.up_proj"),
    "gemma2": FamilyAdapter("gemma2", _GEMMA_AXES, **_GEMMA),
    "gemma3_text": FamilyAdapter("gemma3_text", _GEMMA_AXES, **_GEMMA),
    "phi3": FamilyAdapter("phi3", _PHI3_AXES, mlp_preactivation="mlp.gate_up_proj",
                          preactivation=lambda out: out.chunk(2, dim=-1)[0]),
    "mixtral": FamilyAdapter("mixtral", {**_OUTER, **_ATTENTION, **_TWO_NORMS, **_EXPERTS},
                             moe=MixtureOfExperts("num_local_experts", "intermediate_size", module="mixtral")),
    "qwen3_moe": FamilyAdapter("qwen3_moe", {**_OUTER, **_ATTENTION, **_QK_NORMS, **_TWO_NORMS, **_EXPERTS},
                               per_layer_config_keys=("layer_types",),
                               moe=MixtureOfExperts("num_experts", "moe_intermediate_size", module="qwen3_moe"),
                               check_config=_qwen3_moe_dense_layers),
}


def logit_softcap(hf_config) -> Optional[float]:
    """The family's final logit soft-cap (the head function of the fused losses): None when
    logits are lm_head(final hidden state). Only families with an adapter reach the fused path."""
    return ADAPTERS[hf_config.model_type].logit_softcap(hf_config)


def adapter_for(hf_config, key: str = "model.path") -> FamilyAdapter:
    model_type = getattr(hf_config, "model_type", None)
    if model_type not in ADAPTERS:
        raise ConfigError(f"{key}: model type {model_type!r} has no pruning adapter; "
                          f"supported: {', '.join(sorted(ADAPTERS))}")
    adapter = ADAPTERS[model_type]
    reason = adapter.check_config(hf_config) if adapter.check_config is not None else None
    if reason:
        raise ConfigError(f"{key}: this {model_type} checkpoint cannot be pruned: {reason}")
    return adapter
