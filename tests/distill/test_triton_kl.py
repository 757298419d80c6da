"""The Triton forward-KL kernel (the GPU path) against the PyTorch path, run on CPU tensors in
Triton's interpreter (conftest sets TRITON_INTERPRET=1)."""
import pytest
import torch

from minitron.distill import fused, triton_kl

pytestmark = pytest.mark.skipif(not triton_kl.available(), reason="triton is not installed (the dev extra has it)")


@pytest.mark.parametrize("temperature,scale", [(1.0, False), (2.0, True), (0.5, False)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kernel_equals_the_pytorch_path(temperature, scale, dtype):
    g = torch.Generator().manual_seed(0)
    student = (torch.randn(5, 200, generator=g) * 3).to(dtype)
    teacher = (torch.randn(5, 200, generator=g) * 3).to(dtype)
    want_loss, want_grad = fused.forward_kl_with_grad(student.clone(), teacher.clone(), temperature, scale)
    # block 64: four blocks per row, the last one masked; fp32 logits are overwritten in place.
    got_loss, got_grad = triton_kl.forward_kl_with_grad(student.clone(), teacher, temperature, scale, block=64)
    torch.testing.assert_close(got_loss, want_loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got_grad, want_grad, rtol=1e-5, atol=1e-5 * want_grad.abs().max().item())


def test_chunked_loss_through_the_kernel():
    g = torch.Generator().manual_seed(1)
    hs = torch.randn(9, 8, generator=g).requires_grad_()
    ws = torch.randn(30, 8, generator=g).requires_grad_()
    ht, wt = torch.randn(9, 12, generator=g), torch.randn(30, 12, generator=g)
    targets = torch.zeros(9, dtype=torch.long)
    results = []
    for kernel in ("torch", "triton"):
        spec = type("Spec", (), dict(divergence="forward_kl", temperature=1.0, top_k=0, beta=0.5, scale_by_t2=False,
                                     ce_weight=0.0, kernel=kernel))
        loss, _ = fused.chunked_logit_loss(hs, ws, ht, wt, targets, 28, spec, chunk_tokens=4)
        results.append((loss, *torch.autograd.grad(loss, (hs, ws))))
    for got, want in zip(results[1], results[0]):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)
