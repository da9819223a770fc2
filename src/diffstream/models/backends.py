"""Execution backends: the same modules run eagerly or compiled (issue #16).

`apply_backend(components, "compile")` compiles the UNet and the VAE's encoder and
decoder (the full VAE or TAESD) **in place** with `nn.Module.compile`: the module objects
stay the ones the rest of diffstream knows, so mechanisms still install and restore their
attention processors (`attention.base.install_processors`), the processor lease still
lives on the UNet, and `unet.config` still reads.

Backends:

- `eager`: plain PyTorch.
- `compile`: PyTorch's inductor. On the CPU with weight freezing (weights folded into the
  graph as constants, convolution weights pre-packed for oneDNN): measured on a 2-core
  AVX-512 machine, one SD 1.5 UNet call in bf16 took 0.55 s compiled against 0.87 s eager
  (README, Measured). On CUDA `mode="max-autotune"`: autotuned kernels and CUDA graphs
  over static input buffers (not run here: no GPU in CI).
- `openvino`: OpenVINO's torch.compile backend (`pip install diffstream[openvino]`), CPU.
  For the per-frame baseline: when a stateful mechanism attaches, the UNet falls back to
  `compile` with a one-line notice (`attention.base.check_backend` says why); the VAE
  stays on OpenVINO.
- `auto`: `compile` on CPU and CUDA, `eager` on MPS (inductor's MPS support is partial).

Stateful attention processors (the feature bank, the causal KV cache, Fairy's anchors,
FateZero's store) are marked `@attention.base.compiler_opaque`: dynamo does not trace into them, so the
compiled graphs are the pieces between them, with no Python state of a stream baked in
as a guard (fill counts, update flags). The graphs are built for the first frames and
then reused frame after frame; their state lives in preallocated buffers (rings and fill
counts, wave 1), so shapes never change in the steady state.

Compiled artefacts are cached on disk under `$DIFFSTREAM_CACHE` (default
`~/.cache/diffstream/compiled`): inductor's caches (unless the user set
`TORCHINDUCTOR_CACHE_DIR`) and OpenVINO's model cache, one folder per weight fingerprint.
"""

from __future__ import annotations

import functools
import hashlib
import os
from pathlib import Path

import torch

from diffstream.attention.base import FALLBACK_ATTRIBUTE
from diffstream.config import BACKENDS
from diffstream.errors import ConfigError


def resolve_backend(name: str, device: torch.device) -> str:
    """The backend `name` means on `device`: "auto" becomes "compile" on CPU/CUDA and
    "eager" on MPS; an impossible pair is refused in one line (ConfigError)."""
    if name not in BACKENDS:
        raise ConfigError(f"--backend must be one of {', '.join(BACKENDS)}, got {name!r}")
    if name == "auto":
        return "eager" if device.type == "mps" else "compile"
    if name == "openvino" and device.type != "cpu":
        raise ConfigError(f"--backend openvino runs on the CPU, not on {device.type}: use --backend compile "
                          f"(or --device cpu)")
    if name == "openvino":
        try:
            import openvino.torch  # noqa: F401  (registers the "openvino" torch.compile backend)
        except ImportError:
            raise ConfigError("--backend openvino needs OpenVINO: pip install 'diffstream[openvino]' "
                              "(or use --backend compile)") from None
    return name


def cache_root() -> Path:
    """Where compiled artefacts live: `$DIFFSTREAM_CACHE` or ~/.cache/diffstream/compiled."""
    return Path(os.environ.get("DIFFSTREAM_CACHE") or Path.home() / ".cache" / "diffstream" / "compiled")


def fingerprint(*modules: torch.nn.Module) -> str:
    """A short hash of the modules' weights (every parameter's name, shape, dtype and sum).

    OpenVINO's model cache keys a compiled graph by its code and input shapes only, with
    the weights folded in as constants: two checkpoints of one architecture would share a
    cache entry. Keying the folder by this fingerprint keeps them apart.
    """
    digest = hashlib.sha256()
    for module in modules:
        for name, param in module.state_dict().items():
            digest.update(f"{name}{tuple(param.shape)}{param.dtype}".encode())
            digest.update(repr(float(param.detach().double().sum())).encode())
    return digest.hexdigest()[:16]


