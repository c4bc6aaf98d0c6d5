"""The runtime's Llama: llama_cpp.Llama with named KV-cache types, per-layer types from a plan,
and checks before native code. ``pyadaq.Llama`` (pyadaq/llama.py) adds ``kv_budget`` on top.

>>> from pyadaq import Llama
>>> llm = Llama("model.gguf", cache_type_k="q4_0", cache_type_v="kvq2", n_ctx=4096)
>>> llm.kv_cache_bytes          # bytes llama.cpp allocated for K and V, all layers

Everything llama.cpp would reject about the cache types, and everything wrong with the model
file, is found from the GGUF header before llama.cpp is called, and raised as a Python
exception that says what is wrong:

* an unknown cache type: ``ValueError`` listing the supported names;
* a missing, non-GGUF, truncated or unsupported-version file: a
  :class:`pyadaq.model.header.ModelFileError` (a ``ValueError``; the missing-file one is also a
  ``FileNotFoundError``) naming the path;
* a quantized type whose block size does not divide a K (or V) head size of some layer (SWA
  layers included): ``ValueError`` naming the type, its block size and the head size;
* a quantized V cache with ``flash_attn=False``: ``ValueError`` (llama.cpp stores quantized V
  only for flash attention). With a quantized K or V and no ``flash_attn`` argument, flash
  attention is switched on.

Per-layer types (adaptive KV-AdaQuant): ``kv_plan="plan.json"`` (a plan from ``pyadaq plan``,
or a :class:`pyadaq.runtime.kvplan.KVPlan`). A plan made for another model (layer count or head
sizes), or a type that does not fit a layer's head size, raises before any context is created.

A calibration: ``kv_calibration="cal.gguf"`` (from ``pyadaq calibrate``, or a
:class:`pyadaq.model.calibration.Calibration`) stores each layer's K and V in the calibration's
coordinates (native/src/pyadaq-kv-transform.h). A missing or corrupt file raises
:class:`pyadaq.model.calibration.CalibrationFileError`, one made for another model
:class:`~pyadaq.model.calibration.CalibrationMismatchError`, both before any context exists; a
state saved under one calibration (or none) does not load under another (``ValueError``).

A window: ``kv_window=128`` keeps the K/V rows of the last 128 cells written in f16 beside the
quantized cache, and flash attention reads them instead of their quantized rows
(:mod:`pyadaq.runtime.kv_window`): a conversation shorter than the window is attended as with an
f16 cache, a longer one keeps its latest tokens exact. ``kv_window_bytes`` is its memory. CPU only
(``n_gpu_layers=0``); flash attention is switched on for it.

Other machines: ``rpc_servers="host1:50052,host2:50052"`` puts the model's layers, with their KV
cache in the requested types, on ``pyadaq tool rpc-server`` processes (:mod:`pyadaq.runtime.rpc`;
every layer unless ``n_gpu_layers`` is given). A server that does not answer ggml's RPC handshake
raises :class:`pyadaq.runtime.rpc.RPCServerError` before anything is loaded.

llama_cpp's own ``type_k`` / ``type_v`` (raw ggml ids) are refused with a ``TypeError``: use
``cache_type_k`` / ``cache_type_v``, which take a name (case-insensitive), a ggml id or a
:class:`pyadaq.CacheType`.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any, Union

from pyadaq._native import creation_lock, native
from pyadaq.model import chat_template
from pyadaq.model.calibration import Calibration, calibration_for_model
from pyadaq.model.header import ModelInfo, read_model_info
from pyadaq.runtime import rpc
from pyadaq.runtime.context import default_gpu_layers
from pyadaq.runtime.kv_transform import context_settings, coordinates_fingerprint
from pyadaq.runtime.kv_window import check_kv_window, check_window_made, window_bytes
from pyadaq.runtime.kvplan import load_checked
from pyadaq.runtime.layer_types import context_layer_types, context_transform_layers, next_context
from pyadaq.runtime.offload import KVOffloadError, check_offload
from pyadaq.types import CacheType, cache_type, cache_types, formats_fingerprint

import llama_cpp
import llama_cpp.llama_cpp as _lib

__all__ = ["Llama", "estimate_kv_cache_bytes", "validate_cache_types"]

CacheTypeSpec = Union[str, int, CacheType]

_KV_PAD = 256  # llama.cpp pads n_ctx, n_ctx_seq and the SWA cache size to 256 cells


def _pad(n: int, to: int = _KV_PAD) -> int:
    return (n + to - 1) // to * to


def _compatible_names(sizes: list[int]) -> str:
    names = [t.name for t in cache_types() if all(s % t.block_size == 0 for s in sizes)]
    return ", ".join(names) if names else "none"


def undivided_head_sizes(info: ModelInfo, cache_type_spec: CacheTypeSpec, which: str) -> list[int]:
    """The model's K (``which="k"``) or V head sizes that a cache type's block does not divide
    (none for a float type): the type fits that side when the list is empty."""
    t = cache_type(cache_type_spec)
    sizes = info.head_sizes_k() if which == "k" else info.head_sizes_v()
    return [s for s in sizes if t.quantized and s % t.block_size]


def validate_cache_types(
    model: ModelInfo | str | os.PathLike,
    cache_type_k: CacheTypeSpec = "f16",
    cache_type_v: CacheTypeSpec = "f16",
    *,
    flash_attn: bool | None = None,
) -> tuple:
    """Check a K/V cache-type pair against a model; return ``(CacheType_k, CacheType_v)``.

    Raises ``ValueError`` for an unknown type, a block size that does not divide a head size,
    or a quantized V cache with ``flash_attn=False`` (``None`` means "not specified").
    """
    tk = cache_type(cache_type_k)
    tv = cache_type(cache_type_v)
    info = model if isinstance(model, ModelInfo) else read_model_info(model)
    for which, t, sizes in (("K", tk, info.head_sizes_k()), ("V", tv, info.head_sizes_v())):
        bad = undivided_head_sizes(info, t, which.lower())
        if bad:
            head = bad[0]
            swa = ""
            if info.sliding_window > 0 and len(sizes) > 1:
                swa = " (the model has different head sizes for sliding-window and full layers: " + \
                      ", ".join(map(str, sizes)) + ")"
            raise ValueError(
                f"cache_type_{which.lower()}='{t.name}' has block size {t.block_size}, which does not "
                f"divide the model's {which} head size {head}{swa}; {info.path.name} needs a "
                f"{which} cache type whose block size divides {', '.join(map(str, sizes))}: "
                f"{_compatible_names(sizes)}"
            )
    if tv.quantized and flash_attn is not None and not flash_attn:
        raise ValueError(
            f"cache_type_v='{tv.name}' is quantized, and llama.cpp keeps a quantized V cache only "
            "with flash attention, but flash_attn=False was passed: drop flash_attn=False "
            "(pyadaq then enables it) or use an unquantized V cache (f16, bf16, f32)"
        )
    return tk, tv


def _per_layer(t, n: int) -> list[CacheType]:
    return [cache_type(x) for x in t] if isinstance(t, (list, tuple)) else [cache_type(t)] * n


def _kv_bytes(info: ModelInfo, tk, tv, *, n_ctx_seq: int, n_seq_max: int,
              n_ubatch: int, kv_unified: bool, swa_full: bool, v_trans: bool) -> int:
    """llama_kv_cache / llama_kv_cache_iswa tensor bytes for the given context numbers.
    tk / tv: one CacheType for all layers or a list with one per layer."""
    tks, tvs = _per_layer(tk, info.n_layer), _per_layer(tv, info.n_layer)
    n_stream = 1 if kv_unified else n_seq_max
    size_swa = n_ctx_seq
    if info.has_swa and not swa_full:
        size_swa = _pad(min(n_ctx_seq, info.sliding_window * (n_seq_max if kv_unified else 1) + n_ubatch))
    n_embd_v_gqa_max = max(
        (info.n_head_kv_layer(il) * info.head_size_v_layer(il) for il in range(info.n_layer)), default=0
    )
    total = 0
    for il in info.cache_layers():
        cells = size_swa if info.is_swa(il) else n_ctx_seq
        n_kv = info.n_head_kv_layer(il)
        k_row = tks[il].row_bytes(n_kv * info.head_size_k_layer(il))
        v_row = tvs[il].row_bytes(n_embd_v_gqa_max if v_trans else n_kv * info.head_size_v_layer(il))
        total += (k_row + v_row) * cells * n_stream
    return total


def estimate_kv_cache_bytes(
    model: ModelInfo | str | os.PathLike,
    cache_type_k: CacheTypeSpec = "f16",
    cache_type_v: CacheTypeSpec = "f16",
    *,
    n_ctx: int = 512,
    n_batch: int = 512,
    n_ubatch: int = 512,
    n_seq_max: int = 1,
    kv_unified: bool = False,
    swa_full: bool = True,
    flash_attn: bool = True,
) -> int:
    """The KV-cache bytes llama.cpp would allocate for these settings, from the GGUF header.

    Arguments are those of ``Llama`` (llama_cpp's defaults; ``swa_full=True`` is llama.cpp's
    default). Mirrors llama.cpp's sizing: ``n_ctx`` (``0``: the training context) padded to
    256; per sequence ``n_ctx_seq = pad(n_ctx / n_seq_max, 256)`` unless ``kv_unified``; the
    SWA layers of an interleaved-SWA model hold ``pad(min(n_ctx_seq, n_swa * (n_seq_max if
    kv_unified else 1) + n_ubatch), 256)`` cells unless ``swa_full``; each layer stores
    ``n_head_kv * head_size`` values per cell for K and for V, as rows of the cache type.
    Alignment padding of the backend buffers is not included.
    """
    info = model if isinstance(model, ModelInfo) else read_model_info(model)
    tk, tv = cache_type(cache_type_k), cache_type(cache_type_v)
    if n_ctx == 0:
        n_ctx = info.n_ctx_train
    n_batch = min(n_ctx, n_batch)
    n_ubatch = min(n_batch, n_ubatch or n_batch)
    n_ctx = _pad(n_ctx)
    n_ctx_seq = n_ctx if kv_unified else _pad(n_ctx // max(n_seq_max, 1))
    return _kv_bytes(info, tk, tv, n_ctx_seq=n_ctx_seq, n_seq_max=max(n_seq_max, 1), n_ubatch=n_ubatch,
                     kv_unified=kv_unified, swa_full=swa_full, v_trans=not flash_attn)


def _available_memory() -> int | None:
    """Bytes of memory available to a new allocation (Linux: MemAvailable), or None."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def check_context_size(info: ModelInfo, kwargs: dict[str, Any], tk, tv, *, allow_long_context: bool = False) -> int:
    """Check ``n_ctx`` and the batch sizes of Llama's keyword arguments before llama.cpp sees
    them; return the context size. ``n_ctx`` must be an int >= 0 (0: the model's training
    context), at most the training context unless ``allow_long_context``, and the KV cache it
    implies must fit in the memory available now (``MemoryError`` naming the size otherwise).
    ``n_batch``, ``n_ubatch`` and ``n_seq_max``, when given, must be ints > 0. tk / tv: one
    CacheType or one per layer."""
    n_ctx = kwargs.get("n_ctx", 512)
    checks = [("n_ctx", n_ctx, 0)] + [(key, kwargs[key], 1) for key in ("n_batch", "n_ubatch", "n_seq_max")
                                      if key in kwargs]
    for key, value, least in checks:
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"{key} must be an int, not {type(value).__name__} ({value!r})")
        if value < least:
            what = ">= 0 (0: the model's training context)" if key == "n_ctx" else "> 0"
            raise ValueError(f"{key} must be {what}, not {value}")
    n = n_ctx or info.n_ctx_train
    if info.n_ctx_train and n > info.n_ctx_train and not allow_long_context:
        raise ValueError(
            f"n_ctx={n_ctx} is beyond {info.path.name}'s training context ({info.n_ctx_train} tokens), which the "
            "model was not trained for; pass allow_long_context=True to use it anyway"
        )
    n_seq = kwargs.get("n_seq_max", 1)
    unified = bool(kwargs.get("kv_unified", False))
    nbytes = _kv_bytes(info, tk, tv, n_ctx_seq=_pad(n) if unified else _pad(_pad(n) // n_seq), n_seq_max=n_seq,
                       n_ubatch=min(kwargs.get("n_ubatch", 512), n), kv_unified=unified,
                       swa_full=bool(kwargs.get("swa_full", True)), v_trans=kwargs.get("flash_attn") is False)
    avail = _available_memory()
    if avail is not None and nbytes > avail:
        raise MemoryError(
            f"n_ctx={n} needs a KV cache of {nbytes / 2**30:.1f} GiB for {info.path.name} with these cache types, "
            f"but only {avail / 2**30:.1f} GiB of memory is available now: use a smaller n_ctx or smaller cache types"
        )
    return n


class Llama(llama_cpp.Llama):
    """llama_cpp.Llama with ``cache_type_k`` / ``cache_type_v`` and up-front validation.

    ``cache_type_k`` / ``cache_type_v``: a cache type name (case-insensitive, e.g. "q4_0",
    "KVQ2"), a ggml type id, or a :class:`pyadaq.CacheType`; default "f16". ``kv_plan``
    (a plan file or KVPlan) gives each layer its own K and V type instead. All other keyword arguments go to
    ``llama_cpp.Llama`` unchanged, except that ``verbose`` defaults to False and
    ``flash_attn`` defaults to True when any K or V type is quantized (``flash_attn=None``
    also means "choose"). If a layer's cache ends up on a GPU that cannot run what its types
    need, construction raises :class:`pyadaq.runtime.offload.KVOffloadError` (llama.cpp would
    run those ops on the CPU without saying so); ``allow_cpu_fallback=True`` turns that into a
    warning. ``kv_plan`` together with ``cache_type_k`` / ``cache_type_v`` is a ``TypeError``
    (a plan sets every layer's types).

    ``n_ctx`` is checked first: an int >= 0 (``TypeError`` / ``ValueError``), at most the
    model's training context unless ``allow_long_context=True``, and a KV cache that fits in
    the memory available now (``MemoryError`` naming its size).

    After construction: ``cache_type_k``, ``cache_type_v`` (CacheType; for a plan, its most
    common types), ``layer_types_k`` / ``layer_types_v`` (per layer), ``kv_plan`` (the KVPlan
    or None), ``model_info`` (:class:`pyadaq.model.header.ModelInfo`), ``kv_cache_bytes``
    (allocated by llama.cpp) and ``kv_cache_bytes_expected`` (the sizing formula applied to
    this context).
    """

    def __init__(
        self,
        model_path: str | os.PathLike,
        *,
        cache_type_k: CacheTypeSpec | None = None,
        cache_type_v: CacheTypeSpec | None = None,
        kv_plan: Any = None,
        kv_calibration: Calibration | str | os.PathLike | None = None,
        kv_window: int = 0,
        allow_cpu_fallback: bool = False,
        allow_long_context: bool = False,
        rpc_servers: str | Sequence[str] | None = None,
        **kwargs: Any,
    ) -> None:
        for raw, ours in (("type_k", "cache_type_k"), ("type_v", "cache_type_v")):
            if raw in kwargs:
                raise TypeError(
                    f"pyadaq.Llama does not take llama_cpp's '{raw}' (a raw ggml type id); pass "
                    f"{ours}= with a cache type name such as 'q4_0' or 'kvq2' (or its ggml id)"
                )
        if kv_plan is not None and (cache_type_k is not None or cache_type_v is not None):
            raise TypeError(
                "pass either cache_type_k/cache_type_v (one K and one V type for every layer) or a plan "
                "(kv_plan/kv_budget: a type per layer), not both: a plan sets every layer's K and V type"
            )
        tk = cache_type("f16" if cache_type_k is None else cache_type_k)
        tv = cache_type("f16" if cache_type_v is None else cache_type_v)
        info = read_model_info(model_path)
        flash_attn = kwargs.get("flash_attn")
        plan, layers_k, layers_v = load_checked(kv_plan, info) if kv_plan is not None else (None, None, None)
        calibration = None if kv_calibration is None else calibration_for_model(kv_calibration, info)
        types_k, types_v = layers_k or [tk] * info.n_layer, layers_v or [tv] * info.n_layer
        transforms, rot = context_settings(calibration, types_k, types_v)
        if plan is not None:
            tk = max(set(layers_k), key=layers_k.count)
            tv = max(set(layers_v), key=layers_v.count)
            if any(t.quantized for t in layers_v) and flash_attn is not None and not flash_attn:
                raise ValueError(
                    "the plan stores some layers' V cache in a quantized type, which llama.cpp keeps only "
                    "with flash attention, but flash_attn=False was passed"
                )
        check_kv_window(kv_window, flash_attn is None or bool(flash_attn))
        validate_cache_types(info, tk, tv, flash_attn=flash_attn)
        check_context_size(info, kwargs, layers_k or tk, layers_v or tv, allow_long_context=allow_long_context)
        if flash_attn is None:
            kwargs.pop("flash_attn", None)
            if kv_window or any(t.quantized for t in (layers_k or [tk]) + (layers_v or [tv])):
                kwargs["flash_attn"] = True
        kwargs.setdefault("verbose", False)
        servers = rpc.parse_servers(rpc_servers) if rpc_servers is not None else []
        if servers:
            rpc.check_servers(servers)  # ggml's RPC client would abort the process on a bad server
        if "n_gpu_layers" not in kwargs:
            # every layer on the RPC servers; else 0 (llama_cpp's default) unless $PYADAQ_GPU_LAYERS
            kwargs["n_gpu_layers"] = -1 if servers else default_gpu_layers()
        check_kv_window(kv_window, True, kwargs["n_gpu_layers"])

        self.cache_type_k: CacheType = tk
        self.cache_type_v: CacheType = tv
        self.layer_types_k: list[CacheType] = types_k
        self.layer_types_v: list[CacheType] = types_v
        self.kv_plan = plan
        self.kv_calibration: Calibration | None = calibration
        # what the cache's K/V are stored in: saved states carry it (save_state / load_state)
        self._kv_coordinates: str | None = coordinates_fingerprint(transforms, rot)
        self.kv_window: int = kv_window
        self.model_info: ModelInfo = info
        self.rpc_servers: list[str] = servers
        # the per-layer types go to the context llama_cpp.Llama creates on this thread (it loads the
        # model, then creates one context); model loading and context creation run one at a time
        with creation_lock, rpc.next_model_servers(servers), \
                next_context(layers_k, layers_v, attn_rot=rot, transforms=transforms, kv_window=kv_window):
            super().__init__(os.fspath(model_path), type_k=tk.id, type_v=tv.id, **kwargs)
            rpc.hold(servers)
            self._rpc_held = True
        try:
            check_window_made(self._ctx_ptr(), kv_window, types_k + types_v)
        except ValueError:
            self.close()
            raise
        got = context_transform_layers(self._ctx_ptr())
        if calibration is not None and got != len(calibration.layers()):
            self.close()
            raise RuntimeError(f"llama.cpp applied the calibration to {got} of its {len(calibration.layers())} "
                               "layers")
        # a GPU-resident cache whose ops its GPU cannot run: an error, not a silent CPU fallback
        try:
            check_offload(self._ctx_ptr(), allow_cpu_fallback=allow_cpu_fallback)
        except KVOffloadError:
            self.close()
            raise
        # a model without a chat template of its own gets pyadaq's transcript (llama-cpp-python would
        # fall back to llama-2's format, which base models answer with nothing)
        if (kwargs.get("chat_format") is None and kwargs.get("chat_handler") is None
                and not chat_template.has_chat_template(self.metadata)):
            self.chat_handler = template_chat_handler(self, chat_template.template_text(), (chat_template.STOP,))
            self._fallback_chat_handler = self.chat_handler

    # --- KV cache size ------------------------------------------------------------------
    def _ctx_ptr(self) -> int:
        ctx = getattr(getattr(self, "_ctx", None), "ctx", None)
        if not ctx:
            raise RuntimeError("this Llama has no llama.cpp context (closed, or construction failed)")
        return int(ctx)

    @property
    def kv_cache_bytes(self) -> int:
        """Bytes of the backend buffers holding this context's KV cache (K and V, all layers,
        all devices, alignment included), as llama.cpp allocated them; 0 if the model has no
        KV cache. Read from libllama via ``pyadaq_kv_cache_bytes``."""
        n = native()
        fn = getattr(n.llama, "pyadaq_kv_cache_bytes", None)
        if fn is None:
            raise NotImplementedError(
                "this libllama does not export pyadaq_kv_cache_bytes; rebuild pyadaq's native "
                "libraries (kv_cache_bytes_expected gives the computed size)"
            )
        got = int(fn(n.ffi.cast("void *", self._ctx_ptr())))
        return max(got, 0)

    @property
    def kv_transform_bytes(self) -> int:
        """Bytes of the buffers holding this context's calibrated K/V transforms (0 without a
        calibration): memory the calibration costs on top of ``kv_cache_bytes``."""
        n = native()
        return int(n.llama.pyadaq_kv_transform_bytes(n.ffi.cast("void *", self._ctx_ptr())))

    @property
    def kv_window_bytes(self) -> int:
        """Bytes of the KV window's f16 copies of the last ``kv_window`` cells' K/V rows (0 without a
        window, or when no layer's cache is quantized): memory the window costs on top of
        ``kv_cache_bytes``."""
        return window_bytes(self._ctx_ptr())

    @property
    def kv_cache_bytes_expected(self) -> int:
        """The KV-cache size computed from the GGUF header and this context's actual
        n_ctx_seq, n_seq_max, n_ubatch, kv_unified, swa_full and flash attention setting."""
        ctx = self._ctx_ptr()
        cp = self.context_params
        return _kv_bytes(
            self.model_info, self.layer_types_k, self.layer_types_v,
            n_ctx_seq=int(_lib.llama_n_ctx_seq(ctx)),
            n_seq_max=int(_lib.llama_n_seq_max(ctx)),
            n_ubatch=int(_lib.llama_n_ubatch(ctx)),
            kv_unified=bool(cp.kv_unified),
            swa_full=bool(cp.swa_full),
            v_trans=cp.flash_attn_type == _lib.LLAMA_FLASH_ATTN_TYPE_DISABLED,
        )

    # --- llama_cpp.Llama plumbing -------------------------------------------------------
    def close(self) -> None:
        # __del__ calls close(); after a validation error super().__init__ never ran
        if hasattr(self, "_stack"):
            super().close()
        if getattr(self, "_rpc_held", False):
            self._rpc_held = False
            rpc.release(self.rpc_servers)

    def save_state(self):
        state = super().save_state()
        state.pyadaq_calibration = self._kv_coordinates
        state.pyadaq_formats = formats_fingerprint()
        return state

    def load_state(self, state) -> None:
        """llama_cpp's load_state, refused (ValueError) for a state saved under another
        calibration, or under none by a calibrated Llama and the other way round (the cache holds
        K and V in the calibration's coordinates; the state carries their fingerprint, which also
        changes where a pyadaq derives other transforms from the same calibration), and for one
        saved by a pyadaq whose cache formats differ (the same type names once stood for other
        bytes: the kvt blocks' fp16 scale); a calibrated state without the formats' stamp comes
        from such a pyadaq."""
        ours = self._kv_coordinates
        theirs = getattr(state, "pyadaq_calibration", None)
        formats = getattr(state, "pyadaq_formats", None)
        if formats != formats_fingerprint() and (formats is not None or theirs is not None):
            raise ValueError("this state was saved by a pyadaq whose KV cache formats differ from this one's: "
                             "its K/V bytes would decode as other values")
        if theirs != ours:
            def name(fp):
                return "no calibration" if fp is None else f"calibrated coordinates {fp[:12]}"

            raise ValueError(f"this state was saved with {name(theirs)}, this Llama has {name(ours)}: "
                             "its K/V cache would be read in the wrong coordinates")
        super().load_state(state)

    def context_layer_types(self) -> tuple:
        """The cache types of each layer's K and V tensors as llama.cpp allocated them."""
        return context_layer_types(self._ctx_ptr(), self.model_info.n_layer)

    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__()
        state.pop("type_k", None)
        state.pop("type_v", None)
        # the fallback handler is a closure over this Llama: the clone's __init__ installs its own
        fallback = getattr(self, "_fallback_chat_handler", None)
        if fallback is not None and state.get("chat_handler") is fallback:
            state["chat_handler"] = None
            state["chat_format"] = None  # llama_cpp's guess ("llama-2"), which __init__ replaced
        state["cache_type_k"] = self.cache_type_k.name
        state["cache_type_v"] = self.cache_type_v.name
        if self.rpc_servers:
            state["rpc_servers"] = ",".join(self.rpc_servers)
        if self.kv_plan is not None:
            state["kv_plan"] = self.kv_plan
        if self.kv_calibration is not None:
            state["kv_calibration"] = self.kv_calibration
        if self.kv_window:
            state["kv_window"] = self.kv_window
        return state

    def __repr__(self) -> str:
        path = getattr(self, "model_path", None)
        return (f"{type(self).__name__}({str(path)!r}, cache_type_k='{getattr(self, 'cache_type_k', None)}', "
                f"cache_type_v='{getattr(self, 'cache_type_v', None)}')")



def template_chat_handler(llm: llama_cpp.Llama, template: str, stop: tuple[str, ...] = ()):
    """llama-cpp-python's chat handler for a Jinja chat template (as llama.cpp reads one: bos_token,
    eos_token, messages, add_generation_prompt), generation also stopped at each string of `stop`."""
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    class Formatter(Jinja2ChatFormatter):
        def __call__(self, **kwargs):
            result = super().__call__(**kwargs)
            result.stop = [*result.stop, *stop]
            return result

    def text(token: int) -> str:
        return llm._model.token_get_text(token) if token != -1 else ""

    bos = text(llm.token_bos()) if llm._model.add_bos_token() else ""
    return Formatter(template=template, eos_token=text(llm.token_eos()), bos_token=bos,
                     stop_token_ids=[llm.token_eos()]).to_chat_handler()
