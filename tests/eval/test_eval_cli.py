"""minitron-eval on an exported checkpoint: validation perplexity against a float64 full-logit
reference on the same blocks, the shipped lm-eval task's scores in summary.json, and bad input
refused in one line before any model loads."""
import json
import math
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM

from conftest import compose_job, run_cli
from minitron.config import ConfigError
from minitron.data.packing import open_blocks
from minitron.eval.job import check_eval_inputs

EVAL = [sys.executable, "-m", "minitron.cli.eval"]


def test_eval_writes_perplexity_and_the_local_task(tiny_teacher, corpus_dir, tmp_path):
    out = tmp_path / "eval"
    proc = run_cli([f"model.path={tiny_teacher}", f"data.path={corpus_dir}", "data.seq_len=64", f"output_dir={out}",
                    "eval.blocks=12", "eval.micro_batch_size=5", "eval.tasks=[python_next_line]", "eval.limit=24"],
                   launcher=EVAL)
    summary = json.loads((out / "summary.json").read_text())
    scores = summary["tasks"]["python_next_line"]
    assert 0 <= scores["acc"] <= 1 and 0 <= scores["acc_norm"] <= 1 and scores["acc_stderr"] > 0
    assert "python_next_line acc" in proc.stdout
    assert summary["sample"].startswith("def ")  # eval.sample_prompt's default
    assert "the model, greedy from 'def ':\n  | def " in proc.stdout

    # The same 12 validation blocks through the full logits in float64.
    val = torch.from_numpy(open_blocks(Path(summary["data_cache"]), "val")[:12].astype("int64"))
    model = AutoModelForCausalLM.from_pretrained(tiny_teacher).double().eval()
    with torch.no_grad():
        logits = model(input_ids=val).logits[:, :-1]
    expected = F.cross_entropy(logits.transpose(1, 2), val[:, 1:], reduction="none").mean().item()
    assert summary["val_blocks"] == 12
    assert summary["val_loss"] == pytest.approx(expected, rel=1e-5)
    assert summary["val_ppl"] == pytest.approx(math.exp(expected), rel=1e-5)
    assert summary["params"] == sum(p.numel() for p in model.parameters())


# Through a real interpreter; the rest of eval's bad input is in the table (tests/cli/test_bad_input_table.py).
@pytest.mark.parametrize("overrides, message", [
    ([], "model.path: set it"),
    (["MODEL", "eval.tasks=[no_such_task_anywhere]"], "eval.tasks: unknown task"),
    (["MODEL", "output_dir=MODEL"], "output_dir:"),
])
def test_bad_input(overrides, message, tiny_teacher, corpus_dir, tmp_path):
    overrides = [o.replace("MODEL", f"model.path={tiny_teacher}") if o == "MODEL" else
                 o.replace("MODEL", str(tiny_teacher)) for o in overrides]
    cfg = compose_job("eval", f"output_dir={tmp_path / 'eval'}", f"data.path={corpus_dir}", *overrides)
    with pytest.raises(ConfigError) as e:
        check_eval_inputs(cfg)
    assert str(e.value).startswith(message), str(e.value)
    assert not (tmp_path / "eval").exists()
