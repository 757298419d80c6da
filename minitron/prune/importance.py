"""Activation-based importance (arXiv 2407.14679, section 2.2), from forward passes only.

One pass over the calibration blocks, with hooks, collects for every layer:
  - attention heads: the L2 norm over head_dim of each head's output (the input of o_proj);
  - MLP neurons: the input of down_proj (post-activation) or the pre-activation (the output of the
    gate projection, Nemotron's up_proj, the first half of Phi-3's gate_up_proj);
  - mixtures of experts: each expert's router-weighted output norm, and its neurons' router-weighted
    activations, over the tokens routed to it;
  - embedding channels: the outputs of the layer's two norms on the residual stream;
  - the hidden state entering every layer and leaving the last, for block importance
    (1 - cos(input, output), arXiv 2403.03853 / 2408.11796) of every contiguous block.
Each sample's activations are first reduced over its tokens (`seq_agg`), then accumulated as
float32 sums of the per-sample value and of its square. Sums reduce across data-parallel ranks,
so N processes give the scores one process gives on the same samples, and the batch aggregation
(`batch_agg`) can be chosen after the pass.

Depth importance by loss: the validation LM loss with a layer, or a block of layers, replaced
by the identity.
"""
import math
from contextlib import contextmanager
from typing import Dict, Iterable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from minitron import progress
from minitron.config import ConfigError
from minitron.distributed.partitions import is_partitioned
from minitron.models.adapters import FamilyAdapter
from minitron.eval.perplexity import evaluate

AGGREGATIONS = ("mean", "l2", "var")


def seq_aggregate(x_BTN: torch.Tensor, how: str) -> torch.Tensor:
    """[batch, tokens, N] -> [batch, N] in float32."""
    x = x_BTN.float()
    if how == "mean":
        return x.abs().mean(1)
    if how == "l2":
        return x.square().sum(1).sqrt()
    if how == "var":
        return x.var(1, unbiased=False)
    raise ConfigError(f"prune.importance.seq_agg: must be one of {', '.join(AGGREGATIONS)}, got {how!r}")


def batch_aggregate(sums_2N: torch.Tensor, num_samples: float, how: str) -> torch.Tensor:
    """Combine per-sample values from their sums [sum s, sum s^2] (s >= 0 after seq_aggregate)."""
    total, total_sq = sums_2N[0].double(), sums_2N[1].double()
    if how == "mean":
        out = total / num_samples
    elif how == "l2":
        out = total_sq.sqrt()
    elif how == "var":
        out = (total_sq / num_samples - (total / num_samples).square()).clamp_min(0)
    else:
        raise ConfigError(f"prune.importance.batch_agg: must be one of {', '.join(AGGREGATIONS)}, got {how!r}")
    return out.float()


def _accumulate(acc_2N: torch.Tensor, per_sample_BN: torch.Tensor) -> None:
    acc_2N[0] += per_sample_BN.sum(0).to(acc_2N.device)
    acc_2N[1] += per_sample_BN.square().sum(0).to(acc_2N.device)


def empty_stats(hf_config, head_dim: int, adapter: FamilyAdapter) -> Dict[str, torch.Tensor]:
    num_layers, hidden = hf_config.num_hidden_layers, hf_config.hidden_size
    zeros = lambda *shape: torch.zeros(*shape, dtype=torch.float32)  # noqa: E731
    stats = {
        "heads": zeros(num_layers, 2, hf_config.num_attention_heads),
        "hidden": zeros(num_layers, 2, 2, hidden),  # [layer, which norm, sum/sum_sq, channel]
        "cos_sum": zeros(num_layers + 1, num_layers + 1),  # sum over tokens of cos(h_i, h_j)
        "samples": zeros(1),
        "tokens": zeros(1),
    }
    if adapter.moe is None:
        stats["mlp"] = zeros(num_layers, 2, hf_config.intermediate_size)
    else:
        experts, width = getattr(hf_config, adapter.moe.num_experts_key), getattr(hf_config, adapter.moe.ffn_key)
        stats["experts"] = zeros(num_layers, 2, experts)
        stats["moe"] = zeros(num_layers, 2, experts, width)  # [layer, sum/sum_sq, expert, neuron]
    return stats


