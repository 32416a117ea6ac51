"""Loss and metric curves as inline SVG: live in the widget, static in saved notebooks.

SVG needs no plotting library and no JavaScript, so nbconvert's HTML export
and a notebook opened without a kernel show the same picture.  One small
chart per metric, train and validation on the same axes; a polyline stays
readable at hundreds of epochs.
"""

from __future__ import annotations

import html
import math
from typing import Any

WIDTH, HEIGHT = 260, 150
_PAD_LEFT, _PAD_RIGHT, _PAD_TOP, _PAD_BOTTOM = 44, 8, 20, 24
TRAIN_COLOR, VALIDATION_COLOR = "#1f77b4", "#ff7f0e"
# One color per curve where many share a chart (a sweep's trials), repeating after ten.
PALETTE = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf")


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


def _ticks(low: float, high: float, count: int = 4) -> list[float]:
    if high <= low:
        return [low]
    step = (high - low) / count
    magnitude = 10 ** math.floor(math.log10(step))
    step = min((m * magnitude for m in (1, 2, 2.5, 5, 10) if m * magnitude >= step), default=step)
    first = math.ceil(low / step) * step
    return [first + i * step for i in range(int((high - first) / step + 1e-9) + 1)]


def _label(value: float) -> str:
    if value == 0:
        return "0"
    if abs(value) >= 1000 or abs(value) < 0.01:
        return f"{value:.1e}"
    return f"{value:.3g}"


def svg_chart(
    title: str,
    series: dict[str, list[tuple[int, float]]],
    colors: dict[str, str] | None = None,
    width: int = WIDTH,
    unit: str = "epoch",
) -> str:
    """One chart; each series in its color from ``colors``, else blue for training and orange for validation.

    ``unit`` names the x axis (``step`` for a ``remote_log`` loop).  A
    legend is drawn only when it tells something the title does not.
    """
    points = [p for values in series.values() for p in values]
    if not points:
        return ""
    x_low, x_high = min(p[0] for p in points), max(p[0] for p in points)
    y_low, y_high = min(p[1] for p in points), max(p[1] for p in points)
    if y_high == y_low:
        y_low, y_high = y_low - 0.5, y_high + 0.5
    x_span = max(x_high - x_low, 1)
    plot_w, plot_h = width - _PAD_LEFT - _PAD_RIGHT, HEIGHT - _PAD_TOP - _PAD_BOTTOM

    def x(epoch: float) -> float:
        return _PAD_LEFT + (epoch - x_low) / x_span * plot_w

    def y(value: float) -> float:
        return _PAD_TOP + (y_high - value) / (y_high - y_low) * plot_h

    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{HEIGHT}" '
        f'viewBox="0 0 {width} {HEIGHT}" class="remote-magic-chart" data-metric="{html.escape(title)}" '
        'style="font: 10px sans-serif; background: white">',
        f'<text x="{_PAD_LEFT}" y="12" font-weight="bold">{html.escape(title)}</text>',
        f'<rect x="{_PAD_LEFT}" y="{_PAD_TOP}" width="{plot_w}" height="{plot_h}" fill="none" stroke="#ccc"/>',
    ]
    for tick in _ticks(y_low, y_high):
        parts.append(f'<text x="{_PAD_LEFT - 4}" y="{y(tick) + 3:.1f}" text-anchor="end">{_label(tick)}</text>')
        parts.append(
            f'<line x1="{_PAD_LEFT}" x2="{width - _PAD_RIGHT}" y1="{y(tick):.1f}" y2="{y(tick):.1f}" stroke="#eee"/>'
        )
    for tick in _ticks(x_low, x_high):
        if tick == int(tick):
            parts.append(f'<text x="{x(tick):.1f}" y="{HEIGHT - 10}" text-anchor="middle">{int(tick)}</text>')
    parts.append(f'<text x="{width - _PAD_RIGHT}" y="{HEIGHT - 1}" text-anchor="end">{html.escape(unit)}</text>')
    legend_x = _PAD_LEFT + 70
    show_legend = list(series) != [title]
    for name, values in series.items():
        color = (colors or {}).get(name) or (VALIDATION_COLOR if name.startswith("val_") else TRAIN_COLOR)
        coords = " ".join(f"{x(e):.1f},{y(v):.1f}" for e, v in values)
        parts.append(
            f'<polyline data-series="{html.escape(name)}" points="{coords}" fill="none" stroke="{color}" stroke-width="1.5"/>'
        )
        if len(values) == 1:
            parts.append(f'<circle cx="{x(values[0][0]):.1f}" cy="{y(values[0][1]):.1f}" r="2" fill="{color}"/>')
        if show_legend:
            parts.append(f'<text x="{legend_x}" y="12" fill="{color}">{html.escape(name)}</text>')
            legend_x += 8 + 6 * len(name)
    parts.append("</svg>")
    return "".join(parts)


def svg_charts(rows: list[dict[str, Any]], unit: str = "epoch") -> str:
    """One chart per metric, side by side (wrapping), as one HTML fragment."""
    charts = [svg_chart(name, series, unit=unit) for name, series in metric_groups(rows).items()]
    return "<div style='display:flex;flex-wrap:wrap;gap:6px'>" + "".join(charts) + "</div>" if charts else ""
