"""The real CLI, one process: outputs, W&B offline files, the exported checkpoint."""
import json
import math
from pathlib import Path

import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM, AutoTokenizer

from minitron.train.schedule import lr_multiplier
from conftest import corpus_texts, read_metrics, run_cli, tiny_args


def test_tiny_run_writes_a_loadable_checkpoint_and_summary(tmp_path, corpus_dir):
    out = tmp_path / "run"
    run_cli(tiny_args(corpus_dir, out, "logger=wandb", "train.max_steps=12", "train.eval_every=4",
                      "train.lr=3e-3"))
    summary = json.loads((out / "summary.json").read_text())
    for key in ("val_loss", "val_ppl", "params", "tokens_seen", "output_model"):
        assert key in summary
    assert summary["tokens_seen"] == 12 * 8 * 64
    assert summary["val_ppl"] == pytest.approx(math.exp(summary["val_loss"]))

    metrics = read_metrics(out)
    assert sorted(metrics) == list(range(1, 13))
    val = [metrics[s]["val/loss"] for s in (4, 8, 12)]
    assert val[-1] < val[0]  # it learns
    assert summary["val_loss"] == val[-1]
    assert all(k in metrics[1] for k in ("train/loss", "train/lr", "train/grad_norm", "train/tokens_per_s"))

    resolved = yaml.safe_load((out / "config.yaml").read_text())
    train = resolved["train"]
    # Each row's rate is the one its step used (logged before the scheduler steps past it).
    assert [metrics[s]["train/lr"] for s in range(1, 13)] == pytest.approx(
        [train["lr"] * lr_multiplier(s - 1, train["warmup_steps"], 12, train["min_lr_ratio"]) for s in range(1, 13)],
        rel=1e-12)
    # The summary's throughput is the median step's (the first, warm-up step left out): an odd
    # count, so exactly one logged step's rate.
    assert summary["tokens_per_s"] == pytest.approx(sorted(metrics[s]["train/tokens_per_s"] for s in range(2, 13))[5],
                                                    rel=1e-9)
    assert resolved["model"]["name"] == "tiny" and resolved["output_dir"] == str(out)
    assert list((out / "wandb").glob("offline-run-*/run-*.wandb"))

    model = AutoModelForCausalLM.from_pretrained(summary["output_model"])
    tok = AutoTokenizer.from_pretrained(summary["output_model"])
    assert model.num_parameters() == summary["params"]
    prompt = tok("def main(", return_tensors="pt")
    generated = model.generate(**prompt, max_new_tokens=8, do_sample=False, pad_token_id=tok.eos_token_id)
    assert generated.shape[1] == prompt["input_ids"].shape[1] + 8
    assert isinstance(tok.decode(generated[0]), str)


def test_continue_training_from_a_local_checkpoint(tmp_path, corpus_dir):
    first = tmp_path / "first"
    run_cli(tiny_args(corpus_dir, first, "train.max_steps=2"))
    second = tmp_path / "second"
    run_cli(tiny_args(corpus_dir, second, f"model.path={first / 'model'}", "train.max_steps=2"))
    summary = json.loads((second / "summary.json").read_text())
    assert summary["params"] == json.loads((first / "summary.json").read_text())["params"]


def test_bf16_run_exports_bf16_weights(tmp_path, corpus_dir):
    out = tmp_path / "bf16"
    run_cli(tiny_args(corpus_dir, out, "train.precision=bf16", "train.max_steps=3"))
    summary = json.loads((out / "summary.json").read_text())
    assert math.isfinite(summary["val_loss"])
    model = AutoModelForCausalLM.from_pretrained(summary["output_model"], dtype="auto")
    assert model.dtype == torch.bfloat16


def test_multirun_sweep_runs_each_job(tmp_path, corpus_dir):
    args = tiny_args(corpus_dir, tmp_path / "lr${train.lr}", "train.max_steps=2", "train.eval_every=2")
    run_cli(["-m", *args, "train.lr=0.001,0.002"])
    losses = [json.loads((tmp_path / f"lr{lr}" / "summary.json").read_text())["val_loss"]
              for lr in ("0.001", "0.002")]
    assert losses[0] != losses[1]


def test_one_large_text_file_with_the_defaults(tmp_path, corpus_dir):
    """The most common corpus: one .txt file. Its blank lines separate documents, so it has a
    validation split; with a blend of it and a JSON-lines corpus the run trains too."""
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n\n".join(corpus_texts(corpus_dir)) * 2)  # ~0.8 MB
    out = tmp_path / "run"
    run_cli(tiny_args(corpus, out, "train.max_steps=3", "train.eval_every=3"))
    summary = json.loads((out / "summary.json").read_text())
    assert math.isfinite(summary["val_loss"])
    meta = json.loads((Path(summary["data_cache"]) / "meta.json").read_text())
    assert meta["val_documents"] > 10 and meta["val_blocks"] > 0
    (tmp_path / "more.jsonl").write_text(json.dumps({"text": corpus_texts(corpus_dir)[0]}) + "\n")
    blend = f"data.sources=[{{path: {corpus}, weight: 3}}, {{path: {tmp_path / 'more.jsonl'}, weight: 1}}]"
    args = [a for a in tiny_args(corpus, tmp_path / "blend", "train.max_steps=2", "train.eval_every=2", blend)
            if not a.startswith("data.path=")]
    run_cli(args)
    assert (tmp_path / "blend" / "summary.json").exists()
