"""Exact sizes of every candidate from one meta-device build of the teacher.

Each parameter of the teacher is listed once with the axis of each of its dimensions (the family
adapter's table, the one slicing uses), so a candidate's parameter count is a sum of products of
its axis sizes: the same number `count_params` gets by building the student's config on the meta
device (tested for every candidate listed), thousands of times faster, so a 70B teacher's whole
space is sized in seconds.
"""
from dataclasses import dataclass
from math import prod
from typing import Dict, List, Optional, Tuple

import torch

from minitron.config import ConfigError
from minitron.models.adapters import Axis, FamilyAdapter
from minitron.models.build import head_dim_of
from minitron.prune.shape import Shape

BYTES = {"fp32": 4, "bf16": 2}


@dataclass(frozen=True)
class Sizes:
    params: int
    non_embedding_params: int
    memory_gb: float
    flops_per_token: float
    active_params: Optional[int] = None
    """Mixture of experts: the parameters one token uses (top-k experts of each layer); None when dense."""

    def as_dict(self) -> dict:
        out = {"params": self.params, "non_embedding_params": self.non_embedding_params,
               "memory_gb": self.memory_gb, "flops_per_token": self.flops_per_token}
        if self.active_params is not None:
            out["active_params"] = self.active_params
        return out


Entry = Tuple[Tuple[int, ...], Tuple[Axis, ...], str]  # teacher shape, axes, role


class Sizer:
    """`sizes(shape)` for any candidate of one teacher. Roles: `embedding` (input lookup),
    `output` (the untied lm_head), `expert` (experts' weights, of which a token uses its top-k
    experts'), `matmul` (other weights of 2+ dims), `other` (norms, biases)."""

    def __init__(self, teacher_config, adapter: FamilyAdapter, precision: str, seq_len: int, batch_size: int):
        from transformers import AutoModelForCausalLM

        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(teacher_config)
        embedding = model.get_input_embeddings().weight
        output = model.get_output_embeddings().weight
        self.tied = output is embedding
        self.head_dim = head_dim_of(teacher_config)
        self.vocab_size, self.teacher_hidden = embedding.shape
        self.outer: List[Entry] = []  # outside the decoder layers
        self.per_layer: List[Entry] = []  # layer 0's, the same in every layer (width is homogeneous)
        for name, param in model.named_parameters():
            try:
                axes, layer = adapter.axes_of(name)
            except KeyError:
                raise ConfigError(f"model.path: the {adapter.model_type} adapter does not know the "
                                  f"parameter {name}; this checkpoint's layout is not supported") from None
            role = ("embedding" if param is embedding else "output" if param is output
                    else "expert" if any(a == "moe" or (isinstance(a, tuple) and "moe" in a) for a in axes)
                    else "matmul" if param.dim() >= 2 else "other")
            if layer is None:
                self.outer.append((tuple(param.shape), axes, role))
            elif layer == 0:
                self.per_layer.append((tuple(param.shape), axes, role))
        self.top_k = getattr(teacher_config, "num_experts_per_tok", None)
        self.bytes_per_param = BYTES[precision]
        self.seq_len, self.batch_size = seq_len, batch_size

    def _numel(self, entry: Entry, sizes: Dict[str, int]) -> int:
        shape, axes, _ = entry
        return prod(n if a is None else sizes[a] if isinstance(a, str) else sum(sizes[part] for part in a)
                    for n, a in zip(shape, axes))

    def sizes(self, s: Shape) -> Sizes:
        axis = {"hidden": s.hidden_size, "mlp": s.ffn_hidden_size, "q": s.num_attention_heads * self.head_dim,
                "kv": s.num_key_value_heads * self.head_dim, "expert": s.num_experts, "moe": s.moe_ffn_hidden_size}
        by_role = {"embedding": 0, "output": 0, "matmul": 0, "other": 0, "expert": 0}
        for entry in self.outer:
            by_role[entry[2]] += self._numel(entry, axis)
        for entry in self.per_layer:
            by_role[entry[2]] += s.num_layers * self._numel(entry, axis)
        params = sum(by_role.values())
        kv_cache = 2 * s.num_layers * s.num_key_value_heads * self.head_dim * self.seq_len * self.batch_size
        # Forward FLOPs per token: 2 per weight of every matmul, the output projection included
        # (tied or not; the input lookup is no matmul), plus attention scores and values over the
        # context (PaLM, arXiv 2204.02311 appendix B).
        projection = by_role["output"] or self.vocab_size * s.hidden_size
        active_experts = by_role["expert"] * min(self.top_k, s.num_experts) // s.num_experts if s.num_experts else 0
        flops = (2 * (by_role["matmul"] + active_experts + projection)
                 + 4 * s.num_layers * s.num_attention_heads * self.head_dim * self.seq_len)
        return Sizes(params=params, non_embedding_params=params - by_role["embedding"] - by_role["output"],
                     memory_gb=(params + kv_cache) * self.bytes_per_param / 2**30, flops_per_token=float(flops),
                     active_params=params - by_role["expert"] + active_experts if s.num_experts else None)
