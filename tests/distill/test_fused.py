"""The fused chunked logit loss equals the naive computation on full logits (loss and gradients,
fp32), for every divergence and option; and the Distiller's loss on real models equals the naive
loss computed from the models' own full logits, with tied embeddings and padded vocabularies."""
import contextlib
import itertools
from types import SimpleNamespace

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from minitron.distill import losses
from minitron.distill.distiller import Distiller
from minitron.distill import fused
from minitron.distill.fused import chunked_logit_loss
from minitron.distill.hidden import make_projection
from minitron.distill.teacher import Teacher, freeze


def spec(**kw):
    base = dict(divergence="forward_kl", temperature=1.0, top_k=0, beta=0.5, scale_by_t2=False, ce_weight=0.0,
                kernel="torch")
    return SimpleNamespace(**{**base, **kw})


def naive_loss(hs, ws, ht, wt, targets, vocab, s):
    kd, ce = losses.token_losses(hs @ ws[:vocab].T, ht @ wt[:vocab].T if ht is not None else None, targets, s)
    return losses.combine_token_losses(kd, ce, s).mean()


def assert_close_rel(got, want, rtol=1e-5):
    """rtol 1e-5 on the tensor's scale (summation order differs between chunked and full)."""
    torch.testing.assert_close(got, want, rtol=rtol, atol=rtol * want.abs().max().item())


SPECS = [spec(divergence=d, temperature=t, top_k=k, ce_weight=c, scale_by_t2=t != 1.0, beta=0.3)
         for d, t, k, c in itertools.product(losses.DIVERGENCES, (1.0, 2.0), (0, 5), (0.0, 0.5))]
SPECS.append(spec(divergence="none", ce_weight=1.0))


@pytest.mark.parametrize("s", SPECS, ids=lambda s: f"{s.divergence}-T{s.temperature}-k{s.top_k}-ce{s.ce_weight}")
def test_chunked_equals_full_logits(s):
    g = torch.Generator().manual_seed(0)
    n, h, k, vocab = 45, 16, 24, 40
    hs = torch.randn(n, h, generator=g).requires_grad_()
    ws = (torch.randn(vocab + 3, h, generator=g) * 0.5).requires_grad_()  # padded student vocabulary
    ht, wt = torch.randn(n, k, generator=g), torch.randn(vocab + 7, k, generator=g) * 0.5
    if s.divergence == "none":
        ht = wt = None
    targets = torch.randint(0, vocab, (n,), generator=g)
    loss, parts = chunked_logit_loss(hs, ws, ht, wt, targets, vocab, s, chunk_tokens=8)
    grads = torch.autograd.grad(2.5 * loss, (hs, ws))
    ref = naive_loss(hs, ws, ht, wt, targets, vocab, s)
    ref_grads = torch.autograd.grad(2.5 * ref, (hs, ws))
    assert_close_rel(loss, ref)
    for got, want in zip(grads, ref_grads):
        assert_close_rel(got, want)
    assert torch.all(grads[1][vocab:] == 0)  # padding rows never get a gradient
    if s.divergence != "none":
        kd, _ = losses.token_losses(hs @ ws[:vocab].T, ht @ wt[:vocab].T, targets, s)
        assert_close_rel(parts["kd"], kd.mean())


@pytest.mark.parametrize("s", [spec(), spec(temperature=2.0, scale_by_t2=True)], ids=["T1", "T2-scaled"])
def test_forward_kl_in_blocks_of_rows_equals_full_logits(s, monkeypatch):
    """On a CPU the default loss runs a few rows at a time (sized for the cache); blocks of 3 rows,
    the last one short, over chunks of 8 give the naive loss and gradients."""
    monkeypatch.setattr(fused, "CPU_BLOCK_BYTES", 3 * 4 * 40)
    g = torch.Generator().manual_seed(1)
    n, h, k, vocab = 45, 16, 24, 40
    hs = torch.randn(n, h, generator=g).requires_grad_()
    ws = (torch.randn(vocab, h, generator=g) * 0.5).requires_grad_()
    ht, wt = torch.randn(n, k, generator=g), torch.randn(vocab, k, generator=g) * 0.5
    targets = torch.randint(0, vocab, (n,), generator=g)
    loss, _ = chunked_logit_loss(hs, ws, ht, wt, targets, vocab, s, chunk_tokens=8)
    ref = naive_loss(hs, ws, ht, wt, targets, vocab, s)
    assert_close_rel(loss, ref)
    for got, want in zip(torch.autograd.grad(loss, (hs, ws)), torch.autograd.grad(ref, (hs, ws))):
        assert_close_rel(got, want)


CAPPED = [spec(), spec(divergence="reverse_kl", temperature=2.0, top_k=5, ce_weight=0.5),
          spec(divergence="none", ce_weight=1.0)]


