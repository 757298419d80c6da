"""Importance scores measure what they claim: aggregations against float64 numpy, hooks against
planted activations, loss-when-removed against a model that never had the layer."""
import dataclasses

import numpy as np
import pytest
import torch

from minitron.config import DepthConfig
from minitron.distributed.gang import LocalGang
from minitron.models.adapters import adapter_for
from minitron.prune.importance import (batch_aggregate, collect_activation_stats, removal_losses,
                                       scores_from_stats, seq_aggregate)
from minitron.prune.select import Kept, select_kept
from minitron.models.build import head_dim_of
from minitron.prune.shape import student_config, teacher_shape
from minitron.models.weights import model_weights
from minitron.prune.slicing import prune_model
from minitron.eval.perplexity import evaluate
from random_models import random_model

BLOCKS = np.random.default_rng(0).integers(0, 97, size=(10, 16))
CPU = torch.device("cpu")


@pytest.mark.parametrize("how", ["mean", "l2", "var"])
def test_aggregations_match_float64_numpy(how):
    x = np.random.default_rng(1).normal(size=(5, 7, 3))
    per_sample = {"mean": np.abs(x).mean(1), "l2": np.sqrt((x ** 2).sum(1)), "var": x.var(1)}[how]
    got = seq_aggregate(torch.tensor(x, dtype=torch.float32), how)
    np.testing.assert_allclose(got.numpy(), per_sample, rtol=1e-5)
    sums = torch.tensor(np.stack([per_sample.sum(0), (per_sample ** 2).sum(0)]), dtype=torch.float32)
    want = {"mean": per_sample.mean(0), "l2": np.sqrt((per_sample ** 2).sum(0)), "var": per_sample.var(0)}[how]
    np.testing.assert_allclose(batch_aggregate(sums, 5, how).numpy(), want, rtol=1e-4, atol=1e-6)


def stats_of(model, **kw):
    return collect_activation_stats(model, adapter_for(model.config), BLOCKS, 4, LocalGang(), CPU,
                                    head_dim=head_dim_of(model.config), **kw)


def test_planted_head_and_neuron_scale_their_scores_exactly():
    """Doubling a KV head's value rows doubles the outputs of its query heads; tripling a
    neuron's up row triples its post-activation (or its gate row, its pre-activation). Planted
    in the last layer so nothing upstream moves; seq=mean and batch=l2 are homogeneous of
    degree 1, so the scores scale by the same factor."""
    for mlp_activation in ("post", "pre"):
        model = random_model("llama_gqa")
        head_dim = head_dim_of(model.config)
        base = scores_from_stats(stats_of(model, mlp_activation=mlp_activation), "l2")
        last = model.model.layers[3]
        with torch.no_grad():
            last.self_attn.v_proj.weight[head_dim:2 * head_dim] *= 2  # KV head 1 serves query heads 4-7
        planted = scores_from_stats(stats_of(model, mlp_activation=mlp_activation), "l2")
        torch.testing.assert_close(planted["heads"][3, 4:], 2 * base["heads"][3, 4:], rtol=1e-5, atol=0)
        torch.testing.assert_close(planted["heads"][:, :4], base["heads"][:, :4], rtol=1e-5, atol=0)

        model = random_model("llama_gqa")
        with torch.no_grad():
            (model.model.layers[3].mlp.up_proj if mlp_activation == "post"
             else model.model.layers[3].mlp.gate_proj).weight[5] *= 3
        planted = scores_from_stats(stats_of(model, mlp_activation=mlp_activation), "l2")
        torch.testing.assert_close(planted["mlp"][3, 5], 3 * base["mlp"][3, 5], rtol=1e-5, atol=0)
        torch.testing.assert_close(planted["mlp"][3, 6:], base["mlp"][3, 6:], rtol=1e-5, atol=0)


def test_a_channel_zeroed_in_every_norm_scores_zero():
    model = random_model("llama_gqa")
    with torch.no_grad():
        for block in model.model.layers:
            block.input_layernorm.weight[7] = 0
            block.post_attention_layernorm.weight[7] = 0
    hidden = scores_from_stats(stats_of(model), "l2")["hidden"]
    assert hidden[7] == 0 and (hidden > 0).sum() == model.config.hidden_size - 1


