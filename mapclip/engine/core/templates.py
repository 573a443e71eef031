"""Prompt template ensembles: the named sets, a template file, and what is wrong with a choice.

A prompt (a class name, a search term) is put into every template of an
ensemble; engine.model.scoring.encode_prompts encodes the filled templates and
averages them. A choice (``templates=`` of every options class, ``--templates``
on the command line) is one of:

- None: the model's default set (``Preset.templates``, a model folder's
  ``mapclip.templates``);
- a set name of :data:`TEMPLATE_SETS`;
- one template holding ``{}`` where the prompt goes;
- the path of a text file with one template per line (blank lines and lines
  starting with ``#`` skipped), each holding ``{}``;
- a list of templates, each holding ``{}``.

The named sets are data copied from the code the published tables were made
with (docs/models.md names each source):

- ``mapclip`` (old name ``remote-sensing``): MapCLIP's own seven templates,
  the presets' default;
- ``openai``: OpenAI CLIP's remote-sensing ensemble, the 18 RESISC45
  templates of its ``data/prompts.md`` (github.com/openai/CLIP);
- ``rs5m``: the 105 templates of RS5M / GeoRSCLIP's zero-shot evaluation
  (``inference/classname_and_prompt/RSAID.py``, the same list for EuroSAT and
  RESISC45; github.com/om-ai-lab/RS5M);
- ``clip_benchmark``: CLIP_benchmark's ``resisc45`` entry of
  ``en_zeroshot_classification_templates.json`` (github.com/LAION-AI/CLIP_benchmark),
  its spelling kept;
- ``raw``: the prompt exactly as typed.

Standard library only (the front ends list the names without torch).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, Optional, Tuple

from .errors import UsageError

#: MapCLIP's ensemble ("{}" is the prompt as typed: no article is added, so
#: plurals and mass nouns read right)
REMOTE_SENSING_TEMPLATES: Tuple[str, ...] = (
    "a satellite image of {}.",
    "an aerial photo of {}.",
    "a remote sensing image of {}.",
    "a satellite photo of {}.",
    "an aerial image of {}.",
    "a top-down view of {}.",
    "a photo of {}.",
)

#: OpenAI CLIP, data/prompts.md, RESISC45: six image words times no article, "a", "the"
OPENAI_TEMPLATES: Tuple[str, ...] = tuple(
    f"{kind} of {article}{{}}."
    for article in ("", "a ", "the ")
    for kind in ("satellite imagery", "aerial imagery", "satellite photo", "aerial photo",
                 "satellite view", "aerial view"))

#: RS5M / GeoRSCLIP: 35 phrasings of "a remote sensing image", repeated for "an aerial
#: image" and "a satellite image" (105 templates, in the reference's order)
_RS5M_PHRASINGS: Tuple[str, ...] = (
    "a remote sensing image of many {}.", "a remote sensing image of a {}.",
    "a remote sensing image of the {}.", "a remote sensing image of the hard to see {}.",
    "a remote sensing image of a hard to see {}.",
    "a low resolution remote sensing image of the {}.", "a low resolution remote sensing image of a {}.",
    "a bad remote sensing image of the {}.", "a bad remote sensing image of a {}.",
    "a cropped remote sensing image of the {}.", "a cropped remote sensing image of a {}.",
    "a bright remote sensing image of the {}.", "a bright remote sensing image of a {}.",
    "a dark remote sensing image of the {}.", "a dark remote sensing image of a {}.",
    "a close-up remote sensing image of the {}.", "a close-up remote sensing image of a {}.",
    "a black and white remote sensing image of the {}.", "a black and white remote sensing image of a {}.",
    "a jpeg corrupted remote sensing image of the {}.", "a jpeg corrupted remote sensing image of a {}.",
    "a blurry remote sensing image of the {}.", "a blurry remote sensing image of a {}.",
    "a good remote sensing image of the {}.", "a good remote sensing image of a {}.",
    "a remote sensing image of the large {}.", "a remote sensing image of a large {}.",
    "a remote sensing image of the nice {}.", "a remote sensing image of a nice {}.",
    "a remote sensing image of the small {}.", "a remote sensing image of a small {}.",
    "a remote sensing image of the weird {}.", "a remote sensing image of a weird {}.",
    "a remote sensing image of the cool {}.", "a remote sensing image of a cool {}.",
)


def _rs5m_kind(phrasing: str, article: str, kind: str) -> str:
    lead = "a remote sensing image"
    if phrasing.startswith(lead):
        return f"{article} {kind}" + phrasing[len(lead):]
    return phrasing.replace("remote sensing image", kind)


RS5M_TEMPLATES: Tuple[str, ...] = tuple(
    _rs5m_kind(p, article, kind)
    for article, kind in (("a", "remote sensing image"), ("an", "aerial image"), ("a", "satellite image"))
    for p in _RS5M_PHRASINGS)

#: CLIP_benchmark, en_zeroshot_classification_templates.json, "resisc45" (spelling as published)
CLIP_BENCHMARK_TEMPLATES: Tuple[str, ...] = (
    "a sattelite image of {}",
    "an aerial view of {}",
    "a sattelite photo of {}",
    "{} from above",
)

#: named template sets; "raw" is the prompt exactly as typed
TEMPLATE_SETS: Dict[str, Tuple[str, ...]] = {
    "mapclip": REMOTE_SENSING_TEMPLATES,
    "remote-sensing": REMOTE_SENSING_TEMPLATES,
    "openai": OPENAI_TEMPLATES,
    "rs5m": RS5M_TEMPLATES,
    "clip_benchmark": CLIP_BENCHMARK_TEMPLATES,
    "raw": ("{}",),
}
DEFAULT_TEMPLATES = "remote-sensing"

#: how a prompt's template embeddings become one: "normalised" normalises each before the mean
#: (CLIP's notebook, CLIP_benchmark, RemoteCLIP, MapCLIP); "raw" averages them as the text tower
#: gives them (GeoRSCLIP's zeroshot_classifier); the mean is normalised either way
ENSEMBLE_MEANS = ("normalised", "raw")
DEFAULT_ENSEMBLE_MEAN = "normalised"

#: the front ends' help for a template choice
TEMPLATES_HELP = ("prompt template ensemble: " + ", ".join(n for n in TEMPLATE_SETS if n != "remote-sensing")
                  + " (old name of mapclip: remote-sensing; raw: the prompt as typed), one template "
                  "holding {}, or a text FILE with one such template per line (default: the model's; "
                  "docs/models.md names each set's source)")

#: how the fix of a bad template choice reads
TEMPLATES_FIX = (f"use one of {', '.join(TEMPLATE_SETS)}, a template holding {{}} (e.g. \"an aerial "
                 "photo of {}\"), or a text file with one such template per line")


def _missing_braces(line: str) -> str:
    if "{c}" in line:
        return "write {} where the class name goes (CLIP_benchmark's {c} is written {} here)"
    return "put {} where the class name goes in every line, e.g. \"a satellite photo of {}.\""


def read_template_file(path: Any) -> Tuple[str, ...]:
    """The templates of a text file, one per line (blank and ``#`` lines skipped); a
    UsageError naming the file, and the line, when it is missing, empty or a line has no ``{}``."""
    p = Path(str(path)).expanduser()
    if not p.is_file():
        raise UsageError(f"templates file {p} does not exist", TEMPLATES_FIX, option="templates")
    try:
        text = p.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as exc:
        raise UsageError(f"templates file {p} is not UTF-8 text ({exc.reason} at byte {exc.start})",
                         "save the file as UTF-8", option="templates") from None
    out = []
    for n, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if "{}" not in line:
            raise UsageError(f"templates file {p}, line {n} ({line!r}) has no {{}} for the class name",
                             _missing_braces(line), option="templates")
        out.append(line)
    if not out:
        raise UsageError(f"templates file {p} holds no templates",
                         "write one template per line, each with {} where the class name goes, "
                         "e.g. \"a satellite photo of {}.\"", option="templates")
    return tuple(out)


def template_strings(templates: Any) -> Optional[Tuple[str, ...]]:
    """The templates a choice stands for (see the module doc); None for None or an empty
    name (the model's default). Raises a UsageError (option ``templates``) for a bad choice."""
    if templates is None:
        return None
    if isinstance(templates, (str, Path)):
        name = str(templates).strip()
        if not name:
            return None
        if name in TEMPLATE_SETS:
            return TEMPLATE_SETS[name]
        if "{}" in name:
            return (name,)
        if Path(name).expanduser().is_file() or any(s in name for s in ("/", "\\", ".txt")):
            return read_template_file(name)
        raise UsageError(f"unknown prompt template set {name!r} (and no file of that name)",
                         TEMPLATES_FIX, option="templates")
    items = [str(t) for t in templates]
    if not items or any("{}" not in t for t in items):
        raise UsageError("every prompt template must hold {} where the prompt goes", TEMPLATES_FIX,
                         option="templates")
    return tuple(items)


def template_error(templates: Any) -> Optional[str]:
    """None if ``templates`` is a valid template choice, else what is wrong."""
    try:
        template_strings(templates)
    except UsageError as exc:
        return exc.message
    return None
