"""``softpatch demo``: generate the demo data, plant defective images in the training
sets, fit SoftPatch+ and PatchCore per category, and write an HTML report."""

from __future__ import annotations

import datetime as _dt
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from ..errors import UsageError
from ..report import format_pct

DEMO_SIZES = {
    # Same sizes as benchmarks/results/accuracy_cpu.md (20 + 20 test images: AUROC moves in
    # steps of 0.25 points, not 1.25). With the optimised kernels the default demo (6
    # categories x 2 models, pretrained efficientnet_lite0, 128 px) takes well under a
    # minute on the project's idle 2-core CPU; the budget is 3 minutes.
    "default": {"n_train": 30, "n_test_good": 20, "n_test_defect": 20, "image_size": 128},
    "quick": {"n_train": 12, "n_test_good": 5, "n_test_defect": 6, "image_size": 96},
}
DEMO_MODELS = ("softpatch-plus", "patchcore")
DEMO_MARKER = ".softpatch-demo"

DEMO_EXPLANATION = [
    "Industrial inspection data is rarely clean: a training set of 'good' parts often hides a few "
    "defective ones. PatchCore memorises every training patch, defects included, and then accepts "
    "the same defects at test time. SoftPatch / SoftPatch+ compare each training patch with the "
    "patches at the same place in the other training images, drop the outliers from the memory bank "
    "and down-weight the rest, without any labels.",
    "This demo generated a small dataset (textures and rendered objects with synthetic defects), "
    "planted defective images in each training set (the 'noise' protocol of the papers, no-overlap: "
    "planted images are removed from the test set), fitted SoftPatch+ and PatchCore on the "
    "contaminated training sets, and tested both on the remaining test images.",
    "The synthetic data is small and easy; real benchmarks (softpatch evaluate on MVTec AD, VisA, "
    "BTAD) are the place for accuracy claims.",
]


def _prepare_demo_folder(folder: Path, what: str = "demo dataset") -> None:
    """Empty a folder an earlier demo run wrote (recognised by our marker file) and mark it
    again; refuse to touch a non-empty folder that is not ours."""
    if folder.exists():
        if (folder / DEMO_MARKER).is_file():
            shutil.rmtree(folder)
        elif not folder.is_dir() or any(folder.iterdir()):
            raise UsageError(f"{folder} exists and is not a {what} folder written by 'softpatch demo'; "
                             "choose another --out")
    folder.mkdir(parents=True, exist_ok=True)
    (folder / DEMO_MARKER).write_text("written by 'softpatch demo'; deleted and rebuilt by the next run\n")


def _same_file(a: str | None, b: str) -> bool:
    return a is not None and os.path.abspath(a) == os.path.abspath(b)


