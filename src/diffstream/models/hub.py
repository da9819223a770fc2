"""Hub access: whether the Hugging Face hub may be asked, and loading checkpoint parts.

`hub_kwargs` decides, once per load, whether `from_pretrained` may go to the hub or
must use the local cache only (an unreachable hub otherwise costs about a minute of
retries); the loaders in `models.loading`, `models.motion`, `models.depth` and
`metrics.clip` all decide through these helpers. `load_pretrained_parts` loads the parts of one checkpoint
(model, processor, tokenizer...) and turns any failure into one `ModelLoadError` line
naming the option to pass instead.
"""

from __future__ import annotations

import os
from pathlib import Path

from diffstream.errors import ModelLoadError, one_line


def hub_kwargs(name: str, local_files_only: bool | None = None) -> dict:
    """`from_pretrained` keyword arguments for a hub id or folder.

    With the hub unreachable, from_pretrained retries for about a minute before it
    fails; asking for the local cache only fails (or succeeds) at once.
    """
    if local_files_only is not None:
        return {"local_files_only": bool(local_files_only)}
    if Path(name).expanduser().is_dir() or _offline() or not hub_reachable():
        return {"local_files_only": True}
    return {}


def load_pretrained_parts(name: str, loaders, what: str, flag: str, local_files_only: bool | None = None):
    """Load several `from_pretrained` parts (model, processor, tokenizer...) of one checkpoint.

    Args:
        name: hub id or local folder ("~" expanded).
        loaders: classes with `from_pretrained`, loaded in order.
        what: what it is, for messages ("CLIP model"); flag: the option to name ("--clip-model").
    Returns:
        tuple of the loaded parts.
    Raises:
        ModelLoadError: one line naming `flag PATH`.
    """
    path = os.path.expanduser(name)
    looks_like_path = os.sep in name and (name.startswith((".", "/", "~")) or os.path.isabs(name))
    if looks_like_path and not os.path.isdir(path):
        raise ModelLoadError(f"{what} folder {name!r} does not exist; pass {flag} PATH to a local checkpoint folder")
    kwargs = hub_kwargs(name, local_files_only)
    source = path if looks_like_path else name
    try:
        return tuple(loader.from_pretrained(source, **kwargs) for loader in loaders)
    except ImportError:
        raise
    except Exception as exc:  # OSError, hub errors, bad configs: all mean "can't load"
        reason = one_line(exc, 160)
        raise ModelLoadError(
            f"cannot load {what} {name!r} ({type(exc).__name__}: {reason}); pass {flag} PATH to a local checkpoint folder"
        ) from exc


def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the Hugging Face hub answers at all (checked once, fast, no retries)."""
    import socket
    from urllib.parse import urlparse

    host = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname or "huggingface.co"
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False")
