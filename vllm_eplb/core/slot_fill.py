"""Did a weight loader write every expert slot? A sentinel in each slot before, looked for after.

With redundant slots a model's loader must fill every slot, the redundant ones included; one
written for the logical experts only leaves some slots as they were allocated, and serving
would compute garbage from them. So before loading, each expert tensor's bytes are set to a
sentinel no loaded value holds, and after loading the slots still holding it are unwritten:

- a floating tensor (bf16, fp32, every fp8 format, block or per-expert scales): the bytes of
  NaN in that format (fp8 e4m3fn: 0x7F; e4m3fnuz: 0x80; e8m0 scales: 0xFF). No checkpoint
  weight or scale is NaN, so one sentinel element left in a slot's row means the loader never
  wrote that part of it (a missing shard of a fused w13 shows too). Compared as bytes: CUDA
  has no `isnan` or `fill_` for every fp8 format, but every dtype has a byte view.
- an integer tensor (packed int4/int8 weights): all bytes 0xFF. A packed row can hold such
  words, so only a row made of nothing else counts as unwritten.

Tensors on the meta device have no bytes to mark (online quantization builds them there and
replaces them while loading), and tensors replaced during loading are not the ones marked:
`Marks.unwritten` checks only the tensors it marked that the model still uses, and says how
many it could not check. A check never refuses a slot it could not read.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


def sentinel(dtype: torch.dtype) -> torch.Tensor:
    """The bytes of one element no loader writes: NaN's for floating dtypes, 0xFF... else."""
    if dtype.is_floating_point:
        return torch.tensor([float("nan")]).to(dtype).view(torch.uint8)
    return torch.full((torch.empty((), dtype=dtype).element_size(),), 0xFF, dtype=torch.uint8)


def _rows(t: torch.Tensor) -> torch.Tensor:
    """(slots, elements, element bytes) byte view of a (slots, ...) tensor."""
    return t.reshape(t.shape[0], -1).view(torch.uint8).view(t.shape[0], -1, t.element_size())


def _storage(t: torch.Tensor) -> tuple:
    return (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.dtype)


@dataclass
class Marks:
    """The expert tensors of each layer marked with their sentinel before loading."""

    marked: list[set] = field(default_factory=list)  # per layer: storage keys of the marked tensors

    @classmethod
    def mark(cls, layers: list[list[torch.Tensor]]) -> "Marks":
        marks = cls()
        for tensors in layers:
            keys = set()
            for t in tensors:
                if t.device.type == "meta" or t.dim() == 0 or t.shape[0] == 0 or not t.is_contiguous():
                    continue  # nothing to mark: unchecked after loading
                rows = _rows(t)
                rows.copy_(sentinel(t.dtype).to(t.device).expand_as(rows))
                keys.add(_storage(t))
            marks.marked.append(keys)
        return marks

    def unwritten(self, layers: list[list[torch.Tensor]]) -> tuple[int, int]:
        """(slots left unwritten, tensors not checked) for the tensors the model uses after
        loading (`layers`, listed as `mark` got them). A slot is unwritten when a marked
        tensor's row for it still holds its sentinel: any element of a floating tensor, every
        element of an integer one. A layer's slots count once, whichever tensors miss them.
        Tensors that were not marked (meta before loading, replaced while loading) are not
        checked."""
        unwritten, unchecked = 0, 0
        for keys, tensors in zip(self.marked, layers):
            missing = None
            for t in tensors:
                if t.device.type == "meta" or _storage(t) not in keys:
                    unchecked += 1
                    continue
                s = sentinel(t.dtype).to(t.device)
                floating = t.is_floating_point()
                # row by row: comparing a whole tensor at once would take as many bytes again
                hit = torch.stack([(r == s).all(dim=1).any() if floating else (r == s).all() for r in _rows(t)])
                missing = hit if missing is None else missing | hit
            if missing is not None:
                unwritten += int(missing.sum())
        return unwritten, unchecked
