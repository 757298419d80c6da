"""A Gemma teacher distils into a pruned Gemma student end to end through the CLIs: trained from a
preset, pruned in width and depth (the embedding scale folded in), distilled on the fused
soft-capped loss, and measured from the models' own full logits."""
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, AutoTokenizer

from conftest import PRUNE, corpus_texts, read_metrics, run_cli, tiny_args

DISTILL = [sys.executable, "-m", "minitron.cli.distill"]


@pytest.fixture(scope="module")
def gemma_run(tmp_path_factory, corpus_dir):
    root = tmp_path_factory.mktemp("gemma")
    run_cli(tiny_args(corpus_dir, root / "teacher", "model.family=gemma2", "model.tie_word_embeddings=true",
                      "train.max_steps=30", "train.lr=3e-3"))
    teacher = root / "teacher" / "model"
    run_cli([f"model.path={teacher}", f"data.path={corpus_dir}", "data.seq_len=64", f"output_dir={root / 'pruned'}",
             "prune.calibration.num_samples=16", "prune.calibration.micro_batch_size=4", "prune.depth.eval_blocks=8",
             "prune.export.hidden_size=48", "prune.export.ffn_hidden_size=96", "prune.export.num_attention_heads=2",
             "prune.export.num_layers=1"], launcher=PRUNE)
    run_cli([f"teacher.path={teacher}", f"student.path={root / 'pruned'}", f"data.path={corpus_dir}",
             f"output_dir={root / 'distilled'}", "logger=none", "data.seq_len=64", "train.micro_batch_size=4",
             "train.global_batch_size=8", "train.max_steps=16", "train.eval_every=8", "train.eval_blocks=16",
             "train.save_every=0", "train.warmup_steps=1", "train.lr=3e-3", "distill.logits.chunk_tokens=100"],
            launcher=DISTILL)
    return teacher, root / "pruned", root / "distilled"


def mean_kl(teacher, student, input_ids) -> float:
    """KL(teacher || student) per token from each model's own forward (soft-capped logits)."""
    with torch.no_grad():
        p = F.log_softmax(teacher(input_ids).logits.double(), -1)
        q = F.log_softmax(student(input_ids).logits.double(), -1)
    return (p.exp() * (p - q)).sum(-1).mean().item()


def test_gemma_teacher_distils_into_a_pruned_gemma_student(gemma_run, corpus_dir):
    teacher_dir, pruned_dir, distilled = gemma_run
    summary = json.loads((distilled / "summary.json").read_text())
    if not torch.cuda.is_available():
        assert summary["attn_implementation"] == "eager"  # Gemma 2 has no SDPA path
    kd = [row["train/kd"] for _, row in sorted(read_metrics(distilled).items()) if "train/kd" in row]
    assert len(kd) == 16 and np.mean(kd[-4:]) < 0.8 * np.mean(kd[:4])

    teacher = AutoModelForCausalLM.from_pretrained(teacher_dir, attn_implementation="eager").eval()
    pruned = AutoModelForCausalLM.from_pretrained(pruned_dir, attn_implementation="eager").eval()
    student = AutoModelForCausalLM.from_pretrained(summary["output_model"], attn_implementation="eager").eval()
    assert student.config.model_type == "gemma2" and student.config.hidden_size == 48
    assert student.lm_head.weight.data_ptr() == student.model.embed_tokens.weight.data_ptr()
    assert student.config.layer_types == [teacher.config.layer_types[i] for i in
                                          json.loads((pruned_dir / "pruning.json").read_text())["kept"]["layers"]]
    tokenizer = AutoTokenizer.from_pretrained(teacher_dir)
    text = corpus_texts(corpus_dir)[-1]  # the same 8 blocks for every model
    input_ids = torch.tensor([tokenizer(text)["input_ids"][i:i + 64] for i in range(0, 64 * 8, 64)])
    assert mean_kl(teacher, student, input_ids) < 0.9 * mean_kl(teacher, pruned, input_ids)
    with torch.no_grad():
        cached = student.generate(input_ids[:1, :8], max_new_tokens=8, do_sample=False, use_cache=True)
        uncached = student.generate(input_ids[:1, :8], max_new_tokens=8, do_sample=False, use_cache=False)
    assert torch.equal(cached, uncached)
