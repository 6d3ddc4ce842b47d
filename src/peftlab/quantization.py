"""Frozen 4-bit / 8-bit base weights via bitsandbytes, for QLoRA (Dettmers et al. 2023,
https://arxiv.org/abs/2305.14314).

QLoRA stores the frozen base weights in 4-bit NormalFloat (NF4, or plain FP4) blocks of 64
values with one absmax scale per block (optionally the scales themselves quantized again:
"double quantization"), dequantizes them on the fly in forward, and trains fp32 LoRA
adapters on top. The adapters see the base layer as an ordinary ``nn.Linear`` subclass, so
LoRA's forward needs no special case; only merging needs to know how to write into packed
weights, which lives here.

Works on CPU with bitsandbytes >= 0.47 (forward and backward through the frozen weights, NF4 and FP4).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn

from peftlab import activation_checkpointing
from peftlab.errors import QuantizationError
from peftlab.release_memory import trim_heap

INSTALL_HINT = "install it with `pip install peftlab[quant]` (bitsandbytes>=0.47)"
# Module names never quantized by default: the output head is small next to its activations
# and feeds the loss directly, so QLoRA keeps it in full precision.
DEFAULT_SKIP = ("lm_head", "score", "classifier")


def require_bitsandbytes() -> Any:
    """Import bitsandbytes or explain how to get it."""
    try:
        import bitsandbytes as bnb
    except ImportError as exc:
        raise QuantizationError(f"quantized base weights need bitsandbytes, which is not importable ({exc}); {INSTALL_HINT}.") from None
    return bnb


@dataclass
class QuantConfig:
    """How to store the frozen linear weights.

    Args:
        bits: 4 (QLoRA) or 8 (LLM.int8 row-wise absmax).
        quant_type: 4-bit data type: "nf4" (normal-float, best for normally distributed weights) or "fp4".
        double_quant: also quantize the per-block scales (saves ~0.4 bit per weight).
        compute_dtype: dtype the 4-bit weights are dequantized to for the matmul.
        skip_modules: module names (or dotted suffixes) kept in full precision.
    """

    bits: Literal[4, 8] = 4
    quant_type: Literal["nf4", "fp4"] = "nf4"
    double_quant: bool = False
    compute_dtype: torch.dtype = torch.float32
    skip_modules: tuple[str, ...] = DEFAULT_SKIP

    def __post_init__(self) -> None:
        if self.bits not in (4, 8):
            raise QuantizationError(f"QuantConfig: bits must be 4 or 8, got {self.bits!r}.")
        if self.quant_type not in ("nf4", "fp4"):
            raise QuantizationError(f"QuantConfig: quant_type must be 'nf4' or 'fp4', got {self.quant_type!r}.")
        if not isinstance(self.compute_dtype, torch.dtype) or not self.compute_dtype.is_floating_point:
            raise QuantizationError(f"QuantConfig: compute_dtype must be a float torch.dtype, got {self.compute_dtype!r}.")
        self.skip_modules = tuple(self.skip_modules)


@dataclass(frozen=True)
class QuantSpec:
    """What :func:`dequantize_linear` needs to rebuild the same kind of quantized layer."""

    bits: int
    quant_type: str
    double_quant: bool
    compute_dtype: torch.dtype

    def config(self) -> QuantConfig:
        return QuantConfig(self.bits, self.quant_type, self.double_quant, self.compute_dtype)  # type: ignore[arg-type]


# ----- recognising quantized layers ----------------------------------------------------------
def _bnb_or_none() -> Any:
    """bitsandbytes if it is imported already, else None.

    A module can be a bitsandbytes layer only once bitsandbytes is imported, so recognising one
    never imports it: that import takes seconds and, through its kernels package, asks the hub.
    """
    return sys.modules.get("bitsandbytes")


def is_quantized_linear(module: nn.Module) -> bool:
    """True for bitsandbytes Linear4bit / Linear8bitLt (False when bitsandbytes is absent)."""
    bnb = _bnb_or_none()
    return bnb is not None and isinstance(module, (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt))


def spec_of(layer: nn.Module) -> QuantSpec:
    bnb = require_bitsandbytes()
    if isinstance(layer, bnb.nn.Linear4bit):
        _unpack_cpu_layout(layer)
        state = layer.weight.quant_state
        compute = layer.compute_dtype or torch.float32
        return QuantSpec(4, state.quant_type, bool(state.nested), compute)
    if isinstance(layer, bnb.nn.Linear8bitLt):
        return QuantSpec(8, "nf4", False, torch.float32)
    raise QuantizationError(f"{type(layer).__name__} is not a bitsandbytes quantized linear layer.")


def is_quantized_model(model: nn.Module) -> bool:
    return any(is_quantized_linear(m) for m in model.modules())


# ----- one layer ------------------------------------------------------------------------------
def block_size_for(in_features: int) -> int:
    """Weights per 4-bit scale: bitsandbytes' 64 when it divides a row, else 32.

    bitsandbytes 0.50's AVX512 CPU dequantize kernel misreads 64-blocks that straddle rows: with
    in_features 32, 96 or 160 the weight comes back with 25-40% relative error instead of NF4's 9%
    (measured; 32-blocks are right for every width tried). Real models' widths are multiples of 64.
    """
    return 64 if in_features % 64 == 0 else 32


def quantize_linear(linear: nn.Linear, config: QuantConfig) -> nn.Module:
    """A bitsandbytes layer holding ``linear``'s weight quantized (bias kept in full precision)."""
    bnb = require_bitsandbytes()
    # From the CPU: bitsandbytes' Int8Params quantizes in .to(device) only data that is on the CPU
    # (a weight already on the GPU would stay fp32); Params4bit quantizes from anywhere.
    weight = linear.weight.detach().to(device="cpu", dtype=torch.float32)
    has_bias = linear.bias is not None
    device = linear.weight.device
    if config.bits == 4:
        layer = bnb.nn.Linear4bit(
            linear.in_features, linear.out_features, bias=has_bias, compute_dtype=config.compute_dtype,
            compress_statistics=config.double_quant, quant_type=config.quant_type, device="meta",
        )
        layer.weight = bnb.nn.Params4bit(
            weight.to(config.compute_dtype), requires_grad=False, compress_statistics=config.double_quant,
            quant_type=config.quant_type, blocksize=block_size_for(linear.in_features), module=layer,
        )
        # bitsandbytes' AVX512-BF16 repacking also fails for in_features below the block size.
        _keep_layer_portable(layer)
    else:
        layer = bnb.nn.Linear8bitLt(linear.in_features, linear.out_features, bias=has_bias, has_fp16_weights=False, device="meta")
        layer.weight = bnb.nn.Int8Params(weight, requires_grad=False, has_fp16_weights=False)
    if has_bias:
        layer.bias = nn.Parameter(linear.bias.detach().clone(), requires_grad=False)
    # Moving to the device is what packs the weight (bitsandbytes quantizes lazily in .to()).
    return layer.to(device)


