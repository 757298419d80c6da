"""The one training loop. It knows nothing about what is trained or how the loss is made:
`loss_fn(model, input_ids) -> (loss, extras)` is passed in, so distillation reuses this loop
unchanged. The engine is duck-typed (DeepSpeed's: backward / step / save_checkpoint)."""
import math
import time
from dataclasses import dataclass
from typing import Callable, Dict, Tuple

import numpy as np
import torch
from tqdm import tqdm

from minitron.config import ConfigError, TrainConfig
from minitron.eval.perplexity import evaluate
from minitron.train.schedule import schedule_length

LossFn = Callable[[torch.nn.Module, torch.Tensor], Tuple[torch.Tensor, Dict[str, float]]]


def lm_loss(model, input_ids: torch.Tensor):
    """Next-token cross-entropy (transformers shifts the labels inside the model)."""
    return model(input_ids=input_ids, labels=input_ids).loss, {}


@dataclass
class LoopResult:
    steps: int
    tokens_seen: int
    train_loss: float
    val_loss: float
    tokens_per_s: float
    last_metrics: Dict[str, float]
    """The last step's extras from the loss function (global means), e.g. {"kd": ...}."""


def train_loop(engine, loss_fn: LossFn, sampler, val_blocks: np.ndarray, cfg: TrainConfig, gang,
               tracker, start_step: int, save_checkpoint: Callable[[int], None],
               device: torch.device, eval_model=None) -> LoopResult:
    """Train from `start_step` to cfg.max_steps. `eval_model` is what the validation loss is
    measured on (default: the engine's model; distillation passes the student alone)."""
    eval_model = eval_model if eval_model is not None else engine
    seq_len = sampler.blocks.shape[1]
    tokens_per_step = cfg.global_batch_size * seq_len
    bar = tqdm(total=cfg.max_steps, initial=start_step, disable=gang.rank != 0, desc="train",
               dynamic_ncols=True)
    train_loss, val_loss, means = float("nan"), float("nan"), {}
    timed_tokens, timed_seconds = 0, 0.0
    for step in range(start_step, cfg.max_steps):
        engine.train()
        t0 = time.perf_counter()
        sums: Dict[str, float] = {}
        for micro in range(sampler.accumulation_steps):
            input_ids = sampler.micro_batch(step, micro).to(device)
            loss, extras = loss_fn(engine, input_ids)
            engine.backward(loss)
            engine.step()  # DeepSpeed only steps the optimizer at the accumulation boundary
            for name, value in {"loss": loss, **extras}.items():
                sums[name] = sums.get(name, 0.0) + float(torch.as_tensor(value).detach())
        # One small all-reduce per step for logging: means over the whole global batch of the loss
        # and of every extra metric the loss function reported.
        means = gang.all_reduce_sum(torch.tensor(list(sums.values()), dtype=torch.float64))
        means = dict(zip(sums, (means / (sampler.accumulation_steps * gang.world_size)).tolist()))
        train_loss = means.pop("loss")
        if not math.isfinite(train_loss):
            raise ConfigError(f"train.lr: the loss became {train_loss} at step {step + 1}; "
                              "lower train.lr or use train.precision=fp32")
        dt = time.perf_counter() - t0
        if step > start_step:  # the first step pays one-off warm-up costs
            timed_tokens, timed_seconds = timed_tokens + tokens_per_step, timed_seconds + dt
        done = step + 1
        metrics = {"train/loss": train_loss, **{f"train/{k}": v for k, v in means.items()},
                   "train/lr": engine.get_lr()[0],
                   "train/grad_norm": _grad_norm(engine), "train/tokens_per_s": tokens_per_step / dt,
                   "train/tokens_seen": done * tokens_per_step}
        if cfg.eval_every and (done % cfg.eval_every == 0 or done == cfg.max_steps):
            val_loss = evaluate(eval_model, val_blocks, cfg.micro_batch_size, gang, device, cfg.eval_blocks)
            metrics.update({"val/loss": val_loss, "val/ppl": math.exp(min(val_loss, 50.0))})
        if done % cfg.log_every == 0 or "val/loss" in metrics:
            tracker.log(metrics, step=done)
        bar.update(1)
        bar.set_postfix(loss=f"{train_loss:.3f}", val=f"{val_loss:.3f}")
        periodic = cfg.save_every and done % cfg.save_every == 0 and done < cfg.max_steps
        if periodic or done == cfg.max_steps < schedule_length(cfg):  # a segment: a later run continues it
            save_checkpoint(done)
    bar.close()
    if math.isnan(val_loss):
        val_loss = evaluate(eval_model, val_blocks, cfg.micro_batch_size, gang, device, cfg.eval_blocks)
    return LoopResult(steps=cfg.max_steps, tokens_seen=cfg.max_steps * tokens_per_step,
                      train_loss=train_loss, val_loss=val_loss,
                      tokens_per_s=timed_tokens / timed_seconds if timed_seconds else float("nan"),
                      last_metrics=means)


def _grad_norm(engine) -> float:
    norm = engine.get_global_grad_norm()
    return float(norm) if norm is not None else float("nan")
