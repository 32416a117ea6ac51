"""Loss and metric curves as inline SVG: live in the widget, static in saved notebooks.

SVG needs no plotting library and no JavaScript, so nbconvert's HTML export
and a notebook opened without a kernel show the same picture.  One small
chart per metric, train and validation on the same axes; a polyline stays
readable at hundreds of epochs.
"""

from __future__ import annotations

import html
import math
from dataclasses import dataclass
from typing import Any

WIDTH, HEIGHT = 260, 150
_PAD_LEFT, _PAD_RIGHT, _PAD_TOP, _PAD_BOTTOM = 48, 8, 20, 24
_LEGEND_LINE = 12  # a legend gets lines of its own under the title, so it never covers it
_CHAR = 6  # about how wide one 10px character is
TRAIN_COLOR, VALIDATION_COLOR = "#1f77b4", "#ff7f0e"
# One color per curve where many share a chart (a sweep's trials), repeating after ten.
PALETTE = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf")
LOG_SPAN = 100  # a series spanning more than this factor is drawn on a log scale
# JupyterLab's theme variables, with fallbacks readable on nbconvert's white page; text uses currentColor.
TEXT = "var(--jp-ui-font-color1, #212121)"
MUTED = "var(--jp-ui-font-color2, #616161)"
GRID = "var(--jp-border-color2, #e0e0e0)"
FRAME = "var(--jp-border-color1, #bdbdbd)"
BACKGROUND = "var(--jp-layout-color1, transparent)"


def metric_groups(rows: list[dict[str, Any]]) -> dict[str, dict[str, list[tuple[int, float]]]]:
    """{"loss": {"loss": [(epoch, value)...], "val_loss": [...]}, "accuracy": {...}}"""
    groups: dict[str, dict[str, list[tuple[int, float]]]] = {}
    for row in rows:
        for key, value in row["logs"].items():
            if not isinstance(value, (int, float)) or not math.isfinite(value):
                continue
            base = key[4:] if key.startswith("val_") else key
            groups.setdefault(base, {}).setdefault(key, []).append((row["epoch"], float(value)))
    return groups


