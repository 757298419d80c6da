"""The pruning job: check the targets, score importance (or reuse cached scores), choose what to
keep, slice, and export a plain transformers checkpoint with `pruning.json`.

Every check that needs only configs runs before data, weights or a process group are touched.
The output is assembled in a temporary sibling directory and renamed into place at the end, so
an interrupted run never leaves a directory that looks complete.
"""
import gc
import json
import logging
import os
import re
import shutil
import tempfile
from pathlib import Path

from minitron.checks import check_output_dir
from minitron.config import ConfigError, PruneJobConfig
from minitron.data.corpus import check_source
from minitron.data.packing import build_or_load
from minitron.distributed.gang import init_gang
from minitron.distributed.partitions import release, teacher_memory
from minitron.eval.perplexity import evaluate
from minitron.logs import captured_output, is_log_file
from minitron.memory import measure
from minitron.models.adapters import adapter_for
from minitron.models.weights import SafetensorsWeights, model_weights
from minitron.models.build import (DTYPES, build_model, check_checkpoint_files, count_params, has_tokenizer,
                                   local_checkpoint, max_positions, resolve_hf_config, weight_files,
                                   why_not_tensor_by_tensor)
from minitron.prune import importance, scores
from minitron.prune.shape import check_exportable, resolve_target, student_config, teacher_shape
from minitron.prune.slicing import prune_model
from minitron.run import follow_umask, write_json_atomic
from minitron.search.sizing import Sizer
from minitron.train.tracking import make_tracker

log = logging.getLogger(__name__)


def check_prune_inputs(cfg: PruneJobConfig):
    """Cheap checks; returns (teacher config, adapter, teacher shape, target shape)."""
    if not cfg.model.path:
        raise ConfigError("model.path: set it to the teacher's Hugging Face checkpoint directory")
    teacher_cfg = resolve_hf_config(cfg.model, vocab_size=0)
    adapter = adapter_for(teacher_cfg)
    shape = teacher_shape(teacher_cfg)
    target = resolve_target(shape, cfg.prune.export)
    check_exportable(teacher_cfg, adapter, target)
    check_prune_options(cfg.prune, calibrates=False)
    out = Path(cfg.output_dir)
    check_output_dir(cfg.output_dir)
    if cfg.prune.dry_run:
        if (out / "pruning.json").exists():
            raise ConfigError(f"output_dir: {out} holds a pruned model; a dry run would overwrite its "
                              "summary.json, choose another directory")
        return teacher_cfg, adapter, shape, target
    check_prune_options(cfg.prune, calibrates=True)
    check_teacher_checkpoint(cfg, teacher_cfg)
    if out.exists() and any(not is_log_file(p) for p in out.iterdir()) and not (out / "pruning.json").exists():
        raise ConfigError(f"output_dir: {out} exists and is not a minitron pruning output; "
                          "choose a new directory")
    return teacher_cfg, adapter, shape, target


def check_prune_options(p, calibrates: bool) -> None:
    """prune.* choices; with `calibrates`, also what the calibration pass needs."""
    for key, value, allowed in (("importance.seq_agg", p.importance.seq_agg, importance.AGGREGATIONS),
                                ("importance.batch_agg", p.importance.batch_agg, importance.AGGREGATIONS),
                                ("importance.mlp_activation", p.importance.mlp_activation, ("post", "pre")),
                                ("importance.ranking", p.importance.ranking, ("importance", "random")),
                                ("depth.metric", p.depth.metric, ("loss", "block_importance")),
                                ("precision", p.precision, tuple(DTYPES))):
        if value not in allowed:
            raise ConfigError(f"prune.{key}: must be one of {', '.join(allowed)}, got {value!r}")
    if not calibrates:
        return
    if p.calibration.num_samples < 1:
        raise ConfigError(f"prune.calibration.num_samples: the calibration set is empty "
                          f"({p.calibration.num_samples}); it must be at least 1")
    if p.calibration.micro_batch_size < 1:
        raise ConfigError("prune.calibration.micro_batch_size: must be at least 1")
    if p.depth.eval_blocks < 1:
        raise ConfigError("prune.depth.eval_blocks: must be at least 1")


