"""What a Wan model will hold on the GPU, known before any weight loads (issue #18).

`wan_parts` reads what `models.wan_checkpoints.estimate_vram` needs of a `--model` (and
`--transformer`) from configs and tensor shapes only: the transformer's config (tiny-wan:
built on the meta device; a folder: transformer/config.json; a `--transformer` file: its
tensor shapes, `wan_checkpoints.checkpoint_config`), the text encoder's and the VAE's
parameter counts (UMT5's from its config.json by formula, the VAE built from its config
on the meta device), the text length. `stream_estimate` turns that and the stream settings
into the estimate, as diffstream runs a stream: one row per stream (the denoising steps
run one after another), the VAE in fp32 (as `models.loading` keeps it), the text encoder
at the load dtype unless offloaded.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from diffstream.config import ModelConfig
from diffstream.errors import ModelLoadError, one_line


@dataclass(frozen=True)
class WanParts:
    """What the memory estimate needs to know of a Wan model.

    Attributes:
        transformer: `WanTransformer3DModel` config (dict).
        text_encoder: `umt5_encoder_parameters`-style counts {"total", "linear_weights",
            "linear_rows"} (parameters).
        vae: the VAE's parameter count.
        text_len: tokens per prompt embedding.
    """

    transformer: dict
    text_encoder: dict
    vae: int
    text_len: int


def _module_counts(module: torch.nn.Module) -> dict:
    """{"total", "linear_weights", "linear_rows"} of a module (parameters; tied ones once);
    the Linear counts are those int8 quantizes (`models.quantize`: not the modules the
    model keeps in fp32, e.g. T5's `wo`), as `umt5_encoder_parameters` counts them."""
    keep = tuple(getattr(module, "_keep_in_fp32_modules", None) or ())
    linears = [m for n, m in module.named_modules()
               if isinstance(m, torch.nn.Linear) and not any(k in n.split(".") for k in keep)]
    return {"total": sum(p.numel() for p in module.parameters()),
            "linear_weights": sum(m.weight.numel() for m in linears),
            "linear_rows": sum(m.out_features for m in linears)}


def _tiny_parts() -> WanParts:
    """tiny-wan's parts, built on the meta device (no memory, no init)."""
    from diffstream.models.wan import WAN_MAX_TEXT_TOKENS, tiny_wan_text_encoder, tiny_wan_transformer, tiny_wan_vae

    with torch.device("meta"):
        transformer, text_encoder, vae = tiny_wan_transformer(), tiny_wan_text_encoder(), tiny_wan_vae()
    return WanParts(transformer=dict(transformer.config), text_encoder=_module_counts(text_encoder),
                    vae=_module_counts(vae)["total"], text_len=min(WAN_MAX_TEXT_TOKENS, 77))  # CLIP's 77 tokens


def _folder_file(spec: str, name: str) -> Path | None:
    """`name` (e.g. "transformer/config.json") of a local folder or a hub id in the local
    cache (or fetched: a small JSON file, when the hub is reachable); None if unavailable."""
    path = Path(spec).expanduser()
    if path.is_dir():
        return path / name if (path / name).is_file() else None
    from diffstream.models import hub

    try:
        from huggingface_hub import hf_hub_download

        local_only = hub._offline() or not hub.hub_reachable()
        return Path(hf_hub_download(spec, name, local_files_only=local_only))
    except Exception:  # not cached, no network, not a repo: no estimate
        return None


def _read_json(path: Path | None) -> dict | None:
    if path is None:
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def wan_parts(config: ModelConfig) -> WanParts | None:
    """The parts of `config`'s Wan model, from configs and shapes only (no weights read).

    Returns:
        the parts, or None when the folder's configs are not available here (a hub id not
        in the local cache and no network): then no estimate can be made before loading.
    Raises:
        ModelLoadError: a `--transformer` whose config cannot be read off its tensors.
    """
    from diffstream.models.wan import WAN_MAX_TEXT_TOKENS
    from diffstream.models.wan_checkpoints import checkpoint_config, umt5_encoder_parameters

    if config.model == "tiny-wan":
        parts = _tiny_parts()
    else:
        transformer = _read_json(_folder_file(config.model, "transformer/config.json"))
        text = _read_json(_folder_file(config.model, "text_encoder/config.json"))
        vae_config = _read_json(_folder_file(config.model, "vae/config.json"))
        if transformer is None and not config.transformer or text is None or vae_config is None:
            return None
        tokenizer = _read_json(_folder_file(config.model, "tokenizer/tokenizer_config.json")) or {}
        try:
            counts = umt5_encoder_parameters(vocab=text["vocab_size"], d_model=text["d_model"], d_ff=text["d_ff"],
                                             layers=text["num_layers"], heads=text["num_heads"], d_kv=text["d_kv"],
                                             buckets=text.get("relative_attention_num_buckets", 32))
            from diffusers import AutoencoderKLWan

            with torch.device("meta"):
                vae = AutoencoderKLWan.from_config(vae_config)
        except Exception as exc:  # noqa: BLE001  (a config another version wrote)
            raise ModelLoadError(f"{config.model}: its text_encoder/ or vae/ config is not Wan 2.1's "
                                 f"({one_line(exc, 120)})") from None
        max_len = tokenizer.get("model_max_length", WAN_MAX_TEXT_TOKENS)
        text_len = int(min(WAN_MAX_TEXT_TOKENS, max_len if isinstance(max_len, (int, float)) else WAN_MAX_TEXT_TOKENS))
        parts = WanParts(transformer=transformer or {}, text_encoder=counts, vae=_module_counts(vae)["total"],
                         text_len=text_len)
    if config.transformer:
        parts = WanParts(transformer=checkpoint_config(Path(config.transformer).expanduser()),
                         text_encoder=parts.text_encoder, vae=parts.vae, text_len=parts.text_len)
    return parts


def stream_estimate(parts: WanParts, width: int, height: int, block_causal, *, dtype_bytes: int,
                    text_encoder_offload: bool, rows: int = 1, weights_int8: bool = False) -> dict:
    """`estimate_vram` of streams at `width` x `height` pixels on these parts.

    Args:
        parts: `wan_parts`'s.
        width, height: the processing size in pixels (multiples of 16).
        block_causal: `attention.block_causal.BlockCausalConfig` (chunk, sinks, window).
        dtype_bytes: bytes per element of the transformer, text encoder, cache (2 or 4).
        text_encoder_offload: the text encoder stays on the CPU.
        weights_int8: int8 (or fp8) Linear weights (`--int8` / `--fp8`).
        rows: streams held at once, each with its own KV cache and prompt embeddings
            (`diffstream run`: 1; `serve`: --max-clients); their activations are counted
            per row too, an upper bound (the server runs one stream at a time).
    Returns:
        `estimate_vram`'s dict (bytes per item, "total", "settings").
    """
    from diffstream.models.wan_checkpoints import estimate_vram

    return estimate_vram(parts.transformer, height, width, steps=1, chunk_frames=block_causal.chunk_frames,
                         sink_chunks=block_causal.sink_chunks, window_chunks=block_causal.window_chunks,
                         dtype_bytes=dtype_bytes, text_encoder_offload=text_encoder_offload, rows=rows,
                         weights_int8=weights_int8,
                         text_encoder_params=parts.text_encoder, vae_params=parts.vae, vae_dtype_bytes=4,
                         text_len=parts.text_len)


def summary_line(estimate: dict, free_bytes: int | None = None) -> str:
    """One line: the total, its largest items, and the free memory if known (GiB)."""
    gib = 2**30
    items = sorted(((b, k) for k, b in estimate.items() if k not in ("total", "settings") and b), reverse=True)
    shown = ", ".join(f"{k.replace('_', ' ')} {b / gib:.1f}" for b, k in items[:4])
    free = f"; {free_bytes / gib:.1f} GiB free" if free_bytes is not None else ""
    return f"GPU memory estimate {estimate['total'] / gib:.1f} GiB ({shown}){free}"
