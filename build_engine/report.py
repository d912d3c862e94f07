"""The accuracy gate's report: a markdown page and an SVG picture next to it, for people.

manifest.json's `quality` holds the same figures for machines; this is what an operator opens to
decide whether a quantized build is good enough or a threshold should move. The markdown shows
every figure next to its threshold and margin, the per-canary greedy answers of the candidate
beside the fp32 reference's (where the eye spots drift faster than in token ids), and the sizes.
The SVG is hand-written (no plotting library on the build path) and shows at a glance: how far
each canary's greedy answer follows the reference, and whether top-1 agreement decays along the
sequence (a symptom of KV-cache or positional errors) or is uniformly lower (weight rounding).
"""

from __future__ import annotations

import math
from pathlib import Path
from xml.sax.saxutils import escape

from build_engine.gate import CanaryAgreement, GateReport

_TEXT_LIMIT = 160  # characters of each canary answer shown in the markdown table
_GREEN, _RED, _AMBER, _GREY = "#2e7d32", "#c62828", "#ef8f00", "#9e9e9e"


def write_report(
    report: GateReport,
    out_path: Path,
    *,
    bundle_name: str,
    precision: str,
    target: str,
    sizes: dict[str, int],
) -> None:
    """Write `out_path` (markdown) and the SVG it shows, `out_path` with the suffix `.svg`."""
    svg_path = out_path.with_suffix(".svg")
    out_path.parent.mkdir(parents=True, exist_ok=True)
    svg_path.write_text(render_svg(report, bundle_name=bundle_name), encoding="utf-8")
    markdown = render_markdown(
        report,
        bundle_name=bundle_name,
        precision=precision,
        target=target,
        sizes=sizes,
        svg_name=svg_path.name,
    )
    out_path.write_text(markdown, encoding="utf-8")


# --- markdown ------------------------------------------------------------------------------------


def render_markdown(
    report: GateReport,
    *,
    bundle_name: str,
    precision: str,
    target: str,
    sizes: dict[str, int],
    svg_name: str,
) -> str:
    t = report.thresholds
    verdict = "PASSED" if report.passed else "FAILED"
    lines = [
        f"# Accuracy gate: {_md(bundle_name)}",
        "",
        f"**{verdict}**: the {precision} graph for target `{target}` against the fp32 reference "
        f"of the same model (measured in {report.seconds:.0f} s on ONNX Runtime CPU).",
        "",
    ]
    failures = report.failures
    if failures:
        lines += ["Missed thresholds:", ""]
        lines += [f"- {_md(f)}" for f in failures]
        lines.append("")
    ratio = report.ppl_ratio
    lines += [
        "| measure | value | threshold | margin | |",
        "| --- | --- | --- | --- | --- |",
        _row(
            f"next-token top-1 agreement ({report.sequences} held-out windows x "
            f"{report.seq_len} tokens)",
            f"{report.top1_agreement:.4f}",
            f">= {t.min_top1:.3f}",
            report.top1_agreement - t.min_top1,
        ),
        _row(
            f"perplexity ratio (candidate {_fmt(report.candidate_ppl)} / fp32 "
            f"{_fmt(report.reference_ppl)})",
            f"{ratio:.4f}",
            f"<= {t.max_ppl_ratio:.3f}",
            t.max_ppl_ratio - ratio,
        ),
        _row(
            f"golden greedy agreement (mean over {len(report.canaries)} canaries, "
            f"{report.golden_exact} exact)",
            f"{report.golden_mean:.3f}",
            f">= {t.min_golden:.3f}",
            report.golden_mean - t.min_golden,
        ),
        _row(
            "held-out positions with NaN/inf logits",
            str(report.nonfinite_positions),
            "= 0",
            None if report.nonfinite_positions == 0 else -float(report.nonfinite_positions),
        ),
        "",
        f"![accuracy gate figures]({svg_name})",
        "",
        "## Top-1 agreement by position",
        "",
        "A drop towards later positions points at the attention / KV cache path; a uniform "
        "drop at the weights.",
        "",
        "| positions | agreement |",
        "| --- | --- |",
    ]
    for index, value in enumerate(report.top1_by_bucket):
        start = index * report.bucket_size
        stop = min(start + report.bucket_size, report.seq_len) - 1
        lines.append(f"| {start}-{stop} | {value:.4f} |")
    lines += [
        "",
        "## Golden canaries (greedy)",
        "",
        "Agreement = common prefix of the token ids / the longer of the two answers.",
        "",
        "| canary | common prefix | agreement | fp32 reference | candidate |",
        "| --- | --- | --- | --- | --- |",
    ]
    lines += [_canary_row(c) for c in report.canaries]
    lines += ["", "## Sizes", "", "| | bytes | MB | vs fp32 |", "| --- | --- | --- | --- |"]
    base = sizes.get("fp32")
    for name, size in sizes.items():
        versus = f"{size / base:.2f}x" if base else ""
        lines.append(f"| {_md(name)} | {size:,} | {size / 1e6:.1f} | {versus} |")
    lines += [
        "",
        "## Thresholds",
        "",
        f"Used for this build (the {report.precision} defaults unless overridden): "
        f"`--min-top1 {t.min_top1:g} --max-ppl-ratio {t.max_ppl_ratio:g} "
        f"--min-golden {t.min_golden:g}`. How the defaults were chosen is documented in "
        "`build_engine/gate.py`.",
        "",
    ]
    return "\n".join(lines)