def test_block_importance_is_zero_for_an_identity_layer():
    model = random_model("llama_gqa")
    with torch.no_grad():  # o_proj and down_proj of zero: layer 2 adds nothing to the residual
        model.model.layers[2].self_attn.o_proj.weight.zero_()
        model.model.layers[2].mlp.down_proj.weight.zero_()
    cos = scores_from_stats(stats_of(model), "l2")["cos"]
    torch.testing.assert_close(cos.diagonal(), torch.ones(5))
    torch.testing.assert_close(cos, cos.T)
    assert abs(1 - cos[2, 3]) < 1e-6 and all(1 - cos[i, i + 1] > 1e-3 for i in (0, 1, 3))
    shape = teacher_shape(model.config)
    kept = select_kept(scores_from_stats(stats_of(model), "l2"), shape,
                       dataclasses.replace(shape, num_layers=3),
                       DepthConfig(metric="block_importance"))
    assert kept.layers == [0, 1, 3]


def test_removal_loss_equals_a_model_built_without_the_layers():
    model = random_model("qwen2")
    adapter = adapter_for(model.config)
    val = np.random.default_rng(2).integers(0, 97, size=(6, 24))
    losses = removal_losses(model, adapter, val, 2, 4, LocalGang(), CPU, max_blocks=6)
    assert losses.shape == (3,)
    shape = teacher_shape(model.config)
    for start in range(3):
        layers = [i for i in range(4) if i not in (start, start + 1)]
        full = {"hidden": list(range(64)), "mlp": [list(range(96))] * 2, "heads": [list(range(8))] * 2,
                "kv_heads": [list(range(2))] * 2}
        kept = Kept(layers=layers, **full, teacher=shape)
        target = dataclasses.replace(shape, num_layers=2)
        smaller = prune_model(model_weights(model), adapter, kept, student_config(model.config, adapter, target, layers),
                              attn_implementation="eager")
        want = evaluate(smaller, val, 4, LocalGang(), CPU, 6)
        assert losses[start].item() == pytest.approx(want, rel=1e-6)


# family -> (module whose output row 5 is neuron 5's pre-activation, the two residual-stream norms,
# the weight value that zeroes a norm's output channel)
HOOKED = {
    "nemotron": ("mlp.up_proj", ("input_layernorm", "post_attention_layernorm"), -1.0),  # 1 + w
    "gemma2": ("mlp.gate_proj", ("input_layernorm", "pre_feedforward_layernorm"), -1.0),
    "gemma3_text": ("mlp.gate_proj", ("input_layernorm", "pre_feedforward_layernorm"), -1.0),
    "phi3": ("mlp.gate_up_proj", ("input_layernorm", "post_attention_layernorm"), 0.0),  # gate rows first
}


@pytest.mark.parametrize("family", sorted(HOOKED))
def test_hooks_read_each_familys_preactivations_and_residual_norms(family):
    preactivation, norms, zero = HOOKED[family]
    model = random_model(family)
    base = scores_from_stats(stats_of(model, mlp_activation="pre"), "l2")
    with torch.no_grad():
        model.model.layers[3].get_submodule(preactivation).weight[5] *= 3
    planted = scores_from_stats(stats_of(model, mlp_activation="pre"), "l2")
    torch.testing.assert_close(planted["mlp"][3, 5], 3 * base["mlp"][3, 5], rtol=1e-5, atol=0)
    torch.testing.assert_close(planted["mlp"][3, 6:], base["mlp"][3, 6:], rtol=1e-5, atol=0)

    model = random_model(family)
    with torch.no_grad():
        for block in model.model.layers:
            for norm in norms:
                block.get_submodule(norm).weight[7] = zero
                bias = getattr(block.get_submodule(norm), "bias", None)
                if bias is not None:
                    bias[7] = 0
    hidden = scores_from_stats(stats_of(model), "l2")["hidden"]
    assert hidden[7] == 0 and (hidden > 0).sum() == model.config.hidden_size - 1