def format_number(value: Any) -> str:
    """A metric as a table shows it: 4 decimals in the usual range, else significant digits (``2.5e-04``, never
    ``0.0000`` for a small learning rate)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return html.escape(str(value))
    if isinstance(value, int):
        return str(value)
    if not math.isfinite(value) or value == 0:
        return str(value) if value else "0.0000"
    if 0.01 <= abs(value) < 100_000:
        return f"{value:.4f}"
    mantissa, exponent = f"{value:.2e}".split("e")
    return f"{mantissa.rstrip('0').rstrip('.')}e{exponent}"


def wants_log_scale(values: list[float]) -> bool:
    """A log axis where every value is positive and they span more than ``LOG_SPAN`` times: else the small ones
    (the best epochs, a decayed learning rate) lie flat on the axis."""
    return bool(values) and min(values) > 0 and max(values) / min(values) > LOG_SPAN


def _ticks(low: float, high: float, count: int = 4) -> list[float]:
    if high <= low:
        return [low]
    step = (high - low) / count
    magnitude = 10 ** math.floor(math.log10(step))
    step = min((m * magnitude for m in (1, 2, 2.5, 5, 10) if m * magnitude >= step), default=step)
    first = math.ceil(low / step) * step
    return [first + i * step for i in range(int((high - first) / step + 1e-9) + 1)]


def _log_ticks(low: float, high: float) -> list[float]:
    """Powers of ten between ``low`` and ``high`` (log10 values), at most five of them."""
    first, last = math.ceil(low - 1e-9), math.floor(high + 1e-9)
    stride = max(1, math.ceil((last - first + 1) / 5))
    return [float(p) for p in range(first, last + 1, stride)] or [low]


def _label(value: float) -> str:
    if value == 0:
        return "0"
    if abs(value) >= 1000 or abs(value) < 0.01:
        mantissa, exponent = f"{value:.1e}".split("e")
        return f"{mantissa.rstrip('0').rstrip('.')}e{exponent}"
    return f"{value:.3g}"


def _legend_lines(names: list[str], width: int) -> list[list[tuple[str, int]]]:
    """Legend entries with their x, wrapped into lines as wide as the plot."""
    lines: list[list[tuple[str, int]]] = [[]]
    x = _PAD_LEFT
    for name in names:
        size = 8 + _CHAR * len(name)
        if lines[-1] and x + size > width - _PAD_RIGHT:
            lines.append([])
            x = _PAD_LEFT
        lines[-1].append((name, x))
        x += size
    return lines


def _cut(text: str, width: float) -> str:
    """``text`` cut with an ellipsis to about ``width`` pixels (the whole of it is in the chart's tooltip)."""
    fits = max(int(width // _CHAR), 4)
    return text if len(text) <= fits else text[: fits - 1] + "…"


def svg_chart(
    title: str,
    series: dict[str, list[tuple[int, float]]],
    colors: dict[str, str] | None = None,
    width: int = WIDTH,
    unit: str = "epoch",
    log: bool | None = None,
) -> str:
    """One chart; each series in its color from ``colors``, else blue for training and orange for validation.

    ``unit`` names the x axis (``step`` for a ``remote_log`` loop).  ``log``
    picks a log y axis; ``None`` picks one when the values span more than
    ``LOG_SPAN`` times.  A legend is drawn only when it tells something the
    title does not, on lines of its own under the title.  Colors follow
    JupyterLab's theme through its CSS variables.
    """
    points = [p for values in series.values() for p in values]
    if not points:
        return ""
    if log is None:
        log = wants_log_scale([p[1] for p in points])
    log = bool(log) and min(p[1] for p in points) > 0
    scale = (lambda v: math.log10(v)) if log else (lambda v: v)
    x_low, x_high = min(p[0] for p in points), max(p[0] for p in points)
    y_low, y_high = min(scale(p[1]) for p in points), max(scale(p[1]) for p in points)
    if y_high == y_low:
        y_low, y_high = y_low - 0.5, y_high + 0.5
    show_legend = list(series) != [title]
    legend = _legend_lines(list(series), width) if show_legend else []
    top = _PAD_TOP + _LEGEND_LINE * len(legend)
    height = HEIGHT + _LEGEND_LINE * len(legend)
    plot = _Plot(x_low, x_high, y_low, y_high, top, width, height)
    scale_name = " (log scale)" if log else ""
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        f'viewBox="0 0 {width} {height}" class="remote-magic-chart" data-metric="{html.escape(title)}" '
        f'data-scale="{"log" if log else "linear"}" '
        f'style="font: 10px var(--jp-ui-font-family, sans-serif); color: {TEXT}; background: {BACKGROUND}">',
        f"<title>{html.escape(title + scale_name)}</title>",
        f'<text x="4" y="12" font-weight="bold" fill="currentColor">{html.escape(_cut(title + scale_name, width - 8))}'
        "</text>",
        f'<rect x="{_PAD_LEFT}" y="{top}" width="{plot.plot_w}" height="{plot.plot_h}" fill="none" '
        f'style="stroke: {FRAME}"/>',
        *_axes(plot, log, unit),
    ]
    where = {name: (x_at, 12 + _LEGEND_LINE * (1 + i)) for i, line in enumerate(legend) for name, x_at in line}
    for name, values in series.items():
        color = (colors or {}).get(name) or (VALIDATION_COLOR if name.startswith("val_") else TRAIN_COLOR)
        parts += _line(plot, name, [(e, scale(v)) for e, v in values], color, where.get(name))
    parts.append("</svg>")
    return "".join(parts)


@dataclass
class _Plot:
    """Where a chart's values land: the data's ranges and the plot area's place in the picture."""

    x_low: float
    x_high: float
    y_low: float
    y_high: float
    top: float
    width: int
    height: int

    @property
    def x_span(self) -> float:
        return max(self.x_high - self.x_low, 1)

    @property
    def plot_w(self) -> float:
        return self.width - _PAD_LEFT - _PAD_RIGHT

    @property
    def plot_h(self) -> float:
        return self.height - self.top - _PAD_BOTTOM

    def x(self, epoch: float) -> float:
        return _PAD_LEFT + (epoch - self.x_low) / self.x_span * self.plot_w

    def y(self, value: float) -> float:
        return self.top + (self.y_high - value) / (self.y_high - self.y_low) * self.plot_h


def _axes(plot: _Plot, log: bool, unit: str) -> list[str]:
    """The y ticks with their grid lines (powers of ten on a log scale), the x ticks and the unit's name."""
    parts = []
    for tick in _log_ticks(plot.y_low, plot.y_high) if log else _ticks(plot.y_low, plot.y_high):
        label = _label(10**tick) if log else _label(tick)
        y = plot.y(tick)
        parts.append(f'<text x="{_PAD_LEFT - 4}" y="{y + 3:.1f}" text-anchor="end" fill="currentColor">{label}</text>')
        parts.append(
            f'<line x1="{_PAD_LEFT}" x2="{plot.width - _PAD_RIGHT}" y1="{y:.1f}" y2="{y:.1f}" style="stroke: {GRID}"/>'
        )
    for tick in _ticks(plot.x_low, plot.x_high):
        if tick == int(tick):
            parts.append(
                f'<text x="{plot.x(tick):.1f}" y="{plot.height - 10}" text-anchor="middle" fill="currentColor">'
                f"{int(tick)}</text>"
            )
    parts.append(
        f'<text x="{plot.width - _PAD_RIGHT}" y="{plot.height - 1}" text-anchor="end" style="fill: {MUTED}">'
        f"{html.escape(unit)}</text>"
    )
    return parts


def _line(
    plot: _Plot, name: str, values: list[tuple[int, float]], color: str, legend_at: tuple[float, float] | None
) -> list[str]:
    """One series (already on the chart's scale): its line, a dot when it has one point, its legend entry."""
    coords = " ".join(f"{plot.x(e):.1f},{plot.y(v):.1f}" for e, v in values)
    parts = [
        f'<polyline data-series="{html.escape(name)}" points="{coords}" fill="none" stroke="{color}" stroke-width="1.5"/>'
    ]
    if len(values) == 1:
        parts.append(f'<circle cx="{plot.x(values[0][0]):.1f}" cy="{plot.y(values[0][1]):.1f}" r="2" fill="{color}"/>')
    if legend_at is not None:
        parts.append(
            f'<text class="remote-magic-legend" x="{legend_at[0]}" y="{legend_at[1]}" fill="{color}">'
            f"{html.escape(name)}</text>"
        )
    return parts


def svg_charts(rows: list[dict[str, Any]], unit: str = "epoch") -> str:
    """One chart per metric, side by side (wrapping), as one HTML fragment; each picks its own scale."""
    charts = [svg_chart(name, series, unit=unit) for name, series in metric_groups(rows).items()]
    return "<div style='display:flex;flex-wrap:wrap;gap:6px'>" + "".join(charts) + "</div>" if charts else ""