def _row(measure: str, value: str, threshold: str, margin: float | None) -> str:
    """`margin` > 0 is room to spare, < 0 the shortfall; None when there is nothing to show."""
    ok = margin is None or margin >= 0  # a NaN margin fails
    shown = "" if margin is None else f"{margin:+.4f}" if math.isfinite(margin) else "n/a"
    return f"| {_md(measure)} | {value} | {threshold} | {shown} | {'pass' if ok else '**FAIL**'} |"


def _canary_row(c: CanaryAgreement) -> str:
    prefix = f"{c.common_prefix}/{c.longest}"
    marker = " (exact)" if c.exact else ""
    return (
        f"| {_md(c.name)} | {prefix}{marker} | {c.agreement:.2f} | {_md(_clip(c.expected_text))} "
        f"| {_md(_clip(c.candidate_text))} |"
    )


def _clip(text: str) -> str:
    return text if len(text) <= _TEXT_LIMIT else text[: _TEXT_LIMIT - 1] + "…"


def _md(text: str) -> str:
    """Safe inside a markdown table cell: no pipes, no line breaks, no raw HTML."""
    return (
        text.replace("\\", "\\\\")
        .replace("|", "\\|")
        .replace("<", "&lt;")
        .replace(">", "&gt;")
        .replace("\r", "")
        .replace("\n", "⏎")
    )


def _fmt(value: float) -> str:
    return f"{value:.3f}" if math.isfinite(value) else str(value)


# --- SVG -----------------------------------------------------------------------------------------

_WIDTH = 760
_PANEL_TOP = 86
_ROW = 24


def render_svg(report: GateReport, *, bundle_name: str) -> str:
    """Two panels: per-canary greedy agreement (left), top-1 agreement by position (right)."""
    t = report.thresholds
    rows = max(len(report.canaries), 1)
    panel_height = max(rows * _ROW, 150)
    height = _PANEL_TOP + panel_height + 60
    verdict, colour = ("PASSED", _GREEN) if report.passed else ("FAILED", _RED)
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{_WIDTH}" height="{height}" '
        f'viewBox="0 0 {_WIDTH} {height}" font-family="sans-serif" font-size="12">',
        f"<title>Accuracy gate: {escape(bundle_name)} {verdict}</title>",
        f'<rect width="{_WIDTH}" height="{height}" fill="white"/>',
        _text(16, 26, f"{bundle_name}: {report.precision} vs fp32", size=16, weight="bold"),
        _text(_WIDTH - 16, 26, verdict, size=16, weight="bold", fill=colour, anchor="end"),
        _text(
            16,
            50,
            f"top-1 {report.top1_agreement:.3f} (≥ {t.min_top1:.2f})   "
            f"ppl ratio {report.ppl_ratio:.3f} (≤ {t.max_ppl_ratio:.2f})   "
            f"golden {report.golden_mean:.2f} (≥ {t.min_golden:.2f}), "
            f"{report.golden_exact}/{len(report.canaries)} exact",
            fill="#333333",
        ),
    ]
    parts += _canary_panel(report, x=16, y=_PANEL_TOP, width=340, height=panel_height)
    parts += _position_panel(report, x=404, y=_PANEL_TOP, width=340, height=panel_height)
    parts.append("</svg>")
    return "\n".join(parts) + "\n"


