"""The model side of every job's setup (engine.rasterjob for the raster jobs, the index
build for archives): the model loaded, its device path fixed, the job's options completed
with the model's defaults."""
from __future__ import annotations

from dataclasses import replace

from ..core.options import check, with_model_defaults
from .models import as_loaded
from . import accel


def job_defaults(options, lm, auto_batch: bool = True):
    """``options`` with model ``lm``'s defaults filled in (and, on CUDA, a batch size from
    free memory where none was given), checked."""
    if auto_batch and options.batch_size is None:
        options = replace(options, batch_size=accel.auto_batch_size(lm))  # None off CUDA
    return check(with_model_defaults(options, lm.defaults))


def job_model(model, options):
    """The model side of a job's setup: ``model`` (a spec or a LoadedModel) loaded on
    ``options.device`` at ``options.precision`` and its device path fixed (engine.model.accel:
    CUDA autocast, compile where ``options.compile``, the CPU's checked bf16 image tower).
    Returns (the LoadedModel, the notes it made)."""
    lm = as_loaded(model, options.device, options.precision)
    return lm, list(accel.prepare(lm, compile=bool(getattr(options, "compile", False))))
