"""Importance scores of one teacher, computed once and cached on disk: `minitron-prune` to any
shape and `minitron-search` over many shapes read the same entry, so only the first pays for the
calibration pass (and for each depth block size's removal losses).

An entry is keyed by the teacher's content hash and everything the statistics depend on; the
batch aggregation is applied when scores are read, so it is not part of the key. The file (a
plain torch dict) records a SHA-256 of its own content: a truncated or corrupted entry is found
when read, and recomputed rather than used.
"""
import hashlib
import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterable, Optional

import numpy as np
import torch

from minitron.data.corpus import file_digest
from minitron.data.packing import digest_memo_dir
from minitron.eval.perplexity import evaluate
from minitron.models.adapters import FamilyAdapter
from minitron.models.build import head_dim_of
from minitron.prune import importance
from minitron.prune.select import Kept, select_kept
from minitron.prune.shape import Shape

log = logging.getLogger(__name__)

SCORES_VERSION = 2  # 2: the file records a SHA-256 of its content


@dataclass
class Importance:
    cached: Dict
    """{"stats": activation sums, "removal_loss": {"<block size>:<eval blocks>": losses}}."""
    path: Path
    reused: bool
    """The calibration statistics came from the cache."""
    calibration_seconds: float
    num_samples: int
    content_hash: str

    def teacher_loss(self, eval_blocks: int) -> float:
        return self.cached["removal_loss"][f"0:{eval_blocks}"].item()


def calibration_rows(num_train_blocks: int, num_samples: int, seed: int) -> np.ndarray:
    rows = np.sort(np.random.default_rng(seed).permutation(num_train_blocks)[:num_samples])
    if len(rows) < num_samples:
        log.warning("calibration: only %d training blocks exist; using all of them", len(rows))
    return rows


def depth_block(teacher: Shape, target: Shape, depth) -> int:
    """The block size whose removal losses rank the layers for `target` (0: no layer dropped)."""
    drop = teacher.num_layers - target.num_layers
    return (drop if depth.contiguous else 1) if drop else 0


def load_or_score(cfg, teacher, adapter: FamilyAdapter, data, gang, device: torch.device,
                  block_sizes: Iterable[int]) -> Importance:
    """The cached entry for `cfg` (a prune or search job config: model.path, data, seed, prune,
    output_dir), with whatever it lacks computed now and written back: the activation statistics,
    the teacher's own validation loss, and with depth.metric=loss the removal losses of every
    block size in `block_sizes`."""
    p = cfg.prune
    rows = calibration_rows(len(data.train), p.calibration.num_samples, cfg.seed)
    content_hash = teacher_hash(cfg.model.path, digest_memo_dir(cfg.data))
    path = scores_path(cfg, content_hash, data.cache_dir, len(rows))
    cached = gang.broadcast_object(_read(path) if gang.rank == 0 else None)
    reused = cached is not None
    cached = cached or {"version": SCORES_VERSION, "removal_loss": {}}
    started = time.perf_counter()
    if "stats" not in cached:
        log.info("calibration: %d blocks of %d tokens", len(rows), cfg.data.seq_len)
        cached["stats"] = importance.collect_activation_stats(
            teacher, adapter, data.train[rows], p.calibration.micro_batch_size, gang, device,
            p.importance.seq_agg, p.importance.mlp_activation, head_dim_of(teacher.config))
    seconds = time.perf_counter() - started

    wanted = {f"0:{p.depth.eval_blocks}"}  # the teacher's own loss, reported in summaries
    if p.depth.metric == "loss":
        wanted |= {f"{size}:{p.depth.eval_blocks}" for size in block_sizes if size}
    missing = sorted(wanted - set(cached["removal_loss"]))
    for key in missing:
        size = int(key.split(":")[0])
        if size == 0:
            loss = torch.tensor([evaluate(teacher, data.val, p.calibration.micro_batch_size, gang, device,
                                          p.depth.eval_blocks)])
        else:
            loss = importance.removal_losses(teacher, adapter, data.val, size, p.calibration.micro_batch_size,
                                             gang, device, p.depth.eval_blocks)
        cached["removal_loss"][key] = loss
    if gang.rank == 0 and (not reused or missing):
        _write(path, cached)
    return Importance(cached, path, reused, seconds, len(rows), content_hash)