def check_teacher_checkpoint(cfg, teacher_cfg) -> None:
    """The teacher at model.path can be calibrated on data.*: positions, weights, a tokenizer
    (data.tokenizer defaults to the teacher's own)."""
    if cfg.data.seq_len > max_positions(teacher_cfg):
        raise ConfigError(f"data.seq_len: {cfg.data.seq_len} exceeds the teacher's maximum positions "
                          f"({max_positions(teacher_cfg)})")
    cfg.model.path = local_checkpoint(cfg.model.path)
    if not weight_files(cfg.model.path):
        raise ConfigError(f"model.path: {cfg.model.path} has a config.json but no weights (*.safetensors, *.bin)")
    check_checkpoint_files(cfg.model)
    if not cfg.data.tokenizer:
        if not has_tokenizer(cfg.model.path):
            raise ConfigError(f"data.tokenizer: model.path {cfg.model.path} has no tokenizer; set data.tokenizer")
        cfg.data.tokenizer = cfg.model.path
    check_source(cfg.data)  # the tokenizer's files included


def run_prune_job(cfg: PruneJobConfig, config_yaml: str) -> dict:
    teacher_cfg, adapter, shape, target = check_prune_inputs(cfg)
    if cfg.prune.dry_run:
        return dry_run(cfg, teacher_cfg, adapter, shape, target)
    p = cfg.prune
    check_shardable(cfg.model.path, teacher_cfg, cfg.deepspeed)
    gang = init_gang()
    device = gang.device
    if cfg.deepspeed.zero_optimization.get("stage", 0) in (1, 2) and gang.rank == 0:
        log.info("deepspeed: calibration runs data-parallel with the teacher on every rank; ZeRO stages 1 and 2 "
                 "shard optimizer state, which pruning has none of (deepspeed=zero3 shards the teacher)")
    data = build_or_load(cfg.data, gang, cfg.seed)
    tokenizer = data.tokenizer()
    check_vocab(tokenizer, teacher_cfg)

    memory_mark = measure.reset_peak(device)
    teacher = scoring_teacher(cfg.model, teacher_cfg, cfg.seed, DTYPES[p.precision], cfg.deepspeed, gang)
    held = teacher_memory(teacher, gang)
    imp = scores.load_or_score(cfg, teacher, adapter, data, gang, device, [scores.depth_block(shape, target, p.depth)])
    kept = scores.kept_for(imp, shape, target, p, cfg.seed)
    attn = teacher.config._attn_implementation
    # Build the student from the checkpoint files, one tensor at a time, once the teacher is gone:
    # teacher and student never sit in memory together. Files that do not name the tensors as the
    # model does (.bin, renamed keys) fall back to the in-memory teacher (never a sharded one: those
    # files were refused above).
    weights = SafetensorsWeights(cfg.model.path)
    if not set(dict(teacher.named_parameters())) <= set(weights):
        weights = model_weights(teacher)
    release(teacher)
    del teacher
    gc.collect()
    student = prune_model(weights, adapter, kept, student_config(teacher_cfg, adapter, target, kept.layers),
                          DTYPES[p.precision], attn).to(device)
    del weights
    student_loss = evaluate(student, data.val, p.calibration.micro_batch_size, gang, device, p.depth.eval_blocks)
    summary = {"teacher_params": held["teacher_params"], "teacher_params_per_rank": held["teacher_params_per_rank"],
               "student_params": sum(t.numel() for t in student.parameters()),
               **active_params(teacher_cfg, adapter, shape, target),
               "teacher_val_loss": imp.teacher_loss(p.depth.eval_blocks), "student_val_loss": student_loss,
               "calibration_seconds": imp.calibration_seconds, "scores_reused": imp.reused,
               "world_size": gang.world_size, "output_model": str(Path(cfg.output_dir).resolve()),
               "memory": measure.per_rank(gang, memory_mark, device)}
    manifest = pruning_manifest(cfg, imp, data, shape, target, kept, held["teacher_params"], summary["student_params"])
    if gang.rank == 0:
        export(student, tokenizer, Path(cfg.output_dir),
               {"pruning.json": manifest, "summary.json": summary}, config_yaml)
        if cfg.logger.backend != "none":  # nothing but the checkpoint in output_dir by default
            tracker = make_tracker(cfg.logger, Path(cfg.output_dir), {"teacher": cfg.model.path}, gang.rank)
            tracker.log({f"prune/{k}": v for k, v in summary.items() if isinstance(v, (int, float))}, step=0)
            tracker.finish()
    gang.barrier()
    return summary


def sharded(ds) -> bool:
    return ds.zero_optimization.get("stage", 0) == 3