def _unpack_cpu_layout(layer: nn.Module) -> None:
    """Put a 4-bit weight that bitsandbytes repacked for its AVX512-BF16 CPU kernel back in the
    layout every other bitsandbytes function reads.

    bitsandbytes repacks a Linear4bit's weight in place on its first no-grad eval forward on such
    CPUs (layers peftlab quantizes opt out; layers loaded through transformers do not), and undoes
    it itself only before moving the weight to a GPU. Unpacked, the layer computes as before (the
    block scales keep the bf16 rounding the packed form gave them).
    """
    bnb = require_bitsandbytes()
    weight = layer.weight
    if not getattr(weight.quant_state, "packing_format_for_cpu", False):
        return
    data, state = bnb.functional._convert_weight_packed_for_cpu_inverse(weight.data, weight.quant_state)
    if state.absmax.dim() == 2:  # bitsandbytes 0.50 restores only double-quantized scales: (blocks per row, rows) bf16
        state.absmax = state.absmax.t().reshape(-1).to(torch.float32)
    weight.data, weight.quant_state = data, state


def keep_portable_layout(model: nn.Module) -> None:
    """Keep every 4-bit layer of ``model`` in bitsandbytes' portable layout, on every CPU.

    bitsandbytes (0.50) repacks a Linear4bit on the first no-grad eval forward on AVX512-BF16
    CPUs, and its kernel for the packed layout has no backward: after one evaluation, training
    gets no gradient through any 4-bit layer (the Trainer evaluates between epochs). It also
    rounds the block scales to bf16, so evaluation and training would see different weights.
    Adapted models opt out, as layers :func:`quantize_linear` makes do; layers already repacked
    are put back.
    """
    bnb = _bnb_or_none()
    if bnb is None:
        return
    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            _keep_layer_portable(module)


