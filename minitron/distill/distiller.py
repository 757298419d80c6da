"""What the student's DeepSpeed engine wraps: the student plus the projection that trains with
it, and the forward pass that turns one micro-batch and the teacher's outputs into the loss.

The teacher is not a submodule: it has no optimizer state, is never checkpointed with the
student, and under ZeRO-3 is sharded by an engine of its own (see distill/teacher.py).
"""
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

from minitron.distill.fused import chunked_logit_loss
from minitron.distill.hidden import capture_hidden_states
from minitron.distill.losses import hidden_state_loss
from minitron.models.adapters import ADAPTERS, logit_softcap


@dataclass
class TeacherOutputs:
    """One micro-batch through the frozen teacher (or read from the teacher cache: `top_k` alone)."""
    final_hidden: Optional[torch.Tensor] = None
    """[B, T, K] final normed hidden states (logits are made from them chunk by chunk)."""
    head_weight: Optional[torch.Tensor] = None
    """[V', K] the teacher's full (gathered) lm_head weight."""
    softcap: Optional[float] = None
    """The teacher's final logit soft-cap (Gemma), None when its logits are lm_head(h)."""
    hidden: Dict[int, torch.Tensor] = field(default_factory=dict)
    """Resolved hidden-state index -> [B, T, K], for the intermediate losses."""
    top_k: Optional[Tuple[torch.Tensor, torch.Tensor]] = None
    """[B, T-1, k] cached logits (soft-capped) and token ids, largest first, in place of the above."""


class Distiller(nn.Module):
    def __init__(self, student: nn.Module, logit_spec, vocab_size: int, chunk_tokens: int,
                 pairs: Sequence[Tuple[int, int]] = (), hidden_loss: str = "cosine",
                 projection: Optional[nn.Module] = None, hidden_weight: Optional[float] = None):
        """pairs: resolved (student index, teacher index) hidden states to match; hidden_weight:
        a fixed weight for their summed loss, or None for the dynamic weight."""
        super().__init__()
        self.student = student
        self.projection = projection if projection is not None else nn.Identity()
        self.logit_spec = logit_spec
        self.vocab_size = vocab_size
        self.chunk_tokens = chunk_tokens
        self.pairs: List[Tuple[int, int]] = list(pairs)
        self.hidden_loss = hidden_loss
        self.hidden_weight = hidden_weight
        self.softcap = logit_softcap(student.config)
        self.moe = ADAPTERS[student.config.model_type].moe
        self.aux_coef = getattr(student.config, "router_aux_loss_coef", 0.0) if self.moe is not None else 0.0

    def forward(self, input_ids: torch.Tensor, teacher: Optional[TeacherOutputs] = None):
        """(loss, extras): extras are detached scalars to log (kd, ce, each hidden loss, weight, and a
        mixture of experts' router loss)."""
        with capture_hidden_states(self.student, [s for s, _ in self.pairs]) as student_hidden:
            out = self.student.base_model(input_ids=input_ids, use_cache=False,
                                          **({"output_router_logits": True} if self.aux_coef else {}))
            final = out.last_hidden_state
        # Position t predicts token t+1: the last position has no target for the cross-entropy,
        # and is left out of the divergence too, so both average over the same tokens.
        hidden = final[:, :-1].flatten(0, 1)
        targets = input_ids[:, 1:].flatten()
        teacher = teacher or TeacherOutputs()
        teacher_hidden = teacher.final_hidden[:, :-1].flatten(0, 1) if teacher.final_hidden is not None else None
        top_k = tuple(t.flatten(0, 1) for t in teacher.top_k) if teacher.top_k is not None else None
        loss, parts = chunked_logit_loss(hidden, self.student.get_output_embeddings().weight, teacher_hidden,
                                         teacher.head_weight, targets, self.vocab_size, self.logit_spec,
                                         self.chunk_tokens, student_softcap=self.softcap,
                                         teacher_softcap=teacher.softcap, teacher_topk=top_k)
        extras = {}
        if self.logit_spec.divergence != "none":
            extras["kd"] = parts["kd"]
        if self.logit_spec.ce_weight:
            extras["ce"] = parts["ce"]
        if self.pairs:
            terms = [hidden_state_loss(self.projection(student_hidden[s]), teacher.hidden[t], self.hidden_loss)
                     for s, t in self.pairs]
            hidden_total = torch.stack(terms).sum()
            # arXiv 2407.14679 eq. 3: alpha = L_logits / L_intermediate, recomputed every step and
            # not differentiated, so the intermediate term always weighs as much as the logit term.
            weight = (self.hidden_weight if self.hidden_weight is not None
                      else loss.detach() / hidden_total.detach().clamp_min(1e-12))
            loss = loss + weight * hidden_total
            extras.update({f"hidden_{s}_{t}": term.detach() for (s, t), term in zip(self.pairs, terms)})
            extras["hidden_weight"] = torch.as_tensor(weight).detach()
        if self.aux_coef:
            # The router's load-balancing loss, weighted as the family's own training forward weighs it.
            aux = self.moe.router_aux_loss(self.student.config, out.router_logits)
            loss = loss + self.aux_coef * aux
            extras["router_aux"] = aux.detach()
        return loss, extras
