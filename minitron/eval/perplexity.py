"""Validation loss of any causal LM on held-out blocks: the one evaluator that training,
distillation, pruning, the search, the pipeline and `minitron-eval` share.

Sharded over ranks through the gang (every rank runs the same number of forward passes, so a
ZeRO-3 model can gather its weights collectively); logits are made chunk by chunk of tokens.
"""
import math
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F

from minitron import progress
from minitron.distill.fused import softcapped
from minitron.models.adapters import ADAPTERS, logit_softcap


@torch.no_grad()
def evaluate(model, val_blocks: np.ndarray, micro_batch_size: int, gang, device: torch.device,
             max_blocks: Optional[int] = None, desc: Optional[str] = None) -> float:
    """Mean next-token loss over the validation blocks, sharded over ranks. Every rank runs the
    same number of forward passes (ZeRO-3 gathers weights collectively in each one); padding rows
    carry weight 0. With `desc`, rank 0 shows a progress bar of that name."""
    model.eval()
    total = torch.zeros(2, dtype=torch.float64)
    count = len(val_blocks) if max_blocks is None else min(len(val_blocks), max_blocks)
    shown = progress.bar(math.ceil(math.ceil(count / gang.world_size) / micro_batch_size), desc or "",
                         show=bool(desc) and gang.rank == 0, unit="batch",
                         iterable=eval_batches(val_blocks, micro_batch_size, gang, device, max_blocks))
    for input_ids, w in shown:
        total += torch.stack([(sequence_losses(model, input_ids).double().cpu() * w).sum(), w.sum()])
    total = gang.all_reduce_sum(total)
    return (total[0] / total[1]).item()


def eval_batches(val_blocks: np.ndarray, micro_batch_size: int, gang, device: torch.device,
                 max_blocks: Optional[int] = None):
    """This rank's (input_ids, weight per row) micro-batches of the first `max_blocks` blocks; every
    rank yields as many, padding rows carry weight 0."""
    count = len(val_blocks) if max_blocks is None else min(len(val_blocks), max_blocks)
    per_rank = math.ceil(count / gang.world_size)
    mine = np.arange(gang.rank, count, gang.world_size)
    weights = np.concatenate([np.ones(len(mine)), np.zeros(per_rank - len(mine))])
    rows = np.concatenate([mine, np.zeros(per_rank - len(mine), dtype=np.int64)]).astype(np.int64)
    for start in range(0, per_rank, micro_batch_size):
        idx = rows[start:start + micro_batch_size]
        yield (torch.from_numpy(np.asarray(val_blocks[idx], dtype=np.int64)).to(device),
               torch.from_numpy(weights[start:start + micro_batch_size]))


LOSS_CHUNK_TOKENS = 1024


def sequence_losses(model, input_ids: torch.Tensor) -> torch.Tensor:
    """[batch] mean next-token cross-entropy of each sequence (float32). For the families minitron
    has an adapter for, whose logits are lm_head(final hidden states), soft-capped or not, the loss
    is computed over chunks of tokens, so [batch x seq x vocab] float32 logits never exist at once
    (16 GB for 8 sequences of 4096 tokens over a 128k vocabulary)."""
    module = getattr(model, "module", model)  # a DeepSpeed engine wraps the model
    if getattr(module.config, "model_type", None) not in ADAPTERS:
        logits = model(input_ids=input_ids, use_cache=False).logits[:, :-1]
        return F.cross_entropy(logits.float().transpose(1, 2), input_ids[:, 1:], reduction="none").mean(1)
    hidden = module.base_model(input_ids=input_ids, use_cache=False).last_hidden_state[:, :-1].flatten(0, 1)
    targets = input_ids[:, 1:].flatten()
    head, cap = module.get_output_embeddings(), logit_softcap(module.config)
    per_token = torch.cat([F.cross_entropy(softcapped(head(h), cap).float(), t, reduction="none")
                           for h, t in zip(hidden.split(LOSS_CHUNK_TOKENS), targets.split(LOSS_CHUNK_TOKENS))])
    return per_token.view(input_ids.shape[0], -1).mean(1)
