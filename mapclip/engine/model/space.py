"""A loaded model's identity, computed: the facts an index's manifest keeps to
name the embedding space its vectors live in (compared by
engine.model.identity.same_space). Apart from identity.py because computing
it runs the model (engine.model.encode), which identity.py, imported by the
device path (engine.model.accel), must not import. Importing this module needs no torch.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Dict

from .identity import PROBE_TEXT, probe_image, weights_fingerprint


def model_identity(lm) -> Dict[str, Any]:
    """Model facts stored in the manifest: spec, preprocessing, embed dim, and
    the embeddings of a fixed text and a fixed image, which identify the
    embedding space whatever the spec was called (bf16 vs fp32 agree to 0.999)."""
    from .encode import encode_images, encode_text   # torch: imported when a model runs
    spec = lm.spec
    p = Path(str(spec)).expanduser()
    if p.exists():
        spec = str(p.resolve())
    facts = dict(lm.describe())
    facts.update({"spec": spec, "mean": list(lm.mean), "std": list(lm.std),
                  "probe_text": [round(float(v), 6) for v in encode_text(lm, [PROBE_TEXT])[0].cpu()],
                  "probe_image": [round(float(v), 6)
                                  for v in encode_images(lm, probe_image(lm.image_size))[0].cpu()]})
    facts.pop("device", None)
    facts.pop("precision", None)
    facts["weights"] = weights_fingerprint(lm)
    return facts