def _keep_layer_portable(layer: nn.Module) -> None:
    """One Linear4bit of :func:`keep_portable_layout`: opt out of the repacking, undo it if done."""
    layer.support_avx512bf16_for_cpu = False
    _unpack_cpu_layout(layer)


def dequantize_weight(layer: nn.Module) -> torch.Tensor:
    """The fp32 ``(out, in)`` weight a quantized layer actually multiplies with."""
    bnb = require_bitsandbytes()
    if isinstance(layer, bnb.nn.Linear4bit):
        _unpack_cpu_layout(layer)
        weight = layer.weight
        return bnb.functional.dequantize_4bit(weight.data, weight.quant_state).to(torch.float32)
    if isinstance(layer, bnb.nn.Linear8bitLt):
        weight = layer.weight
        scales = weight.SCB if weight.SCB is not None else layer.state.SCB
        return weight.data.to(torch.float32) * (scales.to(torch.float32).unsqueeze(1) / 127.0)
    raise QuantizationError(f"{type(layer).__name__} is not a bitsandbytes quantized linear layer.")


def dequantize_linear(layer: nn.Module) -> nn.Linear:
    """A plain fp32 ``nn.Linear`` with the weight the quantized layer represents."""
    weight = dequantize_weight(layer)
    plain = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None, device=weight.device)
    plain.weight = nn.Parameter(weight, requires_grad=False)
    if layer.bias is not None:
        plain.bias = nn.Parameter(layer.bias.detach().to(torch.float32).clone(), requires_grad=False)
    return plain


def add_to_quantized_weight(layer: nn.Module, delta: torch.Tensor) -> None:
    """``W <- Q(deq(W) + delta)`` in place: how an adapter merges into packed weights (lossy)."""
    spec = spec_of(layer)
    plain = dequantize_linear(layer)
    plain.weight.data += delta.to(plain.weight.dtype)
    fresh = quantize_linear(plain, spec.config())
    layer.weight = fresh.weight
    if isinstance(layer, require_bitsandbytes().nn.Linear8bitLt):
        layer.state.reset_grads()
        layer.state.SCB = None
        layer.state.CB = None


# ----- whole models ---------------------------------------------------------------------------
def _skipped(name: str, skip: tuple[str, ...]) -> bool:
    return any(name == s or name.endswith("." + s) for s in skip)


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, new)


def quantize_model(model: nn.Module, config: QuantConfig | None = None) -> nn.Module:
    """Replace every ``nn.Linear`` (except ``config.skip_modules``) by its quantized version, in place.

    All parameters end up frozen: a quantized base is only ever trained through adapters.
    """
    require_bitsandbytes()
    config = config or QuantConfig()
    # Adapter wrappers hold their layer as ``base_layer`` / ``original_module`` (peft's tree); read by
    # name so this module, which the layer code builds on, imports none of it.
    if any({"base_layer", "original_module"} & set(m._modules) for m in model.modules()):
        raise QuantizationError("quantize the base model before adding adapters (get_peft_model after quantize_model).")
    names = [n for n, m in model.named_modules() if type(m) is nn.Linear and not _skipped(n, config.skip_modules)]
    if not names:
        raise QuantizationError(f"{type(model).__name__} has no nn.Linear layer to quantize outside {list(config.skip_modules)}.")
    for name in names:
        _replace(model, name, quantize_linear(model.get_submodule(name), config))
        trim_heap()  # the layer's full-precision temporaries are freed now; hand their pages back
    for param in model.parameters():
        param.requires_grad_(False)
    return model


