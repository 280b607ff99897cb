"""Combine bench_accuracy.py result files (one per set or seed) into one table, per set and mean,
and check the accuracy targets of a change against a baseline model, judged on every set.

    python benchmarks/summarize_accuracy.py benchmarks/results/accuracy_issue16_*.json \
        --model softpatch-plus --baseline patchcore --before "softpatch-plus[support_images=None]" \
        --out benchmarks/results/accuracy_issue16_summary.md

--model is the model under test, --baseline the reference (PatchCore), --before the same model
as it was before the change (optional: the "no worse than today" and fit-time rows need it).
Rows are pooled over files; a (set, model, protocol, noise) cell is the mean over its seeds.
The targets are issue 16's: overlap 10-40 % mean >= baseline + 10; every set at overlap 20 %
within 5 of the baseline's clean score; clean within 1 on every set; no-overlap 10-20 % within
2 on every set; training-report AUROC >= 0.90 at 10-20 % on every set; pixel AUROC in overlap no
worse than before (mean, 0.5 point tolerance); fit time at most 2x before.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

NOISES = (0.1, 0.2, 0.4)


def load_rows(paths: list[str]) -> tuple[list[dict], list[dict]]:
    rows, sources = [], []
    for p in paths:
        data = json.loads(Path(p).read_text())
        rows += data["rows"]
        meta = data.get("meta", {})
        seeds = sorted({r["seed"] for r in data["rows"] if r["noise"] > 0})
        sources.append({"file": Path(p).name, "created": meta.get("created"), "elapsed_s": meta.get("elapsed_s"),
                        "load": meta.get("load"), "seeds": seeds,
                        "machine": (data.get("machine") or {}).get("cpu_model")})
    return rows, sources


def mean(values) -> float | None:
    vals = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    return sum(vals) / len(vals) if vals else None


def cell(rows, cat, model, protocol, noise, key="image_auroc"):
    """Mean over seeds of one (set, model, protocol, noise); clean rows serve noise 0."""
    if noise == 0:
        protocol = "clean"
    return mean(r.get(key) for r in rows if r["category"] == cat and r["model"] == model
                and r["protocol"] == protocol and r["noise"] == noise)


def detection(rows, cat, model, noise, key="auroc"):
    """A training-report figure of one (set, model, noise), from the first protocol's rows (fits are shared)."""
    sel = [r for r in rows if r["category"] == cat and r["model"] == model and r["noise"] == noise and r["protocol"] != "clean"]
    protocols = sorted({r["protocol"] for r in sel})
    sel = [r for r in sel if protocols and r["protocol"] == protocols[0]]
    return mean((r.get("contamination_detection") or {}).get(key) for r in sel)


def pct(v) -> str:
    return "n/a" if v is None else f"{100 * v:.1f}"


def table(rows, cats, models, protocols, key) -> list[str]:
    head = ["clean"] + [f"{p} {n:g}" for p in protocols for n in NOISES]
    out = ["| set | model | " + " | ".join(head) + " |", "|---|---|" + "|".join("---:" for _ in head) + "|"]
    for cat in cats + ["**mean**"]:
        for m in models:
            vals = []
            for protocol, noise in [("clean", 0.0)] + [(p, n) for p in protocols for n in NOISES]:
                if cat == "**mean**":
                    per = [cell(rows, c, m, protocol, noise, key) for c in cats]
                    vals.append(None if any(v is None for v in per) else mean(per))
                else:
                    vals.append(cell(rows, cat, m, protocol, noise, key))
            if all(v is None for v in vals):
                continue
            out.append(f"| {cat} | {m} | " + " | ".join(pct(v) for v in vals) + " |")
    return out


