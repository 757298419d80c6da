import os

import torch

from minitron.distributed.gang import LocalGang, launcher_env


def test_slurm_variables_become_torch_distributed_ones(monkeypatch):
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("SLURM_PROCID", "5")
    monkeypatch.setenv("SLURM_NTASKS", "16")
    monkeypatch.setenv("SLURM_LOCALID", "1")
    monkeypatch.setenv("MASTER_ADDR", "node-001")
    env = launcher_env()
    assert (env["RANK"], env["WORLD_SIZE"], env["LOCAL_RANK"], env["MASTER_ADDR"]) == ("5", "16", "1", "node-001")


def test_no_launcher_is_a_world_of_one(monkeypatch):
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "SLURM_PROCID", "SLURM_NTASKS"):
        monkeypatch.delenv(var, raising=False)
    env = launcher_env()
    assert (env["RANK"], env["WORLD_SIZE"], env["MASTER_PORT"]) == ("0", "1", "0")


def test_local_gang_is_the_identity():
    g = LocalGang()
    t = torch.tensor([1.0, 2.0])
    assert torch.equal(g.all_reduce_sum(t), t) and g.broadcast_object({"a": 1}) == {"a": 1}


def test_one_process_on_the_cpu_builds_no_shared_memory_op(tmp_path):
    """DeepSpeed compiles a shared-memory collective op for the CPU when its comm starts (22 s
    here into an empty extensions cache, 60 s seen when another environment wrote it); a lone
    process has no peers for it, so minitron's 1-process runs skip it. Two processes still get
    it (the multi-process tests run with it)."""
    import subprocess
    import sys

    extensions = tmp_path / "torch_extensions"
    proc = subprocess.run([sys.executable, "-m", "minitron.cli.train", "model=tiny", "train.max_steps=1",
                           "train.eval_every=0", "logger=none", f"output_dir={tmp_path / 'run'}"],
                          capture_output=True, text=True, timeout=600,
                          env={**os.environ, "TORCH_EXTENSIONS_DIR": str(extensions)})
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert not (extensions / "deepspeed_shm_comm").exists()
    assert "shm_comm_op built" not in (tmp_path / "run" / "train.log").read_text()
