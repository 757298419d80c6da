"""The pruning job: check the targets, score importance (or reuse cached scores), choose what to
keep, slice, and export a plain transformers checkpoint with `pruning.json`.

Every check that needs only configs runs before data, weights or a process group are touched.
The output is assembled in a temporary sibling directory and renamed into place at the end, so
an interrupted run never leaves a directory that looks complete.
"""
import gc
import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from minitron.config import ConfigError, PruneJobConfig
from minitron.data.corpus import check_source
from minitron.data.packing import build_or_load
from minitron.dist.gang import init_gang
from minitron.models.adapters import adapter_for
from minitron.models.weights import SafetensorsWeights, model_weights
from minitron.models.build import (DTYPES, build_model, count_params, has_tokenizer, head_dim_of,
                                   local_checkpoint, max_positions, resolve_hf_config)
from minitron.prune import importance
from minitron.prune.select import select_kept
from minitron.prune.shape import check_exportable, resolve_target, student_config, teacher_shape
from minitron.prune.slicing import prune_model
from minitron.train.job import write_json_atomic
from minitron.train.loop import evaluate

log = logging.getLogger(__name__)

SCORES_VERSION = 1

def check_prune_inputs(cfg: PruneJobConfig):
    """Cheap checks; returns (teacher config, adapter, teacher shape, target shape)."""
    if not cfg.model.path:
        raise ConfigError("model.path: set it to the teacher's Hugging Face checkpoint directory")
    teacher_cfg = resolve_hf_config(cfg.model, vocab_size=0)
    adapter = adapter_for(teacher_cfg)
    shape = teacher_shape(teacher_cfg)
    target = resolve_target(shape, cfg.prune.export)
    check_exportable(teacher_cfg, adapter, target)
    p = cfg.prune
    for key, value, allowed in (("importance.seq_agg", p.importance.seq_agg, importance.AGGREGATIONS),
                                ("importance.batch_agg", p.importance.batch_agg, importance.AGGREGATIONS),
                                ("importance.mlp_activation", p.importance.mlp_activation, ("post", "pre")),
                                ("importance.ranking", p.importance.ranking, ("importance", "random")),
                                ("depth.metric", p.depth.metric, ("loss", "block_importance")),
                                ("precision", p.precision, tuple(DTYPES))):
        if value not in allowed:
            raise ConfigError(f"prune.{key}: must be one of {', '.join(allowed)}, got {value!r}")
    out = Path(cfg.output_dir)
    if p.dry_run:
        if (out / "pruning.json").exists():
            raise ConfigError(f"output_dir: {out} holds a pruned model; a dry run would overwrite its "
                              "summary.json, choose another directory")
        return teacher_cfg, adapter, shape, target
    if p.calibration.num_samples < 1:
        raise ConfigError(f"prune.calibration.num_samples: the calibration set is empty "
                          f"({p.calibration.num_samples}); it must be at least 1")
    if p.calibration.micro_batch_size < 1:
        raise ConfigError("prune.calibration.micro_batch_size: must be at least 1")
    if p.depth.eval_blocks < 1:
        raise ConfigError("prune.depth.eval_blocks: must be at least 1")
    if cfg.data.seq_len > max_positions(teacher_cfg):
        raise ConfigError(f"data.seq_len: {cfg.data.seq_len} exceeds the teacher's maximum positions "
                          f"({max_positions(teacher_cfg)})")
    cfg.model.path = local_checkpoint(cfg.model.path)
    if not list(Path(cfg.model.path).glob("*.safetensors")) + list(Path(cfg.model.path).glob("*.bin")):
        raise ConfigError(f"model.path: {cfg.model.path} has a config.json but no weights (*.safetensors, *.bin)")
    if not cfg.data.tokenizer:
        if not has_tokenizer(cfg.model.path):
            raise ConfigError(f"data.tokenizer: model.path {cfg.model.path} has no tokenizer; set data.tokenizer")
        cfg.data.tokenizer = cfg.model.path
    check_source(cfg.data)
    if out.exists() and any(out.iterdir()) and not (out / "pruning.json").exists():
        raise ConfigError(f"output_dir: {out} exists and is not a minitron pruning output; "
                          "choose a new directory")
    return teacher_cfg, adapter, shape, target


