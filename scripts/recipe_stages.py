"""What the demo models' recipes (train_demo_model.py, train_demo_captioner.py) share:
the stage-by-stage command line and writing the trained model folder in one step."""
from __future__ import annotations

import argparse
import os
import platform
import shutil
from pathlib import Path
from typing import Callable, Dict, Optional


def run_stages(argv, description: str, stages: Dict[str, Callable], work: Path, out: Path,
               add_args: Optional[Callable] = None) -> int:
    """``--stage all|NAME`` (``stages`` in order, each called with the parsed arguments and
    the resolved work folder), ``--model`` (eval: the model to measure), ``--work``,
    ``--out``, and what ``add_args(parser)`` adds."""
    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("--stage", choices=["all", *stages], default="all")
    ap.add_argument("--model", default=None, help="eval: model to measure (default: the exported one)")
    ap.add_argument("--work", default=str(work))
    ap.add_argument("--out", default=str(out))
    if add_args is not None:
        add_args(ap)
    a = ap.parse_args(argv)
    folder = Path(a.work).resolve()
    folder.mkdir(parents=True, exist_ok=True)
    for name, stage in stages.items():
        if a.stage in ("all", name):
            stage(a, folder)
    return 0


def machine() -> str:
    """The training machine, as the model cards say it."""
    import torch
    return f"{platform.machine()} CPU, {os.cpu_count()} cores (shared), torch {torch.__version__}"


def write_model_folder(model, cfg, dest: Path, arch: str, mean, std, extra: dict) -> float:
    """The model as fp16 safetensors in ``dest``, replacing it in one step (written beside it
    first; an existing MODEL_CARD.md is kept); returns the weights' size in MB."""
    from mapclip.engine.model.models import save_model_folder
    tmp = dest.with_name(dest.name + ".part")
    if tmp.exists():
        shutil.rmtree(tmp)
    save_model_folder(model, cfg, tmp, arch, mean=mean, std=std, extra=extra, half=True)
    card = dest / "MODEL_CARD.md"
    if card.exists():
        shutil.copy(card, tmp / "MODEL_CARD.md")
    if dest.exists():
        shutil.rmtree(dest)
    os.replace(tmp, dest)
    return (dest / "open_clip_model.safetensors").stat().st_size / 1e6
