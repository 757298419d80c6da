"""The evaluation job (`minitron-eval`) and the evaluator the pipeline shares: validation
perplexity of any causal LM checkpoint on the held-out blocks of data.*, plus lm-eval-harness
tasks when the `eval` extra is installed.

Perplexity is sharded over ranks like training's validation; the lm-eval tasks run on rank 0
(the harness has its own notion of distribution, not needed at the sizes a task set takes here).
"""
import logging
import math
import time
from pathlib import Path

from minitron.config import ConfigError, EvalConfig, EvalJobConfig
from minitron.data.corpus import check_source
from minitron.data.packing import build_or_load
from minitron.distributed.gang import init_gang
from minitron.eval import harness
from minitron.eval.perplexity import evaluate
from minitron.eval.sample import greedy_sample
from minitron.models.build import (build_model, check_checkpoint_files, has_tokenizer, local_checkpoint, max_positions,
                                   resolve_hf_config, weight_files)
from minitron.run import write_json_atomic
from minitron.train.tracking import make_tracker

log = logging.getLogger(__name__)


def check_eval_options(e: EvalConfig) -> None:
    for key in ("blocks", "micro_batch_size", "batch_size"):
        if getattr(e, key) < 1:
            raise ConfigError(f"eval.{key}: must be at least 1, got {getattr(e, key)}")
    if e.sample_tokens < 0:
        raise ConfigError(f"eval.sample_tokens: must be at least 0, got {e.sample_tokens}")
    if e.limit is not None and e.limit < 1:
        raise ConfigError(f"eval.limit: must be at least 1 or unset, got {e.limit}")
    harness.check_tasks(list(e.tasks))


def check_eval_inputs(cfg: EvalJobConfig):
    """Cheap checks; returns the model's transformers config."""
    check_eval_options(cfg.eval)
    if not cfg.model.path:
        raise ConfigError("model.path: set it to the Hugging Face checkpoint to evaluate")
    hf_config = resolve_hf_config(cfg.model, vocab_size=0)
    cfg.model.path = local_checkpoint(cfg.model.path)
    if not weight_files(cfg.model.path):
        raise ConfigError(f"model.path: {cfg.model.path} has a config.json but no weights (*.safetensors, *.bin)")
    check_checkpoint_files(cfg.model)
    if cfg.data.seq_len > max_positions(hf_config):
        raise ConfigError(f"data.seq_len: {cfg.data.seq_len} exceeds the model's maximum positions "
                          f"({max_positions(hf_config)})")
    if not cfg.data.tokenizer:
        if not has_tokenizer(cfg.model.path):
            raise ConfigError(f"data.tokenizer: model.path {cfg.model.path} has no tokenizer; set data.tokenizer")
        cfg.data.tokenizer = cfg.model.path
    check_source(cfg.data)  # the tokenizer's files included
    out = Path(cfg.output_dir)
    if out.is_file():
        raise ConfigError(f"output_dir: {out} is a file; choose a directory")
    if (out / "config.json").is_file():
        raise ConfigError(f"output_dir: {out} holds a checkpoint; evaluation results go in a directory of their own")
    return hf_config


def evaluate_model(model, tokenizer, val_blocks, e: EvalConfig, gang, device, seed: int = 0) -> dict:
    """{"val_loss", "val_ppl", "params", "tasks": {task: {metric: value}}} of an in-memory model."""
    started = time.perf_counter()
    val_loss = evaluate(model, val_blocks, e.micro_batch_size, gang, device, e.blocks, desc="eval")
    result = {"val_loss": val_loss, "val_ppl": math.exp(min(val_loss, 50.0)),
              "params": sum(p.numel() for p in model.parameters()),
              "val_blocks": min(e.blocks, len(val_blocks)), "tasks": {}}
    if e.tasks:
        tasks = None
        if gang.rank == 0:
            tasks = harness.run_tasks(model, tokenizer, list(e.tasks), batch_size=e.batch_size, limit=e.limit,
                                      device=str(device), seed=seed)
        result["tasks"] = gang.broadcast_object(tasks)
    if e.sample_prompt and e.sample_tokens > 0:
        result["sample"] = greedy_sample(model, tokenizer, e.sample_prompt, e.sample_tokens)
    result["seconds"] = time.perf_counter() - started
    return result


def run_eval_job(cfg: EvalJobConfig, config_yaml: str) -> dict:
    hf_config = check_eval_inputs(cfg)
    gang = init_gang()
    out = Path(cfg.output_dir)
    data = build_or_load(cfg.data, gang, cfg.seed)
    tokenizer = data.tokenizer()
    if len(tokenizer) > hf_config.vocab_size:
        raise ConfigError(f"data.tokenizer: {len(tokenizer)} tokens do not fit the model's vocabulary of "
                          f"{hf_config.vocab_size}")
    model = build_model(cfg.model, hf_config, seed=cfg.seed).to(gang.device).eval()
    result = evaluate_model(model, tokenizer, data.val, cfg.eval, gang, gang.device, cfg.seed)
    summary = {**result, "model": str(Path(cfg.model.path).resolve()), "world_size": gang.world_size,
               "data_cache": str(data.cache_dir)}
    if gang.rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        (out / "eval_config.yaml").write_text(config_yaml)
        tracker = make_tracker(cfg.logger, out, {"model": summary["model"]}, gang.rank)
        tracker.log({"eval/val_loss": summary["val_loss"], "eval/val_ppl": summary["val_ppl"],
                     **{f"eval/{task}/{metric}": value for task, scores in summary["tasks"].items()
                        for metric, value in scores.items()}}, step=0)
        tracker.finish()
        write_json_atomic(out / "summary.json", summary)
    gang.barrier()
    return summary