def kept_for(imp: Importance, teacher: Shape, target: Shape, prune_cfg, seed: int) -> Kept:
    """What a student of shape `target` keeps, by the cached scores (or at random, the ablation)."""
    block = depth_block(teacher, target, prune_cfg.depth)
    scores = importance.scores_from_stats(imp.cached["stats"], prune_cfg.importance.batch_agg)
    removal = imp.cached["removal_loss"].get(f"{block}:{prune_cfg.depth.eval_blocks}") if block else None
    return select_kept(scores, teacher, target, prune_cfg.depth, removal_loss=removal,
                       seed=seed if prune_cfg.importance.ranking == "random" else None)


def teacher_hash(path: str, memo_dir: Path) -> str:
    """A digest of the teacher's config and weight files: names the teacher in pruning.json and
    keys the importance and teacher-output caches. Each file's digest is memoised by path, size
    and mtime under `memo_dir`, so a 140 GB teacher is read once, not by every job and candidate."""
    h = hashlib.blake2b(digest_size=16)
    root = Path(path)
    for f in sorted([root / "config.json", *root.glob("*.safetensors"), *root.glob("*.bin")]):
        h.update(f"{f.name}\0{file_digest(f, memo_dir)}\0".encode())
    return h.hexdigest()


def scores_path(cfg, content_hash: str, data_cache: Path, num_samples: int) -> Path:
    spec = {"v": SCORES_VERSION, "teacher": content_hash, "data": Path(data_cache).name,
            "num_samples": num_samples, "seed": cfg.seed, "seq_agg": cfg.prune.importance.seq_agg,
            "mlp_activation": cfg.prune.importance.mlp_activation, "precision": cfg.prune.precision}
    key = hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:20]
    root = Path(cfg.prune.scores_dir) if cfg.prune.scores_dir else Path(cfg.output_dir).parent / "importance"
    return root / f"{key}.pt"


def _read(path: Path) -> Optional[Dict]:
    """The cached scores, or None if there are none or they are damaged (logged, to be recomputed)."""
    if not path.exists():
        return None
    try:
        scores = torch.load(path, weights_only=True)
        recorded = scores.pop("sha256", None)
        if scores.get("version") != SCORES_VERSION:
            return None
        problem = None if recorded == content_digest(scores) else "its content does not match its SHA-256"
    except Exception as e:  # a truncated file fails in torch.load, with whatever error it hits
        problem = f"unreadable ({type(e).__name__}: {(str(e).splitlines() or [''])[0][:200]})"
    if problem:
        log.warning("importance scores %s: %s; recomputing", path, problem)
        return None
    log.info("reusing importance scores from %s", path)
    return scores


def _write(path: Path, scores: Dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")  # jobs of one sweep may write at once
    torch.save({**scores, "sha256": content_digest(scores)}, tmp)
    tmp.replace(path)


def content_digest(scores: Dict) -> str:
    """SHA-256 over every key, dtype, shape and byte of the scores, in a fixed order. Over the
    content rather than the file's bytes, so the file stays a plain dict that torch.load reads."""
    h = hashlib.sha256()

    def visit(node, name: str) -> None:
        if isinstance(node, dict):
            for key in sorted(node):
                visit(node[key], f"{name}/{key}")
        elif isinstance(node, (list, tuple)):
            for i, item in enumerate(node):
                visit(item, f"{name}/{i}")
        elif isinstance(node, torch.Tensor):
            flat = node.detach().cpu().contiguous().reshape(-1)
            h.update(f"{name}:{flat.dtype}:{tuple(node.shape)}\0".encode())
            h.update(flat.view(torch.uint8).numpy().tobytes())
        else:
            h.update(f"{name}={node!r}\0".encode())

    visit(scores, "")
    return h.hexdigest()
