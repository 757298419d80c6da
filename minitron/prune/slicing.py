"""Build the student from the teacher's weights and the kept indices.

Every student tensor is the teacher's tensor (from the kept layer it replaces) indexed along the
axes the family adapter names, copied straight into the student's allocated parameter, so peak
memory is teacher + student + one tensor. Buffers (rotary frequencies) are copied whole: head_dim
and the rope settings never change.
"""
import re
from contextlib import nullcontext

import torch

from minitron.models.adapters import FamilyAdapter
from minitron.prune.select import Kept


def _axis_indices(kept: Kept, layer: int, head_dim: int) -> dict:
    def per_head(heads):
        return torch.tensor([h * head_dim + d for h in heads for d in range(head_dim)], dtype=torch.long)

    out = {"hidden": torch.tensor(kept.hidden, dtype=torch.long)}
    if layer is not None:
        out.update(mlp=torch.tensor(kept.mlp[layer], dtype=torch.long),
                   q=per_head(kept.heads[layer]), kv=per_head(kept.kv_heads[layer]))
    return out


def sliced(tensor: torch.Tensor, axes, indices: dict) -> torch.Tensor:
    for dim, axis in enumerate(axes):
        if axis is not None:
            tensor = tensor.index_select(dim, indices[axis].to(tensor.device))
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
def prune_model(teacher, adapter: FamilyAdapter, kept: Kept, student_cfg, head_dim: int):
    """A new transformers model with `student_cfg`'s shape holding the kept teacher weights."""
    from transformers import AutoModelForCausalLM

    with _no_init():
        student = AutoModelForCausalLM.from_config(
            student_cfg, dtype=teacher.dtype, attn_implementation=teacher.config._attn_implementation)
    student.tie_weights()  # no_init_weights also skips tying; tied embeddings must stay one tensor
    teacher_tensors = dict(teacher.named_parameters())
    teacher_buffers = dict(teacher.named_buffers())
    for name, param in student.named_parameters():
        axes, layer = adapter.axes_of(name)
        source = name if layer is None else _teacher_name(name, kept.layers[layer])
        param.copy_(sliced(teacher_tensors[source], axes, _axis_indices(kept, layer, head_dim)))
    for name, buf in student.named_buffers():
        layer = re.match(r"model\.layers\.(\d+)\.", name)
        source = name if layer is None else _teacher_name(name, kept.layers[int(layer.group(1))])
        buf.copy_(teacher_buffers[source])
    student.eval()
    return student


def _teacher_name(student_name: str, teacher_layer: int) -> str:
    return re.sub(r"^model\.layers\.\d+\.", f"model.layers.{teacher_layer}.", student_name)
