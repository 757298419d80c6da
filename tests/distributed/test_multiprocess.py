"""Two real DeepSpeed processes on CPU (gloo) train exactly like one with the same global batch."""
import json
import shutil
import socket
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from conftest import read_metrics, run_cli, tiny_args

STEPS = 5
TRAIN_PY = str(Path(__file__).resolve().parents[2] / "minitron" / "cli" / "train.py")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launcher(kind: str) -> list:
    if kind == "torchrun":
        return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                "--master_port", str(free_port()), TRAIN_PY]
    return [shutil.which("deepspeed"), "--num_gpus", "2", "--master_port", str(free_port()), TRAIN_PY]


def args(corpus_dir, out, micro):
    # Same global batch (8): one process accumulates 2 micro-batches of 4, two processes do 1 each.
    return tiny_args(corpus_dir, out, f"train.max_steps={STEPS}", f"train.eval_every={STEPS}",
                     f"train.micro_batch_size={micro}", "train.global_batch_size=8", "train.lr=3e-3")


@pytest.fixture(scope="module")
def single_process(tmp_path_factory, corpus_dir):
    out = tmp_path_factory.mktemp("one")
    run_cli(args(corpus_dir, out, micro=4))
    return out


@pytest.mark.parametrize("stage,kind", [(1, "torchrun"), (2, "deepspeed"), (3, "torchrun")])
def test_two_processes_match_one(tmp_path, corpus_dir, single_process, stage, kind):
    out = tmp_path / "two"
    run_cli([*args(corpus_dir, out, micro=4), f"deepspeed=zero{stage}"], launcher=launcher(kind))
    one, two = read_metrics(single_process), read_metrics(out)
    assert sorted(two) == list(range(1, STEPS + 1))
    for step in range(1, STEPS + 1):
        # fp32 all-reduce sums in another order than one process's accumulation: tolerance, not equality.
        assert two[step]["train/loss"] == pytest.approx(one[step]["train/loss"], rel=1e-5, abs=1e-6)
        assert two[step]["train/grad_norm"] == pytest.approx(one[step]["train/grad_norm"], rel=1e-4)
    assert two[STEPS]["val/loss"] == pytest.approx(one[STEPS]["val/loss"], rel=1e-5)

    summary = json.loads((out / "summary.json").read_text())
    assert summary["world_size"] == 2
    # The export gathers ZeRO-3 shards: the checkpoint is whole and matches the 1-process model.
    a = AutoModelForCausalLM.from_pretrained(summary["output_model"])
    b = AutoModelForCausalLM.from_pretrained(single_process / "model")
    for (name, pa), pb in zip(a.state_dict().items(), b.state_dict().values()):
        torch.testing.assert_close(pa, pb, rtol=1e-4, atol=1e-5, msg=name)
