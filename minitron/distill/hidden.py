"""Intermediate hidden states for the hidden-state losses: which ones (index convention, checks),
how to catch them during a forward pass, and the student-to-teacher projection.

Indices follow transformers' `hidden_states` convention for a model with L layers: 0 is the
embedding output, i in 1..L-1 the output of layer i, and L the final, normed hidden state;
negative indices count from the end (-3 is the output of the last-but-two layer,
arXiv 2407.14679 section 3). Only the requested states are kept, through forward hooks, instead
of asking the model for all L+1 of them.
"""
import contextlib
from typing import Dict, Iterable, List, Optional

import torch
from torch import nn


def resolve_index(index: int, num_layers: int) -> int:
    """A hidden-state index in 0..num_layers; raises IndexError when out of range."""
    if not -(num_layers + 1) <= index <= num_layers:
        raise IndexError(index)
    return index % (num_layers + 1)


def _module_for(model, index: int) -> nn.Module:
    base = model.base_model
    if index == 0:
        return model.get_input_embeddings()
    if index == len(base.layers):
        return base.norm
    return base.layers[index - 1]


@contextlib.contextmanager
def capture_hidden_states(model, indices: Iterable[int]):
    """Yields a dict that the next forward pass of `model` fills with {index: [B, T, H] tensor}
    for each resolved index."""
    caught: Dict[int, torch.Tensor] = {}
    handles = []
    for index in set(indices):
        def hook(module, args, output, index=index):
            caught[index] = output[0] if isinstance(output, tuple) else output
        handles.append(_module_for(model, index).register_forward_hook(hook))
    try:
        yield caught
    finally:
        for handle in handles:
            handle.remove()


def make_projection(student_width: int, teacher_width: int, kept_hidden: Optional[List[int]],
                    seed: int) -> nn.Linear:
    """The one learned linear map from student to teacher width (arXiv 2407.14679 section 3).

    For a student pruned from this teacher (`kept_hidden` from its pruning.json) it starts as the
    inverse of the width pruning: student channel j goes back to teacher channel kept_hidden[j],
    so at step 0 it compares exactly the channels the student inherited. Otherwise it starts
    from a seeded random init."""
    generator = torch.Generator().manual_seed(seed)
    projection = nn.Linear(student_width, teacher_width, bias=False)
    with torch.no_grad():
        if kept_hidden is not None and len(kept_hidden) == student_width and max(kept_hidden) < teacher_width:
            projection.weight.zero_()
            projection.weight[torch.tensor(kept_hidden), torch.arange(student_width)] = 1.0
        else:
            bound = student_width ** -0.5
            projection.weight.copy_(torch.rand(projection.weight.shape, generator=generator) * 2 * bound - bound)
    return projection