def _compile_targets(components) -> dict[str, torch.nn.Module]:
    """The modules a backend compiles: the UNet and the VAE's encoder and decoder; of a Wan
    video model the transformer alone (its VAE runs through `models.wan.WanVAEStream`'s
    causal feature caches, Python lists the encoder and decoder mutate as they go)."""
    if getattr(components, "is_wan", False):
        return {"unet": components.unet}
    vae = components.vae
    return {"unet": components.unet, "vae.encoder": vae.encoder, "vae.decoder": vae.decoder}


def _inductor_setup(device: torch.device) -> dict:
    """Process-wide inductor settings and the arguments of `Module.compile`.

    Freezing is a process-wide inductor setting (passing it through `options` does not reach
    the freezing pass, measured: no speed-up); it needs inference without autograd, which
    is how every pipeline runs the model (`torch.no_grad`).
    """
    import torch._dynamo.config as dynamo_config
    import torch._inductor.config as inductor_config
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir

    # torch writes its default (a folder in /tmp) into the variable when first asked, so
    # only a value other than that default is the user's own choice.
    if os.environ.get("TORCHINDUCTOR_CACHE_DIR", default_cache_dir()) == default_cache_dir():
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(cache_root() / "inductor")

    # Each installed set of processors and each batch size (stream fill, guidance rows)
    # is a graph of its own; the default limit (8) would make dynamo fall back to eager.
    for name, floor in (("recompile_limit", 64), ("accumulated_recompile_limit", 512),
                        ("cache_size_limit", 64), ("accumulated_cache_size_limit", 512)):  # older torch
        if hasattr(dynamo_config, name):
            setattr(dynamo_config, name, max(getattr(dynamo_config, name), floor))
    if device.type == "cuda":
        return dict(backend="inductor", mode="max-autotune", dynamic=False)
    inductor_config.freezing = True
    return dict(backend="inductor", dynamic=False)


def apply_backend(components, backend: str) -> str:
    """Compile `components`' UNet and VAE encoder/decoder in place for `backend`.

    Args:
        components: a loaded `Components` (modules already on their device and dtype).
        backend: one of `BACKENDS`.
    Returns:
        the backend applied ("auto" resolved), also stored in `components.backend`.
    """
    backend = resolve_backend(backend, components.device)
    components.backend = backend
    if backend == "eager":
        return backend
    targets = _compile_targets(components)
    if backend == "compile":
        kwargs = _inductor_setup(components.device)
    else:
        cache = cache_root() / fingerprint(*targets.values()) / "openvino"
        # aot_autograd: OpenVINO's default capture path fails under Module.compile on
        # torch 2.13 (a shape-guard IndexError); through AOT autograd it captures cleanly.
        # OpenVINO's CPU plugin runs fp32 models in bf16 where the CPU has bf16 units
        # (measured here: 6 grey levels off eager); the model's own precision is kept.
        precision = {torch.float32: "f32", torch.bfloat16: "bf16", torch.float16: "f16"}[components.dtype]
        kwargs = dict(backend="openvino", dynamic=False,
                      options={"aot_autograd": True, "model_caching": True, "cache_dir": str(cache),
                               "config": {"INFERENCE_PRECISION_HINT": precision}})
    for module in targets.values():
        module.compile(**kwargs)
    # Read by `attention.base.install_processors` (which must not import this floor).
    components.unet._diffstream_backend = backend
    if backend == "openvino":
        setattr(components.unet, FALLBACK_ATTRIBUTE, functools.partial(_fall_back_to_compile, components))
    return backend


def _fall_back_to_compile(components, kind: str) -> str:
    """Recompile an OpenVINO UNet with inductor for a stateful mechanism (`check_backend`);
    returns the one-line notice. The VAE stays on OpenVINO; later streams on the model
    (any method) run the inductor UNet."""
    unet = components.unet
    unet.compile(**_inductor_setup(components.device))
    unet._diffstream_backend = "compile"
    delattr(unet, FALLBACK_ATTRIBUTE)
    components.backend = "compile"  # what the UNet runs on: the compile notices say so
    return (f"--backend openvino cannot run {kind} (it keeps state in the attention layers): the UNet now runs on "
            f"--backend compile (inductor), the VAE stays on OpenVINO")