def run_prune_job(cfg: PruneJobConfig, config_yaml: str) -> dict:
    teacher_cfg, adapter, shape, target = check_prune_inputs(cfg)
    if cfg.prune.dry_run:
        return dry_run(cfg, teacher_cfg, adapter, shape, target)
    p = cfg.prune
    gang = init_gang()
    device = gang.device
    data = build_or_load(cfg.data, gang)
    tokenizer = data.tokenizer()
    if len(tokenizer) > teacher_cfg.vocab_size:
        raise ConfigError(f"data.tokenizer: {len(tokenizer)} tokens do not fit the teacher's "
                          f"vocabulary of {teacher_cfg.vocab_size}")
    rng = np.random.default_rng(cfg.seed)
    calibration_rows = np.sort(rng.permutation(len(data.train))[:p.calibration.num_samples])
    if len(calibration_rows) < p.calibration.num_samples:
        log.warning("calibration: only %d training blocks exist; using all of them", len(calibration_rows))

    teacher = build_model(cfg.model, teacher_cfg, seed=cfg.seed, dtype=DTYPES[p.precision]).to(device).eval()
    hd = head_dim_of(teacher_cfg)
    content_hash = teacher_hash(cfg.model.path)
    scores_path = _scores_path(cfg, content_hash, data.cache_dir, len(calibration_rows))
    cached = gang.broadcast_object(_read_scores(scores_path) if gang.rank == 0 else None)
    reused = cached is not None
    cached = cached or {"version": SCORES_VERSION, "removal_loss": {}}
    started = time.perf_counter()
    if "stats" not in cached:
        log.info("calibration: %d blocks of %d tokens", len(calibration_rows), cfg.data.seq_len)
        cached["stats"] = importance.collect_activation_stats(
            teacher, adapter, data.train[calibration_rows], p.calibration.micro_batch_size, gang, device,
            p.importance.seq_agg, p.importance.mlp_activation, hd)
    calibration_s = time.perf_counter() - started

    drop = shape.num_layers - target.num_layers
    block = drop if p.depth.contiguous else 1
    wanted = {f"0:{p.depth.eval_blocks}"}  # the teacher's own loss, reported in summary.json
    if drop and p.depth.metric == "loss":
        wanted.add(f"{block}:{p.depth.eval_blocks}")
    missing = sorted(wanted - set(cached["removal_loss"]))
    for key in missing:
        size = int(key.split(":")[0])
        if size == 0:
            loss = torch.tensor([evaluate(teacher, data.val, p.calibration.micro_batch_size, gang, device,
                                          p.depth.eval_blocks)])
        else:
            log.info("depth: validation loss with each block of %d layer(s) removed", size)
            loss = importance.removal_losses(teacher, adapter, data.val, size, p.calibration.micro_batch_size,
                                             gang, device, p.depth.eval_blocks)
        cached["removal_loss"][key] = loss
    if gang.rank == 0 and (not reused or missing):
        _write_scores(scores_path, cached)

    scores = importance.scores_from_stats(cached["stats"], p.importance.batch_agg)
    kept = select_kept(scores, shape, target, p.depth,
                       removal_loss=cached["removal_loss"].get(f"{block}:{p.depth.eval_blocks}"),
                       seed=cfg.seed if p.importance.ranking == "random" else None)
    student_cfg = student_config(teacher_cfg, adapter, target, kept.layers)
    teacher_loss = cached["removal_loss"][f"0:{p.depth.eval_blocks}"].item()
    teacher_params = sum(t.numel() for t in teacher.parameters())
    attn = teacher.config._attn_implementation
    # Build the student from the checkpoint files, one tensor at a time, once the teacher is gone:
    # teacher and student never sit in memory together. Files that do not name the tensors as the
    # model does (.bin, renamed keys) fall back to the in-memory teacher.
    weights = SafetensorsWeights(cfg.model.path)
    if not set(dict(teacher.named_parameters())) <= set(weights):
        weights = model_weights(teacher)
    del teacher
    gc.collect()
    student = prune_model(weights, adapter, kept, student_cfg, DTYPES[p.precision], attn).to(device)
    del weights
    student_loss = evaluate(student, data.val, p.calibration.micro_batch_size, gang, device, p.depth.eval_blocks)
    student_params = sum(t.numel() for t in student.parameters())

    manifest = {
        "teacher": {"path": str(Path(cfg.model.path).resolve()), "content_hash": content_hash,
                    "params": teacher_params, "shape": shape.as_dict()},
        "student": {"params": student_params, "shape": target.as_dict()},
        "calibration": {"num_samples": int(len(calibration_rows)), "seq_len": cfg.data.seq_len,
                        "seed": cfg.seed, "data": cfg.data.path or cfg.data.name or "embedded",
                        "data_cache": str(data.cache_dir)},
        "importance": {"seq_agg": p.importance.seq_agg, "batch_agg": p.importance.batch_agg,
                       "mlp_activation": p.importance.mlp_activation, "ranking": p.importance.ranking,
                       "scores": str(scores_path)},
        "depth": {"metric": p.depth.metric, "contiguous": p.depth.contiguous, "eval_blocks": p.depth.eval_blocks},
        "kept": kept.as_dict(),
    }
    summary = {"teacher_params": teacher_params, "student_params": student_params,
               "teacher_val_loss": teacher_loss, "student_val_loss": student_loss,
               "calibration_seconds": calibration_s, "scores_reused": reused, "world_size": gang.world_size,
               "output_model": str(Path(cfg.output_dir).resolve())}
    if gang.rank == 0:
        export(student, tokenizer, Path(cfg.output_dir),
               {"pruning.json": manifest, "summary.json": summary}, config_yaml)
    gang.barrier()
    return summary