def _canary_panel(report: GateReport, *, x: int, y: int, width: int, height: int) -> list[str]:
    label_w, value_w = 96, 44
    bar_x, bar_w = x + label_w, width - label_w - value_w
    out = [_text(x, y - 12, "Golden canaries: greedy common prefix", weight="bold")]
    out.append(_rect(bar_x, y, bar_w, height, fill="#f5f5f5"))
    for index, canary in enumerate(report.canaries):
        row_y = y + index * _ROW + 4
        fill = _GREEN if canary.exact else (_AMBER if canary.agreement > 0 else _RED)
        out.append(_text(bar_x - 6, row_y + 12, _short(canary.name, 14), anchor="end"))
        out.append(_rect(bar_x, row_y, max(bar_w * canary.agreement, 1.0), _ROW - 8, fill=fill))
        out.append(
            _text(
                bar_x + bar_w + 4,
                row_y + 12,
                f"{canary.common_prefix}/{canary.longest}",
            )
        )
    line_x = bar_x + bar_w * min(max(report.thresholds.min_golden, 0.0), 1.0)
    mean_x = bar_x + bar_w * min(max(report.golden_mean, 0.0), 1.0)
    out.append(_vline(line_x, y, y + height, _RED, dashed=True))
    out.append(_vline(mean_x, y, y + height, "#1565c0", dashed=False))
    out.append(_text(bar_x, y + height + 16, "0"))
    out.append(_text(bar_x + bar_w, y + height + 16, "1", anchor="end"))
    out.append(
        _text(
            x,
            y + height + 34,
            f"blue = mean {report.golden_mean:.2f}, dashed = threshold "
            f"{report.thresholds.min_golden:.2f}, green = exact",
            fill="#555555",
            size=11,
        )
    )
    return out


def _position_panel(report: GateReport, *, x: int, y: int, width: int, height: int) -> list[str]:
    axis_w = 36
    plot_x, plot_w = x + axis_w, width - axis_w
    values = list(report.top1_by_bucket)
    threshold = report.thresholds.min_top1
    # Zoom the y axis onto the interesting range: agreement near 1.0 would otherwise be a wall.
    finite = [v for v in [*values, threshold] if math.isfinite(v)]
    low = max(0.0, math.floor((min(finite) - 0.05) * 10) / 10) if finite else 0.0
    high = 1.0 if max(finite, default=1.0) <= 1.0 else math.ceil(max(finite) * 10) / 10
    span = max(high - low, 1e-9)

    def y_of(value: float) -> float:
        return y + height - height * (min(max(value, low), high) - low) / span

    out = [_text(x, y - 12, "Top-1 agreement by position (held-out)", weight="bold")]
    out.append(_rect(plot_x, y, plot_w, height, fill="#f5f5f5"))
    for tick in (low, (low + high) / 2, high):
        out.append(_text(plot_x - 4, y_of(tick) + 4, f"{tick:.2f}", anchor="end", size=10))
    slot = plot_w / max(len(values), 1)
    for index, value in enumerate(values):
        top = y_of(value) if math.isfinite(value) else y + height
        fill = _GREEN if value >= threshold else _RED
        out.append(_rect(plot_x + index * slot + 3, top, slot - 6, y + height - top, fill=fill))
        start = index * report.bucket_size
        out.append(
            _text(plot_x + (index + 0.5) * slot, y + height + 14, str(start), anchor="middle")
        )
    line_y = y_of(threshold)
    out.append(
        f'<line x1="{plot_x}" y1="{line_y:.1f}" x2="{plot_x + plot_w}" y2="{line_y:.1f}" '
        f'stroke="{_RED}" stroke-width="1.5" stroke-dasharray="5,3"/>'
    )
    out.append(
        _text(
            x,
            y + height + 34,
            f"bar = {report.bucket_size} positions; dashed = threshold {threshold:.2f}",
            fill="#555555",
            size=11,
        )
    )
    return out


def _short(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _text(
    x: float,
    y: float,
    content: str,
    *,
    size: int = 12,
    weight: str = "normal",
    fill: str = "#000000",
    anchor: str = "start",
) -> str:
    return (
        f'<text x="{x:.1f}" y="{y:.1f}" font-size="{size}" font-weight="{weight}" '
        f'fill="{fill}" text-anchor="{anchor}">{escape(content)}</text>'
    )


def _rect(x: float, y: float, width: float, height: float, *, fill: str) -> str:
    return (
        f'<rect x="{x:.1f}" y="{y:.1f}" width="{max(width, 0.0):.1f}" '
        f'height="{max(height, 0.0):.1f}" fill="{fill}"/>'
    )


def _vline(x: float, y1: float, y2: float, colour: str, *, dashed: bool) -> str:
    dash = ' stroke-dasharray="5,3"' if dashed else ""
    return (
        f'<line x1="{x:.1f}" y1="{y1:.1f}" x2="{x:.1f}" y2="{y2:.1f}" stroke="{colour}" '
        f'stroke-width="1.5"{dash}/>'
    )
