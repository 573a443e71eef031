"""Text prompts against image embeddings: softmax scores and raw cosines.

A CLIP softmax only means something when the prompt competes with
alternatives. As in the Ibaraki thesis, a single prompt is therefore scored
against a set of generic *background* prompts; several prompts compete with
each other and with the background. The score of prompt ``p`` for an image is

    softmax(logit_scale * cos(image, [prompts..., background...]))[p]

with the model's own (learned) logit scale, and the raw cosine
``cos(image, prompt p)`` is reported beside it, since a softmax hides how
close the match is in absolute terms.

The background prompts below are the one editable default (DetectOptions and
the index/count engines take them from here). A background prompt that
equals one of the user's prompts (case-insensitive) is dropped so a prompt
never competes with itself.

Prompt templates (:data:`TEMPLATE_SETS`): as in CLIP practice, the Ibaraki
thesis ("a photo of a {}") and RemoteCLIP's zero-shot evaluation, a prompt
is not encoded as typed but put into every template of an ensemble, each
filled template encoded, normalised, averaged in embedding space and
normalised again (:func:`encode_prompts`). The default ensemble is
``"remote-sensing"`` (:data:`REMOTE_SENSING_TEMPLATES`, also named ``"mapclip"``);
``"raw"`` encodes the prompt exactly as typed; ``"openai"``, ``"rs5m"`` and
``"clip_benchmark"`` are the references' ensembles, and a text file of templates
works too (engine.core.templates); a model preset names its own default
(``Preset.templates``). Prompts and background prompts go through the same
ensemble, so they compete on equal terms. All prompts times all templates are
encoded in one pass.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, List, Optional, Sequence, Tuple, Union

if TYPE_CHECKING:  # torch loads on first use, so importing the defaults stays cheap
    import torch

    from .models import LoadedModel

from ..core.options import DEFAULT_BACKGROUND_PROMPTS  # noqa: E402,F401 (the one editable default)

from ..core.options import DEFAULT_TEMPLATES, TEMPLATE_SETS, template_strings  # noqa: F401
from ..core.templates import DEFAULT_ENSEMBLE_MEAN, ENSEMBLE_MEANS
from ..core.errors import UsageError
from ..core.options import EXAMPLE_METHODS
from .accel import TEXT_CACHE

Templates = Union[str, Sequence[str], None]

#: the largest logit scale used (CLIP clamps its learned scale at 100)
MAX_LOGIT_SCALE = 100.0


@dataclass
class PromptBank:
    """Prompts and background prompts encoded once, ready to score images.

    ``text`` holds the normalised embeddings of ``prompts`` followed by
    ``background`` (float32, on the model's device).
    """

    prompts: List[str]
    background: List[str]
    text: Any  # torch.Tensor
    logit_scale: float

    @property
    def n_prompts(self) -> int:
        return len(self.prompts)


def prompt_key(text: str) -> str:
    """What makes two prompts the same prompt: case and runs of white space ignored."""
    return " ".join(str(text).split()).casefold()


def effective_background(prompts: Sequence[str], background: Sequence[str]) -> List[str]:
    """Background prompts minus any that equal a user prompt (:func:`prompt_key`),
    order kept, no repeats.

    A background given but left empty this way is refused: a lone prompt scored
    against nothing scores 1.000 everywhere, and prompts scored only against each
    other are not what was asked."""
    taken = {prompt_key(p) for p in prompts}
    given = [" ".join(str(b).split()) for b in background or () if str(b).strip()]
    out: List[str] = []
    for b in given:
        if prompt_key(b) not in taken:
            taken.add(prompt_key(b))
            out.append(b)
    if given and not out:
        raise UsageError(
            f"background {', '.join(repr(b) for b in given)} "
            f"{'is' if len(given) == 1 else 'are each'} also a prompt: nothing is left to "
            "compare against, so the scores would say nothing (a lone prompt scores 1.000 "
            "everywhere)",
            "give background prompts that differ from the prompts, or leave --background out "
            "for the defaults", option="background")
    return out


def model_logit_scale(lm: LoadedModel) -> float:
    """The model's learned softmax temperature, exp(logit_scale), clamped to 100."""
    import torch
    raw = getattr(lm.model, "logit_scale", None)
    if raw is None:
        return MAX_LOGIT_SCALE
    value = float(torch.as_tensor(raw).float().exp().item())
    return min(value, MAX_LOGIT_SCALE)


def resolve_templates(templates: Templates = None, lm: Any = None) -> Tuple[str, ...]:
    """The template strings for ``templates``: a set name, a template or a list of
    templates holding "{}", a template file, or None for the model's default
    (``lm.templates``, else :data:`DEFAULT_TEMPLATES`); a UsageError for a bad choice
    (engine.core.templates)."""
    return (template_strings(templates)
            or template_strings(getattr(lm, "templates", None) or DEFAULT_TEMPLATES))


#: marks a prompt's template-ensemble embedding in the text cache (engine.model.accel.TEXT_CACHE)
ENSEMBLE_KEY = "\x00ensemble"


def encode_prompts(lm: LoadedModel, prompts: Sequence[str], templates: Templates = None,
                   mean: str = DEFAULT_ENSEMBLE_MEAN):
    """(N, D) normalised embeddings of ``prompts``, each the normalised mean of its
    template embeddings (the ensemble of :func:`resolve_templates`), normalised each
    before the mean or, ``mean="raw"``, averaged as the text tower gives them
    (engine.core.templates.ENSEMBLE_MEANS).

    Every prompt times every template is encoded in one batched pass.
    """
    import torch
    import torch.nn.functional as F

    from .encode import clean_prompts, encode_text
    prompts = clean_prompts(prompts)
    temps = resolve_templates(templates, lm)
    # each prompt's ensemble embedding is kept on its own: a new prompt beside the same
    # background prompts encodes only itself (the text tower is most of a cached search)
    if mean not in ENSEMBLE_MEANS:
        raise ValueError(f"unknown ensemble mean {mean!r}; use one of {', '.join(ENSEMBLE_MEANS)}")
    tag = ENSEMBLE_KEY if mean == DEFAULT_ENSEMBLE_MEAN else ENSEMBLE_KEY + mean
    keys = [(tag, *temps, p) for p in prompts]
    rows = [TEXT_CACHE.get(lm, k) for k in keys]
    todo = [i for i, r in enumerate(rows) if r is None]
    if todo:
        if temps == ("{}",):
            new = encode_text(lm, [prompts[i] for i in todo], cache=False)
        else:
            filled = [t.replace("{}", prompts[i]) for i in todo for t in temps]
            emb = encode_text(lm, filled, cache=False, normalize=mean == "normalised")
            emb = emb.reshape(len(todo), len(temps), -1)
            new = F.normalize(emb.mean(dim=1), dim=-1)
        for j, i in enumerate(todo):
            rows[i] = new[j:j + 1]
            TEXT_CACHE.put(lm, keys[i], rows[i])
    return torch.cat(rows)


def build_bank(lm: LoadedModel, prompts: Sequence[str],
               background: Sequence[str] = DEFAULT_BACKGROUND_PROMPTS,
               templates: Templates = None) -> PromptBank:
    """Encode the prompts and the (deduplicated) background prompts in one pass,
    each through the template ensemble ``templates`` (None: the model's default)."""
    from .encode import clean_prompts
    prompts = clean_prompts(prompts)
    seen = set()
    unique = []
    for p in prompts:
        if prompt_key(p) not in seen:
            seen.add(prompt_key(p))
            unique.append(p)
    bg = effective_background(unique, background)
    text = encode_prompts(lm, unique + bg, templates)
    return PromptBank(unique, bg, text, model_logit_scale(lm))


def score_embeddings(image: torch.Tensor, bank: PromptBank) -> Tuple[torch.Tensor, torch.Tensor]:
    """Scores for ``image`` embeddings (N, D), normalised.

    Returns ``(probs, cosine)``, both (N, P) float32 for the P user prompts:
    the softmax share of each prompt among prompts + background, and the raw
    cosine similarity.
    """
    import torch
    cos_all = image.float() @ bank.text.T
    probs = torch.softmax(cos_all * bank.logit_scale, dim=-1)
    p = bank.n_prompts
    return probs[:, :p], cos_all[:, :p]


def score_maps(features: torch.Tensor, bank: PromptBank) -> Tuple[torch.Tensor, torch.Tensor]:
    """Per-patch scores for dense features (B, h, w, D) -> two (B, P, h, w) maps."""
    b, h, w, d = features.shape
    probs, cos = score_embeddings(features.reshape(-1, d), bank)
    p = bank.n_prompts
    return (probs.reshape(b, h, w, p).permute(0, 3, 1, 2),
            cos.reshape(b, h, w, p).permute(0, 3, 1, 2))


#: the Rocchio weights of the positive and negative centroids (the prompt's weight is 1)
ROCCHIO_POSITIVE = 0.75
ROCCHIO_NEGATIVE = 0.25
#: probe: steps, learning rate and how strongly the weights are held near the prompt
PROBE_STEPS = 100
PROBE_LR = 0.05
PROBE_PRIOR = 1.0


def refine_query(text, positives, negatives, method: str = "rocchio", logit_scale: float = 100.0):
    """A prompt's text embedding (D,) moved by example image embeddings (normalised rows):

    ``rocchio``: ``text + 0.75 mean(positives) - 0.25 mean(negatives)``, normalised;
    ``probe``: a logistic probe on the examples (positives 1, negatives 0) whose weights
    start at the prompt and are held near it (an L2 pull of ``PROBE_PRIOR``), normalised;
    with only positives or only negatives it is Rocchio. ``text`` may be None (examples
    alone: the mean of the positives is the start).
    """
    import torch
    import torch.nn.functional as F

    pos = positives.float() if positives is not None and len(positives) else None
    neg = negatives.float() if negatives is not None and len(negatives) else None
    if text is None:
        if pos is None:
            raise UsageError("examples alone need at least one positive", "mark a place you mean")
        start = F.normalize(pos.mean(0), dim=0)
    else:
        start = F.normalize(text.float(), dim=0)
    if method not in EXAMPLE_METHODS:
        raise UsageError(f"unknown refinement {method!r}", f"use one of {', '.join(EXAMPLE_METHODS)}",
                         option="examples_method")
    if method == "rocchio" or pos is None or neg is None:
        q = start.clone()
        if pos is not None and text is not None:
            q = q + ROCCHIO_POSITIVE * pos.mean(0)
        if neg is not None:
            q = q - ROCCHIO_NEGATIVE * neg.mean(0)
        return F.normalize(q, dim=0)
    x = torch.cat([pos, neg])
    y = torch.cat([torch.ones(len(pos)), torch.zeros(len(neg))]).to(x.device)
    w = start.detach().clone().requires_grad_(True)
    b = torch.zeros((), device=x.device, requires_grad=True)
    opt = torch.optim.Adam([w, b], lr=PROBE_LR)
    with torch.enable_grad():
        for _ in range(PROBE_STEPS):
            opt.zero_grad()
            logits = logit_scale * (x @ F.normalize(w, dim=0)) + b
            loss = F.binary_cross_entropy_with_logits(logits, y) + PROBE_PRIOR * (w - start).pow(2).sum()
            loss.backward()
            opt.step()
    return F.normalize(w.detach(), dim=0)


#: affinity: how sharply an image's likeness to an example falls off (``exp(-beta (1 - cos))``,
#: as in Tip-Adapter's cache model), the examples' weight beside the prompt's score, and a
#: negative's weight beside a positive's; chosen on scenes 9401-9404 (bench/bench_examples.py)
AFFINITY_BETA = 20.0
AFFINITY_WEIGHT = 4.0
AFFINITY_NEGATIVE = 0.5


def example_affinity(image, positives, negatives, beta: float = AFFINITY_BETA,
                     negative: float = AFFINITY_NEGATIVE):
    """(N,) how much each image embedding (normalised rows) looks like the positive examples
    and not like the negatives: ``mean_p exp(-beta (1 - cos(x, p))) - negative *
    mean_n exp(-beta (1 - cos(x, n)))``, in [-negative, 1]."""
    import torch
    x = image.float()
    out = torch.zeros(len(x), device=x.device)
    if positives is not None and len(positives):
        out = out + torch.exp(-beta * (1 - x @ positives.to(x.device).float().T)).mean(1)
    if negatives is not None and len(negatives):
        out = out - negative * torch.exp(-beta * (1 - x @ negatives.to(x.device).float().T)).mean(1)
    return out


@dataclass
class Scorer:
    """How a search scores image embeddings: ``(probs, cosine)`` as :func:`score_embeddings`.

    Without examples (``method`` empty) the bank's prompts as typed. With examples,
    ``rocchio`` and ``probe`` have moved the bank's text embeddings (:func:`refine_query`);
    ``affinity`` keeps the prompts and blends each score with the image's likeness to the
    examples (:func:`example_affinity`): ``(p + w a) / (1 + w)``, clipped at 0, so a score
    stays in [0, 1]; a search's score threshold then applies as ``t / (1 + w)`` (what the
    prompt alone keeps is kept, plus what looks like the positives). The cosine reported is
    always the (moved) prompt's."""

    bank: PromptBank
    method: str = ""
    positives: Any = None
    negatives: Any = None

    def __call__(self, image) -> Tuple["torch.Tensor", "torch.Tensor"]:
        probs, cos = score_embeddings(image, self.bank)
        if self.method == "affinity":
            a = example_affinity(image, self.positives, self.negatives)
            probs = ((probs + AFFINITY_WEIGHT * a[:, None]) / (1 + AFFINITY_WEIGHT)).clamp_min(0)
        return probs, cos

    def threshold(self, t: Optional[float]) -> Optional[float]:
        """The score threshold ``t`` of the prompts alone on this scorer's scale."""
        if t is None or self.method != "affinity":
            return t
        return t / (1 + AFFINITY_WEIGHT)


def example_scorer(bank: PromptBank, positives, negatives, method: str) -> Scorer:
    """The :class:`Scorer` of ``bank`` refined by example embeddings (rows, normalised; either
    may be None) with ``method`` (core.options.EXAMPLE_METHODS)."""
    if method not in EXAMPLE_METHODS:
        raise UsageError(f"unknown refinement {method!r}", f"use one of {', '.join(EXAMPLE_METHODS)}",
                         option="examples_method")
    if method == "affinity":
        return Scorer(bank, method, positives, negatives)
    text = bank.text.clone()
    for p in range(bank.n_prompts):
        text[p] = refine_query(text[p], positives, negatives, method, bank.logit_scale).to(text.dtype)
    return Scorer(PromptBank(list(bank.prompts), list(bank.background), text, bank.logit_scale), method)