def denoising(rows, cats, models) -> list[str]:
    out = ["| set | model | noise | cls / seg rows removed % | flagged / planted | report AUROC | flag precision / recall "
           "| AUROC discriminators / leave-out | unsupported rows removed cls / seg |",
           "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for cat in cats:
        for m in models:
            for noise in (0.0,) + NOISES:
                sel = [r for r in rows if r["category"] == cat and r["model"] == m and r["noise"] == noise
                       and r.get("denoising")]
                if not sel:
                    continue
                first = sorted({r["protocol"] for r in sel})[0]
                sel = [r for r in sel if r["protocol"] == first]
                d = [r["denoising"] for r in sel]
                c = [r.get("contamination_detection") or {} for r in sel]
                ev = [x.get("evidence_auroc") or {} for x in c]
                flagged = mean(x.get("flagged_images") for x in d)
                out.append(
                    f"| {cat} | {m} | {noise:g} | {pct(mean(x.get('cls_removed_share') for x in d))} / "
                    f"{pct(mean(x.get('seg_removed_share') for x in d))} | "
                    f"{'n/a' if flagged is None else f'{flagged:.1f}'} / {mean(r['n_planted'] for r in sel):.1f} | "
                    f"{pct(mean(x.get('auroc') for x in c))} | {pct(mean(x.get('precision') for x in c))} / "
                    f"{pct(mean(x.get('recall') for x in c))} | {pct(mean(e.get('discriminators') for e in ev))} / "
                    f"{pct(mean(e.get('leave_out') for e in ev))} | "
                    + " / ".join("n/a" if v is None else f"{v:.1f}" for v in (
                        mean(x.get('cls_unsupported_removed') for x in d),
                        mean(x.get('seg_unsupported_removed') for x in d))) + " |")
    return out


def per_set(name: str, margin: float, items) -> tuple[str, bool, str]:
    """A target judged on every item (label, value, reference, note): value >= reference - margin."""
    figs, ok = [], True
    for label, v, ref, note in items:
        good = v is not None and ref is not None and v >= ref - margin
        ok &= good
        figs.append(f"{label} {pct(v)} vs {pct(ref)} {'ok' if good else 'MISSED'}{note}")
    return name, ok, "; ".join(figs)


def targets(rows, cats, model, base, before) -> list[tuple[str, bool | None, str]]:
    """(target, met?, figures) for each of issue 16's targets."""
    res = []
    gaps = {n: mean([cell(rows, c, model, "overlap", n) for c in cats]) for n in NOISES}
    bases = {n: mean([cell(rows, c, base, "overlap", n) for c in cats]) for n in NOISES}
    ok = all(gaps[n] is not None and bases[n] is not None and gaps[n] >= bases[n] + 0.10 for n in NOISES)
    res.append(("overlap 10-40 %: mean image AUROC >= baseline + 10", ok, "; ".join(
        f"{n:g}: {pct(gaps[n])} vs {pct(bases[n])}" for n in NOISES)))
    res.append(per_set("every set, overlap 20 %: within 5 of the baseline's clean image AUROC", 0.05, [
        (c, cell(rows, c, model, "overlap", 0.2), cell(rows, c, base, "clean", 0.0), "") for c in cats]))
    res.append(per_set("clean: within 1 image point of the baseline on every set", 0.01, [
        (c, cell(rows, c, model, "clean", 0.0), cell(rows, c, base, "clean", 0.0), "") for c in cats]))
    items = []
    for c in cats:
        for n in (0.1, 0.2):
            vp, bp = cell(rows, c, model, "no-overlap-paired", n), cell(rows, c, base, "no-overlap-paired", n)
            paired = "" if vp is None or bp is None else f" (paired protocol: {pct(vp)} vs {pct(bp)})"
            items.append((f"{c} {n:g}", cell(rows, c, model, "no-overlap", n), cell(rows, c, base, "no-overlap", n),
                          paired))
    res.append(per_set("no-overlap 10-20 %: within 2 image points on every set", 0.02, items))
    figs, ok = [], True
    for c in cats:
        for n in (0.1, 0.2):
            v = detection(rows, c, model, n)
            good = v is not None and v >= 0.90
            ok &= good
            figs.append(f"{c} {n:g} {pct(v)}{'' if good else ' MISSED'}")
    res.append(("training report AUROC >= 0.90 at 10-20 % on every set", ok, "; ".join(figs)))
    if before:
        now = {n: mean([cell(rows, c, model, "overlap", n, "pixel_auroc") for c in cats]) for n in NOISES}
        then = {n: mean([cell(rows, c, before, "overlap", n, "pixel_auroc") for c in cats]) for n in NOISES}
        ok = all(now[n] is not None and then[n] is not None and now[n] >= then[n] - 0.005 for n in NOISES)
        res.append(("overlap pixel AUROC no worse than before (mean, 0.5 point tolerance)", ok, "; ".join(
            f"{n:g}: {pct(now[n])} vs {pct(then[n])}" for n in NOISES)))
        fit_now = mean(r["fit_s"] for r in rows if r["model"] == model)
        fit_then = mean(r["fit_s"] for r in rows if r["model"] == before)
        ratio = fit_now / fit_then if fit_now and fit_then else None
        res.append(("fit time at most 2x before (cached embeddings, same runs)", None if ratio is None else ratio <= 2.0,
                    f"{fit_now:.1f} s vs {fit_then:.1f} s = {ratio:.2f}x" if ratio else "n/a"))
    return res


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("files", nargs="+")
    p.add_argument("--model", default="softpatch-plus")
    p.add_argument("--baseline", default="patchcore")
    p.add_argument("--before", default=None)
    p.add_argument("--title", default="Accuracy under training-set contamination")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    rows, sources = load_rows(args.files)
    cats = list(dict.fromkeys(r["category"] for r in rows))
    models = list(dict.fromkeys(r["model"] for r in rows))
    protocols = [p for p in ("no-overlap", "overlap", "no-overlap-paired") if any(r["protocol"] == p for r in rows)]
    lines = [f"# {args.title}", ""]
    for s in sources:
        load = s["load"] or [None, None]
        lines.append(f"- `{s['file']}`: created {s['created']}, {s['elapsed_s']:.0f} s, noise-draw seeds {s['seeds']}, "
                     f"1-min load start / end {load[0]} / {load[1]}, {s['machine']}")
    lines += ["- efficientnet_lite0 (ImageNet weights), every model at its defaults unless its label says otherwise; "
              "AUROC in %; a cell is the mean over the seeds its set was run with; **mean** = mean over sets.", ""]
    lines += ["## Targets", "", "| target | met | figures |", "|---|---|---|"]
    for name, ok, figs in targets(rows, cats, args.model, args.baseline, args.before):
        lines.append(f"| {name} | {'n/a' if ok is None else 'yes' if ok else '**no**'} | {figs} |")
    for key, title in (("image_auroc", "Image AUROC"), ("pixel_auroc", "Pixel AUROC")):
        lines += ["", f"## {title}", "", *table(rows, cats, models, protocols, key)]
    lines += ["", "## What the denoising and the image-level support did (first protocol's fits; "
              "rows removed = share of each bank's candidate rows)", "", *denoising(rows, cats, models)]
    lines += ["", "## Mean fit / predict seconds per run (cached embeddings)", "", "| model | fit s | predict s |",
              "|---|---:|---:|"]
    for m in models:
        sel = [r for r in rows if r["model"] == m]
        lines.append(f"| {m} | {mean(r['fit_s'] for r in sel):.1f} | {mean(r['predict_s'] for r in sel):.1f} |")
    text = "\n".join(lines) + "\n"
    if args.out:
        Path(args.out).write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
