"""Build the student from the teacher's weights and the kept indices.

Every student tensor is the teacher's tensor (from the kept layer it replaces) indexed along the
axes the family adapter names, copied straight into the student's parameter. The teacher's
tensors come from a Mapping: an in-memory model's (`models.weights.model_weights`) or its
checkpoint files read one tensor at a time (`SafetensorsWeights`), in which case the teacher need
not be in memory at all and the peak is the student plus one teacher tensor. Buffers (rotary
frequencies) depend only on head_dim and the rope settings, which never change: copied when the
source has them, else the student's own are already the same.
"""
import re
from contextlib import nullcontext
from typing import Mapping

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
def prune_model(weights: Mapping[str, torch.Tensor], adapter: FamilyAdapter, kept: Kept, student_cfg,
                dtype: torch.dtype = torch.float32, attn_implementation: str = "sdpa"):
    """A new transformers model with `student_cfg`'s shape holding the kept teacher weights."""
    from transformers import AutoModelForCausalLM

    with _no_init():
        student = AutoModelForCausalLM.from_config(student_cfg, dtype=dtype,
                                                   attn_implementation=attn_implementation)
    student.tie_weights()  # no_init_weights also skips tying; tied embeddings must stay one tensor
    for name, param in student.named_parameters():
        axes, layer = adapter.axes_of(name)
        indices = _axis_indices(kept, layer, student_cfg.head_dim)
        param.copy_(sliced(weights[_teacher_name(name, kept.layers, layer)], axes, indices))
    for name, buf in student.named_buffers():
        layer = re.match(r"model\.layers\.(\d+)\.", name)
        source = _teacher_name(name, kept.layers, int(layer.group(1)) if layer else None)
        if source in weights:
            buf.copy_(weights[source])
    student.eval()
    return student


def _teacher_name(student_name: str, kept_layers, layer) -> str:
    if layer is None:
        return student_name
    return re.sub(r"^model\.layers\.\d+\.", f"model.layers.{kept_layers[layer]}.", student_name)
