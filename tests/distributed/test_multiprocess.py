"""Two real DeepSpeed processes on CPU (gloo) train exactly like one with the same global batch,
however they are launched: torchrun, deepspeed (--num_gpus or a hostfile), two torchrun "nodes"
meeting at a rendezvous, or SLURM's srun (its variables alone)."""
import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from conftest import read_metrics, run_cli, tiny_args

STEPS = 5
DEEPSPEED_SH = Path(__file__).resolve().parents[2] / "launch" / "deepspeed.sh"
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


def args(corpus_dir, out):
    """The batch keys at their defaults: a global batch of 8, the micro batch derived (8 on one
    process; 4 on each of two), which must run under every launcher as is."""
    return [a for a in tiny_args(corpus_dir, out, f"train.max_steps={STEPS}", f"train.eval_every={STEPS}",
                                 "train.lr=3e-3") if "batch_size=" not in a]


@pytest.fixture(scope="module")
def single_process(tmp_path_factory, corpus_dir):
    out = tmp_path_factory.mktemp("one")
    run_cli(args(corpus_dir, out))
    return out


@pytest.fixture(scope="module")
def one_node_two_processes(tmp_path_factory, corpus_dir):
    out = tmp_path_factory.mktemp("one_node")
    run_cli([*args(corpus_dir, out), "deepspeed=zero1"], launcher=launcher("torchrun"))
    return out


@pytest.mark.parametrize("stage,kind", [(2, "deepspeed"), (3, "torchrun")])
def test_two_processes_match_one(tmp_path, corpus_dir, single_process, stage, kind):
    out = tmp_path / "two"
    run_cli([*args(corpus_dir, out), f"deepspeed=zero{stage}"], launcher=launcher(kind))
    check_matches_one_process(out, single_process)


def test_zero3_streams_a_sharded_export_equal_to_one_process(tmp_path, corpus_dir, single_process):
    """ZeRO-3 over 2 processes with every parameter partitioned: rank 0 streams the export one
    gathered parameter at a time; with a small export.max_shard_size it is several files and an
    index, and it loads as the 1-process export."""
    out = tmp_path / "two"
    run_cli([*args(corpus_dir, out), "deepspeed=zero3", "+deepspeed.zero_optimization.stage3_param_persistence_threshold=0",
             "export.max_shard_size=100KB"], launcher=launcher("torchrun"))
    check_matches_one_process(out, single_process)
    index = json.loads((out / "model" / "model.safetensors.index.json").read_text())
    shards = sorted((out / "model").glob("model-*-of-*.safetensors"))
    assert len(shards) > 2 and set(index["weight_map"].values()) == {f.name for f in shards}
    assert not (out / "model" / "model.safetensors").exists()


def test_two_processes_under_zero1_match_one(one_node_two_processes, single_process):
    check_matches_one_process(one_node_two_processes, single_process)


def check_matches_one_process(out: Path, single_process: Path) -> None:
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


def test_two_nodes_match_one_node_with_two_processes(tmp_path, corpus_dir, one_node_two_processes):
    """Two torchrun "nodes" on this machine, one process each, meeting at a c10d rendezvous on
    localhost: the same two ranks as one node with two processes, so the same losses."""
    out, port = tmp_path / "two_nodes", free_port()
    nodes = [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node_rank", str(rank),
                               "--nproc_per_node", "1", "--rdzv_backend", "c10d", "--rdzv_id", "two-nodes",
                               "--rdzv_endpoint", f"127.0.0.1:{port}", TRAIN_PY,
                               *args(corpus_dir, out), "deepspeed=zero1"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for rank in (0, 1)]
    check_all_exit_zero(nodes)
    check_same_run(out, one_node_two_processes)


def test_srun_variables_alone_make_two_ranks(tmp_path, corpus_dir, one_node_two_processes):
    """What srun gives each task (SLURM_PROCID / SLURM_NTASKS / SLURM_LOCALID) and what
    launch/slurm.sbatch exports (MASTER_ADDR / MASTER_PORT), with no torchrun: two ranks."""
    out, port = tmp_path / "srun", free_port()
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    tasks = [subprocess.Popen([sys.executable, "-m", "minitron.cli.train", *args(corpus_dir, out), "deepspeed=zero1"],
                              env={**env, "SLURM_PROCID": str(rank), "SLURM_NTASKS": "2", "SLURM_LOCALID": str(rank),
                                   "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)},
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for rank in (0, 1)]
    check_all_exit_zero(tasks)
    check_same_run(out, one_node_two_processes)


def test_deepspeed_hostfile_with_two_local_slots(tmp_path, corpus_dir, one_node_two_processes):
    """launch/deepspeed.sh with a hostfile, as on a cluster, of one host with two slots (without
    ssh: NODE_RANK says which line of the hostfile this node is)."""
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("localhost slots=2\n")
    out = tmp_path / "hostfile_run"
    run_cli(["train", *args(corpus_dir, out), "deepspeed=zero1"], launcher=["bash", str(DEEPSPEED_SH)],
            env={"HOSTFILE": str(hostfile), "NODE_RANK": "0", "MASTER_ADDR": "127.0.0.1",
                 "MASTER_PORT": str(free_port())})
    check_same_run(out, one_node_two_processes)


def test_deepspeed_hostfile_with_two_nodes_started_on_each(tmp_path, corpus_dir, one_node_two_processes):
    """A hostfile of two one-slot nodes, launch/deepspeed.sh started on each with its NODE_RANK
    (DeepSpeed's --no_ssh mode): the same two ranks."""
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("node-a slots=1\nnode-b slots=1\n")
    out, port = tmp_path / "hostfile_nodes", free_port()
    nodes = [subprocess.Popen(["bash", str(DEEPSPEED_SH), "train", *args(corpus_dir, out), "deepspeed=zero1"],
                              env={**os.environ, "HOSTFILE": str(hostfile), "NODE_RANK": str(rank),
                                   "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)},
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for rank in (0, 1)]
    check_all_exit_zero(nodes)
    check_same_run(out, one_node_two_processes)


def check_all_exit_zero(procs) -> None:
    for proc in procs:
        try:
            _, stderr = proc.communicate(timeout=600)
        finally:
            for other in procs:
                if other.poll() is None and proc.returncode != 0:
                    other.kill()
        assert proc.returncode == 0, stderr[-4000:]


def check_same_run(out: Path, reference: Path) -> None:
    """The same two ranks doing the same sums: the same losses and the same exported model."""
    got, want = read_metrics(out), read_metrics(reference)
    assert sorted(got) == sorted(want) == list(range(1, STEPS + 1))
    for step in want:
        assert got[step]["train/loss"] == pytest.approx(want[step]["train/loss"], rel=1e-6)
    assert got[STEPS]["val/loss"] == pytest.approx(want[STEPS]["val/loss"], rel=1e-6)
    assert json.loads((out / "summary.json").read_text())["world_size"] == 2
