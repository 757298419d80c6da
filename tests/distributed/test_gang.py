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