def _expert_activations(experts_module, stats, layer: int, seq_agg: str, mlp_activation: str, batch_shape):
    """A pre-hook on a mixture's experts module, called with (tokens [N, H], top-k expert indices,
    top-k weights): every expert's contribution recomputed for the tokens routed to it, weighted by
    its router weight and zero for the others. Per token, an expert's score is the norm of its
    weighted output and a neuron's the weighted |activation| (post: act(gate) * up, pre: gate);
    both then reduce over each sample's tokens like every other statistic."""
    def hook(_module, args):
        tokens_NH, top_k_index, top_k_weights = args[:3]
        for e in range(experts_module.gate_up_proj.shape[0]):
            routed = top_k_index == e  # [N, k]
            rows = routed.any(-1).nonzero().squeeze(-1)
            weight_N = torch.zeros(tokens_NH.shape[0], device=tokens_NH.device, dtype=torch.float32)
            weight_N[rows] = (top_k_weights.float() * routed).sum(-1)[rows]
            gate, up = F.linear(tokens_NH[rows], experts_module.gate_up_proj[e]).float().chunk(2, dim=-1)
            act = experts_module.act_fn(gate) * up
            neurons_NF = tokens_NH.new_zeros(tokens_NH.shape[0], act.shape[-1], dtype=torch.float32)
            neurons_NF[rows] = (act if mlp_activation == "post" else gate) * weight_N[rows, None]
            output_N = weight_N.clone()
            output_N[rows] *= F.linear(act, experts_module.down_proj[e].float()).norm(dim=-1)
            _accumulate(stats["moe"][layer, :, e], seq_aggregate(neurons_NF.view(*batch_shape(), -1), seq_agg))
            _accumulate(stats["experts"][layer, :, e:e + 1],
                        seq_aggregate(output_N.view(*batch_shape(), 1), seq_agg))
    return hook


@contextmanager
def _hooks(model, adapter: FamilyAdapter, stats, seq_agg: str, mlp_activation: str, head_dim: int):
    handles = []
    cos_sum = stats["cos_sum"]
    num_boundaries = cos_sum.shape[0]
    # Unit hidden-state vectors at every layer boundary of the current micro-batch, written in
    # place: sum_t cos(h_i, h_j) over all pairs is then one small matmul, and the buffer is the
    # pass's only large allocation ([L+1, tokens, hidden] float32).
    units = {"buf": None, "next": 0}

    def add_boundary(hidden_BTD):
        units["batch_shape"] = hidden_BTD.shape[:2]
        tokens = hidden_BTD.shape[0] * hidden_BTD.shape[1]
        buf = units["buf"]
        if buf is None or buf.shape[1] != tokens or buf.device != hidden_BTD.device:
            buf = units["buf"] = torch.empty(num_boundaries, tokens, hidden_BTD.shape[-1],
                                             device=hidden_BTD.device)
        torch.nn.functional.normalize(hidden_BTD.flatten(0, 1).float(), dim=-1, out=buf[units["next"]])
        units["next"] += 1

    def finish_pass(_module, args):
        add_boundary(args[0])
        assert units["next"] == num_boundaries
        flat = units["buf"].flatten(1)
        cos_sum.add_((flat @ flat.T).to(cos_sum.device))
        units["next"] = 0

    for i, layer in enumerate(model.get_submodule(adapter.layers)):
        handles.append(layer.register_forward_pre_hook(
            lambda _m, args, kwargs: add_boundary(args[0] if args else kwargs["hidden_states"]),
            with_kwargs=True))
        handles.append(layer.get_submodule(adapter.attn_output).register_forward_pre_hook(
            lambda _m, args, i=i: _accumulate(
                stats["heads"][i], seq_aggregate(args[0].unflatten(-1, (-1, head_dim)).float().norm(dim=-1), seq_agg))))
        if adapter.moe is not None:
            experts = layer.get_submodule(adapter.moe.experts)
            handles.append(experts.register_forward_pre_hook(
                _expert_activations(experts, stats, i, seq_agg, mlp_activation, lambda: units["batch_shape"])))
        elif mlp_activation == "post":
            handles.append(layer.get_submodule(adapter.mlp_output).register_forward_pre_hook(
                lambda _m, args, i=i: _accumulate(stats["mlp"][i], seq_aggregate(args[0], seq_agg))))
        else:
            handles.append(layer.get_submodule(adapter.mlp_preactivation).register_forward_hook(
                lambda _m, _args, out, i=i: _accumulate(stats["mlp"][i],
                                                         seq_aggregate(adapter.preactivation(out), seq_agg))))
        for n, norm in enumerate(adapter.norms):
            handles.append(layer.get_submodule(norm).register_forward_hook(
                lambda _m, _args, out, i=i, n=n: _accumulate(stats["hidden"][i, n], seq_aggregate(out, seq_agg))))
    handles.append(model.get_submodule(adapter.final_norm).register_forward_pre_hook(finish_pass))
    try:
        yield
    finally:
        for h in handles:
            h.remove()