@pytest.mark.parametrize("s", CAPPED, ids=lambda s: f"{s.divergence}-k{s.top_k}-ce{s.ce_weight}")
@pytest.mark.parametrize("caps", [(2.0, 3.0), (1.5, None), (None, 2.5)], ids=str)
def test_chunked_with_final_logit_softcaps_equals_full_capped_logits(s, caps):
    """Gemma's logits are c * tanh(lm_head(h) / c); the caps (low enough that most logits bend)
    are applied per chunk, and the gradient goes back through them."""
    student_cap, teacher_cap = caps
    g = torch.Generator().manual_seed(1)
    n, h, k, vocab = 37, 16, 24, 40
    hs = torch.randn(n, h, generator=g).requires_grad_()
    ws = torch.randn(vocab, h, generator=g).requires_grad_()
    ht, wt = torch.randn(n, k, generator=g), torch.randn(vocab + 2, k, generator=g)
    if s.divergence == "none":
        ht = wt = None
    targets = torch.randint(0, vocab, (n,), generator=g)
    loss, _ = chunked_logit_loss(hs, ws, ht, wt, targets, vocab, s, chunk_tokens=8,
                                 student_softcap=student_cap, teacher_softcap=teacher_cap)
    grads = torch.autograd.grad(loss, (hs, ws))

    def capped(logits, cap):
        return cap * torch.tanh(logits / cap) if cap else logits

    student_logits = capped(hs @ ws.T, student_cap)
    assert student_cap is None or (student_logits.abs() > 0.5 * student_cap).float().mean() > 0.5
    kd, ce = losses.token_losses(student_logits, capped(ht @ wt[:vocab].T, teacher_cap) if ht is not None else None,
                                 targets, s)
    ref = losses.combine_token_losses(kd, ce, s).mean()
    assert_close_rel(loss, ref)
    for got, want in zip(grads, torch.autograd.grad(ref, (hs, ws))):
        assert_close_rel(got, want)


def _tiny(model_type="llama", vocab=67, hidden=32, layers=3, tie=False, seed=0, **extra):
    cfg = AutoConfig.for_model(model_type, vocab_size=vocab, hidden_size=hidden, intermediate_size=48,
                               num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                               head_dim=8, max_position_embeddings=32, tie_word_embeddings=tie, **extra)
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(cfg, attn_implementation="eager")


FAMILY_EXTRAS = {"llama": {}, "gemma2": dict(final_logit_softcapping=0.5, query_pre_attn_scalar=8),
                 "mixtral": dict(num_local_experts=4, num_experts_per_tok=2, router_aux_loss_coef=0.5)}


@pytest.mark.parametrize("family, tie", [("llama", False), ("llama", True), ("gemma2", True), ("mixtral", False)],
                         ids=["untied", "tied", "gemma2-softcapped", "mixtral-router-loss"])
def test_distiller_equals_naive_loss_on_model_logits(family, tie):
    """The whole student forward (hidden-state capture, projection, chunked loss) against full
    logits from the models' own forward: loss and every parameter's gradient. Gemma 2's own
    forward soft-caps its logits (caps low enough to bend them), the fused loss must too; a
    Mixtral student adds its router's load-balancing loss as its own forward computes it."""
    vocab = 60  # the shared tokenizer; both models carry padded vocabularies
    extra = FAMILY_EXTRAS[family]
    teacher = freeze(_tiny(family, vocab=71, hidden=48, layers=4, seed=1, **extra))
    student = _tiny(family, vocab=64, hidden=32, layers=2, tie=tie, seed=2, **extra)
    s = spec(temperature=2.0, ce_weight=0.4)
    pairs = [(0, 0), (1, 2)]
    projection = make_projection(32, 48, kept_hidden=None, seed=0)
    distiller = Distiller(student, s, vocab, chunk_tokens=7, pairs=pairs, projection=projection)
    runner = Teacher(teacher, teacher, [t for _, t in pairs], full_parameters=lambda params: contextlib.nullcontext())
    input_ids = torch.randint(0, vocab, (3, 10), generator=torch.Generator().manual_seed(3))

    with runner.outputs(input_ids) as t_out:
        loss, extras = distiller(input_ids, t_out)
    grads = torch.autograd.grad(loss, list(distiller.parameters()))

    moe = {"output_router_logits": True} if family == "mixtral" else {}
    out_s = student(input_ids=input_ids, output_hidden_states=True, **moe)
    with torch.no_grad():
        out_t = teacher(input_ids=input_ids, output_hidden_states=True)
    logits_s, logits_t = out_s.logits[:, :-1, :vocab].flatten(0, 1), out_t.logits[:, :-1, :vocab].flatten(0, 1)
    kd, ce = losses.token_losses(logits_s, logits_t, input_ids[:, 1:].flatten(), s)
    logit_loss = losses.combine_token_losses(kd, ce, s).mean()
    hidden = sum(losses.hidden_state_loss(projection(out_s.hidden_states[i]), out_t.hidden_states[j]) for i, j in pairs)
    ref = logit_loss + (logit_loss.detach() / hidden.detach()) * hidden
    if moe:
        ref = ref + 0.5 * out_s.aux_loss
        assert_close_rel(extras["router_aux"], out_s.aux_loss.detach())
    ref_grads = torch.autograd.grad(ref, list(distiller.parameters()))

    assert_close_rel(loss, ref)
    assert_close_rel(extras["kd"], kd.mean())
    for got, want in zip(grads, ref_grads):
        assert_close_rel(got, want)


def test_projection_starts_as_the_inverse_of_width_pruning():
    kept = [5, 0, 3]
    proj = make_projection(3, 6, kept_hidden=kept, seed=0)
    x = torch.randn(2, 3)
    y = proj(x)
    torch.testing.assert_close(y[:, kept], x)
    assert torch.all(y[:, [1, 2, 4]] == 0)
