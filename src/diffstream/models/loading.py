"""Checkpoint loading: hub ids, local diffusers folders, single files, LoRA, tiny VAE.

All of it goes through diffusers/transformers `from_pretrained` / `from_single_file`, so a
user with a real checkpoint gets the real thing. Whatever fails to load ends in one
`ModelLoadError` line that says what to pass instead.
"""

from __future__ import annotations

from pathlib import Path

import torch

from diffstream.config import TINY_VAE_PRESETS, ModelConfig, uses_turbo
from diffstream.errors import ModelLoadError, one_line
from diffstream.models import hub
from diffstream.models.components import Components

_SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth", ".bin")


def resolve_device(device: str) -> torch.device:
    """"auto" picks cuda, then mps, then cpu."""
    if device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        resolved = torch.device(device)
    except (RuntimeError, ValueError) as exc:
        raise ModelLoadError(f"unknown --device {device!r}: {exc}") from None
    if resolved.type == "cuda":
        if not torch.cuda.is_available():
            why = ("this torch is a CPU-only build: install a CUDA build of torch (pytorch.org), or use --device cpu"
                   if torch.version.cuda is None else
                   "no CUDA GPU is visible (driver missing or CUDA_VISIBLE_DEVICES empty): use --device cpu")
            raise ModelLoadError(f"--device {device}: {why}")
        if resolved.index is not None and resolved.index >= torch.cuda.device_count():
            raise ModelLoadError(f"--device {device}: only {torch.cuda.device_count()} CUDA device(s) here "
                                 f"(cuda:0 to cuda:{torch.cuda.device_count() - 1})")
    if resolved.type == "mps":
        mps = getattr(torch.backends, "mps", None)
        if mps is None or not mps.is_available():
            raise ModelLoadError(f"--device {device}: Apple's MPS is not available here (it needs macOS on Apple "
                                 f"silicon and an MPS build of torch): use --device cpu")
    return resolved


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """"auto" is fp16 on cuda/mps and fp32 on cpu (CPU fp16 kernels are slow or missing)."""
    if dtype == "auto":
        return torch.float16 if device.type in ("cuda", "mps") else torch.float32
    return {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[dtype]


def _missing(what: str, spec: str, exc: BaseException | None = None) -> ModelLoadError:
    reason = f" ({type(exc).__name__}: {one_line(exc, 160)})" if exc and str(exc) else ""
    return ModelLoadError(
        f"cannot load {what} {spec!r}{reason}: pass a local diffusers folder or .safetensors "
        f"file (e.g. --model /path/to/sd15), or --model tiny to try the machinery offline"
    )


def _is_single_file(spec: str) -> bool:
    return spec.lower().endswith(_SINGLE_FILE_SUFFIXES)


def _load_diffusers_folder_or_hub(spec: str, dtype: torch.dtype) -> dict:
    local = Path(spec).is_dir()
    if local and not (Path(spec) / "unet").is_dir():
        raise ModelLoadError(
            f"{spec!r} is a folder but not a diffusers Stable Diffusion folder (no unet/ inside): "
            f"pass a diffusers folder or a single .safetensors file, or --model tiny"
        )
    if local:
        return _from_pretrained(spec, dtype, local_files_only=True)
    try:  # a hub id that is already in the local cache needs no network
        return _from_pretrained(spec, dtype, local_files_only=True)
    except Exception:
        pass
    if hub._offline() or not hub.hub_reachable():
        raise ModelLoadError(
            f"cannot load model {spec!r}: it is not a local folder or file, not in the local cache, "
            f"and the model hub is unreachable: pass a local diffusers folder or .safetensors file "
            f"(--model /path/to/sd15), or --model tiny to try the machinery offline"
        )
    try:
        return _from_pretrained(spec, dtype, local_files_only=False)
    except Exception as exc:  # hub/network/format errors all mean the same to the user
        raise _missing("model", spec, exc) from None


def _from_pretrained(spec: str, dtype: torch.dtype, local_files_only: bool, tokenizer=None) -> dict:
    """The SD components of a diffusers folder or hub id; `tokenizer`, if given, instead of
    the folder's (the toy folder stores none: it is the package's CLIP tokenizer)."""
    from diffusers import AutoencoderKL, DiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    kwargs = dict(local_files_only=local_files_only)
    try:
        index = DiffusionPipeline.load_config(spec, **kwargs)  # model_index.json: which parts there are
        modules = dict(
            scheduler=_scheduler_from(spec, kwargs),
            tokenizer=tokenizer or CLIPTokenizer.from_pretrained(spec, subfolder="tokenizer", **kwargs),
            text_encoder=CLIPTextModel.from_pretrained(spec, subfolder="text_encoder", torch_dtype=dtype, **kwargs),
            unet=UNet2DConditionModel.from_pretrained(spec, subfolder="unet", torch_dtype=dtype, **kwargs),
            vae=AutoencoderKL.from_pretrained(spec, subfolder="vae", torch_dtype=dtype, **kwargs),
        )
        if (index.get("text_encoder_2") or [None])[0]:  # SDXL: a second text encoder with projection
            modules.update(
                text_encoder_2=CLIPTextModelWithProjection.from_pretrained(spec, subfolder="text_encoder_2",
                                                                           torch_dtype=dtype, **kwargs),
                tokenizer_2=CLIPTokenizer.from_pretrained(spec, subfolder="tokenizer_2", **kwargs),
                force_zeros_for_empty_prompt=bool(index.get("force_zeros_for_empty_prompt", True)))
        return modules
    except Exception as exc:
        if local_files_only and Path(spec).is_dir():
            raise _missing("model", spec, exc) from None
        raise


def _scheduler_from(spec: str, kwargs: dict):
    """An LCMScheduler carrying the checkpoint's own noise schedule and prediction type."""
    from diffusers import LCMScheduler

    return LCMScheduler.from_pretrained(spec, subfolder="scheduler", **kwargs)


def _is_sdxl_file(spec: str) -> bool:
    """Whether a .safetensors checkpoint in the original (SGM) layout is SDXL: its second
    text encoder is stored under `conditioner.embedders.1` (read from the header only)."""
    if not spec.lower().endswith(".safetensors"):
        return False
    from safetensors import safe_open

    with safe_open(spec, framework="pt") as f:
        return any(k.startswith("conditioner.embedders.1.") for k in f.keys())


def _load_single_file(spec: str, dtype: torch.dtype) -> dict:
    from diffusers import LCMScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline

    if not Path(spec).is_file():
        raise _missing("checkpoint file", spec, FileNotFoundError("no such file"))
    sdxl = _is_sdxl_file(spec)
    try:
        pipe = (StableDiffusionXLPipeline if sdxl else StableDiffusionPipeline).from_single_file(
            spec, torch_dtype=dtype, safety_checker=None, local_files_only=hub._offline()
        )
    except Exception as exc:
        raise ModelLoadError(
            f"cannot load checkpoint file {spec!r} ({type(exc).__name__}: {one_line(exc, 160)}); "
            f"single files need diffusers' config for their architecture (cached from the hub once), "
            f"or pass a diffusers folder with --model PATH"
        ) from None
    modules = dict(
        tokenizer=pipe.tokenizer,
        text_encoder=pipe.text_encoder,
        unet=pipe.unet,
        vae=pipe.vae,
        scheduler=LCMScheduler.from_config(pipe.scheduler.config),
    )
    if sdxl:
        modules.update(text_encoder_2=pipe.text_encoder_2, tokenizer_2=pipe.tokenizer_2)
    return modules


def _load_toy(config: ModelConfig, dtype: torch.dtype) -> dict:
    """The shipped trained toy model (`models.toy`): a diffusers folder, loaded as one."""
    from diffstream.models.toy import TOY_DIR, toy_available

    if config.instruct:
        raise ModelLoadError("--model toy is a text-to-image model (it restyles by prompt); instruction edits need "
                             "an InstructPix2Pix checkpoint (--model timbrooks/instruct-pix2pix), or --model tiny "
                             "to try the machinery")
    if not toy_available():
        raise ModelLoadError(f"the toy model's weights are missing from {TOY_DIR}: reinstall diffstream, or "
                             f"rebuild them with scripts/train_toy.py")
    from diffstream.models.tokenizer import clip_tokenizer

    # The CLIP tokenizer is rebuilt from the package's BPE file, not stored a second time.
    return _from_pretrained(str(TOY_DIR), dtype, local_files_only=True, tokenizer=clip_tokenizer())


def load_tiny_vae(spec: str, dtype: torch.dtype):
    """An AutoencoderTiny (TAESD) from a hub id, a folder, `taesd`, or `tiny` (random)."""
    from diffusers import AutoencoderTiny

    if spec == "tiny":
        from diffstream.models.tiny import tiny_taesd

        return tiny_taesd().to(dtype)
    if spec == "taesd-random":  # TAESD's real size with random weights (benchmarks)
        from diffstream.models.tiny import tiny_taesd

        return tiny_taesd(full_size=True).to(dtype)
    spec = TINY_VAE_PRESETS.get(spec, spec)
    try:
        return AutoencoderTiny.from_pretrained(spec, torch_dtype=dtype, **hub.hub_kwargs(spec))
    except Exception as exc:
        raise ModelLoadError(
            f"cannot load tiny VAE {spec!r} ({type(exc).__name__}): pass a local AutoencoderTiny folder "
            f"with --tiny-vae PATH, or leave --tiny-vae out to use the model's own VAE"
        ) from None


def fuse_loras(modules: dict, loras: list[tuple[str, float]], num_lcm: int = 0) -> None:
    """Load LoRA weights (LCM-LoRA or style LoRAs) and fuse them into the UNet/text encoder.

    Uses diffusers' LoRA loader (PEFT) through a throw-away pipeline object that shares
    the modules; after fusing, the adapter layers are removed so inference pays nothing.

    Args:
        modules: dict with unet, vae, text_encoder, tokenizer, scheduler (modified in place).
        loras: (hub id, folder or .safetensors file, scale) in the order to fuse.
        num_lcm: how many of them, first, came from --lcm-lora (for the error message).
    """
    if not loras:
        return
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    parts = {k: modules[k] for k in ("vae", "text_encoder", "tokenizer", "unet", "scheduler")}
    if modules.get("text_encoder_2") is not None:  # SDXL LoRAs may also touch the second text encoder
        pipe = StableDiffusionXLPipeline(**parts, text_encoder_2=modules["text_encoder_2"],
                                         tokenizer_2=modules["tokenizer_2"])
    else:
        pipe = StableDiffusionPipeline(**parts, safety_checker=None, feature_extractor=None,
                                       requires_safety_checker=False)
    for i, (spec, scale) in enumerate(loras):
        path = Path(spec).expanduser()
        option = "--lcm-lora" if i < num_lcm else "--lora"
        hint = "pass a local LoRA file or folder" + (", or --lcm-lora none" if option == "--lcm-lora" else "")
        looks_local = spec.endswith((".safetensors", ".bin", ".pt", ".ckpt")) or spec.startswith((".", "/", "~"))
        if looks_local and not path.exists():
            raise ModelLoadError(f"{option} {spec}: no such file; {hint}")
        kwargs = {}
        if path.is_file():
            kwargs = dict(weight_name=path.name)
            spec_arg = str(path.parent)
        else:
            spec_arg = spec
            kwargs.update(hub.hub_kwargs(spec))
        try:
            pipe.load_lora_weights(spec_arg, adapter_name=f"lora{i}", **kwargs)
        except Exception as exc:
            raise ModelLoadError(
                f"cannot load {option} {spec!r} ({type(exc).__name__}: {one_line(exc, 160)}); {hint}"
            ) from None
        pipe.fuse_lora(lora_scale=float(scale), adapter_names=[f"lora{i}"])
        pipe.unload_lora_weights()


def load_components(config: ModelConfig) -> Components:
    """Load (or build) a model as described by `config`: `Components` for Stable Diffusion
    models, `models.wan.WanComponents` for a Wan video model (`tiny-wan`, a Wan folder).

    Raises:
        ModelLoadError: one line saying what to pass instead.
    """
    config = config.resolved()
    precheck_wan(config)
    device = resolve_device(config.device)
    dtype = resolve_dtype(config.dtype, device)
    if is_wan_model(config.model):
        return load_wan_components(config, device, dtype)
    if config.controlnets:  # a missing ControlNet file fails now, not after the base model loaded
        from diffstream.models.controlnet import precheck

        precheck(config.controlnets)
    if config.ip_adapter:
        from diffstream.models.ip_adapter import precheck as precheck_ip

        precheck_ip(config.ip_adapter)
    if config.model == "tiny":
        from diffstream.models.tiny import tiny_components

        modules = tiny_components(in_channels=8 if config.instruct else 4)
    elif config.model == "tiny-sdxl":
        from diffstream.models.tiny import tiny_sdxl_components

        modules = tiny_sdxl_components()
    elif config.model == "toy":
        modules = _load_toy(config, dtype)
    elif _is_single_file(config.model):
        modules = _load_single_file(config.model, dtype)
    else:
        if not Path(config.model).exists() and (
            config.model.startswith((".", "/", "~")) or config.model.count("/") != 1
        ):
            raise _missing("model", config.model, FileNotFoundError("no such folder"))
        modules = _load_diffusers_folder_or_hub(config.model, dtype)

    loras = []
    if config.lcm_lora and config.lcm_lora.lower() != "none":
        loras.append((config.lcm_lora, 1.0))
    num_lcm = len(loras)
    loras.extend(config.loras)
    fuse_loras(modules, loras, num_lcm)

    if config.tiny_vae:
        modules["vae"] = load_tiny_vae(config.tiny_vae, dtype)

    controlnets = ()
    if config.controlnets:  # built against the image UNet, before motion modules wrap it
        from diffstream.models.controlnet import load_controlnets

        controlnets = load_controlnets(config.controlnets, modules["unet"], config.model, device, dtype,
                                       config.control_depth_model)

    ip_adapter = None
    if config.ip_adapter:  # into the UNet: its processors become the UNet's own
        from diffstream.models.ip_adapter import load_ip_adapter

        ip_adapter = load_ip_adapter(config.ip_adapter, modules, device, dtype)

    depth_state = None
    if config.motion_adapter:
        from diffstream.models.motion import load_motion_adapter, motion_unet

        adapter, depth_state, _ = load_motion_adapter(
            config.motion_adapter, modules["unet"].config.block_out_channels, dtype=torch.float32
        )
        modules["unet"] = motion_unet(modules["unet"].float(), adapter)

    if config.video_model:  # a tuned video UNet replaces the checkpoint's (tune video)
        from diffstream.models.video_unet import load_video_model

        modules["unet"] = load_video_model(config.video_model, dtype, device)

    turbo = uses_turbo(config)
    for key in ("unet", "vae", "text_encoder", "text_encoder_2"):
        if modules.get(key) is None:
            continue
        module = modules[key]
        if next(module.parameters()).dtype != dtype:
            module = module.to(dtype=dtype)
        modules[key] = module.to(device=device).eval().requires_grad_(False)
    components = Components(name=config.model, turbo=turbo, device=device, dtype=dtype,
                            depth_prior_state=depth_state, controlnets=controlnets, ip_adapter=ip_adapter,
                            **modules)
    from diffstream.models.backends import apply_backend

    apply_backend(components, config.backend)  # in place: the modules stay the same objects
    return components


def is_wan_model(spec: str) -> bool:
    """Whether `--model spec` loads as a Wan video model (`tiny-wan`, a Wan diffusers folder,
    a hub id naming Wan) rather than a Stable Diffusion one; reads configs only."""
    from diffstream.models.wan import is_wan_checkpoint

    return spec == "tiny-wan" or (not _is_single_file(spec) and is_wan_checkpoint(spec))


# The checkpoints `--transformer` is for (README, "Real checkpoints").
TRANSFORMER_HINT = ("a Wan 2.1 transformer checkpoint: StreamDiffusionV2's wan_causal_dmd_v2v/model.pt, Self-Forcing's "
                    "checkpoints/self_forcing_dmd.pt, CausVid's .pt, an original Wan or ComfyUI .safetensors")


def precheck_wan(config: ModelConfig) -> None:
    """The Wan-only model options checked before anything loads (one line each).

    Raises:
        ConfigError: `--transformer` / `--text-encoder-offload` with a model that is not a
            Wan video model, or a `--transformer` path that does not exist.
    """
    from diffstream.errors import ConfigError

    wan_only = [flag for flag, given in (("--transformer", config.transformer),
                                         ("--text-encoder-offload", config.text_encoder_offload),
                                         (f"--{config.quantize}", config.quantize)) if given]
    if not wan_only:
        return
    if not is_wan_model(config.model):
        raise ConfigError(f"{' and '.join(wan_only)} {'are' if len(wan_only) > 1 else 'is'} for Wan video models; "
                          f"--model {config.model} is not one: pass --model Wan-AI/Wan2.1-T2V-1.3B-Diffusers (or a "
                          f"local copy of it; it gives the VAE, UMT5 and tokenizer) or --model tiny-wan")
    if config.transformer and not Path(config.transformer).expanduser().exists():
        raise ConfigError(f"--transformer {config.transformer}: no such file or folder; pass {TRANSFORMER_HINT}")


def load_wan_components(config: ModelConfig, device: torch.device, dtype: torch.dtype):
    """A Wan video model (`--model tiny-wan`, or a Wan diffusers folder or hub id) as
    `models.wan.WanComponents`; the options of image models are refused in one line.

    The VAE stays in fp32 (as diffusers' Wan pipelines keep it); the transformer and the
    text encoder take `dtype`. `--transformer` replaces the model's transformer (the
    folder's own is then not read); with `--text-encoder-offload` the text encoder stays
    on the CPU.
    """
    from diffstream.errors import ConfigError
    from diffstream.models.wan import WanComponents, load_wan_modules, tiny_wan_modules

    extras = [flag for flag, given in (
        ("--lcm-lora", config.lcm_lora and config.lcm_lora.lower() != "none"), ("--lora", config.loras),
        ("--controlnet", config.controlnets), ("--ip-adapter", config.ip_adapter),
        ("--motion-adapter", config.motion_adapter), ("--video-model", config.video_model),
        ("--instruct", config.instruct)) if given]
    if extras:
        raise ConfigError(f"{', '.join(extras)} are for Stable Diffusion models, not a Wan video model: leave "
                          f"{'them' if len(extras) > 1 else 'it'} out")
    if config.backend == "openvino":
        raise ConfigError("--backend openvino runs --method streamdiffusion only (causal-video keeps its KV cache in "
                          "the attention layers): use --backend compile or eager")
    if config.quantize:
        from diffstream.models.quantize import check_quantize

        check_quantize(config.quantize, device)  # before the weights load
    tiny_vae = None
    if config.tiny_vae:  # TAEHV decodes (StreamDiffusionV2's --use_taehv); loaded first: a bad path fails fast
        from diffstream.models.taehv import load_taehv, random_taehv

        tiny_vae = random_taehv(0) if config.tiny_vae == "tiny" else load_taehv(config.tiny_vae)
        tiny_vae = tiny_vae.to(device=device, dtype=dtype).eval().requires_grad_(False)
    if config.model == "tiny-wan":
        modules = tiny_wan_modules()
    else:
        local = Path(config.model).expanduser().is_dir()
        try:
            modules = load_wan_modules(str(Path(config.model).expanduser()) if local else config.model, dtype,
                                       local_files_only=local or hub._offline() or not hub.hub_reachable(),
                                       transformer=not config.transformer)
        except Exception as exc:
            raise ModelLoadError(f"cannot load the Wan model {config.model!r} ({type(exc).__name__}: "
                                 f"{one_line(exc, 160)}): pass a Wan diffusers folder (transformer/, vae/, "
                                 f"text_encoder/, tokenizer/), or --model tiny-wan to try the machinery offline"
                                 ) from None
    if config.transformer:
        from diffstream.models.wan_checkpoints import load_wan_transformer

        modules["transformer"] = load_wan_transformer(Path(config.transformer).expanduser(), dtype=dtype)
        check_wan_parts(modules)
    for key in ("transformer", "text_encoder", "vae"):
        where = torch.device("cpu") if key == "text_encoder" and config.text_encoder_offload else device
        module = modules[key].to(device=where, dtype=torch.float32 if key == "vae" else dtype)
        modules[key] = module.eval().requires_grad_(False)
        if config.quantize and key != "vae":  # the VAE's convolutions stay as they are
            from diffstream.models.quantize import quantize_weights

            quantize_weights(modules[key], config.quantize)
    components = WanComponents(name=config.model, device=device, dtype=dtype,
                               text_encoder_offload=config.text_encoder_offload, tiny_vae=tiny_vae, **modules)
    from diffstream.models.backends import apply_backend

    apply_backend(components, config.backend)  # the transformer, in place (`backends._compile_targets`)
    return components


def check_wan_parts(modules: dict) -> None:
    """A `--transformer` must fit the base model's other parts: its text width is the text
    encoder's, its input channels the VAE's latent channels (ModelLoadError, one line)."""
    cfg = modules["transformer"].config
    text_width = int(modules["text_encoder"].config.d_model)
    latent = int(modules["vae"].config.z_dim)
    if int(cfg.text_dim) != text_width or int(cfg.in_channels) != latent:
        raise ModelLoadError(f"--transformer takes text {cfg.text_dim} wide and {cfg.in_channels} latent channels; "
                             f"--model's text encoder gives {text_width} and its VAE {latent}: pass the base model "
                             f"the checkpoint was trained on (Wan2.1-T2V's diffusers folder for Wan 2.1 checkpoints)")
