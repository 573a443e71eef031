"""The image model near the hardware's limit on CUDA, and a checked bf16 path on the CPU.

Everything here is selected by the model's device (:func:`choose`):

* **Precision.** On CUDA the model is loaded in bf16 (fp16 where bf16 is
  missing; :func:`engine.model.models.resolve_precision`) and the image encoder runs
  under ``torch.autocast`` in that dtype, so the few float32 leftovers (a
  fine-tuned model's fp32 parts, inputs) run on the tensor cores too. A user
  who asks for fp32 on CUDA gets fp32 (no autocast). On the CPU: fp32, no
  autocast, unless the CPU path below applies.
* **The CPU path** (:func:`cpu_path`): on a CPU with native bf16 arithmetic
  (AVX512_BF16 or AMX, as oneDNN reports it), a model loaded without an asked
  precision whose image tower costs at least :data:`CPU_BF16_MIN_GFLOP` per
  image runs its image tower from a bf16 copy of the weights (the measured
  gain on ViT-B-32 is in docs/performance.md; autocast alone does not pay on
  the CPU, and the text tower in bf16 was measured slower than fp32 here, so
  it stays fp32). It is kept only when a probe batch agrees with fp32: every
  probe embedding at a cosine of at least :data:`CPU_AGREEMENT` to fp32, and
  the same top-10 order of the probe images; else fp32 stays. The fp32 model
  stays loaded (text, dense maps and training use it). ``$MAPCLIP_CPU_PATH``
  (``auto``, ``fp32``, ``bf16``) overrides the choice; int8 dynamic
  quantisation was measured (bench/bench_interactive.py) and is not chosen.
* **Channels-last.** Convolutional image towers (ResNet/ConvNeXt CLIPs) run
  faster in NHWC with cuDNN in bf16; on CUDA they and their inputs are
  switched to ``torch.channels_last``. A ViT has one convolution (the patch
  embedding), where it does not pay, so ViTs are left as they are.
* **Fused attention.** open_clip 3.x's ViT blocks use
  ``nn.MultiheadAttention`` with ``batch_first=True`` and
  ``need_weights=False``; in inference (eval mode, no autograd) PyTorch runs
  it on its fast path (``aten::_native_multi_head_attention``, seen in the
  profiler on the CPU, where it is fused q/k/v + bmm + softmax); on CUDA that
  op dispatches to the fused scaled-dot-product-attention kernels (flash /
  memory-efficient) when no mask is given (not yet seen on a GPU here). open_clip's own ``Attention`` (custom blocks) calls
  ``F.scaled_dot_product_attention`` directly. :func:`attention_report` says
  which a model uses; nothing has to be patched.
* **torch.compile** (opt-in, ``DetectOptions.compile``): the image tower is
  compiled on first use (CUDA only; Inductor's caches live under
  ``$MAPCLIP_CACHE/inductor`` so a second run reuses the compiled kernels),
  and a compiler failure falls back to eager with a note.
* **Batch size from free GPU memory** (:func:`auto_batch_size`): when the
  user leaves the batch size unset on CUDA, one probe batch measures the
  model's peak memory per image and the batch is sized to half of the free
  memory (``torch.cuda.mem_get_info``), a multiple of 8, at most
  :data:`MAX_AUTO_BATCH`. On the CPU the model's default batch stays.
* **Text embeddings** are cached per prompt set (:data:`TEXT_CACHE`, an LRU
  keyed by the model, its device, precision and weights version, and the
  exact texts, i.e. prompts with their templates applied): the same search
  run twice encodes its prompts once. In-place weight changes (fine-tuning,
  ``load_state_dict``) bump the weights' version counters and so miss.
"""
from __future__ import annotations

import contextlib
import copy
import os
import threading
import weakref
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Callable, List, Optional, Sequence, Tuple
from .identity import weights_version
from .hub import cache_dir

#: largest batch auto_batch_size chooses (beyond this nothing is gained)
MAX_AUTO_BATCH = 1024
#: the CPU path: least image-tower cost (GFLOP per image) worth a bf16 copy, least
#: cosine of a probe embedding to fp32, probe images compared, and the override variable
CPU_BF16_MIN_GFLOP = 1.0
CPU_AGREEMENT = 0.999
CPU_PROBE_IMAGES = 16
CPU_PATH_ENV = "MAPCLIP_CPU_PATH"
#: share of the free GPU memory auto_batch_size plans to use
AUTO_BATCH_MEMORY_SHARE = 0.5
#: prompt sets kept in the text-embedding cache
TEXT_CACHE_SIZE = 1024


