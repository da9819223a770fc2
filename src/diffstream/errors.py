"""User-facing errors: each carries one line that tells the user what to do.

The CLI prints `str(error)` and exits with `exit_code`; it never shows a traceback
for these.
"""


class DiffstreamError(Exception):
    """Base class: a one-line, user-facing message and a process exit code."""

    exit_code = 2


class ConfigError(DiffstreamError):
    """An invalid option; raised before any model loads."""


class InputError(DiffstreamError):
    """An input that cannot be opened or holds no frames (corrupt, empty, not a video)."""


class ModelLoadError(DiffstreamError):
    """A checkpoint that is missing, unreachable or not a supported format."""


class OutputError(DiffstreamError):
    """An output that cannot be created."""


def one_line(text, limit: int = 200) -> str:
    """`text` on one line, shortened at a word boundary (with "…") if over `limit`
    characters: library messages quoted in an error must not end mid-word."""
    text = " ".join(str(text).split())
    if len(text) <= limit:
        return text
    cut = text[: limit - 1]
    if " " in cut:
        cut = cut[: cut.rindex(" ")]
    return cut.rstrip(" ,;:.") + "…"
