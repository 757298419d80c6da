import itertools
import os
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from minitron.cli.common import check_group_choices, conf_dir, prepare_argv
from minitron.checks import check_train_config
from minitron.config import (ConfigError, DistillConfig, DistillJobConfig, PruneConfig, PruneJobConfig,
                             TrainJobConfig, register_schemas)

GROUPS = {g: sorted(p.stem for p in (Path(conf_dir()) / g).glob("*.yaml"))
          for g in ("model", "deepspeed", "logger")}


@pytest.mark.parametrize("choice", list(itertools.product(*GROUPS.values())))
def test_every_config_composes_into_the_schema(choice):
    register_schemas()
    overrides = [f"{g}={c}" for g, c in zip(GROUPS, choice)]
    with initialize_config_dir(config_dir=conf_dir(), version_base="1.3"):
        cfg = compose(config_name="train", overrides=overrides)
    job = OmegaConf.to_object(cfg)
    assert isinstance(job, TrainJobConfig)
    assert job.model.name == choice[0]
    assert job.deepspeed.zero_optimization["stage"] == int(choice[1][-1])
    assert job.logger.backend == choice[2]
    check_train_config(job, world_size=1)


def test_typo_in_a_key_is_rejected():
    register_schemas()
    with initialize_config_dir(config_dir=conf_dir(), version_base="1.3"):
        with pytest.raises(Exception, match="micro_bach_size"):
            compose(config_name="train", overrides=["train.micro_bach_size=2"])


def test_batch_divisibility_names_the_key():
    job = TrainJobConfig()
    job.train.global_batch_size, job.train.micro_batch_size = 12, 4
    check_train_config(job, world_size=3)
    with pytest.raises(ConfigError, match="^train.global_batch_size"):
        check_train_config(job, world_size=2)


@pytest.mark.parametrize("global_batch, world, micro", [(8, 1, 8), (8, 2, 4), (8, 8, 1), (32, 2, 8),
                                                       (24, 1, 8), (12, 1, 6), (7, 1, 7), (36, 4, 3)])
def test_an_unset_micro_batch_fits_any_process_count_that_divides_the_global_batch(global_batch, world, micro):
    job = TrainJobConfig()
    job.train.global_batch_size = global_batch
    check_train_config(job, world_size=world)
    assert job.train.micro_batch_size == micro
    accumulation = global_batch // (micro * world)
    assert micro * world * accumulation == global_batch and micro <= 8


def test_a_global_batch_that_does_not_split_over_the_processes_names_the_key():
    job = TrainJobConfig()
    job.train.global_batch_size = 8
    with pytest.raises(ConfigError, match=r"^train.global_batch_size: 8 sequences do not split evenly over 3 "
                                          r"processes; make it a multiple of 3$"):
        check_train_config(job, world_size=3)


def test_deepspeed_launcher_argument_moves_to_the_environment(monkeypatch):
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    monkeypatch.setenv("RANK", "1")
    assert prepare_argv(["--local_rank=1", "model=tiny"]) == ["model=tiny", "hydra.output_subdir=null"]
    assert os.environ["LOCAL_RANK"] == "1"
    monkeypatch.setenv("RANK", "0")
    assert prepare_argv(["--local_rank", "0", "seed=3"]) == ["seed=3"]


def test_unknown_preset_is_one_line_naming_the_key():
    check_group_choices(["model=tiny", "model.path=/x", "deepspeed=zero3"], conf_dir())
    with pytest.raises(ConfigError, match=r"^model: unknown preset 'huge'; choose one of small, tiny$"):
        check_group_choices(["model=huge"], conf_dir())


def test_prune_config_composes_into_its_schema_with_the_schema_defaults():
    register_schemas()
    with initialize_config_dir(config_dir=conf_dir(), version_base="1.3"):
        plain = OmegaConf.to_object(compose(config_name="prune", overrides=["model.path=/t"]))
        shaped = OmegaConf.to_object(compose(config_name="prune", overrides=["prune.export.num_layers=3"]))
    assert isinstance(plain, PruneJobConfig) and plain.model.path == "/t"
    # conf/prune.yaml spells the defaults out for users to read; they must not drift from the schema.
    assert plain.prune == PruneConfig()
    assert shaped.prune.export.num_layers == 3


@pytest.mark.parametrize("preset", sorted(p.stem for p in (Path(conf_dir()) / "distill").glob("*.yaml")))
def test_distill_presets_compose_into_the_schema(preset):
    register_schemas()
    with initialize_config_dir(config_dir=conf_dir(), version_base="1.3"):
        job = OmegaConf.to_object(compose(config_name="distill", overrides=[f"distill={preset}", "deepspeed=zero3"]))
    assert isinstance(job, DistillJobConfig) and job.distill.name == preset
    assert job.deepspeed.zero_optimization["stage"] == 3
    check_train_config(job, world_size=1)
    if preset == "logits":  # the default: the paper's best, forward KL at T=1 without cross-entropy
        assert job.distill == DistillConfig()


@pytest.mark.parametrize("command", ["train", "prune", "distill", "search", "eval", "pipeline"])
def test_every_command_takes_the_common_keys(command):
    """Scripts pass the same keys to every command: none may refuse one (minitron-prune refused
    logger=none before the search landed)."""
    register_schemas()
    with initialize_config_dir(config_dir=conf_dir(), version_base="1.3"):
        cfg = compose(config_name=command, overrides=["output_dir=runs/x", "seed=3", "logger=none", "deepspeed=zero2"])
    job = OmegaConf.to_object(cfg)
    assert (job.output_dir, job.seed, job.logger.backend) == ("runs/x", 3, "none")
    assert job.deepspeed.zero_optimization["stage"] == 2


@pytest.mark.parametrize("preset", sorted(p.stem for p in (Path(conf_dir()) / "search").glob("*.yaml")))
def test_search_presets_compose(preset):
    register_schemas()
    with initialize_config_dir(config_dir=conf_dir(), version_base="1.3"):
        job = OmegaConf.to_object(compose(config_name="search", overrides=[f"search={preset}"]))
    assert job.search.name == preset and job.search.space.num_layers.step == 1


def test_slurm_launcher_config_composes_with_the_submitit_plugin():
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    register_schemas()
    with initialize_config_dir(config_dir=conf_dir(), version_base="1.3"):
        cfg = compose(config_name="search", overrides=["hydra/launcher=slurm"], return_hydra_config=True)
    launcher = cfg.hydra.launcher
    assert launcher._target_.endswith("SlurmLauncher") and launcher.tasks_per_node == launcher.gpus_per_node == 8