def load_quantized_model(name_or_path: str, config: QuantConfig | None = None, model_class: Any = None, **kwargs: Any) -> nn.Module:
    """Load a transformers model in full precision, then quantize its linear layers.

    transformers maps safetensors files into memory, so the full-precision weights are file
    pages, read once while quantizing. They stay resident (and counted in RSS) for as long as
    any tensor still points into the mapping; the parameters left in full precision (embeddings,
    norms, head) are therefore copied out of it at the end, which releases the whole mapping:
    SmolLM2-135M keeps ~420 MB less resident after loading (docs/qlora.md). Freed temporaries
    are handed back to the OS after every layer (:func:`peftlab.release_memory.trim_heap`): another ~290 MB
    off the load peak and the resident size after loading. The load still reads every fp32
    weight once, but as file pages the kernel can drop, not as copies.
    """
    require_bitsandbytes()
    config = config or QuantConfig()
    if model_class is None:
        from transformers import AutoModelForCausalLM

        model_class = AutoModelForCausalLM
    kwargs.setdefault("dtype", config.compute_dtype)
    model = model_class.from_pretrained(name_or_path, **kwargs)
    quantize_model(model, config)
    _copy_out_of_file_mappings(model)
    trim_heap()
    return model


def _copy_out_of_file_mappings(model: nn.Module) -> None:
    """Give every full-precision parameter and buffer its own memory (see load_quantized_model)."""
    with torch.no_grad():
        for module in model.modules():
            if is_quantized_linear(module):
                continue  # bitsandbytes made new packed weights; the bias is a copy already
            for param in module.parameters(recurse=False):
                param.data = param.data.clone()  # keeps the Parameter (and weight tying) intact
            for name, buffer in module.named_buffers(recurse=False):
                if buffer is not None:
                    module._buffers[name] = buffer.clone()


def weight_bytes(model: nn.Module, skip_modules: tuple[str, ...] = DEFAULT_SKIP) -> int:
    """Bytes of the linear layers' weights (packed weights + quantization scales), output head excluded.

    These are the weights quantization controls; embeddings, norms and the head stay in full
    precision either way, so leaving them out shows the ratio quantization itself achieves.
    """
    total = 0
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear) or _skipped(name, skip_modules):
            continue
        total += _tensor_bytes(module.weight)
    return total


def parameter_bytes(model: nn.Module) -> int:
    """Bytes of every parameter and buffer (tied tensors once), with quantization scales."""
    seen: set[int] = set()
    total = 0
    for tensor in [*model.parameters(), *model.buffers()]:
        if id(tensor) not in seen:
            seen.add(id(tensor))
            total += _tensor_bytes(tensor)
    return total


def _tensor_bytes(weight: torch.Tensor) -> int:
    size = weight.numel() * weight.element_size()
    state = getattr(weight, "quant_state", None)
    if state is not None:
        size += _state_bytes(state)
    scb = getattr(weight, "SCB", None)
    if scb is not None:
        size += scb.numel() * scb.element_size()
    return size


def _state_bytes(state: Any) -> int:
    size = state.absmax.numel() * state.absmax.element_size()
    if getattr(state, "nested", False) and state.state2 is not None:
        size += state.state2.absmax.numel() * state.state2.absmax.element_size()
    return size