def run_demo(
    out_dir: str | os.PathLike,
    categories: Sequence[str] | None = None,
    noise: float = 0.2,
    quick: bool = False,
    device: str = "auto",
    seed: int = 0,
    pretrained: bool = True,
    backbone: str | None = None,
    layers: Sequence[str] | None = None,
    sizes: dict | None = None,
    progress: bool = True,
    log: Callable[[str], None] = lambda s: None,
    threads: int | str = "auto",
) -> dict:
    """Everything ``softpatch demo`` does; returns the results dict (also in out_dir/results.json)."""
    from tqdm.auto import tqdm

    from .._version import __version__
    from ..data.datasets import load_mvtec
    from ..data.noise import apply_noise, noise_count
    from ..evaluation import evaluate_split_detailed, mean_row
    from ..models import kind_by_cli_name
    from ..report import colourbar, save_png, write_json
    from .html import write_demo_report
    from .synthetic import DEMO_CATEGORIES, make_demo_dataset

    t_start = time.perf_counter()
    out = Path(out_dir).expanduser()
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out} exists and is not a folder")
    categories = list(categories) if categories else list(DEMO_CATEGORIES)
    unknown = [c for c in categories if c not in DEMO_CATEGORIES]
    if unknown:
        raise UsageError(f"unknown demo categor{'ies' if len(unknown) > 1 else 'y'} {unknown}; "
                         f"choose from {list(DEMO_CATEGORIES)}")
    size = dict(DEMO_SIZES["quick" if quick else "default"])
    size.update({k: v for k, v in (sizes or {}).items() if v is not None})
    planted_n = noise_count(noise, size["n_train"])
    if planted_n >= size["n_test_defect"]:
        raise UsageError(f"--noise {noise} plants {planted_n} images but the demo has only "
                         f"{size['n_test_defect']} defective test images per category; lower --noise")

    data_root, pictures = out / "data", out / "images"
    for folder, what in ((data_root, "demo dataset"), (pictures, "demo pictures")):
        if folder.exists() and not (folder / DEMO_MARKER).is_file() and (not folder.is_dir() or any(folder.iterdir())):
            raise UsageError(f"{folder} exists and is not a {what} folder written by 'softpatch demo'; "
                             "choose another --out")
    _prepare_demo_folder(data_root, "demo dataset")
    log(f"Generating the demo dataset ({len(categories)} categories, {size['image_size']} px) in {data_root} ...")
    make_demo_dataset(data_root, categories=categories, n_train=size["n_train"], n_test_good=size["n_test_good"],
                      n_test_defect=size["n_test_defect"], image_size=size["image_size"], seed=seed)
    t_data = time.perf_counter() - t_start

    common: dict[str, Any] = {"device": device, "threads": threads, "resize": size["image_size"],
                              "crop": size["image_size"],
                              "pretrained": pretrained, "seed": seed, "progress": False}
    if backbone:
        common["backbone"] = backbone
    if layers:
        common["layers"] = list(layers)

    _prepare_demo_folder(pictures, "demo pictures")
    bar_path = save_png(pictures / "colourbar.png", colourbar())
    results: dict[str, Any] = {
        "title": "softpatch demo: training on contaminated data",
        "settings": {
            "noise": f"{noise:g} (no-overlap)", "categories": len(categories),
            "train images / category": size["n_train"], "planted / category": planted_n,
            "image size": size["image_size"], "backbone": backbone or "efficientnet_lite0",
            "pretrained": pretrained, "device": device, "softpatch_cuda": __version__,
        },
        "models": [kind_by_cli_name(m).display_name for m in DEMO_MODELS],
        "categories": [],
        "explanation": DEMO_EXPLANATION,
        "colourbar": str(bar_path),
    }
    steps = tqdm(total=len(categories) * len(DEMO_MODELS), desc="demo", unit="fit", disable=not progress,
                 file=sys.stderr)
    for category in categories:
        split = load_mvtec(data_root, category)
        noisy, record = apply_noise(split, noise, seed=seed, overlap=False)
        cat_result: dict[str, Any] = {"category": category, "metrics": {}, "noise_record": record.to_dict()}
        embedded = None  # both models share the backbone: every image is embedded once
        for kind in DEMO_MODELS:
            model_kind = kind_by_cli_name(kind)
            steps.set_postfix_str(f"{category} / {model_kind.display_name}")
            model = model_kind.cls(**common)
            if embedded is None:
                embedded = model.embed([s.path for s in noisy.train] + [s.path for s in noisy.test])
            row, prediction, masks = evaluate_split_detailed(model, noisy, embedded=embedded)
            cat_result["metrics"][model_kind.display_name] = row
            if kind == DEMO_MODELS[0]:
                _demo_flagged(cat_result, model, record, pictures / category)
                _demo_cases(cat_result, model, prediction, noisy, pictures / category)
            steps.update(1)
        results["categories"].append(cat_result)
        m0 = cat_result["metrics"]
        log("  " + category + ": " + "; ".join(
            f"{name} image {format_pct(r['image_auroc'])} / pixel {format_pct(r['pixel_auroc'])}" for name, r in m0.items()))
    steps.close()

    results["mean"] = {
        name: mean_row([c["metrics"][name] for c in results["categories"]]) for name in results["models"]
    }
    elapsed = time.perf_counter() - t_start
    results["elapsed_s"] = elapsed
    results["data_s"] = t_data
    results["footer"] = (f"Generated by softpatch_cuda {__version__} in {elapsed:.0f} s "
                         f"on {_dt.datetime.now(_dt.timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}.")
    write_json(out / "results.json", results)
    results["report"] = str(write_demo_report(results, out))
    return results


