"""minitron-plan: the distillation minitron-distill would run (or, as `minitron-plan prune`, the
pruning minitron-prune would), planned before launch. Reads the checkpoints' config.json only (a
hub name's alone is fetched); loads no weights, needs no GPU."""
import logging
from pathlib import Path

from minitron.checks import auto_micro_batch_size
from minitron.config import ConfigError, PlanJobConfig, PrunePlanJobConfig
from minitron.distributed.gang import world_size_from_env
from minitron.memory import plan as planner
from minitron.models.build import count_params, resolve_hf_config
from minitron.run import write_json_atomic

log = logging.getLogger(__name__)
GIB = 2**30


def run_plan_job(cfg) -> dict:
    """minitron-plan (a PlanJobConfig: the distillation) or minitron-plan prune (a PrunePlanJobConfig)."""
    p = cfg.plan
    processes = p.processes or world_size_from_env()
    if processes < 1:
        raise ConfigError(f"plan.processes: must be at least 1, got {processes}")
    if p.device not in ("gpu", "cpu"):
        raise ConfigError(f"plan.device: must be gpu or cpu, got {p.device!r}")
    if p.device_memory_gb is not None and p.device_memory_gb <= 0:
        raise ConfigError(f"plan.device_memory_gb: must be positive, got {p.device_memory_gb}")
    on_gpu = p.device == "gpu"
    if isinstance(cfg, PrunePlanJobConfig):
        teacher, student, micro, rows = _prune_rows(cfg, processes, on_gpu)
        precision_key, micro_key = "prune.precision", "prune.calibration.micro_batch_size"
        precision = cfg.prune.precision
    else:
        teacher, student, micro, rows = _distill_rows(cfg, processes, on_gpu)
        precision_key, precision, micro_key = "train.precision", cfg.train.precision, "train.micro_batch_size"
    choice = recommend(rows, p.device_memory_gb, precision, micro_key)
    summary = {
        "job": "prune" if isinstance(cfg, PrunePlanJobConfig) else "distill",
        "processes": processes, "micro_batch_size": micro, "seq_len": cfg.data.seq_len, "device": p.device,
        "device_memory_gb": p.device_memory_gb,
        "teacher_params": teacher.params if teacher else 0, "student_params": student.params,
        "configurations": [{"zero_stage": r["setup"].zero_stage, "precision": r["setup"].precision,
                            "teacher_offload": r["setup"].offload,
                            "activation_checkpointing": r["setup"].activation_checkpointing,
                            "device_gb": r["parts"]["device"] / GIB, "host_gb": r["parts"]["host"] / GIB,
                            "bytes": {k: int(v) for k, v in r["parts"].items()}} for r in rows],
        "recommended": overrides(choice["setup"], precision_key) if choice else None,
    }
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out / "plan.json", summary)
    summary["table"] = table(rows, choice, p.device_memory_gb)
    return summary


def _distill_rows(cfg: PlanJobConfig, processes: int, on_gpu: bool):
    if not cfg.student.path:
        raise ConfigError("student.path: set it to the student checkpoint (its config.json is enough)")
    micro = cfg.train.micro_batch_size or auto_micro_batch_size(cfg.train.global_batch_size, processes)
    student_cfg = resolve_hf_config(cfg.student, vocab_size=0, key="student")
    student = planner.facts(student_cfg, count_params(student_cfg))
    teacher = None
    if cfg.distill.logits.divergence != "none" or cfg.distill.intermediate.pairs:
        if not cfg.teacher.path:
            raise ConfigError("teacher.path: set it to the teacher checkpoint (its config.json is enough)")
        teacher_cfg = resolve_hf_config(cfg.teacher, vocab_size=0, key="teacher")
        teacher = planner.facts(teacher_cfg, count_params(teacher_cfg))
    rows = [{"setup": setup, "parts": planner.estimate(teacher, student, setup, processes, micro, cfg.data.seq_len,
                                                       cfg.distill.logits.chunk_tokens, on_gpu=on_gpu)}
            for setup in planner.setups()]
    return teacher, student, micro, rows


