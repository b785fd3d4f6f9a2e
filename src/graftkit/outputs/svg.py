"""Small inline SVG charts for report.html: no image files, nothing to fetch, readable offline."""

from __future__ import annotations

from html import escape as _e  # the labels are text already


def _ticks(lo: float, hi: float, n: int = 4) -> list[float]:
    return [lo + (hi - lo) * i / n for i in range(n + 1)]


def bar_chart(bars: list[tuple[float, float, float, str]], lines: list[tuple], x_label: str,
              y_label: str, x_range: tuple[float, float] = (0.0, 1.0),
              y_range: tuple[float, float] = (0.0, 1.0), width: int = 380,
              height: int = 240) -> str:
    """A small inline SVG chart: ``bars`` are (x0, x1, height, colour) in [0, 1] units and
    ``lines`` ((x0, y0, x1, y1, colour, dash)); ticks labelled in ``x_range``/``y_range``
    units. Every attribute is quoted: an unquoted ``stroke-dasharray=4/>`` is no self-closing
    tag in HTML, and the axis labels after it vanished into the line."""
    left, bottom = 44, 40
    w, h = width - left - 10, height - bottom - 10

    def px(x, y):
        return left + x * w, 10 + (1 - y) * h

    def num(v: float) -> str:
        return f"{v:.3g}"

    parts = [f"<svg xmlns='http://www.w3.org/2000/svg' width='{width}' height='{height}' "
             f"role='img' aria-label='{_e(y_label)} by {_e(x_label)}' class='chart'>"
             f"<rect x='{left}' y='10' width='{w}' height='{h}' fill='#fafafa' stroke='#ccc'/>"]
    for x0, x1, y, colour in bars:
        (a, top), (b, _) = px(x0, y), px(x1, 0)
        parts.append(f"<rect x='{a:.1f}' y='{top:.1f}' width='{max(b - a - 1, 1):.1f}' "
                     f"height='{10 + h - top:.1f}' fill='{colour}'/>")
    for x0, y0, x1, y1, colour, dash in lines:
        (a, b), (c, d) = px(x0, y0), px(x1, y1)
        dashed = " stroke-dasharray='4'" if dash else ""
        parts.append(f"<line x1='{a:.1f}' y1='{b:.1f}' x2='{c:.1f}' y2='{d:.1f}' "
                     f"stroke='{colour}' stroke-width='2'{dashed}/>")
    for i, v in enumerate(_ticks(*x_range)):
        x, y = px(i / 4, 0)
        parts.append(f"<line x1='{x:.1f}' y1='{y:.1f}' x2='{x:.1f}' y2='{y + 4:.1f}' "
                     f"stroke='#555'/><text class='tick' x='{x:.1f}' y='{y + 15:.1f}' "
                     f"font-size='10' text-anchor='middle'>{num(v)}</text>")
    for i, v in enumerate(_ticks(*y_range)):
        x, y = px(0, i / 4)
        parts.append(f"<line x1='{x - 4:.1f}' y1='{y:.1f}' x2='{x:.1f}' y2='{y:.1f}' "
                     f"stroke='#555'/><text class='tick' x='{x - 6:.1f}' y='{y + 3:.1f}' "
                     f"font-size='10' text-anchor='end'>{num(v)}</text>")
    parts.append(f"<text class='axis' x='{left + w / 2:.1f}' y='{height - 6}' font-size='11' "
                 f"text-anchor='middle'>{_e(x_label)}</text>"
                 f"<text class='axis' x='12' y='{10 + h / 2:.1f}' font-size='11' "
                 f"transform='rotate(-90 12 {10 + h / 2:.1f})' text-anchor='middle'>"
                 f"{_e(y_label)}</text></svg>")
    return "".join(parts)
