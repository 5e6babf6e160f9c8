"""report.html per slide and index.html per run: pages that open in any browser with no network.

The pictures sit beside the page (relative links, the same files a program reads); the style is
inline and there is no script, so the folder can be zipped, mailed or served as it is."""

from __future__ import annotations

import html
import json
from pathlib import Path
from typing import Any

import numpy as np
import shapely

from pathapp.atomic import atomic_path
from pathapp.results.geojson import qc_summary
from pathapp.results.result import SlideResult

REPORT = "report.html"
INDEX = "index.html"
STYLE = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:24px auto;max-width:1200px;
color:#222;padding:0 16px}
h1{font-size:22px;margin-bottom:4px} h2{font-size:17px;margin-top:28px;border-bottom:1px solid #ddd}
.sub{color:#666;font-size:13px} table{border-collapse:collapse;font-size:13px;margin:8px 0}
td,th{border:1px solid #ddd;padding:4px 8px;text-align:left;vertical-align:top} th{background:#f4f4f4}
td.n{text-align:right;font-variant-numeric:tabular-nums} figure{margin:12px 0}
figure img{max-width:100%;height:auto;border:1px solid #ddd} figcaption{font-size:12px;color:#555}
.swatch{display:inline-block;width:12px;height:12px;border:1px solid #555;margin-right:6px;vertical-align:middle}
.grid{display:grid;grid-template-columns:repeat(auto-fill,minmax(360px,1fr));gap:12px}
code{font-size:12px}
"""


def _e(v: Any) -> str:
    return html.escape(str(v))


def _table(rows: list[list[Any]], header: list[str] | None = None, numeric: set[int] | None = None) -> str:
    numeric = numeric or set()
    head = "<tr>" + "".join(f"<th>{_e(h)}</th>" for h in header) + "</tr>" if header else ""
    body = "".join("<tr>" + "".join(f'<td class="n">{_e(c)}</td>' if j in numeric else f"<td>{c}</td>"
                                    for j, c in enumerate(r)) + "</tr>" for r in rows)
    return f"<table>{head}{body}</table>"


def _page(title: str, body: str) -> str:
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{_e(title)}</title>'
            f'<meta name="viewport" content="width=device-width, initial-scale=1">'
            f"<style>{STYLE}</style></head><body>{body}</body></html>\n")


def _figure(name: str, caption: str) -> str:
    return f'<figure><img src="{_e(name)}" alt="{_e(caption)}" loading="eager"><figcaption>{_e(caption)}</figcaption></figure>'


def class_areas(result: SlideResult, regions: dict[str, shapely.Geometry]) -> list[dict[str, Any]]:
    """Per class: tiles, area in mm² (of its region as in annotations.geojson) and mean probability."""
    if result.probs is None or len(result) == 0:
        return []
    labels = np.argmax(result.probs, axis=1)
    rows = []
    for k, name in enumerate(result.class_names):
        n = int(np.count_nonzero(labels == k))
        geom = regions.get(name)
        rows.append({"class": name, "color": tuple(result.class_colors[k]), "tiles": n,
                     "area_mm2": float(geom.area * result.slide_mpp**2 / 1e6) if geom is not None else 0.0,
                     "mean_prob": float(result.probs[labels == k, k].mean()) if n else None})
    return rows


def write_report(result: SlideResult, out_dir: Path, files: list[Path], regions: dict[str, shapely.Geometry],
                 record: dict[str, Any]) -> Path:
    """report.html for one slide: pictures, class areas, QC, model, parameters, timings, files."""
    out = Path(out_dir)
    names = {p.name for p in files}
    r = result
    parts = [f"<h1>{_e(r.slide_name)}</h1>",
             f'<div class="sub">{_e(r.slide_path)} · model {_e(r.model_name)} · finished {_e(record.get("finished", ""))}</div>']
    overview = [["slide size (level 0)", f"{r.slide_size[0]} × {r.slide_size[1]} px"],
                ["slide µm/px", f"{r.slide_mpp:g}"],
                ["tiles", f"{len(r)} of {r.tile_size} px at {r.mpp:g} µm/px ({r.footprint * r.slide_mpp:.0f} µm wide)"],
                ["analysed area", f"{len(r) * (r.footprint * r.slide_mpp) ** 2 / 1e6:.3f} mm²"]]
    prediction = r.params.get("slide_prediction")
    if prediction:
        top = max(prediction, key=prediction.get)
        overview.append(["slide prediction", f"<b>{_e(top)}</b> " + ", ".join(
            f"{_e(k)} {v:.3f}" for k, v in prediction.items())])
    parts += ["<h2>Overview</h2>", _table([[_e(a), b] for a, b in overview])]
    pictures = [("overlay.png", "predicted class per tile over the slide (opacity = probability)"),
                ("thumbnail.png", "the slide"), ("pca.png", "embeddings: first three principal components as RGB")]
    shown = [_figure(n, c) for n, c in pictures if n in names]
    if shown:
        parts += ['<div class="grid">', *shown, "</div>"]
    areas = class_areas(r, regions)
    if areas:
        total = sum(a["area_mm2"] for a in areas) or 1.0
        rows = [[f'<span class="swatch" style="background:rgb{a["color"]}"></span>{_e(a["class"])}', a["tiles"],
                 f'{a["area_mm2"]:.4f}', f'{100 * a["area_mm2"] / total:.1f}',
                 "" if a["mean_prob"] is None else f'{a["mean_prob"]:.3f}'] for a in areas]
        parts += ["<h2>Class areas</h2>",
                  _table(rows, ["class", "tiles", "area (mm²)", "% of classified area", "mean prob"], {1, 2, 3, 4})]
    heatmaps = sorted(n for n in names if n.startswith("heatmap-"))
    if heatmaps:
        parts += ["<h2>Heatmaps</h2>", '<div class="grid">',
                  *[_figure(n, n.removeprefix("heatmap-").removesuffix(".png")) for n in heatmaps], "</div>"]
    explained = sorted(p.name for p in out.glob("saliency-*.png")) + sorted(p.name for p in out.glob("explain-*.png"))
    if explained:
        parts += ["<h2>Explanations (pathapp explain)</h2>", '<div class="grid">',
                  *[_figure(n, n.removesuffix(".png")) for n in explained], "</div>"]
    if r.qc is not None:
        qc = qc_summary(r)
        rows = [[_e(k), qc["tiles"][k], f'{qc["area µm^2"][k] / 1e6:.3f}'] for k in qc["tiles"]]
        parts += ["<h2>Quality control</h2>",
                  f"<p>{qc['tiles measured']} tiles measured, {qc['tiles excluded']} excluded from the model</p>",
                  _table(rows, ["artefact", "tiles", "area (mm²)"], {1, 2})]
    parts += ["<h2>Model and parameters</h2>",
              _table([[_e(k), f"<code>{_e(json.dumps(v, default=str))}</code>"] for k, v in
                      {"model": r.model_name, "fingerprint": r.model_fingerprint[:16], **r.params}.items()])]
    if r.timings:
        parts += ["<h2>Timings</h2>", _table([[_e(k), f"{v:.2f}"] for k, v in r.timings.items()], ["stage", "seconds"], {1})]
    parts += ["<h2>Files</h2>", "<ul>" + "".join(f'<li><a href="{_e(n)}">{_e(n)}</a></li>' for n in sorted(names))
              + "</ul>", f'<div class="sub">pathapp {_e(record.get("versions", {}).get("pathapp"))}</div>']
    path = out / REPORT
    with atomic_path(path) as tmp:
        tmp.write_text(_page(f"pathapp: {r.slide_name}", "".join(parts)), encoding="utf-8")
    return path


def write_index(folder: str | Path) -> Path | None:
    """index.html in a run's output folder: one row per slide folder in it that has a run.json."""
    folder = Path(folder)
    runs = []
    for run_json in sorted(folder.glob("*/run.json")):
        try:
            runs.append((run_json.parent.name, json.loads(run_json.read_text())))
        except (OSError, json.JSONDecodeError):
            continue
    if not runs:
        return None
    rows = []
    for name, rec in runs:
        link = f"{name}/{REPORT}"
        pic = f'<a href="{_e(link)}"><img src="{_e(name)}/overlay.png" alt="{_e(name)}" width="240"></a>' \
            if (folder / name / "overlay.png").is_file() else ""
        counts = rec.get("counts", {})
        classes = ", ".join(f"{_e(k.removeprefix('class: '))} {v}" for k, v in counts.items() if k.startswith("class: "))
        pred = (rec.get("parameters") or {}).get("slide_prediction")
        rows.append([pic, f'<a href="{_e(link)}">{_e(rec.get("slide", name))}</a>', counts.get("tiles", ""),
                     classes or "—", _e(max(pred, key=pred.get)) if pred else "—", _e(rec.get("model", "")),
                     f'{sum((rec.get("timings") or {}).values()):.1f}'])
    body = (f"<h1>pathapp run: {len(runs)} slides</h1><div class=\"sub\">{_e(folder)}</div>"
            + _table(rows, ["", "slide", "tiles", "tiles per class", "slide prediction", "model", "seconds"], {2, 6}))
    path = folder / INDEX
    with atomic_path(path) as tmp:
        tmp.write_text(_page("pathapp run", body), encoding="utf-8")
    return path
