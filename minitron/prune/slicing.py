"""Build the student from the teacher's weights and the kept indices.

Every student tensor is the teacher's tensor (from the kept layer it replaces) indexed along the
axes the family adapter names, copied straight into the student's parameter. The teacher's
tensors come from a Mapping: an in-memory model's (`models.weights.model_weights`) or its
checkpoint files read one tensor at a time (`SafetensorsWeights`), in which case the teacher need
not be in memory at all and the peak is the student plus one teacher tensor. Buffers are not
copied: they are not saved either (rotary frequencies, Gemma's embedding scale), so the student's
own, computed from its config, are what the exported checkpoint will have.
"""
import re
from contextlib import nullcontext
from typing import Mapping, Optional

import torch

from minitron.models.adapters import Axis, FamilyAdapter
from minitron.prune.select import Kept
from minitron.prune.shape import Shape


def _axis_indices(kept: Kept, layer: int, head_dim: int) -> dict:
    def per_head(heads):
        return torch.tensor([h * head_dim + d for h in heads for d in range(head_dim)], dtype=torch.long)

    out = {"hidden": torch.tensor(kept.hidden, dtype=torch.long)}
    if layer is not None:
        out.update(mlp=torch.tensor(kept.mlp[layer], dtype=torch.long),
                   q=per_head(kept.heads[layer]), kv=per_head(kept.kv_heads[layer]))
        if kept.experts:
            # [kept experts, kept neurons]: each expert's own neurons (see `sliced`)
            out.update(expert=torch.tensor(kept.experts[layer], dtype=torch.long),
                       moe=torch.tensor(kept.moe[layer], dtype=torch.long))
    return out


def teacher_axis_sizes(teacher: Shape, head_dim: int) -> dict:
    return {"hidden": teacher.hidden_size, "mlp": teacher.ffn_hidden_size,
            "q": teacher.num_attention_heads * head_dim, "kv": teacher.num_key_value_heads * head_dim,
            "expert": teacher.num_experts, "moe": teacher.moe_ffn_hidden_size}


def dimension_indices(axis: Axis, indices: dict, teacher_sizes: dict) -> torch.Tensor:
    """The kept positions along one dimension; a fused dimension's parts follow one another, each
    part's kept indices offset by the teacher's sizes of the parts before it."""
    if isinstance(axis, str):
        return indices[axis]
    parts, offset = [], 0
    for part in axis:
        parts.append(indices[part] + offset)
        offset += teacher_sizes[part]
    return torch.cat(parts, dim=-1)


def sliced(tensor: torch.Tensor, axes, indices: dict, teacher_sizes: dict = None) -> torch.Tensor:
    """`tensor` indexed along each named axis. Indices of one row per entry of dimension 0 (an
    expert's own neurons, after dimension 0 has selected the experts) are gathered per row."""
    for dim, axis in enumerate(axes):
        if axis is None:
            continue
        index = dimension_indices(axis, indices, teacher_sizes).to(tensor.device)
        if index.dim() == 1:
            tensor = tensor.index_select(dim, index)
        else:
            view = [1] * tensor.dim()
            view[0], view[dim] = index.shape
            size = list(tensor.shape)
            size[dim] = index.shape[1]
            tensor = tensor.gather(dim, index.view(view).expand(size))
    return tensor


def _no_init():
    # Skip random initialisation of weights that are overwritten at once (minutes for a large
    # student). A private helper of transformers: fall back to initialising if it moves.
    try:
        from transformers.initialization import no_init_weights
        return no_init_weights()
    except ImportError:
        return nullcontext()


@torch.no_grad()
def prune_model(weights: Mapping[str, torch.Tensor], adapter: FamilyAdapter, kept: Kept, student_cfg,
                dtype: torch.dtype = torch.float32, attn_implementation: Optional[str] = None):
    """A new transformers model with `student_cfg`'s shape holding the kept teacher weights
    (attention: transformers' default for the family unless given)."""
    if kept.teacher is None:
        raise ValueError("kept.teacher: the teacher's shape is needed to slice fused weights and fix up weights")
    from transformers import AutoModelForCausalLM

    with _no_init():
        student = AutoModelForCausalLM.from_config(student_cfg, dtype=dtype,
                                                   attn_implementation=attn_implementation)
    student.tie_weights()  # no_init_weights also skips tying; tied embeddings must stay one tensor
    sizes = teacher_axis_sizes(kept.teacher, student_cfg.head_dim)
    for name, param in student.named_parameters():
        axes, layer = adapter.axes_of(name)
        indices = _axis_indices(kept, layer, student_cfg.head_dim)
        param.copy_(sliced(weights[_teacher_name(name, kept.layers, layer)], axes, indices, sizes))
    if adapter.adjust_weights is not None:
        adapter.adjust_weights(kept.teacher, student)
    student.eval()
    return student


def _teacher_name(student_name: str, kept_layers, layer) -> str:
    if layer is None:
        return student_name
    return re.sub(r"^model\.layers\.\d+\.", f"model.layers.{kept_layers[layer]}.", student_name)