@torch.no_grad()
def collect_activation_stats(model, adapter: FamilyAdapter, blocks: np.ndarray, micro_batch_size: int,
                             gang, device: torch.device, seq_agg: str = "mean",
                             mlp_activation: str = "post", head_dim: int = None) -> Dict[str, torch.Tensor]:
    """Sums over all calibration `blocks` (each rank reads rows rank, rank + world, ...), reduced
    over ranks. Runs the decoder trunk only: no logits are needed."""
    if mlp_activation not in ("post", "pre"):
        raise ConfigError(f"prune.importance.mlp_activation: must be post or pre, got {mlp_activation!r}")
    seq_aggregate(torch.zeros(1, 1, 1), seq_agg)  # validates the name before the pass
    head_dim = head_dim or model.config.hidden_size // model.config.num_attention_heads
    stats = empty_stats(model.config, head_dim, adapter)
    model.eval()
    mine = np.arange(gang.rank, len(blocks), gang.world_size)
    passes = range(0, len(mine), micro_batch_size)
    with _hooks(model, adapter, stats, seq_agg, mlp_activation, head_dim), \
            progress.bar(len(blocks), "calibration", show=gang.rank == 0, unit="block") as shown:
        for start in passes:
            rows = mine[start:start + micro_batch_size]
            input_ids = torch.from_numpy(np.asarray(blocks[rows], dtype=np.int64)).to(device)
            model.base_model(input_ids=input_ids, use_cache=False)
            stats["samples"] += len(rows)
            stats["tokens"] += input_ids.numel()
            shown.update(min(len(rows) * gang.world_size, len(blocks) - shown.n))
    if is_partitioned(model):
        # A ZeRO-3 teacher gathers its layers collectively in every forward pass: a rank with fewer
        # blocks (rank 0 has the most) joins the others' last passes, its hooks removed.
        for _ in range(math.ceil(math.ceil(len(blocks) / gang.world_size) / micro_batch_size) - len(passes)):
            model.base_model(input_ids=torch.from_numpy(np.asarray(blocks[:1], dtype=np.int64)).to(device),
                             use_cache=False)
    return _all_reduce(stats, gang)


def _all_reduce(stats: Dict[str, torch.Tensor], gang) -> Dict[str, torch.Tensor]:
    names = sorted(stats)
    flat = gang.all_reduce_sum(torch.cat([stats[n].flatten() for n in names]))
    out, offset = {}, 0
    for n in names:
        out[n] = flat[offset:offset + stats[n].numel()].view_as(stats[n]).clone()
        offset += stats[n].numel()
    return out


def scores_from_stats(stats: Dict[str, torch.Tensor], batch_agg: str) -> Dict[str, torch.Tensor]:
    """heads [L, H], mlp [L, F] (or experts [L, E] and moe [L, E, F]), hidden [D] (summed over
    layers and norms), cos [L+1, L+1]."""
    samples = stats["samples"].item()
    if samples == 0:
        raise ConfigError("prune.calibration.num_samples: the calibration set is empty")
    hidden = sum(batch_aggregate(s, samples, batch_agg) for layer in stats["hidden"] for s in layer)
    scores = {"hidden": hidden, "cos": stats["cos_sum"] / stats["tokens"]}
    for name in ("heads", "mlp", "experts", "moe"):  # per layer; mlp for dense models, the others for MoE
        if name in stats:
            scores[name] = torch.stack([batch_aggregate(s, samples, batch_agg) for s in stats[name]])
    return scores


class _Identity(nn.Module):
    """Stands in for a removed decoder layer: passes the hidden states through."""

    def forward(self, hidden_states, *args, **kwargs):
        return hidden_states


@contextmanager
def layers_removed(model, adapter: FamilyAdapter, indices: Iterable[int]):
    layers = model.get_submodule(adapter.layers)
    saved = {i: layers[i] for i in indices}
    for i in saved:
        layers[i] = _Identity()
    try:
        yield
    finally:
        for i, layer in saved.items():
            layers[i] = layer


def removal_losses(model, adapter: FamilyAdapter, val_blocks: np.ndarray, block_size: int,
                   micro_batch_size: int, gang, device: torch.device, max_blocks: int) -> torch.Tensor:
    """[L - block_size + 1]: validation loss with layers [i, i + block_size) removed."""
    num_layers = len(model.get_submodule(adapter.layers))
    losses = []
    starts = range(num_layers - block_size + 1)
    what = "each layer" if block_size == 1 else f"each block of {block_size} layers"
    for start in progress.bar(len(starts), f"depth: loss without {what}", show=gang.rank == 0, unit="eval",
                              iterable=starts):
        with layers_removed(model, adapter, range(start, start + block_size)):
            losses.append(evaluate(model, val_blocks, micro_batch_size, gang, device, max_blocks))
    return torch.tensor(losses)