def _prune_rows(cfg: PrunePlanJobConfig, processes: int, on_gpu: bool):
    """The teacher at model.path and the student prune.export describes (config.json alone, as
    minitron-prune's dry run reads it)."""
    from minitron.models.adapters import adapter_for
    from minitron.prune.shape import check_exportable, resolve_target, student_config, teacher_shape

    if not cfg.model.path:
        raise ConfigError("model.path: set it to the teacher checkpoint (its config.json is enough)")
    teacher_cfg = resolve_hf_config(cfg.model, vocab_size=0)
    adapter = adapter_for(teacher_cfg)
    target = resolve_target(teacher_shape(teacher_cfg), cfg.prune.export)
    check_exportable(teacher_cfg, adapter, target)
    if cfg.prune.precision not in planner.BYTES:
        raise ConfigError(f"prune.precision: must be one of {', '.join(planner.BYTES)}, got {cfg.prune.precision!r}")
    student_cfg = student_config(teacher_cfg, adapter, target, list(range(target.num_layers)))
    teacher = planner.facts(teacher_cfg, count_params(teacher_cfg))
    student = planner.facts(student_cfg, count_params(student_cfg))
    micro = cfg.prune.calibration.micro_batch_size
    file_bytes = checkpoint_bytes_per_value(teacher_cfg)
    rows = [{"setup": setup, "parts": planner.estimate_prune(teacher, student, setup, processes, micro,
                                                             cfg.data.seq_len, file_bytes, on_gpu)}
            for setup in planner.prune_setups()]
    return teacher, student, micro, rows


def checkpoint_bytes_per_value(hf_config) -> int:
    """Bytes per stored value of the checkpoint (config.json's dtype; float32 when it names none)."""
    dtype = getattr(hf_config, "dtype", None) or getattr(hf_config, "torch_dtype", None) or "float32"
    return {"float32": 4, "float64": 8}.get(str(dtype).removeprefix("torch."), 2)


def recommend(rows, device_memory_gb, precision: str, micro_key: str = "train.micro_batch_size"):
    """The cheapest configuration in the run's precision whose device peak fits; None without a
    device size; a ConfigError naming plan.device_memory_gb when none fits."""
    if device_memory_gb is None:
        return None
    mine = [r for r in rows if r["setup"].precision == precision]
    fitting = [r for r in mine if r["parts"]["device"] <= device_memory_gb * GIB]
    if fitting:
        return min(fitting, key=lambda r: r["setup"].cost)
    smallest = min(mine, key=lambda r: r["parts"]["device"])
    raise ConfigError(f"plan.device_memory_gb: no configuration fits {device_memory_gb:g} GiB per device; the "
                      f"smallest found needs {smallest['parts']['device'] / GIB:.2f} GiB "
                      f"({smallest['setup'].name}); use more processes (plan.processes) or a smaller "
                      f"{micro_key} or data.seq_len")


def overrides(setup: planner.Setup, precision_key: str = "train.precision") -> str:
    """The command-line keys that select `setup` in minitron-distill (minitron-prune: its precision key)."""
    keys = [f"deepspeed=zero{setup.zero_stage}", f"{precision_key}={setup.precision}"]
    if setup.offload != "none":
        keys.append(f"teacher.offload={setup.offload}")
    if setup.activation_checkpointing:
        keys.append("train.activation_checkpointing=true")
    return " ".join(keys)


def table(rows, choice, device_memory_gb) -> str:
    lines = [f"{'configuration':58s} {'device GiB':>10s} {'host GiB':>9s}"]
    for r in rows:
        device = r["parts"]["device"] / GIB
        mark = ""
        if device_memory_gb is not None:
            mark = "  <- recommended" if r is choice else ("" if device <= device_memory_gb else "  (does not fit)")
        lines.append(f"{r['setup'].name:58s} {device:10.2f} {r['parts']['host'] / GIB:9.2f}{mark}")
    return "\n".join(lines)
