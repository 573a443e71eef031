"""The plugin's remembered choices, all in QgsSettings under the group ``mapclip/``.

Search parameters have defaults per model: the engine's DetectOptions give the
base values (one place for those facts) and :data:`MODEL_OVERRIDES` adjusts
them for model sizes (large ViT-L models get smaller batches, the tiny test
model smaller tiles). What the user changes in the dock's Advanced group is
stored per model, so switching models brings back that model's values.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields
from typing import Any, Dict, List, Optional

from qgis.core import QgsSettings

GROUP = "mapclip"
HISTORY_SIZE = 20
DEVICES = ("auto", "cpu", "cuda", "mps")
METHODS = ("window", "dense")

# When the engine cannot be imported (dependencies missing), the dock still
# shows these; they mirror engine.detect.DetectOptions.
_FALLBACK = {"tile_px": 128, "window": 2, "stride": 1, "batch_size": 64, "top_k": 20,
             "threshold": None, "mode": "window"}

#: adjustments by model: a substring of the preset's architecture or the spec
MODEL_OVERRIDES: Dict[str, Dict[str, Any]] = {
    "L-14": {"batch_size": 16, "tile_px": 224},
    "RN50": {"batch_size": 32},
    "mapclip-tiny": {"tile_px": 64, "batch_size": 16},
    "test-tiny": {"tile_px": 64, "batch_size": 16},
}


@dataclass
class SearchParams:
    """What the Advanced group holds; ``gsd`` 0 means native resolution."""

    tile_px: int = 128
    window: int = 2
    stride: int = 1
    gsd: float = 0.0
    top_k: int = 20
    threshold: Optional[float] = None
    bands: str = ""
    device: str = "auto"
    batch_size: int = 64
    method: str = "window"

    def band_list(self) -> Optional[List[int]]:
        """The bands text ("4,3,2") as 1-based ints, None for automatic."""
        parts = [p for p in self.bands.replace(";", ",").replace(" ", ",").split(",") if p.strip()]
        if not parts:
            return None
        try:
            bands = [int(p) for p in parts]
        except ValueError:
            raise ValueError(f"bands {self.bands!r}: write band numbers like 4,3,2") from None
        if any(b < 1 for b in bands):
            raise ValueError("bands are numbered from 1")
        return bands


def engine_defaults() -> Dict[str, Any]:
    """DetectOptions' defaults, or the fallback copy when the engine cannot import."""
    try:
        from ..engine.detect import DetectOptions
    except Exception:  # dependencies missing or engine part not built
        return dict(_FALLBACK)
    opts = DetectOptions()
    return {k: getattr(opts, k, v) for k, v in _FALLBACK.items()}


def _model_arch(model: str) -> str:
    try:
        from ..engine.models import PRESETS
    except Exception:
        return ""
    preset = PRESETS.get(model)
    return preset.arch if preset else ""


def model_defaults(model: str) -> SearchParams:
    """The default search parameters for ``model``."""
    base = engine_defaults()
    params = SearchParams(tile_px=int(base["tile_px"]), window=int(base["window"]),
                          stride=int(base["stride"]), batch_size=int(base["batch_size"]),
                          top_k=int(base["top_k"]), threshold=base["threshold"],
                          method=str(base["mode"]))
    key = f"{model} {_model_arch(model)}"
    for needle, values in MODEL_OVERRIDES.items():
        if needle in key:
            for k, v in values.items():
                setattr(params, k, v)
    return params


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
        from ..engine.models import DEFAULT_MODEL
        return str(self.get("model", DEFAULT_MODEL))

    @model.setter
    def model(self, spec: str) -> None:
        self.set("model", spec)

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
        params = model_defaults(model)
        stored = self._get_json(f"params/{_safe(model)}", {})
        for f in fields(SearchParams):
            if f.name in stored:
                setattr(params, f.name, stored[f.name])
        return params

    def set_params(self, model: str, params: SearchParams) -> None:
        defaults = asdict(model_defaults(model))
        changed = {k: v for k, v in asdict(params).items() if defaults.get(k) != v}
        if changed:
            self.set(f"params/{_safe(model)}", json.dumps(changed))
        else:
            self.remove(f"params/{_safe(model)}")

    def reset_params(self, model: str) -> None:
        self.remove(f"params/{_safe(model)}")
