"""Running the model over a batch on the device, in chunks that fit.

:class:`BatchRunner` is how every job (detect, count, classify, index) calls
the model: a batch runs in chunks of ``batch_size``; when CUDA runs out of
memory the chunk is halved and the run goes on (a note says so), down to one.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, List

from ..core.errors import MapClipError

if TYPE_CHECKING:
    import torch


class BatchRunner:
    """Runs a batch function in chunks; halves the chunk on CUDA out-of-memory."""

    def __init__(self, batch_size: int):
        self.chunk = max(1, int(batch_size))
        self.notes: List[str] = []

    def __call__(self, fn, batch: torch.Tensor) -> Any:
        import torch
        outs = []
        i = 0
        while i < len(batch):
            part = batch[i:i + self.chunk]
            try:
                outs.append(fn(part))
            except torch.cuda.OutOfMemoryError:
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
                if self.chunk == 1:
                    raise MapClipError("the GPU ran out of memory even with a batch of 1",
                                       "use a smaller model, close other GPU programs, "
                                       "or run with --device cpu") from None
                self.chunk = max(1, self.chunk // 2)
                note = (f"CUDA ran out of memory; continued with a batch of {self.chunk} "
                        f"(pass --batch-size {self.chunk} to start there)")
                if note not in self.notes:
                    self.notes.append(note)
                continue
            i += len(part)
        if isinstance(outs[0], tuple):
            return tuple(torch.cat(x) for x in zip(*outs))
        return torch.cat(outs)
