"""Which layers, channels, neurons and heads the student keeps, from importance scores.

Width is homogeneous: every kept layer keeps the same number of neurons and heads (its own
most important ones); in a mixture of experts, the same number of experts, and every kept expert
the same number of neurons (its own). Heads are ranked within their KV group and each kept group
keeps the same number of query heads, so the result is always a legal GQA shape; with fewer KV
heads than the teacher, whole groups go first, ranked by the summed importance of their query heads.
"""
from dataclasses import dataclass, field
from typing import Dict, List, Optional

import torch

from minitron.config import DepthConfig
from minitron.prune.shape import Shape


@dataclass
class Kept:
    """Kept indices in the teacher's numbering; per-layer lists follow the order of `layers`."""
    layers: List[int]
    hidden: List[int]
    mlp: List[List[int]]
    heads: List[List[int]]
    """Query-head indices."""
    kv_heads: List[List[int]] = field(default_factory=list)
    experts: List[List[int]] = field(default_factory=list)
    """Mixture of experts: the experts each kept layer keeps."""
    moe: List[List[List[int]]] = field(default_factory=list)
    """Mixture of experts: per kept layer, per kept expert, the neurons it keeps."""
    teacher: Optional[Shape] = None
    """The teacher's shape: where each part of a fused weight starts (not saved in the manifest)."""

    def as_dict(self) -> dict:
        out = {"layers": self.layers, "hidden": self.hidden, "mlp": self.mlp, "heads": self.heads,
               "kv_heads": self.kv_heads}
        if self.experts:
            out.update(experts=self.experts, moe=self.moe)
        return out


def _top(scores: torch.Tensor, k: int, rng: Optional[torch.Generator]) -> List[int]:
    """Indices of the k highest scores, ascending (a seeded random choice when rng is given)."""
    if rng is not None:
        order = torch.randperm(len(scores), generator=rng)
    else:
        order = torch.argsort(scores.double(), descending=True, stable=True)
    return sorted(order[:k].tolist())


def select_layers(teacher: Shape, target: Shape, depth: DepthConfig, removal_loss: Optional[torch.Tensor],
                  cos: torch.Tensor, rng: Optional[torch.Generator] = None) -> List[int]:
    """`removal_loss[i]`: loss with layers [i, i + k) removed, where k is the number of layers to
    drop when `depth.contiguous`, else 1. Lower loss (or block importance) = less important."""
    drop = teacher.num_layers - target.num_layers
    if drop == 0:
        return list(range(teacher.num_layers))
    block = drop if depth.contiguous else 1
    if depth.metric == "loss":
        assert removal_loss is not None and len(removal_loss) == teacher.num_layers - block + 1
        cost = removal_loss
    else:
        cost = torch.stack([1 - cos[i, i + block] for i in range(teacher.num_layers - block + 1)])
    if depth.contiguous:
        start = int(torch.randint(len(cost), (1,), generator=rng)) if rng is not None else int(torch.argmin(cost))
        dropped = set(range(start, start + drop))
    else:
        dropped = set(_top(-cost, drop, rng))
    return [i for i in range(teacher.num_layers) if i not in dropped]


def select_heads(scores_H: torch.Tensor, teacher: Shape, target: Shape,
                 rng: Optional[torch.Generator] = None):
    """(kept query heads, kept KV heads) for one layer."""
    per_group = teacher.num_attention_heads // teacher.num_key_value_heads
    groups = scores_H.view(teacher.num_key_value_heads, per_group)
    kept_groups = _top(groups.sum(1), target.num_key_value_heads, rng)
    keep_per_group = target.num_attention_heads // target.num_key_value_heads
    heads = [g * per_group + j for g in kept_groups for j in _top(groups[g], keep_per_group, rng)]
    return heads, kept_groups


def select_kept(scores: Dict[str, torch.Tensor], teacher: Shape, target: Shape, depth: DepthConfig,
                removal_loss: Optional[torch.Tensor] = None, seed: Optional[int] = None) -> Kept:
    """Rank by `scores` (see importance.scores_from_stats), or at random when `seed` is given."""
    rng = torch.Generator().manual_seed(seed) if seed is not None else None
    layers = select_layers(teacher, target, depth, removal_loss, scores["cos"], rng)
    heads = [select_heads(scores["heads"][i], teacher, target, rng) for i in layers]
    kept = Kept(
        layers=layers,
        hidden=_top(scores["hidden"], target.hidden_size, rng),
        mlp=[_top(scores["mlp"][i], target.ffn_hidden_size, rng) if "mlp" in scores else [] for i in layers],
        heads=[h for h, _ in heads],
        kv_heads=[g for _, g in heads],
        teacher=teacher,
    )
    if target.num_experts is not None:
        kept.experts = [_top(scores["experts"][i], target.num_experts, rng) for i in layers]
        kept.moe = [[_top(scores["moe"][i, e], target.moe_ffn_hidden_size, rng) for e in experts]
                    for i, experts in zip(layers, kept.experts)]
    return kept
