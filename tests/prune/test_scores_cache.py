"""The importance-score cache records a SHA-256 of its content: a truncated or bit-flipped entry is
found when read, warned about, and recomputed, never used (issue 13)."""
import logging
import os

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from conftest import compose_job
from minitron.data.packing import build_or_load
from minitron.distributed.gang import LocalGang
from minitron.models.adapters import adapter_for
from minitron.prune import scores


@pytest.fixture(scope="module")
def job(tmp_path_factory, corpus_dir):
    """A tiny random llama saved as a checkpoint, the test corpus packed for it, and a prune job
    config whose scores live in their own directory."""
    root = tmp_path_factory.mktemp("scores_cache")
    cfg = AutoConfig.for_model("llama", vocab_size=512, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(root / "teacher")
    job = compose_job("prune", f"model.path={root / 'teacher'}", f"data.path={corpus_dir}", "data.vocab_size=512",
                      "data.seq_len=64", f"data.cache_dir={root / 'cache'}", f"output_dir={root / 'out'}",
                      f"prune.scores_dir={root / 'scores'}", "prune.calibration.num_samples=8",
                      "prune.calibration.micro_batch_size=4", "prune.depth.eval_blocks=4")
    return job, build_or_load(job.data, LocalGang(), job.seed)


def score(job):
    cfg, data = job
    teacher = AutoModelForCausalLM.from_pretrained(cfg.model.path, attn_implementation="eager").eval()
    return scores.load_or_score(cfg, teacher, adapter_for(teacher.config), data, LocalGang(), torch.device("cpu"),
                                block_sizes=[1])


def truncate(file):
    os.truncate(file, file.stat().st_size * 2 // 3)


def flip_a_score_bit(file):
    """One bit inside the largest tensor's bytes. torch.load does not check tensor bytes, so the
    file still loads, with a changed score: only the recorded SHA-256 can tell."""
    raw = bytearray(file.read_bytes())
    largest = max(torch.load(file, weights_only=True)["stats"].values(), key=torch.Tensor.numel)
    needle = largest.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
    at = raw.find(needle)
    assert at > 0
    raw[at + len(needle) // 2] ^= 0x01
    file.write_bytes(bytes(raw))
    flipped = max(torch.load(file, weights_only=True)["stats"].values(), key=torch.Tensor.numel)
    assert flipped.shape == largest.shape and not torch.equal(flipped, largest)


def assert_same_scores(a: dict, b: dict):
    assert a.keys() == b.keys()
    for key in a:
        if isinstance(a[key], dict):
            assert_same_scores(a[key], b[key])
        else:
            torch.testing.assert_close(b[key], a[key], rtol=0, atol=0)


@pytest.mark.parametrize("harm", [truncate, flip_a_score_bit])
def test_damaged_scores_are_recomputed_not_used(job, caplog, harm):
    first = score(job)
    path = first.path
    harm(path)
    with caplog.at_level(logging.WARNING, logger="minitron.prune.scores"):
        again = score(job)
    warnings = [r.getMessage() for r in caplog.records if r.name == "minitron.prune.scores"]
    assert len(warnings) == 1 and "\n" not in warnings[0]
    assert warnings[0].startswith(f"importance scores {path}: ") and warnings[0].endswith("; recomputing")
    if harm is flip_a_score_bit:
        assert warnings[0] == f"importance scores {path}: its content does not match its SHA-256; recomputing"
    assert again.reused is False
    assert_same_scores(first.cached, again.cached)
    assert score(job).reused is True  # the recomputed entry was written back whole


def test_the_teacher_is_hashed_once_and_again_when_its_files_change(tmp_path):
    """The teacher's digest is memoised per file by path, size and mtime: an unchanged teacher is not
    re-read (proven by changing its bytes behind the memo's back), and a touched or replaced file
    is hashed anew."""
    teacher, memo = tmp_path / "teacher", tmp_path / "memo"
    teacher.mkdir()
    (teacher / "config.json").write_text('{"model_type": "llama"}')
    weights = teacher / "model.safetensors"
    weights.write_bytes(b"\x01" * 4096)
    first = scores.teacher_hash(str(teacher), memo)
    assert len(list(memo.iterdir())) == 2

    stamp = weights.stat()
    weights.write_bytes(b"\x02" * 4096)  # same size; the mtime is put back, so the memo answers
    os.utime(weights, ns=(stamp.st_atime_ns, stamp.st_mtime_ns))
    assert scores.teacher_hash(str(teacher), memo) == first

    os.utime(weights, ns=(stamp.st_atime_ns, stamp.st_mtime_ns + 10**9))  # touched: re-read, new bytes
    changed = scores.teacher_hash(str(teacher), memo)
    assert changed != first
    weights.write_bytes(b"\x01" * 4096)
    assert scores.teacher_hash(str(teacher), memo) == first  # the digest is of the content, not the stamp
    (teacher / "model-2.safetensors").write_bytes(b"")
    assert scores.teacher_hash(str(teacher), memo) != first  # a new weight file changes the teacher
