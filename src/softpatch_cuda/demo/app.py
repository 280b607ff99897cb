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
    "planted defective images in each training set (the 'noise' protocol of the papers), fitted "
    "SoftPatch+ and PatchCore on the contaminated training sets, and tested both on the test images.",
]
# The protocol sentence of the explanation, by protocol.
DEMO_PROTOCOL = {
    True: "Overlap protocol: the planted images stay in the test set, as on a production line where the "
          "defect that slipped into the 'good' folder keeps coming back. This is the case the package exists "
          "for: PatchCore has memorised those defects and scores them like normal parts; SoftPatch+ drops "
          "most of them from its memory bank, so they still score above the good parts ('recurring' below: "
          "how many of them each model calls anomalous at its threshold).",
    False: "No-overlap protocol: the planted images were removed from the test set, so the test never shows "
           "the memorised defects again; contamination then matters much less and the two models are close.",
}
DEMO_CAVEAT = ("The synthetic data is small and easy; real benchmarks (softpatch evaluate on MVTec AD, VisA, "
               "BTAD) are the place for accuracy claims.")


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
    overlap: bool = True,
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
    """Everything ``softpatch demo`` does; returns the results dict (also in out_dir/results.json).

    ``overlap`` (default): the planted images stay in the test set (the defect recurs on the
    line: where PatchCore fails and SoftPatch+ does not); False: the no-overlap protocol."""
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
    # without overlap the planted images leave the test set: at least one defect must stay
    if planted_n > size["n_test_defect"] or (not overlap and planted_n == size["n_test_defect"]):
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
    protocol = "overlap" if overlap else "no-overlap"
    results: dict[str, Any] = {
        "title": "softpatch demo: training on contaminated data",
        "protocol": protocol,
        "settings": {
            "noise": f"{noise:g} ({protocol})", "categories": len(categories),
            "train images / category": size["n_train"], "planted / category": planted_n,
            "image size": size["image_size"], "backbone": backbone or "efficientnet_lite0",
            "pretrained": pretrained, "device": device, "softpatch_cuda": __version__,
        },
        "models": [kind_by_cli_name(m).display_name for m in DEMO_MODELS],
        "categories": [],
        "explanation": [*DEMO_EXPLANATION, DEMO_PROTOCOL[overlap], DEMO_CAVEAT],
        "colourbar": str(bar_path),
    }
    steps = tqdm(total=len(categories) * len(DEMO_MODELS), desc="demo", unit="fit", disable=not progress,
                 file=sys.stderr)
    for category in categories:
        split = load_mvtec(data_root, category)
        noisy, record = apply_noise(split, noise, seed=seed, overlap=overlap)
        cat_result: dict[str, Any] = {"category": category, "metrics": {}, "decisions": {},
                                      "noise_record": record.to_dict()}
        recurring = _recurring(noisy, record)
        embedded = None  # both models share the backbone: every image is embedded once
        fitted: dict[str, tuple[Any, Any]] = {}
        for kind in DEMO_MODELS:
            model_kind = kind_by_cli_name(kind)
            steps.set_postfix_str(f"{category} / {model_kind.display_name}")
            model = model_kind.cls(**common)
            if embedded is None:  # with overlap the planted images are in both lists: once is enough
                embedded = model.embed(list(dict.fromkeys([s.path for s in noisy.train] + [s.path for s in noisy.test])))
            row, prediction, masks = evaluate_split_detailed(model, noisy, embedded=embedded)
            cat_result["metrics"][model_kind.display_name] = row
            cat_result["decisions"][model_kind.display_name] = _decisions(model, prediction, noisy, recurring)
            fitted[model_kind.display_name] = (model, prediction)
            if kind == DEMO_MODELS[0]:
                _demo_flagged(cat_result, model, record, pictures / category)
            steps.update(1)
        _demo_cases(cat_result, fitted, noisy, recurring, pictures / category)
        results["categories"].append(cat_result)
        m0 = cat_result["metrics"]
        log("  " + category + ": " + "; ".join(
            f"{name} image {format_pct(r['image_auroc'])} / pixel {format_pct(r['pixel_auroc'])}, caught "
            f"{d['caught']} of {d['defects']}" for name, r in m0.items() for d in [cat_result["decisions"][name]]))
    steps.close()

    results["mean"] = {
        name: mean_row([c["metrics"][name] for c in results["categories"]]) for name in results["models"]
    }
    results["decisions_total"] = {
        name: _total_decisions([c["decisions"][name] for c in results["categories"]]) for name in results["models"]
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


def _recurring(split: Any, record: Any) -> np.ndarray:
    """bool per test image: it is also one of the planted training images (overlap)."""
    if not record.overlap:
        return np.zeros(len(split.test), dtype=bool)
    return np.array([any(_same_file(s.path, p) for p in record.added) for s in split.test], dtype=bool)


def _decisions(model: Any, prediction: Any, split: Any, recurring: np.ndarray) -> dict:
    """What one model decides on one category's test images at its threshold."""
    labels = np.array([s.label for s in split.test])
    caught = np.asarray(prediction.scores, dtype=np.float64) > float(model.threshold)
    return {
        "threshold": float(model.threshold),
        "defects": int((labels == 1).sum()), "caught": int((caught & (labels == 1)).sum()),
        "recurring": int(recurring.sum()), "recurring_caught": int((caught & recurring).sum()),
        "good": int((labels == 0).sum()), "false_alarms": int((caught & (labels == 0)).sum()),
    }


def _total_decisions(rows: list[dict]) -> dict:
    """The counts of every category added up (thresholds are per category: not summed)."""
    keys = ("defects", "caught", "recurring", "recurring_caught", "good", "false_alarms")
    return {k: int(sum(r[k] for r in rows)) for k in keys}


def _demo_cases(cat_result: dict, fitted: dict, split: Any, recurring: np.ndarray, pic_dir: Path) -> None:
    """Overlays of a few test cases of one category, each shown for every model (its own
    threshold and colour scale): the best and worst cases of the first model and, with
    overlap, the recurring defect (planted in training too) that the last model scores
    lowest relative to its threshold."""
    from ..data.datasets import read_mask
    from ..data.images import load_image
    from ..report import colour_range, overlay, save_png

    names = list(fitted)
    labels = np.array([s.label for s in split.test])
    first_model, first_prediction = fitted[names[0]]
    scores = np.asarray(first_prediction.scores, dtype=np.float64)
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
    if recurring.any():
        last_model, last_prediction = fitted[names[-1]]
        margin = np.asarray(last_prediction.scores, dtype=np.float64) - float(last_model.threshold)
        candidates = np.flatnonzero(recurring)
        picks.append(("recurring defect", int(candidates[np.argmin(margin[candidates])])))
    ranges = {name: colour_range(prediction.maps, float(model.threshold)) for name, (model, prediction) in fitted.items()}
    cases = []
    for kind, i in picks:
        sample = split.test[i]
        image = load_image(sample.path)
        mask = np.asarray(read_mask(sample, (image.height, image.width)), dtype=bool)
        per_model = {}
        for m, name in enumerate(names):
            model, prediction = fitted[name]
            amap = np.asarray(prediction.map_at_input_size(i))
            png = save_png(pic_dir / f"case_{kind.replace(' ', '_')}_{m}.png",
                           overlay(image, amap, *ranges[name], mask=mask if mask.any() else None), max_side=360)
            score = float(prediction.scores[i])
            per_model[name] = {"score": score, "threshold": float(model.threshold),
                               "predicted_anomalous": bool(score > float(model.threshold)), "overlay": str(png)}
        cases.append({"kind": kind, "name": f"{sample.defect_type}/{Path(sample.path).name}",
                      "label": int(sample.label), "recurring": bool(recurring[i]), "models": per_model})
    cat_result["cases"] = cases
