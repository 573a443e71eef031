"""Contrastive fine-tuning of a CLIP model on image-caption pairs (RemoteCLIP's recipe,
or PIR-CLIP's with ``recipe="pir"``).

One call, :func:`finetune`, reads a caption dataset (:mod:`engine.data.captions`),
holds out a validation split, evaluates retrieval before training, trains with
symmetric InfoNCE and the model's own learnable temperature, evaluates after
every epoch and keeps the best model by mean recall as a model folder that
:func:`engine.model.models.load_model` reads. Recipe ``pir`` (:mod:`.pir`) first
makes the model PIR-CLIP (:mod:`engine.model.pir`) and trains its scene prior,
then adds the cluster-wise affiliation loss to InfoNCE.

The package: :mod:`.train` (the model, what trains, AdamW, the schedule, the losses,
one step), :mod:`.data` (decoding, augmentation, the epoch plan, the split, the
evaluation), :mod:`.rundir` (the run folder: fingerprint, refusals, state, best/,
lock), :mod:`.pir` (PIR's labels, prior and its checkpoint), :mod:`.run` (the run).

Training details
----------------
- Weights train in fp32; on CUDA the forward runs under autocast (bf16, or
  fp16 with a gradient scaler where bf16 is missing). The CPU trains in fp32.
- Loss: symmetric InfoNCE, ``(CE(s·I·Tᵀ) + CE(s·T·Iᵀ)) / 2`` with
  ``s = exp(logit_scale)``; ``logit_scale`` is clamped to ``[0, ln 100]``
  after every step, as CLIP does.
- One training unit is an *image*; each epoch picks one of its captions at
  random, so an image never meets itself as a negative in a batch.
- Augmentation (RemoteCLIP): random resized crop (area 50-100 %, aspect
  3/4-4/3), horizontal and vertical flips, rotations by multiples of 90°.
  Every sample's augmentation is drawn from its own seed, derived from
  (seed, epoch, position), so results do not depend on the worker count and a
  resumed run sees exactly the batches an uninterrupted run would.
- AdamW (betas 0.9/0.98, eps 1e-6); no weight decay on gains, biases,
  embeddings and the temperature. Learning rate: linear warm-up, then cosine
  decay to ``lr * min_lr_ratio``.
- Gradient accumulation (``accum`` > 1) builds one *contrastive* batch of
  ``batch_size * accum`` pairs: features of all micro-batches are computed
  first without gradients, then each micro-batch is recomputed with gradients
  against the cached features of the others, so the negatives are those of
  the large batch (the open_clip ``accum_freq`` scheme) at the memory of a
  small one.
- ``freeze`` ("text" / "vision") freezes one tower; ``unlock_last`` N trains
  only the last N blocks (plus the final norm and projection) of the towers
  that are not frozen. The temperature always trains.

The run folder
--------------
``RUN_DIR/run.json`` (settings and status), ``metrics.jsonl`` (one JSON object
per step, epoch and evaluation), ``last.pt`` (the training state after the
last completed epoch: model, optimizer, scaler, epoch, step, RNG states and
data order; plain tensors and dicts saved with ``torch.save`` and read back
with ``weights_only=True``) and ``best/`` (a model folder). Files are written
beside their final names and renamed into place.

A model spec ``ARCH:random`` (``ARCH`` an open_clip architecture, a JSON
model config file, or a model folder) trains that architecture from a random
initialisation seeded by ``seed``.
"""
from __future__ import annotations

from ..core.options import FREEZE, FinetuneOptions, check  # noqa: F401
from ..archive.format import LOCK  # noqa: F401
from .data import (PairDataset, augment, collate, epoch_plan, evaluate, evaluate_model,  # noqa: F401
                   load_image, split_items, worker_count)
from .rundir import (BEST_DIR, METRICS_FILE, RUN_FILE, STATE_FILE, STATE_FORMAT,  # noqa: F401
                     RunLock, load_state, options_from_run, save_state)
from .run import FinetuneResult, finetune  # noqa: F401
from .train import (ADAM_BETAS, ADAM_EPS, HEAD_NAMES, MAX_LOGIT_SCALE,  # noqa: F401
                    contrastive_loss, load_base_model, lr_at, make_optimizer, resolve_amp,
                    set_trainable, train_step)
