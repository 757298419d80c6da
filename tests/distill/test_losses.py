"""The pure loss functions against float64 references written independently with numpy, and
their gradients against finite differences (torch.autograd.gradcheck in float64)."""
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from minitron.distill import losses


def _softmax(x):
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def reference_divergence(s, t, divergence, temperature=1.0, top_k=0, beta=0.5, scale_by_t2=False):
    s, t = np.asarray(s, np.float64) / temperature, np.asarray(t, np.float64) / temperature
    out = []
    for srow, trow in zip(s, t):
        if top_k:
            keep = np.argsort(-trow, kind="stable")[:top_k]
            srow, trow = srow[keep], trow[keep]
        q, p = _softmax(srow), _softmax(trow)
        if divergence == "forward_kl":
            value = np.sum(p * np.log(p / q))
        elif divergence == "reverse_kl":
            value = np.sum(q * np.log(q / p))
        else:
            m = beta * p + (1 - beta) * q
            value = beta * np.sum(p * np.log(p / m)) + (1 - beta) * np.sum(q * np.log(q / m))
        out.append(value * (temperature ** 2 if scale_by_t2 else 1.0))
    return np.array(out)


def _logits(seed, n=6, v=50, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, v, generator=g) * scale, torch.randn(n, v, generator=g) * scale


CASES = [dict(divergence=d, temperature=temp, top_k=k, beta=beta, scale_by_t2=t2)
         for d in losses.DIVERGENCES for temp in (1.0, 2.5) for k in (0, 7)
         for beta, t2 in ((0.5, False), (0.2, True))]


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(str(v) for v in c.values()))
def test_divergence_matches_float64_reference(case):
    s, t = _logits(0)
    got = losses.logit_divergence(s, t, **case)
    assert got.dtype == torch.float32
    np.testing.assert_allclose(got.numpy(), reference_divergence(s.numpy(), t.numpy(), **case), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("case", CASES[::3], ids=lambda c: "-".join(str(v) for v in c.values()))
def test_divergence_gradients(case):
    s, t = (x.double() for x in _logits(1, n=3, v=9, scale=1.5))
    s.requires_grad_()
    assert torch.autograd.gradcheck(lambda x: losses.logit_divergence(x, t, **case), (s,))
    # The float32 gradient agrees with the float64 one.
    (g64,) = torch.autograd.grad(losses.logit_divergence(s, t, **case).sum(), s)
    s32 = s.detach().float().requires_grad_()
    (g32,) = torch.autograd.grad(losses.logit_divergence(s32, t.float(), **case).sum(), s32)
    torch.testing.assert_close(g32.double(), g64, rtol=1e-5, atol=1e-6)


def test_divergences_vanish_for_equal_distributions_and_jsd_is_symmetric():
    s, t = _logits(2)
    for d in losses.DIVERGENCES:
        assert losses.logit_divergence(s, s + 4.0, d).abs().max() < 1e-5  # softmax is shift-invariant
    torch.testing.assert_close(losses.logit_divergence(s, t, "jsd"), losses.logit_divergence(t, s, "jsd"))
    torch.testing.assert_close(losses.logit_divergence(s, t, "reverse_kl"), losses.logit_divergence(t, s, "forward_kl"))


def test_cross_entropy_and_bf16_upcast():
    s, _ = _logits(3)
    targets = torch.arange(6) * 7
    ref = [-np.log(_softmax(row.astype(np.float64))[k]) for row, k in zip(s.numpy(), targets.numpy())]
    np.testing.assert_allclose(losses.cross_entropy(s, targets).numpy(), ref, rtol=1e-5)
    assert losses.cross_entropy(s.bfloat16(), targets).dtype == torch.float32


def test_token_losses_follow_the_spec():
    s, t = _logits(4)
    targets = torch.arange(6)
    spec = SimpleNamespace(divergence="forward_kl", temperature=1.0, top_k=0, beta=0.5, scale_by_t2=False,
                           ce_weight=0.3)
    kd, ce = losses.token_losses(s, t, targets, spec)
    torch.testing.assert_close(losses.combine_token_losses(kd, ce, spec),
                               losses.logit_divergence(s, t) + 0.3 * losses.cross_entropy(s, targets))
    kd, ce = losses.token_losses(s, None, targets, SimpleNamespace(**{**vars(spec), "divergence": "none"}))
    assert kd is None and ce is not None
    kd, ce = losses.token_losses(s, t, targets, SimpleNamespace(**{**vars(spec), "ce_weight": 0.0}))
    assert ce is None and kd is not None


@pytest.mark.parametrize("kind", ["cosine", "mse"])
def test_hidden_state_loss_matches_float64_reference(kind):
    g = torch.Generator().manual_seed(5)
    a, b = torch.randn(2, 5, 16, generator=g), torch.randn(2, 5, 16, generator=g)
    a64, b64 = a.double().numpy().reshape(-1, 16), b.double().numpy().reshape(-1, 16)
    if kind == "cosine":
        cos = (a64 * b64).sum(1) / np.linalg.norm(a64, axis=1) / np.linalg.norm(b64, axis=1)
        ref = np.mean(1 - cos)
    else:
        ref = np.mean((a64 - b64) ** 2)
    np.testing.assert_allclose(losses.hidden_state_loss(a, b, kind).item(), ref, rtol=1e-5)
    a64t = a.double().requires_grad_()
    assert torch.autograd.gradcheck(lambda x: losses.hidden_state_loss(x, b.double(), kind), (a64t,))