# ----- training preparation -------------------------------------------------------------------
# Quantization schemes whose kernels expect the model's own dtypes: their models are not upcast
# (the same list peft leaves alone; transformers records the scheme as `quantization_method`).
KEEP_DTYPES_FOR = ("gptq", "aqlm", "eetq", "hqq", "torchao")


def _is_packed_4bit(param: torch.Tensor) -> bool:
    """A bitsandbytes 4-bit weight: its dtype is only the storage type (bf16 with bnb_4bit_quant_storage)."""
    bnb = _bnb_or_none()
    return bnb is not None and isinstance(param, bnb.nn.Params4bit)


def upcast_for_training(model: nn.Module) -> None:
    """Every fp16/bf16 parameter that is not a packed 4-bit weight to fp32, in place.

    Adapters trained next to half-precision norms, embeddings and heads lose small updates to
    rounding; fp32 costs memory only for the unquantized part, which QLoRA keeps small. peft
    does the same, so a model prepared by either library has the same dtypes.
    """
    if getattr(model, "quantization_method", None) in KEEP_DTYPES_FOR or getattr(model, "hqq_quantized", False):
        return
    for param in model.parameters():
        if param.dtype in (torch.float16, torch.bfloat16) and not _is_packed_4bit(param):
            param.data = param.data.to(torch.float32)


def prepare_model_for_kbit_training(
    model: nn.Module, use_gradient_checkpointing: bool = True, gradient_checkpointing_kwargs: dict[str, Any] | None = None
) -> nn.Module:
    """Get a (quantized) model ready for adapter training, in place.

    * every base parameter frozen;
    * every half-precision parameter except packed 4-bit weights in fp32 (:func:`upcast_for_training`);
    * with gradient checkpointing, activations are recomputed in backward; the input
      embeddings' output requires grad so the checkpointed blocks still get gradients even
      though every base weight is frozen.
    """
    for param in model.parameters():
        param.requires_grad_(False)
    upcast_for_training(model)
    if use_gradient_checkpointing:
        if hasattr(model, "enable_input_require_grads"):
            model.enable_input_require_grads()
        elif hasattr(model, "get_input_embeddings"):
            model.get_input_embeddings().register_forward_hook(lambda _m, _i, out: out.requires_grad_(True))
        if not hasattr(model, "gradient_checkpointing_enable"):
            raise QuantizationError(f"{type(model).__name__} has no gradient_checkpointing_enable(); pass use_gradient_checkpointing=False.")
        kwargs = {"use_reentrant": False} if gradient_checkpointing_kwargs is None else gradient_checkpointing_kwargs
        activation_checkpointing.enable(model, kwargs)  # non-reentrant: LoRA layers' narrow outputs are kept too
        if getattr(getattr(model, "config", None), "use_cache", None):
            model.config.use_cache = False  # caches are useless while training and clash with checkpointing
    return model


# ----- merging --------------------------------------------------------------------------------
def dequantize_model(model: nn.Module) -> dict[str, QuantSpec]:
    """Replace every quantized linear (also inside adapter wrappers) by a plain fp32 one.

    Returns what each replaced layer was, by module path, so it can be re-quantized.
    """
    replaced: dict[str, QuantSpec] = {}
    for name, module in list(model.named_modules()):
        if is_quantized_linear(module):
            replaced[name] = spec_of(module)
            _replace(model, name, dequantize_linear(module))
    return replaced


def requantize(model: nn.Module, specs: dict[str, QuantSpec], exact: dict[str, torch.Tensor] | None = None) -> dict[str, float]:
    """Quantize the named plain linears again; returns per-layer relative weight error.

    The error is ``||Q(W) - W|| / ||W||`` for each layer's current weight ``W``.
    """
    errors: dict[str, float] = {}
    for name, spec in specs.items():
        plain = model.get_submodule(name)
        target = plain.weight.detach().to(torch.float32).clone()
        layer = quantize_linear(plain, spec.config())
        _replace(model, name, layer)
        errors[name] = float((dequantize_weight(layer) - target).norm() / target.norm().clamp_min(1e-12))
    return errors
