"""The plugin's remembered choices, all in QgsSettings under the group ``mapclip/``.

Search parameters have defaults per model, and those are the engine's:
engine.core.options (the options and their generic defaults) and
engine.model.presets.model_defaults (each model's own), both importable without
torch, so the dock shows them even before packages are installed. What the
user changes in the dock's Advanced group is stored per model, so switching
models brings back that model's values. A search hands the engine only what
the user changed (:meth:`SearchParams.detect_options`); everything else stays
``None`` and the engine fills in the model's default, exactly as it does for
the CLI and Processing.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields, replace
from typing import Any, Dict, List, Optional

from qgis.core import QgsSettings

from ..engine.model.presets import DEFAULT_MODEL, PRESETS
from ..engine.model.presets import model_defaults as engine_model_defaults
from ..engine.core.errors import UsageError, worded
from ..engine.core.options import (MODES, ClassifyOptions, CountOptions, DetectOptions, ReadOptions, parse_bands,
                                   parse_read_workers, with_model_defaults)

GROUP = "mapclip"
HISTORY_SIZE = 20
DEVICES = ("auto", "cpu", "cuda", "mps")
METHODS = MODES
#: Describe's model until the user picks one: a captioning model, so no caption bank is needed
DEFAULT_CAPTION_MODEL = "demo-captioner"

#: dock field label of each engine option, for errors worded in the dock's terms
FIELD_LABELS = {"tile_px": "Tile size", "window": "Window", "stride": "Stride", "gsd": "GSD",
                "top_k": "Top-k", "threshold": "Threshold", "bands": "Bands", "read": "Bands",
                "device": "Device", "batch_size": "Batch size", "mode": "Method",
                "dense_tile_px": "Tile size", "bank": "Caption bank", "caption_model": "Caption model",
                "read_workers": "Reader processes", "compile": "Compile (CUDA)",
                "cache": "Reuse embeddings", "stac": "Sources", "examples": "Examples"}


@dataclass
class SearchParams:
    """What the Advanced group holds; ``gsd`` 0 means native resolution."""

    tile_px: int
    window: int
    stride: int
    top_k: int
    threshold: Optional[float]
    batch_size: int
    method: str
    gsd: float = 0.0
    bands: str = ""
    device: str = "auto"
    read_workers: Any = "auto"          # ReadOptions.workers: "auto", 0 (threads) or N processes
    compile: bool = False               # DetectOptions.compile (CUDA)
    cache: bool = DetectOptions().cache  # DetectOptions.cache / CountOptions.cache (engine.cache)

    def band_list(self) -> Optional[List[int]]:
        """The bands text ("4,3,2") as 1-based ints, None for automatic (engine.core.options.parse_bands);
        a ValueError worded for the dock."""
        try:
            return parse_bands(self.bands)
        except UsageError as exc:
            message, hint = worded(exc, FIELD_LABELS.get)
            raise ValueError(f"{message} ({hint})") from None

    def _changed(self, model: str) -> Dict[str, Any]:
        base = model_defaults(model, self.method)
        return {f.name: getattr(self, f.name) for f in fields(self)
                if getattr(self, f.name) != getattr(base, f.name)}

    def read_options(self) -> ReadOptions:
        return ReadOptions(bands=self.band_list(), gsd=self.gsd or None,
                           workers=parse_read_workers(self.read_workers))

    def detect_options(self, model: str, heatmap: bool = False) -> DetectOptions:
        """The engine's options for this search: only what differs from ``model``'s
        defaults is set; the engine fills in the rest (engine.core.options.with_model_defaults)."""
        changed = self._changed(model)
        keep = {k: v for k, v in changed.items()
                if k in ("tile_px", "window", "stride", "top_k", "threshold", "batch_size")}
        if "threshold" in keep and keep["threshold"] is None:
            keep["threshold"] = 0.0  # "off" where the model has a threshold
        return replace(DetectOptions(), mode=self.method, read=self.read_options(),
                       device=None if self.device in ("", "auto") else self.device,
                       compile=bool(self.compile), cache=bool(self.cache), heatmap=heatmap, **keep)

    def classify_options(self) -> ClassifyOptions:
        """The engine's classify options: bands, GSD and device from the dock; tiles and the
        rest are the model's (its dense tile)."""
        return replace(ClassifyOptions(), read=self.read_options(), cache=bool(self.cache),
                       device=None if self.device in ("", "auto") else self.device)

    def count_options(self, model: str) -> CountOptions:
        """The engine's count options: batch size if changed, the threshold only in dense
        terms (the dock's window threshold is not a dense one), bands, GSD and device."""
        changed = self._changed(model)
        return replace(CountOptions(), read=self.read_options(),
                       batch_size=changed.get("batch_size"), cache=bool(self.cache),
                       device=None if self.device in ("", "auto") else self.device)


