"""The training job: check inputs, build data and model, run the loop, export, summarise.

Everything that can be checked without data or weights is checked first, so a user's mistake
costs seconds, not a tokenisation pass or a model build.
"""
import logging
import math

import torch

from minitron.checks import check_train_config
from minitron.config import ConfigError, TrainJobConfig
from minitron.data.corpus import check_source
from minitron.data.sampler import BlockSampler
from minitron.distributed.engine import deepspeed_config, initialize
from minitron.distributed.gang import world_size_from_env
from minitron.distributed.sharded import build_for_engine
from minitron.models.build import (check_checkpoint_files, count_params, has_tokenizer, max_positions,
                                   resolve_hf_config, with_tokenizer_ids)
from minitron.run import begin_training, export_model, start_run, stop_interrupted, write_json_atomic
from minitron.train import checkpoint
from minitron.train.loop import lm_loss, train_loop
from minitron.train.schedule import build_optimizer, schedule_length
from minitron.train.tracking import make_tracker

log = logging.getLogger(__name__)


def check_inputs(cfg: TrainJobConfig, world_size: int):
    """Cheap checks; returns the model's transformers config (vocab size still a placeholder for
    presets, which take the tokenizer's)."""
    check_train_config(cfg, world_size)
    hf_config = resolve_hf_config(cfg.model, vocab_size=cfg.data.vocab_size)
    check_checkpoint_files(cfg.model)
    limit = max_positions(hf_config)
    if cfg.data.seq_len > limit:
        raise ConfigError(f"data.seq_len: {cfg.data.seq_len} exceeds the model's maximum positions ({limit})")
    if cfg.model.path and not cfg.data.tokenizer:
        if not has_tokenizer(cfg.model.path):
            raise ConfigError(f"data.tokenizer: model.path {cfg.model.path} has no tokenizer; set data.tokenizer")
        cfg.data.tokenizer = cfg.model.path
    check_source(cfg.data)  # the tokenizer's files included
    return hf_config


def run_training_job(cfg: TrainJobConfig, config_yaml: str) -> dict:
    hf_config = check_inputs(cfg, world_size_from_env())
    gang, out, data = start_run(cfg)
    tokenizer = data.tokenizer()
    if cfg.model.path:
        if len(tokenizer) > hf_config.vocab_size:
            raise ConfigError(f"data.tokenizer: {len(tokenizer)} tokens do not fit the model's "
                              f"vocabulary of {hf_config.vocab_size}")
    else:
        hf_config = with_tokenizer_ids(resolve_hf_config(cfg.model, vocab_size=len(tokenizer)), tokenizer)
    params = count_params(hf_config)
    log.info("model: %s parameters; data: %d train / %d val blocks of %d tokens (cache %s)",
             f"{params:,}", len(data.train), len(data.val), cfg.data.seq_len, data.cache_dir)

    ds_config = deepspeed_config(cfg.train, cfg.deepspeed, gang.world_size)
    model = build_for_engine(cfg.model, hf_config, cfg.seed, torch.float32, ds_config, "model")
    if cfg.train.activation_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    optimizer, scheduler = build_optimizer(model, cfg.train)
    engine = initialize(model, optimizer, scheduler, ds_config)

    ckpt_root = out / "checkpoints"
    start_step = checkpoint.resume(engine, ckpt_root, cfg.resume, gang)
    begin_training(out, config_yaml, gang)

    tracker = make_tracker(cfg.logger, out, {"params": params}, gang.rank, resumed_at=start_step)
    sampler = BlockSampler(data.train, cfg.train.global_batch_size, cfg.train.micro_batch_size,
                           gang.rank, gang.world_size, cfg.seed)
    result = train_loop(
        engine, lm_loss, sampler, data.val, cfg.train, gang, tracker, start_step,
        save_checkpoint=lambda step: checkpoint.save(engine, ckpt_root, step, gang,
                                                     cfg.train.keep_checkpoints),
        device=engine.device)
    if result.interrupted:
        stop_interrupted(result, out, ckpt_root, cfg.train.max_steps, tracker, gang)

    model_dir = export_model(engine, tokenizer, out / "model", gang, cfg.export.max_shard_size)
    summary = {
        "val_loss": result.val_loss,
        "val_ppl": math.exp(min(result.val_loss, 50.0)),
        "train_loss": result.train_loss,
        "params": params,
        "tokens_seen": result.tokens_seen,
        "steps": result.steps,
        "tokens_per_s": result.tokens_per_s,
        "world_size": gang.world_size,
        "attn_implementation": engine.module.config._attn_implementation,
        "output_model": str(model_dir.resolve()),
        "data_cache": str(data.cache_dir),
    }
    tracker.log({"final/val_loss": summary["val_loss"], "final/val_ppl": summary["val_ppl"]}, step=result.steps)
    tracker.finish()
    if gang.rank == 0:
        write_json_atomic(out / "summary.json", summary)
    checkpoint.tidy_finished(ckpt_root, cfg.train.keep_checkpoints,
                             result.steps < schedule_length(cfg.train), gang)
    return summary