def _demo_flagged(cat_result: dict, model: Any, record: Any, pic_dir: Path) -> None:
    """Flagged training images of one category: score, planted or not, thumbnail."""
    from ..data.images import load_image
    from ..evaluation import contamination_detection
    from ..report import save_png

    report = model.training_report()
    scores = np.asarray(report.scores, dtype=np.float64)
    sources = list(report.sources) if getattr(report, "sources", None) else [None] * len(scores)
    planted_paths = list(record.added)
    planted = np.array([any(_same_file(s, p) for p in planted_paths) for s in sources], dtype=bool)
    flagged = np.asarray(report.flagged, dtype=bool)
    detection = contamination_detection(report, planted)
    summary = {
        "n_train": int(len(scores)), "planted": int(len(planted_paths)), "flagged": detection["flagged"],
        "flagged_planted": detection["flagged_planted"], "contamination_auroc": detection["auroc"],
        "flag_precision": detection["precision"], "flag_recall": detection["recall"],
    }
    cat_result["flag_summary"] = summary
    items = []
    for rank, i in enumerate(np.argsort(-scores, kind="stable")):
        if not flagged[i] or len(items) >= 16:  # the report shows at most 16 per category
            continue
        thumb = None
        if sources[i]:
            thumb = str(save_png(pic_dir / f"flagged_{rank + 1:02d}.png", load_image(sources[i]), max_side=180))
        # file names repeat across folders (train/good/002.png, test/crack/002.png): show the folder too
        name = f"{Path(sources[i]).parent.name}/{Path(sources[i]).name}" if sources[i] else report.names[i]
        items.append({"name": name, "source": sources[i], "score": float(scores[i]),
                      "planted": bool(planted[i]), "thumbnail": thumb})
    cat_result["flagged"] = items


def _demo_cases(cat_result: dict, model: Any, prediction: Any, split: Any, pic_dir: Path) -> None:
    """Overlays of the best and worst test cases of one category."""
    from ..data.datasets import read_mask
    from ..data.images import load_image
    from ..report import colour_range, overlay, save_png

    labels = np.array([s.label for s in split.test])
    scores = np.asarray(prediction.scores, dtype=np.float64)
    threshold = float(model.threshold)
    vmin, vmax = colour_range(prediction.maps, threshold)
    picks: list[tuple[str, int]] = []
    defect, good = np.flatnonzero(labels == 1), np.flatnonzero(labels == 0)
    if defect.size:
        picks.append(("best defect", int(defect[np.argmax(scores[defect])])))
    if good.size:
        picks.append(("best good", int(good[np.argmin(scores[good])])))
    if defect.size:
        picks.append(("worst defect", int(defect[np.argmin(scores[defect])])))
    if good.size:
        picks.append(("worst good", int(good[np.argmax(scores[good])])))
    cases = []
    for kind, i in picks:
        sample = split.test[i]
        image = load_image(sample.path)
        mask = np.asarray(read_mask(sample, (image.height, image.width)), dtype=bool)
        amap = np.asarray(prediction.map_at_input_size(i))
        png = save_png(pic_dir / f"case_{kind.replace(' ', '_')}.png",
                       overlay(image, amap, vmin, vmax, mask=mask if mask.any() else None), max_side=360)
        cases.append({"kind": kind, "name": f"{sample.defect_type}/{Path(sample.path).name}", "label": int(sample.label),
                      "score": float(scores[i]), "predicted_anomalous": bool(scores[i] > threshold),
                      "overlay": str(png)})
    cat_result["cases"] = cases
