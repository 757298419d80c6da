"""The teacher cache (distill.teacher_cache): the loss from cached top-k logits equals the loss
over the teacher's top-k support computed from its full logits (the chunked loss and its gradients;
a whole distillation's per-step losses), and a second run reads every block from the cache without
loading the teacher."""
import itertools
import json
import sys

import numpy as np
import pytest
import torch

from conftest import read_metrics, run_cli
from minitron.distill import losses
from minitron.distill.fused import chunked_logit_loss
from minitron.distill.teacher_cache import TeacherCache, block_key, teacher_topk

DISTILL = [sys.executable, "-m", "minitron.cli.distill"]
K = 5


def spec(**kw):
    from types import SimpleNamespace

    base = dict(divergence="forward_kl", temperature=1.0, top_k=K, beta=0.3, scale_by_t2=False, ce_weight=0.0,
                kernel="torch")
    return SimpleNamespace(**{**base, **kw})


SPECS = [spec(divergence=d, temperature=t, ce_weight=c, scale_by_t2=t != 1.0)
         for d, t, c in itertools.product(losses.DIVERGENCES, (1.0, 2.0), (0.0, 0.5))]


@pytest.mark.parametrize("s", SPECS, ids=lambda s: f"{s.divergence}-T{s.temperature}-ce{s.ce_weight}")
@pytest.mark.parametrize("softcap", [None, 3.0])
def test_cached_topk_loss_equals_the_topk_loss_from_full_logits(s, softcap):
    g = torch.Generator().manual_seed(0)
    n, h, kh, vocab = 45, 16, 24, 40
    hs = torch.randn(n, h, generator=g, dtype=torch.float64).requires_grad_()
    ws = (torch.randn(vocab + 3, h, generator=g, dtype=torch.float64) * 0.5).requires_grad_()
    ht = torch.randn(n, kh, generator=g, dtype=torch.float64)
    wt = torch.randn(vocab + 7, kh, generator=g, dtype=torch.float64) * 0.5
    targets = torch.randint(0, vocab, (n,), generator=g)
    want, want_parts = chunked_logit_loss(hs, ws, ht, wt, targets, vocab, s, chunk_tokens=8, teacher_softcap=softcap)
    want_grads = torch.autograd.grad(want, (hs, ws))

    cached = teacher_topk(ht, wt, vocab, 2 * K, softcap, chunk_tokens=7)  # more kept than the loss uses
    got, got_parts = chunked_logit_loss(hs, ws, None, None, targets, vocab, s, chunk_tokens=8, teacher_topk=cached)
    got_grads = torch.autograd.grad(got, (hs, ws))
    torch.testing.assert_close(got, want, rtol=1e-12, atol=0)
    torch.testing.assert_close(got_parts["kd"], want_parts["kd"], rtol=1e-12, atol=0)
    for a, b in zip(got_grads, want_grads):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("dtype, rtol", [("fp32", 0), ("fp16", 1e-3), ("bf16", 1e-2)])
def test_a_segment_round_trips_through_the_files(tmp_path, dtype, rtol):
    cache = TeacherCache(tmp_path / "c", k=3, dtype=dtype)
    blocks = np.arange(40, dtype=np.uint16).reshape(4, 10)
    values = torch.randn(2, 9, 3) * 10
    indices = torch.randint(0, 500, (2, 9, 3), dtype=torch.int32)
    from minitron.distill.teacher_cache import _to_storage

    keys = np.stack([np.frombuffer(block_key(b), dtype=np.uint8) for b in blocks[[2, 0]]])
    cache.write_segment(keys, _to_storage(values, dtype), indices.numpy())
    cache.reload()
    assert list(cache.missing(blocks, [0, 1, 2, 3, 1])) == [1, 3]
    got_values, got_indices = cache.lookup(torch.from_numpy(blocks[[0, 2, 0]].astype(np.int64)))
    torch.testing.assert_close(got_values, values[[1, 0, 1]], rtol=rtol, atol=0)
    assert torch.equal(got_indices, indices[[1, 0, 1]].long())
    with pytest.raises(KeyError, match="missing from the teacher cache"):
        cache.lookup(torch.from_numpy(blocks[[1]].astype(np.int64)))


def distill_args(teacher, student, corpus_dir, out, *extra):
    return [f"teacher.path={teacher}", f"student.path={student}", f"data.path={corpus_dir}", f"output_dir={out}",
            "logger=none", "data.seq_len=64", "train.micro_batch_size=4", "train.global_batch_size=8",
            "train.max_steps=4", "train.eval_every=2", "train.eval_blocks=16", "train.save_every=0",
            "train.warmup_steps=1", "train.lr=3e-3", "distill.logits.chunk_tokens=100",
            f"distill.logits.top_k={K}", *extra]


@pytest.mark.slow
def test_a_cached_distillation_equals_the_topk_one_and_reuses_the_cache(tmp_path, tiny_teacher, pruned_student,
                                                                        corpus_dir):
    cache_env = {"MINITRON_CACHE": str(tmp_path / "cache")}
    run_cli(distill_args(tiny_teacher, pruned_student, corpus_dir, tmp_path / "plain"), launcher=DISTILL,
            env=cache_env)
    cached = ["distill.teacher_cache=true", "distill.teacher_cache_k=8", "distill.teacher_cache_dtype=fp32"]
    run_cli(distill_args(tiny_teacher, pruned_student, corpus_dir, tmp_path / "first", *cached), launcher=DISTILL,
            env=cache_env)
    second = run_cli(distill_args(tiny_teacher, pruned_student, corpus_dir, tmp_path / "second", *cached),
                     launcher=DISTILL, env=cache_env)
    plain, first, again = (read_metrics(tmp_path / d) for d in ("plain", "first", "second"))
    for step in (1, 2, 3, 4):
        assert first[step]["train/loss"] == pytest.approx(plain[step]["train/loss"], rel=1e-5), step
        assert again[step]["train/loss"] == first[step]["train/loss"], step
    summaries = [json.loads((tmp_path / d / "summary.json").read_text()) for d in ("plain", "first", "second")]
    assert summaries[1]["teacher_cache_filled_blocks"] > 0
    assert summaries[2]["teacher_cache_filled_blocks"] == 0
    assert "the teacher is not loaded" in second.stderr + second.stdout + \
        (tmp_path / "second" / "distill.log").read_text()
    assert summaries[2]["teacher_val_loss"] == pytest.approx(summaries[0]["teacher_val_loss"], rel=1e-6)
    assert summaries[2]["val_loss"] == pytest.approx(summaries[0]["val_loss"], rel=1e-5)