def dry_run(cfg, teacher_cfg, adapter, shape, target) -> dict:
    """Parameter counts from meta tensors: works for any size of teacher given its config.json."""
    student_cfg = student_config(teacher_cfg, adapter, target, list(range(target.num_layers)))
    summary = {"dry_run": True, "teacher_params": count_params(teacher_cfg),
               "student_params": count_params(student_cfg), "teacher_shape": shape.as_dict(),
               "student_shape": target.as_dict(), "student_config": student_cfg.to_diff_dict()}
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out / "summary.json", summary)
    return summary


def export(student, tokenizer, out: Path, manifests: dict, config_yaml: str) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.tmp-"))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it private; the output is an ordinary directory
    try:
        student.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / "prune_config.yaml").write_text(config_yaml)
        for name, obj in manifests.items():
            (tmp / name).write_text(format_json(obj))
        if out.exists():  # a previous pruning output (check_prune_inputs refuses anything else)
            shutil.rmtree(out)
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def format_json(obj) -> str:
    """Indented JSON with every list of numbers on one line (a 70B teacher keeps ~2M indices)."""
    text = json.dumps(obj, indent=2)
    return re.sub(r"\[[-\d.,\s]*\]", lambda m: json.dumps(json.loads(m.group(0))), text) + "\n"


def teacher_hash(path: str) -> str:
    """blake2b of the teacher's config and weight files: names the teacher in pruning.json and
    keys the importance cache."""
    h = hashlib.blake2b(digest_size=16)
    root = Path(path)
    files = sorted([root / "config.json", *root.glob("*.safetensors"), *root.glob("*.bin")])
    for f in files:
        h.update(f.name.encode())
        with open(f, "rb") as fh:
            while chunk := fh.read(1 << 24):
                h.update(chunk)
    return h.hexdigest()


def _scores_path(cfg: PruneJobConfig, content_hash: str, data_cache: Path, num_samples: int) -> Path:
    spec = {"v": SCORES_VERSION, "teacher": content_hash, "data": Path(data_cache).name,
            "num_samples": num_samples, "seed": cfg.seed, "seq_agg": cfg.prune.importance.seq_agg,
            "mlp_activation": cfg.prune.importance.mlp_activation, "precision": cfg.prune.precision}
    key = hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:20]
    root = Path(cfg.prune.scores_dir) if cfg.prune.scores_dir else Path(cfg.output_dir).parent / "importance"
    return root / f"{key}.pt"


def _read_scores(path: Path):
    if not path.exists():
        return None
    try:
        scores = torch.load(path, weights_only=True)
    except Exception as e:  # a corrupt cache entry is recomputed, not trusted
        log.warning("ignoring unreadable importance scores %s: %s", path, e)
        return None
    log.info("reusing importance scores from %s", path)
    return scores if scores.get("version") == SCORES_VERSION else None


def _write_scores(path: Path, scores: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    torch.save(scores, tmp)
    tmp.replace(path)
