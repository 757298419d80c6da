"""The one training loop. It knows nothing about what is trained or how the loss is made:
`loss_fn(model, input_ids) -> (loss, extras)` is passed in, so distillation reuses this loop
unchanged. The engine is duck-typed (DeepSpeed's: backward / step / save_checkpoint). It stops
early on a preemption signal or a non-finite loss (train/stopping.py)."""
import math
import time
from dataclasses import dataclass
from typing import Callable, Dict, Optional, Tuple

import numpy as np
import torch

from minitron import progress
from minitron.config import TrainConfig
from minitron.eval.perplexity import evaluate
from minitron.train.schedule import schedule_length
from minitron.train.stopping import TrainingDiverged, stop_on_signals

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
    interrupted: Optional[str] = None
    """The signal the run stopped on after saving a checkpoint at `steps`; None if it finished."""


def train_loop(engine, loss_fn: LossFn, sampler, val_blocks: np.ndarray, cfg: TrainConfig, gang,
               tracker, start_step: int, save_checkpoint: Callable[[int], None],
               device: torch.device, eval_model=None) -> LoopResult:
    """Train from `start_step` to cfg.max_steps. `eval_model` is what the validation loss is
    measured on (default: the engine's model; distillation passes the student alone)."""
    eval_model = eval_model if eval_model is not None else engine
    seq_len = sampler.blocks.shape[1]
    tokens_per_step = cfg.global_batch_size * seq_len
    bar = progress.bar(cfg.max_steps, "train", show=gang.rank == 0, initial=start_step)
    train_loss, val_loss, means = float("nan"), float("nan"), {}
    step_seconds = []
    done, interrupted = start_step, None
    try:
        with stop_on_signals() as stop_request:
            for step in range(start_step, cfg.max_steps):
                t0 = time.perf_counter()
                lr = engine.get_lr()[0]  # the rate this step uses (the scheduler steps inside)
                sums = _accumulate(engine, loss_fn, sampler, step, device)
                # One small all-reduce per step: means over the whole global batch of the loss and of
                # every extra the loss function reported, and how many ranks were asked to stop, so
                # every rank sees the same NaN and the same stop request at the same step.
                reduced = gang.all_reduce_sum(torch.tensor([*sums.values(), float(stop_request.signum is not None)],
                                                           dtype=torch.float64))
                means = dict(zip(sums, (reduced[:-1] / (sampler.accumulation_steps * gang.world_size)).tolist()))
                train_loss, grad_norm, done = means.pop("loss"), _grad_norm(engine), step + 1
                check_finite(train_loss, grad_norm, done, cfg)
                stopping = reduced[-1].item() > 0 and done < cfg.max_steps
                dt = time.perf_counter() - t0
                if step > start_step:  # the first step pays one-off warm-up costs
                    step_seconds.append(dt)
                metrics = {"train/loss": train_loss, **{f"train/{k}": v for k, v in means.items()},
                           "train/lr": lr,
                           "train/grad_norm": grad_norm if grad_norm is not None else float("nan"),
                           "train/tokens_per_s": tokens_per_step / dt, "train/tokens_seen": done * tokens_per_step}
                if not stopping and cfg.eval_every and (done % cfg.eval_every == 0 or done == cfg.max_steps):
                    val_loss = evaluate(eval_model, val_blocks, cfg.micro_batch_size, gang, device, cfg.eval_blocks)
                    metrics.update({"val/loss": val_loss, "val/ppl": math.exp(min(val_loss, 50.0))})
                if done % cfg.log_every == 0 or "val/loss" in metrics or stopping:
                    tracker.log(metrics, step=done)
                bar.update(1)
                shown = {"loss": f"{train_loss:.3f}"}
                if not math.isnan(val_loss):  # none until the first validation
                    shown["val"] = f"{val_loss:.3f}"
                bar.set_postfix(shown)
                periodic = cfg.save_every and done % cfg.save_every == 0 and done < cfg.max_steps
                segment_end = done == cfg.max_steps < schedule_length(cfg)  # a later run continues it
                if stopping or periodic or segment_end:
                    save_checkpoint(done)
                if stopping:
                    interrupted = stop_request.name
                    break
    finally:  # the bar's line ends before any error message is printed
        bar.close()
    if math.isnan(val_loss) and not interrupted:
        val_loss = evaluate(eval_model, val_blocks, cfg.micro_batch_size, gang, device, cfg.eval_blocks)
    return LoopResult(steps=done, tokens_seen=done * tokens_per_step,
                      train_loss=train_loss, val_loss=val_loss,
                      # The median step: a few slow early steps (allocator and cache warm-up, a busy
                      # neighbour) would drag a mean below what the run sustains.
                      tokens_per_s=tokens_per_step / float(np.median(step_seconds)) if step_seconds else float("nan"),
                      last_metrics=means, interrupted=interrupted)


def _accumulate(engine, loss_fn: LossFn, sampler, step: int, device) -> Dict[str, float]:
    """One optimizer step over the step's micro-batches; this rank's sums of the loss and extras."""
    engine.train()
    sums: Dict[str, float] = {}
    for micro in range(sampler.accumulation_steps):
        input_ids = sampler.micro_batch(step, micro).to(device)
        loss, extras = loss_fn(engine, input_ids)
        engine.backward(loss)
        engine.step()  # DeepSpeed only steps the optimizer at the accumulation boundary
        for name, value in {"loss": loss, **extras}.items():
            sums[name] = sums.get(name, 0.0) + float(torch.as_tensor(value).detach())
    return sums


def check_finite(loss: float, grad_norm: Optional[float], step: int, cfg: TrainConfig) -> None:
    """Both values are global (all-reduced), so every rank raises at the same step, before the
    step's checkpoint could overwrite a good one."""
    bad = [f"{name} became {value}" for name, value in (("the loss", loss), ("the gradient norm", grad_norm))
           if value is not None and not math.isfinite(value)]
    if bad:
        hint = "lower train.lr" + ("" if cfg.precision == "fp32" else " or use train.precision=fp32")
        raise TrainingDiverged(f"train.lr: {' and '.join(bad)} at step {step}; {hint}, and resume=auto "
                               "continues from the last checkpoint")


def _grad_norm(engine) -> Optional[float]:
    """None where DeepSpeed did not compute one."""
    norm = engine.get_global_grad_norm()
    return float(norm) if norm is not None else None