def check_shardable(path: str, teacher_cfg, ds) -> None:
    """With deepspeed.zero_optimization.stage=3 the teacher is created partitioned and read tensor
    by tensor, and the student sliced from its files: refuse, before any work, a checkpoint that
    cannot be read so (the replicated teacher takes any)."""
    if sharded(ds):
        why = why_not_tensor_by_tensor(path, teacher_cfg)
        if why:
            raise ConfigError(f"deepspeed.zero_optimization.stage: a ZeRO-3-sharded teacher is read tensor by "
                              f"tensor, and {path} cannot be ({why}); use deepspeed=zero0")


def scoring_teacher(model_cfg, teacher_cfg, seed: int, dtype, ds, gang):
    """The teacher the importance pass runs: with deepspeed.zero_optimization.stage=3 partitioned
    over the ranks (each holds 1/world; layers are gathered one at a time in the forward passes,
    the hooks see the same activations), else whole on every rank."""
    if sharded(ds):
        from minitron.distributed.engine import frozen_model  # deepspeed: only a sharded teacher needs it

        return frozen_model(model_cfg, teacher_cfg, seed, dtype, ds, gang.world_size, gang.device)
    return build_model(model_cfg, teacher_cfg, seed=seed, dtype=dtype).to(gang.device).eval()


def check_vocab(tokenizer, teacher_cfg) -> None:
    if len(tokenizer) > teacher_cfg.vocab_size:
        raise ConfigError(f"data.tokenizer: {len(tokenizer)} tokens do not fit the teacher's "
                          f"vocabulary of {teacher_cfg.vocab_size}")


def pruning_manifest(cfg, imp: scores.Importance, data, shape, target, kept, teacher_params: int,
                     student_params: int) -> dict:
    """pruning.json: where the student came from and what it kept, in the teacher's numbering."""
    p = cfg.prune
    return {
        "teacher": {"path": str(Path(cfg.model.path).resolve()), "content_hash": imp.content_hash,
                    "params": teacher_params, "shape": shape.as_dict()},
        "student": {"params": student_params, "shape": target.as_dict()},
        "calibration": {"num_samples": imp.num_samples, "seq_len": cfg.data.seq_len,
                        "seed": cfg.seed, "data": cfg.data.path or cfg.data.name or "embedded",
                        "data_cache": str(data.cache_dir)},
        "importance": {"seq_agg": p.importance.seq_agg, "batch_agg": p.importance.batch_agg,
                       "mlp_activation": p.importance.mlp_activation, "ranking": p.importance.ranking,
                       "scores": str(imp.path)},
        "depth": {"metric": p.depth.metric, "contiguous": p.depth.contiguous, "eval_blocks": p.depth.eval_blocks},
        "kept": kept.as_dict(),
    }


def dry_run(cfg, teacher_cfg, adapter, shape, target) -> dict:
    """Parameter counts from meta tensors: works for any size of teacher given its config.json."""
    student_cfg = student_config(teacher_cfg, adapter, target, list(range(target.num_layers)))
    summary = {"dry_run": True, "teacher_params": count_params(teacher_cfg),
               "student_params": count_params(student_cfg), **active_params(teacher_cfg, adapter, shape, target),
               "teacher_shape": shape.as_dict(),
               "student_shape": target.as_dict(), "student_config": student_cfg.to_diff_dict()}
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out / "summary.json", summary)
    return summary


def active_params(teacher_cfg, adapter, shape, target) -> dict:
    """A mixture of experts' parameters used per token (its top-k experts), teacher and student."""
    if adapter.moe is None:
        return {}
    sizer = Sizer(teacher_cfg, adapter, "bf16", seq_len=1, batch_size=1)
    return {"teacher_active_params": sizer.sizes(shape).active_params,
            "student_active_params": sizer.sizes(target).active_params}


def export(student, tokenizer, out: Path, manifests: dict, config_yaml: str) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.tmp-"))
    try:
        with captured_output():  # accelerate's unwrap_model imports DeepSpeed, which announces itself
            student.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / "prune_config.yaml").write_text(config_yaml)
        for name, obj in manifests.items():
            (tmp / name).write_text(format_json(obj))
        follow_umask(tmp)
        if out.exists():  # a previous pruning output or this run's log (check_prune_inputs refuses anything else)
            for log_file in filter(is_log_file, out.iterdir()):
                os.replace(log_file, tmp / log_file.name)  # the open log follows its file
            shutil.rmtree(out)
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def format_json(obj) -> str:
    """Indented JSON with every list of numbers on one line (a 70B teacher keeps ~2M indices)."""
    text = json.dumps(obj, indent=2)
    return re.sub(r"\[[-\d.,\s]*\]", lambda m: json.dumps(json.loads(m.group(0))), text) + "\n"