# ------------------------------------------------------------ selection --
@dataclass(frozen=True)
class Plan:
    """How the image model runs on its device."""

    device: str                          # "cuda", "cpu", "mps"
    autocast: Optional[str] = None       # "bf16"/"fp16" on CUDA, else None
    channels_last: bool = False
    compile: bool = False
    cpu_bf16: bool = False               # CPU: the image tower runs from a bf16 copy (cpu_path)

    def describe(self) -> str:
        parts = [self.device, f"autocast {self.autocast}" if self.autocast else "no autocast",
                 *(["bf16 image tower"] if self.cpu_bf16 else []),
                 "channels-last" if self.channels_last else "contiguous (NCHW)",
                 "torch.compile" if self.compile else "eager"]
        return ", ".join(parts)


def choose(device_type: str, precision: str, is_vit: bool, compile: bool = False) -> Plan:
    """The plan for a model on ``device_type`` in ``precision`` (see the module doc)."""
    if device_type != "cuda":
        return Plan(device_type)
    return Plan("cuda", autocast=precision if precision in ("bf16", "fp16") else None,
                channels_last=not is_vit, compile=bool(compile))


def batch_from_memory(free_bytes: int, per_image_bytes: int, share: float = AUTO_BATCH_MEMORY_SHARE,
                      cap: int = MAX_AUTO_BATCH, multiple: int = 8) -> int:
    """Images per batch that fit ``share`` of ``free_bytes`` at ``per_image_bytes`` each:
    a multiple of ``multiple`` when that is at least one multiple, at most ``cap``, at least 1."""
    per = max(1, int(per_image_bytes))
    n = int(max(0, free_bytes) * share) // per
    n = min(int(cap), n)
    if n >= multiple:
        n -= n % multiple
    return max(1, n)


# ----------------------------------------------------------- per model --
@dataclass
class _State:
    plan: Plan
    visual_bf16: Any = None              # the CPU path's bf16 copy of the image tower
    weights_version: Optional[int] = None  # of the weights the copy was made from
    cpu_check: Optional[dict] = None     # what cpu_path measured (agreement, GFLOP, reason)
    compiled: Optional[Callable] = None
    compile_failed: bool = False
    notes: List[str] = field(default_factory=list)
    batch: dict = field(default_factory=dict)      # (input px) -> auto batch size


_STATES: "weakref.WeakKeyDictionary[Any, _State]" = weakref.WeakKeyDictionary()
_LOCK = threading.Lock()


def _dtype(name: Optional[str]):
    import torch
    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(name or "")


def plan_for(lm) -> Plan:
    """The plan in force for ``lm`` (chosen on first use, without compile)."""
    return _state(lm).plan


def _state(lm, compile: Optional[bool] = None) -> _State:
    with _LOCK:
        st = _STATES.get(lm.model)
        if st is None or (compile is not None and compile != st.plan.compile):
            plan = choose(lm.device.type, lm.precision, lm.is_vit,
                          compile if compile is not None else (st.plan.compile if st else False))
            old = st
            st = _State(plan)
            if old is not None:
                st.batch = old.batch
                st.visual_bf16, st.cpu_check = old.visual_bf16, old.cpu_check
            elif plan.device == "cpu":
                st.visual_bf16, st.cpu_check = cpu_path(lm)
                st.weights_version = _weights_version(lm)
            if st.visual_bf16 is not None:
                plan = st.plan = Plan("cpu", cpu_bf16=True)
            _STATES[lm.model] = st
            if plan.channels_last:
                import torch
                lm.model.to(memory_format=torch.channels_last)
        return st


def prepare(lm, compile: bool = False) -> List[str]:
    """Fix the plan for ``lm`` (``compile``: opt in to torch.compile on CUDA);
    returns notes for the user (e.g. that compile is CUDA-only)."""
    notes = []
    if compile and lm.device.type != "cuda":
        notes.append("torch.compile is used on CUDA only; ran without it on "
                     f"{lm.device.type}")
    _state(lm, compile=bool(compile) and lm.device.type == "cuda")
    return notes


def _compile_cache() -> None:
    if "TORCHINDUCTOR_CACHE_DIR" not in os.environ:
        try:
            os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(cache_dir() / "inductor")
        except Exception:  # noqa: BLE001 - Inductor's own default then
            pass


