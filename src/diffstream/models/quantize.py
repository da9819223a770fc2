"""Int8 / fp8 weights for a Wan video model's transformer and text encoder (torchao).

Issue #18's memory profile for 12-16 GB GPUs: torchao's weight-only quantization
(`torchao.quantization.quantize_`) replaces every `nn.Linear` weight by an int8 tensor
with one scale (and one zero point) per output row (`Int8WeightOnlyConfig`), or by an
fp8 tensor (`Float8WeightOnlyConfig`); activations stay in the compute dtype. The
modules a model keeps in fp32 (diffusers' `_keep_in_fp32_modules`: Wan's time embedder,
norms and modulation tables; transformers' for T5-family encoders) are left alone, which
is also what the memory estimate counts (`models.wan_checkpoints._weights_bytes`).

fp8 weights need a CUDA GPU of compute capability 8.9 or newer (Ada, Hopper); int8 runs
everywhere (on the CPU too, tested). torchao is an extra: `pip install 'diffstream[quant]'`.
"""

from __future__ import annotations

import torch

from diffstream.errors import ConfigError

KINDS = ("int8", "fp8")
FP8_CAPABILITY = (8, 9)  # torchao's fp8 kernels: Ada (sm_89) and newer


def check_quantize(kind: str | None, device: torch.device) -> None:
    """Refuse, in one line and before anything loads, a kind this machine cannot run.

    Raises:
        ConfigError: an unknown kind, torchao missing, or fp8 off a recent CUDA GPU.
    """
    if kind is None:
        return
    if kind not in KINDS:
        raise ConfigError(f"--quantize takes {' or '.join(KINDS)}, got {kind!r}")
    try:
        import torchao  # noqa: F401
    except ImportError:
        raise ConfigError(f"--{kind} needs torchao: pip install 'diffstream[quant]' (or pip install torchao)") from None
    if kind == "fp8":
        if device.type != "cuda" or torch.cuda.get_device_capability(device) < FP8_CAPABILITY:
            where = (f"this GPU is sm_{''.join(map(str, torch.cuda.get_device_capability(device)))}"
                     if device.type == "cuda" else f"the device is {device.type}")
            raise ConfigError(f"--fp8 weights need a CUDA GPU of compute capability 8.9 or newer ({where}): "
                              "use --int8")


def quantize_weights(module: torch.nn.Module, kind: str) -> int:
    """Quantize a model's Linear weights in place (weight-only), skipping its fp32 modules.

    Args:
        module: a diffusers / transformers model, already on its device and dtype.
        kind: "int8" or "fp8" (`check_quantize` first).
    Returns:
        how many Linear layers were quantized.
    """
    from torchao.quantization import Float8WeightOnlyConfig, Int8WeightOnlyConfig, quantize_

    keep = tuple(getattr(module, "_keep_in_fp32_modules", None) or ())
    count = 0

    def wanted(layer: torch.nn.Module, name: str) -> bool:
        nonlocal count
        # a module kept in fp32 by its model (a path component equal to one of the names)
        take = isinstance(layer, torch.nn.Linear) and not any(k in name.split(".") for k in keep)
        count += take
        return take

    quantize_(module, Int8WeightOnlyConfig() if kind == "int8" else Float8WeightOnlyConfig(), filter_fn=wanted)
    return count


def weight_bytes(module: torch.nn.Module) -> int:
    """Bytes of a model's parameters as stored, quantized ones by their parts (data, scales, zero points)."""

    def size(t) -> int:
        if type(t) not in (torch.Tensor, torch.nn.Parameter) and hasattr(t, "__tensor_flatten__"):
            names, _ = t.__tensor_flatten__()
            return sum(size(getattr(t, n)) for n in names if getattr(t, n) is not None)
        return t.nbytes

    return sum(size(p) for p in module.parameters())
