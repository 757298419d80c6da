"""The frozen teacher: eval mode, no gradients, in the training dtype.

How it is placed is decided outside (distill/job.py with distributed/engine.py): replicated on every
rank, or under ZeRO-3 partitioned by a DeepSpeed engine of its own without an optimizer (as
DeepSpeed-Chat does with its reference model). Here it is only run.
"""
import contextlib
from typing import Callable, ContextManager, Iterable, Sequence

import torch

from minitron.distill.distiller import TeacherOutputs
from minitron.distill.hidden import capture_hidden_states
from minitron.models.adapters import logit_softcap


class Teacher:
    def __init__(self, model, run: Callable, hidden_indices: Sequence[int],
                 full_parameters: Callable[[Iterable[torch.nn.Parameter]], ContextManager]):
        """model: the transformers model; run: what to call for a forward pass (the model, or the
        DeepSpeed engine that shards it); full_parameters: a context in which the given
        parameters hold their full values (a no-op unless partitioned)."""
        self.model = model
        self.run = run
        self.hidden_indices = list(hidden_indices)
        self.full_parameters = full_parameters
        self.num_layers = len(model.base_model.layers)
        self.softcap = logit_softcap(model.config)

    @contextlib.contextmanager
    def outputs(self, input_ids: torch.Tensor):
        """TeacherOutputs for one micro-batch, valid inside the context (which keeps the lm_head
        weight gathered under ZeRO-3 while the student's loss uses it)."""
        final = self.num_layers  # the final normed hidden state, in hidden.py's numbering
        with torch.no_grad(), capture_hidden_states(self.model, [final, *self.hidden_indices]) as caught:
            # logits_to_keep=1: the model's own lm_head runs on the last position only; the loss
            # makes the logits it needs chunk by chunk from the final hidden states.
            self.run(input_ids=input_ids, use_cache=False, logits_to_keep=1)
        head = self.model.get_output_embeddings().weight
        with self.full_parameters([head]):
            yield TeacherOutputs(final_hidden=caught[final], head_weight=head,
                                 softcap=self.softcap,
                                 hidden={i: caught[i] for i in self.hidden_indices})


def freeze(model: torch.nn.Module) -> torch.nn.Module:
    model.eval()
    model.requires_grad_(False)
    return model