def encode_image(lm, x):
    """``lm.model.encode_image(x)`` (unnormalised features) the plan's way.

    On the CPU this is exactly ``lm.model.encode_image(x)``.
    """
    st = _state(lm)
    plan = st.plan
    if plan.cpu_bf16:
        import torch
        return _bf16_visual(lm, st)(x.to(torch.bfloat16)).float()
    if plan.device != "cuda":
        return lm.model.encode_image(x)
    import torch
    if plan.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    ctx = (torch.autocast("cuda", dtype=_dtype(plan.autocast)) if plan.autocast
           else contextlib.nullcontext())
    with ctx:
        if plan.compile and not st.compile_failed:
            try:
                if st.compiled is None:
                    _compile_cache()
                    st.compiled = torch.compile(lm.model.visual)
                return st.compiled(x)
            except Exception as exc:  # noqa: BLE001 - no compiler, unsupported op: eager
                st.compile_failed = True
                st.notes.append(f"torch.compile failed ({type(exc).__name__}: "
                                f"{str(exc).splitlines()[0][:200] if str(exc) else ''}); "
                                "ran without it")
        return lm.model.encode_image(x)


def _weights_version(lm) -> Optional[int]:
    return weights_version(lm)


def image_gflop(lm) -> float:
    """GFLOP of one image through the image tower (counted by torch's FLOP counter)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode
    x = torch.zeros(1, 3, lm.image_size, lm.image_size, device=lm.device, dtype=lm.dtype)
    counter = FlopCounterMode(display=False)
    with torch.inference_mode(), counter:
        lm.model.visual(x)
    return counter.get_total_flops() / 1e9


def probe_images(size: int, n: int = CPU_PROBE_IMAGES, seed: int = 0):
    """``n`` fixed model inputs (smooth colour fields with edges and noise, normalised
    like photos): the probe batch the CPU path is checked on."""
    import torch
    g = torch.Generator().manual_seed(seed)
    low = torch.rand(n, 3, 4, 4, generator=g)
    x = torch.nn.functional.interpolate(low, size=(size, size), mode="bilinear", align_corners=False)
    x = x + 0.1 * torch.randn(n, 3, size, size, generator=g)
    return (x - 0.45) / 0.27


def agreement(ref, other, top: int = 10) -> Tuple[float, bool]:
    """(least cosine of ``other``'s rows to ``ref``'s, whether both rank the rows alike
    (the top ``top`` rows by similarity to ``ref``'s mean embedding, in order))."""
    import torch.nn.functional as F
    a, b = F.normalize(ref.float(), dim=-1), F.normalize(other.float(), dim=-1)
    cos = float((a * b).sum(-1).min())
    q = F.normalize(a.mean(0), dim=0)
    k = min(top, len(a))
    same = (a @ q).topk(k).indices.tolist() == (b @ q).topk(k).indices.tolist()
    return cos, same


def cpu_path(lm) -> Tuple[Any, dict]:
    """(bf16 copy of ``lm``'s image tower, or None; what was checked) -- see the module doc."""
    import torch
    want = os.environ.get(CPU_PATH_ENV, "auto").strip().lower() or "auto"
    facts: dict = {"path": "fp32", "asked": want}
    if lm.device.type != "cpu" or lm.precision != "fp32":
        facts["reason"] = "not an fp32 model on the CPU"
        return None, facts
    if want == "fp32" or (want == "auto" and not getattr(lm, "auto_precision", False)):
        facts["reason"] = "fp32 asked"
        return None, facts
    if not torch.ops.mkldnn._is_mkldnn_bf16_supported():
        facts["reason"] = "this CPU has no native bf16 arithmetic (AVX512_BF16 or AMX)"
        return None, facts
    if want == "auto":
        facts["gflop"] = round(image_gflop(lm), 3)
        if facts["gflop"] < CPU_BF16_MIN_GFLOP:
            facts["reason"] = f"a small model ({facts['gflop']} GFLOP per image): fp32 is as fast"
            return None, facts
    visual = copy.deepcopy(lm.model.visual).to(torch.bfloat16).eval()
    x = probe_images(lm.image_size)
    with torch.inference_mode():
        cos, same = agreement(lm.model.visual(x), visual(x.to(torch.bfloat16)))
    facts.update(cosine=round(cos, 6), same_top10=same)
    if cos < CPU_AGREEMENT or not same:
        facts["reason"] = (f"bf16 disagrees with fp32 on the probe images (cosine {cos:.5f}, "
                           f"same top-10 {same})")
        return None, facts
    facts.update(path="bf16", reason="native bf16 and agreement with fp32")
    return visual, facts


def cpu_check(lm) -> Optional[dict]:
    """What :func:`cpu_path` found for ``lm`` (None off the CPU)."""
    return _state(lm).cpu_check


def _bf16_visual(lm, st: _State):
    """The CPU path's copy, made again when the weights changed in place (a training step)."""
    if _weights_version(lm) != st.weights_version:
        import torch
        with _LOCK:
            st.visual_bf16 = copy.deepcopy(lm.model.visual).to(torch.bfloat16).eval()
            st.weights_version = _weights_version(lm)
    return st.visual_bf16


def notes(lm) -> List[str]:
    """Notes gathered while running ``lm`` (a compile fallback)."""
    st = _STATES.get(lm.model)
    return list(st.notes) if st else []


def auto_batch_size(lm, input_px: Optional[int] = None, mem_get_info=None) -> Optional[int]:
    """Batch size from free GPU memory for ``lm`` on CUDA; None elsewhere (the model's
    default then). ``mem_get_info`` is for tests (default ``torch.cuda.mem_get_info``)."""
    if lm.device.type != "cuda":
        return None
    import torch
    size = int(input_px or lm.image_size)
    st = _state(lm)
    per = st.batch.get(size)
    if per is None:
        probe = 16
        torch.cuda.synchronize(lm.device)
        base = torch.cuda.memory_allocated(lm.device)
        torch.cuda.reset_peak_memory_stats(lm.device)
        with torch.inference_mode():
            x = torch.zeros((probe, 3, size, size), device=lm.device, dtype=lm.dtype)
            encode_image(lm, x)
        torch.cuda.synchronize(lm.device)
        peak = torch.cuda.max_memory_allocated(lm.device)
        # the input batch and the uint8 tiles it came from count too
        per = max(1, (peak - base) // probe + size * size * 3 * 3)
        st.batch[size] = per
        del x
    free, _total = (mem_get_info or torch.cuda.mem_get_info)(lm.device)
    return batch_from_memory(free, per)


# ------------------------------------------------------------ attention --
def attention_report(lm) -> str:
    """Which attention the image tower runs (see the module doc)."""
    import torch.nn as nn
    visual = getattr(lm.model, "visual", lm.model)
    mha = fsdpa = other = 0
    for m in visual.modules():
        if isinstance(m, nn.MultiheadAttention):
            mha += 1
        elif type(m).__name__ == "Attention" and hasattr(m, "use_fsdpa"):
            if m.use_fsdpa:
                fsdpa += 1
            else:
                other += 1
    parts = []
    if mha:
        parts.append(f"{mha} nn.MultiheadAttention block(s) (PyTorch's native fast path in "
                     "inference; on CUDA it runs fused scaled-dot-product attention kernels)")
    if fsdpa:
        parts.append(f"{fsdpa} open_clip Attention block(s) calling F.scaled_dot_product_attention")
    if other:
        parts.append(f"{other} attention block(s) without fused attention")
    return "; ".join(parts) or "no attention blocks (a convolutional image tower)"


# ---------------------------------------------------------- text cache --
class TextCache:
    """LRU of text embeddings keyed by model + exact texts (see the module doc)."""

    def __init__(self, size: int = TEXT_CACHE_SIZE):
        self.size = int(size)
        self._d: "OrderedDict[tuple, Tuple[weakref.ref, Any]]" = OrderedDict()
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    @staticmethod
    def key(lm, texts: Sequence[str]) -> Optional[tuple]:
        try:
            version = sum(p._version for p in lm.model.parameters())
        except RuntimeError:  # inference tensors carry no version: do not cache
            return None
        return (id(lm.model), str(lm.device), lm.precision, version, tuple(texts))

    def get(self, lm, texts: Sequence[str]):
        k = self.key(lm, texts)
        if k is None:
            return None
        with self._lock:
            hit = self._d.get(k)
            if hit is not None and hit[0]() is lm.model:
                self._d.move_to_end(k)
                self.hits += 1
                return hit[1].clone()
            if hit is not None:          # an old model's id reused
                del self._d[k]
            self.misses += 1
        return None

    def put(self, lm, texts: Sequence[str], emb) -> None:
        k = self.key(lm, texts)
        if k is None:
            return
        with self._lock:
            self._d[k] = (weakref.ref(lm.model), emb.detach().clone())
            self._d.move_to_end(k)
            while len(self._d) > self.size:
                self._d.popitem(last=False)

    def clear(self) -> None:
        with self._lock:
            self._d.clear()
            self.hits = self.misses = 0

    def __len__(self) -> int:
        return len(self._d)


TEXT_CACHE = TextCache()
