"""The teacher's shape, the student's target shape, and the student's transformers config.

Everything here reads configs only, so targets are checked, and a dry run counts parameters,
before any weight is loaded.
"""
import copy
from dataclasses import asdict, dataclass
from typing import Optional, Sequence

from minitron.config import ConfigError, PruneExportConfig
from minitron.models.adapters import ADAPTERS, FamilyAdapter
from minitron.models.build import head_dim_of


@dataclass(frozen=True)
class Shape:
    hidden_size: int
    ffn_hidden_size: int
    """Dense MLP neurons per layer; 0 for a mixture of experts (its experts have `moe_ffn_hidden_size`)."""
    num_attention_heads: int
    num_key_value_heads: int
    num_layers: int
    num_experts: Optional[int] = None
    """Experts per layer; None for a dense model."""
    moe_ffn_hidden_size: Optional[int] = None

    def as_dict(self) -> dict:
        out = asdict(self)
        if self.num_experts is None:  # a dense model's shape reads as it always has
            del out["num_experts"], out["moe_ffn_hidden_size"]
        return out

    def export_keys(self) -> dict:
        """The prune.export keys that give this shape (a mixture of experts has no dense FFN key)."""
        out = self.as_dict()
        if self.num_experts is not None:
            del out["ffn_hidden_size"]
        return out


MOE_KEYS = ("num_experts", "moe_ffn_hidden_size")


def teacher_shape(hf_config) -> Shape:
    heads = hf_config.num_attention_heads
    common = dict(hidden_size=hf_config.hidden_size, num_attention_heads=heads,
                  num_key_value_heads=getattr(hf_config, "num_key_value_heads", None) or heads,
                  num_layers=hf_config.num_hidden_layers)
    family = ADAPTERS.get(getattr(hf_config, "model_type", None))
    if family is not None and family.moe is not None:
        return Shape(ffn_hidden_size=0, num_experts=getattr(hf_config, family.moe.num_experts_key),
                     moe_ffn_hidden_size=getattr(hf_config, family.moe.ffn_key), **common)
    return Shape(ffn_hidden_size=hf_config.intermediate_size, **common)


def resolve_target(teacher: Shape, export: PruneExportConfig) -> Shape:
    """The student's shape: unset keys keep the teacher's; every impossible target is a
    ConfigError naming its `prune.export.*` key."""
    moe = teacher.num_experts is not None
    for key in (MOE_KEYS if not moe else ("ffn_hidden_size",)):
        if getattr(export, key) is not None:
            hint = ("the teacher has no experts" if not moe
                    else "the teacher's MLPs are all experts; set prune.export.moe_ffn_hidden_size")
            raise ConfigError(f"prune.export.{key}: {hint}")
    values = {}
    for key in ("hidden_size", "num_attention_heads", "num_layers",
                *(MOE_KEYS if moe else ("ffn_hidden_size",))):
        target = getattr(export, key)
        have = getattr(teacher, key)
        if target is None:
            target = have
        if not 1 <= target <= have:
            raise ConfigError(f"prune.export.{key}: {target} must be between 1 and the teacher's {have}")
        values[key] = target
    if moe:
        values["ffn_hidden_size"] = 0
    heads = values["num_attention_heads"]
    kv = export.num_key_value_heads
    if kv is None:
        mha = teacher.num_key_value_heads == teacher.num_attention_heads
        kv = heads if mha else teacher.num_key_value_heads
    if not 1 <= kv <= teacher.num_key_value_heads:
        raise ConfigError(f"prune.export.num_key_value_heads: {kv} must be between 1 and the "
                          f"teacher's {teacher.num_key_value_heads}")
    if heads % kv:
        raise ConfigError(f"prune.export.num_attention_heads: {heads} is not divisible by "
                          f"num_key_value_heads={kv}")
    per_group = teacher.num_attention_heads // teacher.num_key_value_heads
    if heads // kv > per_group:
        raise ConfigError(
            f"prune.export.num_attention_heads: {heads} heads over {kv} KV heads needs {heads // kv} "
            f"query heads per group, but the teacher's groups have {per_group}; keep more KV heads")
    return Shape(num_key_value_heads=kv, **values)


def check_exportable(teacher_config, adapter: FamilyAdapter, target: Shape) -> None:
    """transformers validates a config when it is saved or loaded, and some families add rules of
    their own (Llama: hidden_size a multiple of num_attention_heads, although head_dim is explicit):
    a student that breaks one could never be exported, so it is refused up front."""
    cfg = student_config(teacher_config, adapter, target, list(range(target.num_layers)))
    validate = getattr(cfg, "validate", None)
    if validate is None:
        return
    try:
        validate()
    except Exception as e:  # huggingface_hub's StrictDataclassClassValidationError wraps the ValueError
        cause = e.__cause__ or e
        raise ConfigError(f"prune.export.hidden_size: transformers refuses this {teacher_config.model_type} shape "
                          f"({target.hidden_size} hidden, {target.num_attention_heads} heads): "
                          f"{str(cause).splitlines()[0]}") from None


def student_config(teacher_config, adapter: FamilyAdapter, target: Shape, kept_layers: Sequence[int]):
    """The teacher's config with the target shape; `head_dim` is written explicitly because it
    no longer equals hidden_size / num_attention_heads after width pruning."""
    assert len(kept_layers) == target.num_layers
    cfg = copy.deepcopy(teacher_config)
    cfg.head_dim = head_dim_of(teacher_config)
    cfg.hidden_size = target.hidden_size
    if adapter.moe is not None:
        setattr(cfg, adapter.moe.num_experts_key, target.num_experts)
        setattr(cfg, adapter.moe.ffn_key, target.moe_ffn_hidden_size)
        # Every token still goes to top-k experts; with fewer experts than k, to all of them.
        cfg.num_experts_per_tok = min(cfg.num_experts_per_tok, target.num_experts)
    else:
        cfg.intermediate_size = target.ffn_hidden_size
    cfg.num_attention_heads = target.num_attention_heads
    cfg.num_key_value_heads = target.num_key_value_heads
    cfg.num_hidden_layers = target.num_layers
    for key in adapter.per_layer_config_keys:
        per_layer = getattr(teacher_config, key, None)
        if per_layer is not None:
            setattr(cfg, key, [per_layer[i] for i in kept_layers])
    if adapter.adjust_config is not None:
        adapter.adjust_config(teacher_config, cfg, kept_layers)
    return cfg
