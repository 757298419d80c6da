"""A checkpoint's tensors by name, read one at a time from its safetensors files, so a student can
be built from a teacher that is no longer in memory."""
from pathlib import Path
from typing import Dict, Iterator, Mapping

import torch
from safetensors import safe_open


class SafetensorsWeights(Mapping):
    def __init__(self, checkpoint_dir: str):
        self._file_of: Dict[str, Path] = {}
        for path in sorted(Path(checkpoint_dir).glob("*.safetensors")):
            with safe_open(str(path), framework="pt") as f:
                self._file_of.update(dict.fromkeys(f.keys(), path))

    def __getitem__(self, name: str) -> torch.Tensor:
        # The file is opened for each tensor: its memory map closes once the tensor is read, so
        # tensors read earlier do not stay resident in this process.
        with safe_open(str(self._file_of[name]), framework="pt") as f:
            return f.get_tensor(name)

    def __iter__(self) -> Iterator[str]:
        return iter(self._file_of)

    def __len__(self) -> int:
        return len(self._file_of)


def model_weights(model) -> Dict[str, torch.Tensor]:
    """An in-memory model's parameters and buffers by name (the same Mapping interface)."""
    return {**dict(model.named_parameters()), **dict(model.named_buffers())}