def model_defaults(model: str, method: Optional[str] = None) -> SearchParams:
    """The default search parameters for ``model`` (and a method), from the engine."""
    o = with_model_defaults(DetectOptions(mode=method or DetectOptions().mode),
                            engine_model_defaults(model))
    return SearchParams(tile_px=int(o.tile_px), window=int(o.window), stride=int(o.stride),
                        top_k=int(o.top_k), threshold=o.threshold, batch_size=int(o.batch_size),
                        method=o.mode)


def _safe(name: str) -> str:
    """A settings key part for a model spec (paths contain slashes)."""
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)[-120:]


class Settings:
    """Typed access to the ``mapclip/`` settings group."""

    def __init__(self, qsettings: Optional[QgsSettings] = None):
        self.q = qsettings or QgsSettings()

    # -- plain values ------------------------------------------------------
    def get(self, key: str, default: Any = None) -> Any:
        value = self.q.value(f"{GROUP}/{key}", None)
        if value is None:
            return default
        if isinstance(default, bool):
            return value in (True, "true", "True", "1", 1)
        if isinstance(default, int):
            try:
                return int(value)
            except (TypeError, ValueError):
                return default
        if isinstance(default, float):
            try:
                return float(value)
            except (TypeError, ValueError):
                return default
        return value

    def set(self, key: str, value: Any) -> None:
        self.q.setValue(f"{GROUP}/{key}", value)

    def remove(self, key: str) -> None:
        self.q.remove(f"{GROUP}/{key}")

    def _get_json(self, key: str, default):
        raw = self.get(key, "")
        if not raw:
            return default
        try:
            return json.loads(raw)
        except ValueError:
            return default

    # -- models ------------------------------------------------------------
    @property
    def model(self) -> str:
        return str(self.get("model", DEFAULT_MODEL))

    @model.setter
    def model(self, spec: str) -> None:
        self.set("model", spec)

    @property
    def caption_model(self) -> str:
        """The model Describe uses: the user's last choice, else demo-captioner (it writes
        captions, no bank needed) where the engine has it, else the default model."""
        return str(self.get("caption_model", DEFAULT_CAPTION_MODEL if DEFAULT_CAPTION_MODEL in PRESETS
                            else DEFAULT_MODEL))

    @caption_model.setter
    def caption_model(self, spec: str) -> None:
        self.set("caption_model", spec)

    def custom_models(self) -> List[Dict[str, str]]:
        """Checkpoints and model folders the user added: [{"label", "spec"}]."""
        items = self._get_json("custom_models", [])
        return [i for i in items if isinstance(i, dict) and i.get("spec")]

    def add_custom_model(self, spec: str, label: Optional[str] = None) -> Dict[str, str]:
        """Remember a model spec (ARCH:CHECKPOINT or a model folder) for the picker.

        The fine-tune dialog calls this to offer its result in the dock.
        """
        items = [i for i in self.custom_models() if i["spec"] != spec]
        item = {"label": label or spec, "spec": spec}
        items.append(item)
        self.set("custom_models", json.dumps(items))
        return item

    def remove_custom_model(self, spec: str) -> None:
        items = [i for i in self.custom_models() if i["spec"] != spec]
        self.set("custom_models", json.dumps(items))

    # -- prompts -----------------------------------------------------------
    def prompt_history(self) -> List[str]:
        return [p for p in self._get_json("prompt_history", []) if isinstance(p, str)]

    def add_prompt(self, text: str) -> List[str]:
        text = text.strip()
        history = [p for p in self.prompt_history() if p != text]
        if text:
            history.insert(0, text)
        history = history[:HISTORY_SIZE]
        self.set("prompt_history", json.dumps(history))
        return history

    # -- search parameters, per model -------------------------------------
    def params(self, model: str) -> SearchParams:
        stored = self._get_json(f"params/{_safe(model)}", {})
        method = stored.get("method") if stored.get("method") in METHODS else None
        params = model_defaults(model, method)
        for f in fields(SearchParams):
            if f.name in stored:
                setattr(params, f.name, stored[f.name])
        return params

    def set_params(self, model: str, params: SearchParams) -> None:
        defaults = asdict(model_defaults(model, params.method))
        changed = {k: v for k, v in asdict(params).items() if defaults.get(k) != v}
        if params.method != DetectOptions().mode:
            changed["method"] = params.method
        if changed:
            self.set(f"params/{_safe(model)}", json.dumps(changed))
        else:
            self.remove(f"params/{_safe(model)}")

    def reset_params(self, model: str) -> None:
        self.remove(f"params/{_safe(model)}")
