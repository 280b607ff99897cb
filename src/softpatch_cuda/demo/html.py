"""The self-contained HTML report of ``softpatch demo`` (no JavaScript, pictures linked)."""

from __future__ import annotations

import html
import math
import os
from pathlib import Path
from typing import Any

from ..report import format_pct


_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:2em auto;max-width:1100px;
     padding:0 1em;color:#222;line-height:1.45}
h1{font-size:1.6em}h2{margin-top:1.8em;border-bottom:1px solid #ddd;padding-bottom:.2em}
table{border-collapse:collapse;margin:.6em 0}th,td{border:1px solid #ccc;padding:.25em .6em;text-align:right}
th{background:#f3f3f3}td.l,th.l{text-align:left}tr.mean td{font-weight:bold;background:#fafafa}
.bar{display:inline-block;height:.7em;background:#4a7bd0;vertical-align:middle;margin-left:.4em}
.bar.px{background:#e0883a}
.grid{display:flex;flex-wrap:wrap;gap:.8em}.card{width:180px;font-size:.8em}
.card img{width:180px;height:auto;image-rendering:auto;border:1px solid #bbb}
table.maps .card,table.maps .card img{width:160px}table.maps th{font-size:.8em;font-weight:normal;vertical-align:top}
.ok{color:#1a7f37}.bad{color:#c0392b}.muted{color:#777}
code{background:#f3f3f3;padding:0 .2em}
"""


def _bar(v: Any, css: str = "") -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return ""
    # Bars start at 50 % (chance level for AUROC), so differences are visible.
    width = max(0.0, min(1.0, (float(v) - 0.5) / 0.5)) * 80
    return f'<span class="bar {css}" style="width:{width:.0f}px"></span>'


def _rel(path: str | os.PathLike, base: Path) -> str:
    """Relative link from the report folder (posix separators, URL-safe enough for our names)."""
    rel = os.path.relpath(Path(path), base)
    return html.escape(Path(rel).as_posix(), quote=True)


def demo_report_html(results: dict, out_dir: str | os.PathLike) -> str:
    """The HTML of ``softpatch demo``'s report from its results dict (see cli.run_demo).

    Expected keys: title, settings (dict), models (list of display names), categories: list of
    {category, metrics: {model: {image_auroc, pixel_auroc, ...}}, flagged: [...], cases: [...],
    planted: int, flag_summary: {...}}, mean: {model: {...}}, elapsed_s.
    Picture paths in the dict are made relative to out_dir.
    """
    base = Path(out_dir)
    esc = html.escape
    models: list[str] = list(results["models"])
    parts: list[str] = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{esc(results.get('title', 'softpatch demo'))}</title>",
        f"<style>{_CSS}</style></head><body>",
        f"<h1>{esc(results.get('title', 'softpatch demo'))}</h1>",
    ]
    settings = results.get("settings", {})
    if settings:
        parts.append("<p class='muted'>" + esc(", ".join(f"{k}: {v}" for k, v in settings.items())) + "</p>")
    explanation = results.get("explanation")
    if explanation:
        parts.append("<h2>What this shows</h2>")
        parts.extend(f"<p>{esc(p)}</p>" for p in explanation)

    # --- accuracy table: image / pixel AUROC side by side per model
    parts.append("<h2>Accuracy on the test images</h2>")
    parts.append(
        "<p>AUROC in percent (50 = chance, 100 = perfect). <em>Image</em>: does the image score rank "
        "defective images above good ones; <em>pixel</em>: does the anomaly map rank defect pixels "
        "above normal ones. Bars start at 50.</p>"
    )
    head = "<tr><th class='l' rowspan='2'>category</th>" + "".join(
        f"<th colspan='2'>{esc(m)}</th>" for m in models
    ) + "</tr><tr>" + "".join("<th>image</th><th>pixel</th>" for _ in models) + "</tr>"
    rows = []
    for cat in results["categories"]:
        cells = "".join(
            f"<td>{format_pct(cat['metrics'].get(m, {}).get('image_auroc'))}{_bar(cat['metrics'].get(m, {}).get('image_auroc'))}</td>"
            f"<td>{format_pct(cat['metrics'].get(m, {}).get('pixel_auroc'))}{_bar(cat['metrics'].get(m, {}).get('pixel_auroc'), 'px')}</td>"
            for m in models
        )
        rows.append(f"<tr><td class='l'>{esc(cat['category'])}</td>{cells}</tr>")
    mean = results.get("mean", {})
    cells = "".join(
        f"<td>{format_pct(mean.get(m, {}).get('image_auroc'))}{_bar(mean.get(m, {}).get('image_auroc'))}</td>"
        f"<td>{format_pct(mean.get(m, {}).get('pixel_auroc'))}{_bar(mean.get(m, {}).get('pixel_auroc'), 'px')}</td>"
        for m in models
    )
    rows.append(f"<tr class='mean'><td class='l'>mean</td>{cells}</tr>")
    parts.append(f"<table>{head}{''.join(rows)}</table>")
    _decisions_section(parts, results, models)

    # --- heatmaps: the same test images under every model
    parts.append("<h2>Anomaly maps: the same test images under every model</h2>")
    parts.append(
        "<p>Anomaly map overlays of a few test images, one row per model (colour: blue = normal, "
        "red = anomalous; each model's colour scale is centred on its own decision threshold, the same "
        "for all images of a category). White outline: the true defect. <em>Best</em> / <em>worst</em> "
        f"are picked by {esc(models[0]) if models else 'the first model'}'s scores: the highest-scored "
        "defective and lowest-scored good image, and the lowest-scored defective and highest-scored good "
        "image (where errors happen first). <em>Recurring defect</em>: a test image that was also planted "
        "in the training set (overlap), the one the last model scores lowest against its threshold.</p>"
    )
    if results.get("colourbar"):
        parts.append(
            f"<p>low <img src='{_rel(results['colourbar'], base)}' alt='colour scale' "
            "style='width:256px;height:12px;vertical-align:middle'> high</p>"
        )
    for cat in results["categories"]:
        cases = cat.get("cases")
        if not cases:
            continue
        head = "<tr><th class='l'>model</th>"
        for case in cases:
            truth = "defect" if case["label"] else "good"
            label = f"<b>{esc(case['kind'])}</b><br>{esc(case['name'])} ({esc(truth)})"
            if case.get("recurring"):
                label += "<br><span class='muted'>also planted in training</span>"
            head += f"<th class='l'>{label}</th>"
        rows = [head + "</tr>"]
        for m in models:  # one row per model, one column per test image
            cells = []
            for case in cases:
                shown = case.get("models", {}).get(m)
                if shown is None:
                    cells.append("<td></td>")
                    continue
                verdict_ok = bool(shown["predicted_anomalous"]) == bool(case["label"])
                verdict = (f"<span class='{'ok' if verdict_ok else 'bad'}'>"
                           f"{'anomalous' if shown['predicted_anomalous'] else 'normal'}</span>")
                cells.append(
                    f"<td class='l'><div class='card'><img src='{_rel(shown['overlay'], base)}' "
                    f"alt='{esc(m)}: {esc(case['name'])}'><br>score {shown['score']:.3g} "
                    f"(threshold {shown['threshold']:.3g}) &rarr; {verdict}</div></td>"
                )
            rows.append(f"<tr><th class='l'>{esc(m)}</th>{''.join(cells)}</tr>")
        parts.append(f"<h3>{esc(cat['category'])}</h3><table class='maps'>{''.join(rows)}</table>")

    # --- contamination: flagged training images
    parts.append("<h2>Contaminated training images found</h2>")
    parts.append(
        "<p>Each training set had defective test images planted in it (the noise protocol). "
        "The model never sees labels; it scores every training image by how much its patches "
        "disagree with the same patches in the other images. Flagged images are listed, most "
        "suspicious first; <span class='ok'>planted</span> means it really was a defect.</p>"
    )
    for cat in results["categories"]:
        fs = cat.get("flag_summary", {})
        summary = (
            f"{fs.get('flagged', 0)} flagged, {fs.get('flagged_planted', 0)} of them planted; "
            f"{fs.get('planted', 0)} planted in {fs.get('n_train', '?')} training images"
        )
        if fs.get("contamination_auroc") is not None:
            summary += f"; AUROC of the contamination score for finding them: {format_pct(fs['contamination_auroc'])}"
        if fs.get("flag_precision") is not None or fs.get("flag_recall") is not None:
            summary += (f"; flags: precision {format_pct(fs.get('flag_precision'))} %, "
                        f"recall {format_pct(fs.get('flag_recall'))} %")
        parts.append(f"<h3>{esc(cat['category'])}</h3><p>{esc(summary)}</p>")
        if not cat.get("flagged"):
            parts.append("<p class='muted'>No training image was flagged.</p>")
            continue
        cards = []
        for item in cat["flagged"]:
            verdict = (
                "<span class='ok'>planted defect</span>" if item["planted"] else "<span class='bad'>normal image</span>"
            )
            img = f"<img src='{_rel(item['thumbnail'], base)}' alt='{esc(item['name'])}'>" if item.get("thumbnail") else ""
            cards.append(
                f"<div class='card'>{img}<br>{esc(item['name'])}<br>score {item['score']:.3g} &mdash; {verdict}</div>"
            )
        parts.append(f"<div class='grid'>{''.join(cards)}</div>")

    footer = results.get("footer")
    if footer:
        parts.append(f"<p class='muted'>{esc(footer)}</p>")
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"


def _decisions_section(parts: list[str], results: dict, models: list[str]) -> None:
    """What each model decides at its threshold: defects caught, recurring defects caught
    (overlap), false alarms, per category and in total."""
    if not any(cat.get("decisions") for cat in results["categories"]):
        return
    esc = html.escape
    parts.append("<h2>Decisions at the threshold</h2>")
    parts.append(
        "<p>Each model calls a test image anomalous when its score is above the model's decision "
        "threshold (set without labels at fit: median + 3&middot;1.4826&middot;MAD of the scores of "
        "training images left out of the memory bank). <em>Caught</em>: defective test images called "
        "anomalous; <em>recurring</em>: of those, the ones that were also planted in the training set; "
        "<em>false alarms</em>: good test images called anomalous.</p>"
    )
    head = "<tr><th class='l' rowspan='2'>category</th>" + "".join(
        f"<th colspan='4'>{esc(m)}</th>" for m in models
    ) + "</tr><tr>" + "".join(
        "<th>threshold</th><th>defects caught</th><th>recurring caught</th><th>false alarms</th>" for _ in models
    ) + "</tr>"

    def cells(d: dict | None, with_threshold: bool) -> str:
        if not d:
            return "<td></td>" * 4
        recurring = f"{d['recurring_caught']} of {d['recurring']}" if d.get("recurring") else "&ndash;"
        threshold = f"{d['threshold']:.4g}" if with_threshold else "per category"
        return (f"<td>{threshold}</td><td>{d['caught']} of {d['defects']}</td><td>{recurring}</td>"
                f"<td>{d['false_alarms']} of {d['good']}</td>")

    rows = [
        f"<tr><td class='l'>{esc(cat['category'])}</td>"
        + "".join(cells(cat.get("decisions", {}).get(m), True) for m in models) + "</tr>"
        for cat in results["categories"]
    ]
    total = results.get("decisions_total")
    if total:
        rows.append("<tr class='mean'><td class='l'>all</td>"
                    + "".join(cells(total.get(m), False) for m in models) + "</tr>")
    parts.append(f"<table>{head}{''.join(rows)}</table>")


def write_demo_report(results: dict, out_dir: str | os.PathLike) -> Path:
    """Write out_dir/report.html (pictures must already be under out_dir)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "report.html"
    path.write_text(demo_report_html(results, out_dir), encoding="utf-8")
    return path
