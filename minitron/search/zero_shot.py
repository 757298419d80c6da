"""Stage 1 of the ranking: how good a pruned candidate is before any retraining, on held-out
blocks: its LM loss and its KL divergence from the teacher (arXiv 2407.14679 section 4.3 ranks
candidates by LM loss right after pruning, and finds that ranking unreliable after retraining).

The teacher's final hidden states are computed once and shared by every candidate; logits are
made chunk by chunk of tokens, so no [tokens x vocab] tensor exists for a whole micro-batch.
"""
from typing import Dict, List, Optional

import numpy as np
import torch
import torch.nn.functional as F

from minitron.distill.fused import softcapped
from minitron.eval.perplexity import LOSS_CHUNK_TOKENS, eval_batches
from minitron.models.adapters import logit_softcap


@torch.no_grad()
def final_hidden_states(model, val_blocks: np.ndarray, micro_batch_size: int, gang, device: torch.device,
                        max_blocks: int) -> List[torch.Tensor]:
    """[batch, tokens - 1, hidden] final (normed) hidden states of this rank's micro-batches, on the CPU."""
    model.eval()
    return [model.base_model(input_ids=ids, use_cache=False).last_hidden_state[:, :-1].cpu()
            for ids, _ in eval_batches(val_blocks, micro_batch_size, gang, device, max_blocks)]


@torch.no_grad()
def zero_shot_scores(student, teacher_hidden: List[torch.Tensor], teacher_head: torch.Tensor, vocab_size: int,
                     val_blocks: np.ndarray, micro_batch_size: int, gang, device: torch.device,
                     max_blocks: int, teacher_softcap: Optional[float] = None) -> Dict[str, float]:
    """{"val_loss": mean next-token cross-entropy, "kl": mean KL(teacher || student) per token},
    over the same blocks `final_hidden_states` read, each sequence weighted equally (as `evaluate`).
    Logits are soft-capped as each model's family caps them (Gemma)."""
    student.eval()
    student_softcap = logit_softcap(student.config)

    w_student = student.get_output_embeddings().weight[:vocab_size]
    w_teacher = teacher_head[:vocab_size].to(device)
    total = torch.zeros(3, dtype=torch.float64)  # sum of per-sequence CE, of per-sequence KL, weights
    batches = eval_batches(val_blocks, micro_batch_size, gang, device, max_blocks)
    for (ids, weight), hidden_t in zip(batches, teacher_hidden):
        hidden_s = student.base_model(input_ids=ids, use_cache=False).last_hidden_state[:, :-1].flatten(0, 1)
        hidden_t = hidden_t.to(device).flatten(0, 1)
        targets = ids[:, 1:].flatten()
        ce, kl = [], []
        for rows in torch.arange(len(targets), device=device).split(LOSS_CHUNK_TOKENS):
            logq = F.log_softmax(softcapped(hidden_s[rows] @ w_student.T, student_softcap).float(), dim=-1)
            logp = F.log_softmax(softcapped(hidden_t[rows] @ w_teacher.T, teacher_softcap).float(), dim=-1)
            ce.append(F.nll_loss(logq, targets[rows], reduction="none"))
            kl.append((logp.exp() * (logp - logq)).sum(-1))
        per_seq = [torch.cat(x).view(ids.shape[0], -1).mean(1).double().cpu() for x in (ce, kl)]
        total += torch.stack([(per_seq[0] * weight).sum(), (per_seq[1] * weight).sum(), weight.sum()])
    total = gang.all_reduce_sum(total)
    return {"val_loss": (total[0] / total[2]).item(), "kl": (total[1] / total[2]).item()}
