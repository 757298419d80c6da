"""The teacher's top-k next-token logits, computed once per training block and kept beside the
packed data (`distill.teacher_cache=true`): a distillation reads them instead of running the
teacher, and every candidate of a search, which reads the same blocks, shares them.

Layout: <data cache dir>/teacher_topk/<teacher content hash>-k<k>-<dtype>/, holding segments
written whole and renamed into place (so a crashed or concurrent writer leaves nothing half
read): seg-*.keys.npy ([n, 16] uint8, a hash of each block's tokens), seg-*.values.npy ([n, T-1,
k] logits after any soft-cap, largest first) and seg-*.indices.npy ([n, T-1, k] int32). Blocks are
found by the hash of their tokens, so the training loop hands over nothing but its micro-batch.
The teacher's own validation loss, which distillation reports, is kept there too.
"""
import hashlib
import json
import math
import os
import uuid
from pathlib import Path
from typing import Dict, Iterable, Optional, Tuple

import numpy as np
import torch

from minitron.run import write_json_atomic

CACHE_DTYPES = {"fp16": np.float16, "bf16": np.uint16, "fp32": np.float32}  # bf16 kept as its bit pattern


def cache_root(data_cache_dir: Path, teacher_hash: str, k: int, dtype: str) -> Path:
    return Path(data_cache_dir) / "teacher_topk" / f"{teacher_hash}-k{k}-{dtype}"


def block_key(tokens: np.ndarray) -> bytes:
    return hashlib.blake2b(np.ascontiguousarray(tokens, dtype=np.int64).tobytes(), digest_size=16).digest()


def _to_storage(values: torch.Tensor, dtype: str) -> np.ndarray:
    if dtype == "bf16":
        return values.to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    return values.to(torch.float16 if dtype == "fp16" else torch.float32).numpy()


def _from_storage(values: np.ndarray, dtype: str) -> torch.Tensor:
    if dtype == "bf16":
        return torch.from_numpy(values.view(np.int16).copy()).view(torch.bfloat16).float()
    return torch.from_numpy(np.array(values, dtype=np.float32))


class TeacherCache:
    def __init__(self, root: Path, k: int, dtype: str):
        self.root, self.k, self.dtype = Path(root), k, dtype
        self.where: Dict[bytes, Tuple[int, int]] = {}  # block key -> (segment, row)
        self.segments = []
        self.reload()

    def reload(self) -> None:
        self.where.clear()
        self.segments = []
        for keys_file in sorted(self.root.glob("seg-*.keys.npy")):
            stem = str(keys_file)[:-len(".keys.npy")]
            keys = np.load(keys_file)
            self.segments.append((np.load(stem + ".values.npy", mmap_mode="r"),
                                  np.load(stem + ".indices.npy", mmap_mode="r")))
            for row, key in enumerate(keys):
                self.where.setdefault(key.tobytes(), (len(self.segments) - 1, row))

    def missing(self, blocks: np.ndarray, wanted: Iterable[int]) -> np.ndarray:
        """The block numbers among `wanted` whose logits are not cached (each once)."""
        seen, out = set(), []
        for i in wanted:
            key = block_key(blocks[i])
            if key not in self.where and key not in seen:
                seen.add(key)
                out.append(i)
        return np.array(out, dtype=np.int64)

    def lookup(self, input_ids: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """A micro-batch's cached teacher logits at positions 0..T-2 (those with a next token):
        [B, T-1, k] float32 values, largest first, and their int64 token ids."""
        rows = input_ids.cpu().numpy()
        values, indices = [], []
        for row in rows:
            found = self.where.get(block_key(row))
            if found is None:
                raise KeyError("a training block is missing from the teacher cache "
                               f"{self.root}; was it filled for this data and seq_len?")
            seg_values, seg_indices = self.segments[found[0]]
            values.append(seg_values[found[1]])
            indices.append(seg_indices[found[1]])
        return (_from_storage(np.stack(values), self.dtype).to(input_ids.device),
                torch.from_numpy(np.stack(indices).astype(np.int64)).to(input_ids.device))

    def write_segment(self, keys: np.ndarray, values: np.ndarray, indices: np.ndarray) -> None:
        """One segment, each file written beside its place and renamed; the keys file last, so a
        segment is visible only once whole."""
        self.root.mkdir(parents=True, exist_ok=True)
        stem = self.root / f"seg-{uuid.uuid4().hex}"
        for suffix, array in ((".values.npy", values), (".indices.npy", indices), (".keys.npy", keys)):
            tmp = Path(f"{stem}{suffix}.tmp{os.getpid()}")
            with open(tmp, "wb") as f:
                np.save(f, array)
            os.replace(tmp, f"{stem}{suffix}")

    def teacher_val_loss(self, eval_blocks: int) -> Optional[float]:
        path = self.root / f"teacher_val_loss-{eval_blocks}.json"
        return json.loads(path.read_text())["val_loss"] if path.is_file() else None

    def save_teacher_val_loss(self, eval_blocks: int, loss: float) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        write_json_atomic(self.root / f"teacher_val_loss-{eval_blocks}.json", {"val_loss": loss})


@torch.no_grad()
def teacher_topk(final_hidden: torch.Tensor, head_weight: torch.Tensor, vocab_size: int, k: int,
                 softcap: Optional[float], chunk_tokens: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """[N, k] values and indices of the largest teacher logits (soft-capped as the model caps
    them), from [N, H] final hidden states, chunk by chunk as the fused loss makes them."""
    from minitron.distill.fused import softcapped
    from minitron.distill.losses import _at_least_fp32

    values, indices = [], []
    weight = head_weight[:vocab_size]
    for h in final_hidden.split(chunk_tokens):
        top = _at_least_fp32(softcapped(h @ weight.T, softcap)).topk(k, dim=-1)
        values.append(top.values)
        indices.append(top.indices)
    return torch.cat(values), torch.cat(indices)


def fill(cache: TeacherCache, teacher, blocks: np.ndarray, todo: np.ndarray, micro_batch_size: int,
         vocab_size: int, chunk_tokens: int, gang, device: torch.device) -> None:
    """Compute the top-k logits of the `todo` blocks (the same list on every rank): each rank
    its share, in passes of `micro_batch_size`, written as one segment per rank. A ZeRO-3 teacher
    gathers its layers collectively, so every rank runs as many passes (a short rank repeats its
    last block and drops the result)."""
    mine = todo[gang.rank::gang.world_size]
    passes = math.ceil(math.ceil(len(todo) / gang.world_size) / micro_batch_size)
    keys, values, indices = [], [], []
    for p in range(passes):
        rows = mine[p * micro_batch_size:(p + 1) * micro_batch_size]
        real = len(rows)
        if not real:
            rows = todo[:1]
        input_ids = torch.from_numpy(np.asarray(blocks[rows], dtype=np.int64)).to(device)
        with teacher.outputs(input_ids) as out:
            hidden = out.final_hidden[:, :-1]
            top_values, top_indices = teacher_topk(hidden.flatten(0, 1), out.head_weight, vocab_size, cache.k,
                                                   out.softcap, chunk_tokens)
        if not real:
            continue
        shape = (len(rows), hidden.shape[1], cache.k)
        values.append(_to_storage(top_values.view(shape).cpu(), cache.dtype))
        indices.append(top_indices.view(shape).to(torch.int32).cpu().numpy())
        keys.extend(np.frombuffer(block_key(r), dtype=np.uint8) for r in input_ids.cpu().numpy())
    if keys:
        cache.write_segment(np.stack(keys), np.concatenate(values), np.concatenate(indices))
    gang.barrier()
    cache.reload()
