"""README command 1 as written (only output_dir differs) pretrains the embedded teacher first: on
2 CPU cores to a validation perplexity well below a unigram model's on the same split, and to a
greedy continuation of `def ` that reads as Python."""
import json
import math
from pathlib import Path

import numpy as np
import pytest
from transformers import AutoModelForCausalLM, AutoTokenizer

from conftest import reads_as_python
from minitron.data.packing import open_blocks
from minitron.eval.sample import greedy_sample


def unigram_ppl(train: np.ndarray, val: np.ndarray, vocab_size: int) -> float:
    """Perplexity of add-one-smoothed unigram frequencies of the training blocks, on the tokens the
    LM predicts (each block but its first token)."""
    counts = np.bincount(np.asarray(train).ravel(), minlength=vocab_size) + 1.0
    logp = np.log(counts / counts.sum())
    return math.exp(-logp[np.asarray(val)[:, 1:]].mean())


@pytest.mark.slow
def test_default_job_beats_unigram_and_writes_python(embedded_teacher):
    out = embedded_teacher
    summary = json.loads((out / "summary.json").read_text())
    config = json.loads((out / "model" / "config.json").read_text())
    data_dir = Path(summary["data_cache"])
    train, val = open_blocks(data_dir, "train"), open_blocks(data_dir, "val")
    eval_blocks = val[:64]  # train.eval_blocks default: the blocks val_loss was measured on
    baseline = unigram_ppl(train, eval_blocks, config["vocab_size"])
    assert summary["val_ppl"] < 0.3 * baseline, (summary["val_ppl"], baseline)
    assert 4e6 <= summary["params"] <= 8e6

    # The quick start's sample: the exported teacher's greedy continuation of `def ` reads as Python.
    model = AutoModelForCausalLM.from_pretrained(summary["output_model"]).eval()
    text = greedy_sample(model, AutoTokenizer.from_pretrained(summary["output_model"]), "def ", 48)
    print("generated:", repr(text), "val_ppl", summary["val_ppl"], "unigram", baseline)
    assert reads_as_python(text), text

