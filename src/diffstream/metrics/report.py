"""Reporting helpers shared by `eval` and `bench`: number formatting, markdown tables,
JSON files and matplotlib figures drawn without pyplot."""

from __future__ import annotations

import json
import math
import os
from typing import Optional

from diffstream.errors import ConfigError, OutputError


def finite_or_none(x) -> Optional[float]:
    """A float for JSON: None stays None, NaN becomes None."""
    if x is None:
        return None
    x = float(x)
    return None if math.isnan(x) else x


def fmt(x, digits: int = 5) -> str:
    """Table cell: `digits` significant digits (102.99, 0.0015843, 96.583), or "n/a"."""
    x = finite_or_none(x)
    return "n/a" if x is None else f"{x:.{digits}g}"


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    """A GitHub-style markdown table with padded columns.

    Args:
        header: column titles (C strings).
        rows: R rows of C cells each (already formatted strings).
    Returns:
        the table as one string of R + 2 lines (no trailing newline).
    """
    widths = [max(len(str(c)) for c in col) for col in zip(header, *rows)]

    def line(cells):
        return "| " + " | ".join(str(c).ljust(w) for c, w in zip(cells, widths)) + " |"

    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([line(header), sep] + [line(r) for r in rows])


def check_output_path(path: Optional[str], option: str, suffixes: tuple[str, ...] = ()) -> None:
    """Fail before any work if `path` (for `option`) cannot be written.

    Raises:
        ConfigError: wrong suffix, or its folder does not exist.
    """
    if path is None:
        return
    if suffixes and not str(path).lower().endswith(suffixes):
        raise ConfigError(f"{option} must name a {'/'.join(suffixes)} file, got {path!r}")
    folder = os.path.dirname(os.path.abspath(os.path.expanduser(str(path))))
    if not os.path.isdir(folder):
        raise ConfigError(f"cannot write {option} {path!r}: folder {folder!r} does not exist")


def write_json(path: str, data: dict) -> None:
    """Write `data` as indented JSON (NaN must already be None). Raises OutputError."""
    try:
        with open(os.path.expanduser(path), "w", encoding="utf-8") as f:
            json.dump(data, f, indent=2, allow_nan=False)
            f.write("\n")
    except OSError as exc:
        raise OutputError(f"cannot write {path!r}: {exc.strerror or exc}") from None


# The y label of every warp-error plot. What `metrics.warp` computes: the mean squared
# difference between output t and output t-1 warped by the input's flow, over the
# non-occluded pixels and the 3 channels, pixel values on the 0-255 scale (0 .. 255^2).
WARP_ERROR_LABEL = "warp error (MSE, pixels 0-255)"


def wide_range(values, ratio: float = 30.0) -> bool:
    """Whether the finite `values` are all positive and span more than `ratio`: a log
    axis then shows the small ones, which a linear axis squashes onto zero."""
    finite = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    return bool(finite) and min(finite) > 0 and max(finite) / min(finite) > ratio


def legend_beside(ax, **kwargs) -> None:
    """The legend of `ax` to the right of its axes (never over a curve), if it has entries."""
    handles, labels = kwargs.pop("handles", None), kwargs.pop("labels", None)
    if handles is None:
        handles, labels = ax.get_legend_handles_labels()
    if handles:
        ax.legend(handles, labels, fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0,
                  **kwargs)


def new_figure(rows: int, width: float = 9.0, row_height: float = 3.2):
    """A matplotlib Figure with `rows` stacked axes, drawn with the Agg canvas.

    pyplot is not used, so no global backend is switched and no window can open.
    Returns:
        (figure, list of `rows` axes).
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, row_height * rows), dpi=100)
    FigureCanvasAgg(fig)
    axes = [fig.add_subplot(rows, 1, i + 1) for i in range(rows)]
    return fig, axes


def save_figure(fig, path: str) -> None:
    """Save a figure from `new_figure` as PNG. Raises OutputError."""
    fig.tight_layout()
    try:
        fig.savefig(os.path.expanduser(path), format="png", bbox_inches="tight")
    except OSError as exc:
        raise OutputError(f"cannot write {path!r}: {exc.strerror or exc}") from None
