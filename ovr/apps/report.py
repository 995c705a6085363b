"""Results for people (Rich tables, Markdown, plots) and for machines (JSON-ready dicts)."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from rich.markup import escape
from rich.table import Table

from ..embedding.data import SPLITS
from ..learn.metrics import MULTILABEL_SCALARS


def embed_summary(emb) -> dict[str, Any]:
    """An EmbeddedFolder's summary (`ovr embed --json`)."""
    spec = emb.backbone.spec() if emb.backbone else None
    dim = int(emb.backbone.dim if emb.backbone else emb.result.embeddings.shape[1])
    return summary_of(emb.folder, emb.result, emb.labels, emb.splits, spec, dim)


def summary_of(folder, res, labels, splits, spec: dict | None, dim: int) -> dict[str, Any]:
    """res: features.EmbedResult or warm.AllCached (keys, n_cached, n_new, skipped, seconds)."""
    counts = {c: {s: 0 for s in SPLITS} for c in folder.classes}
    for lab, sp in zip(labels, splits):
        counts[folder.classes[lab]][str(sp)] += 1
    return {
        "data": str(folder.root), "classes": folder.classes, "splits_given": folder.splits_given,
        "images": counts, "usable": len(res.keys), "cached": res.n_cached, "embedded": res.n_new,
        "skipped": [{"path": str(p), "reason": r} for p, r in res.skipped],
        "ignored_non_images": dict(folder.ignored), "notes": list(folder.notes),
        "backbone": spec, "dim": dim, "seconds": round(res.seconds, 3),
    }


def embed_table(s: dict) -> Table:
    """An embed summary (embed_summary / summary_of) as images per class and split."""
    t = Table(title=f"Embedded {s['data']}")
    t.add_column("class")
    for sp in SPLITS:
        t.add_column(sp, justify="right")
    for c, row in s["images"].items():
        t.add_row(escape(c), *(str(row[sp]) for sp in SPLITS))
    t.add_row("[bold]total", *(f"[bold]{sum(r[sp] for r in s['images'].values())}" for sp in SPLITS))
    return t


def embed_line(s: dict) -> str:
    return (f"{s['usable']} images: {s['cached']} from cache, {s['embedded']} newly embedded, "
            f"{len(s['skipped'])} skipped; backbone {s['backbone']['name']} (dim {s['dim']}); {s['seconds']:.1f} s")


def multilabel_tables(m: dict) -> list[Table]:
    s = Table(title=f"{m.get('split', '')} split: {m['n']} images, multi-label")
    s.add_column("metric"), s.add_column("value", justify="right")
    for k in MULTILABEL_SCALARS:
        s.add_row(k, f"{m[k]:.4f}")
    pc = Table(title="per class (at each head's stored threshold)")
    for col in ["class", "AP", "precision", "recall", "F1", "support"]:
        pc.add_column(col, justify="left" if col == "class" else "right")
    for c, r in m["per_class"].items():
        pc.add_row(escape(c), "-" if r["ap"] is None else f"{r['ap']:.3f}", f"{r['precision']:.3f}",
                   f"{r['recall']:.3f}", f"{r['f1']:.3f}", str(r["support"]))
    return [s, pc]


def metrics_tables(m: dict) -> list[Table]:
    if m.get("multilabel"):
        return multilabel_tables(m)
    foreign = m.get("foreign") or {}
    scored = f"{m['n']} images of the model's classes" if foreign.get("n") else f"{m['n']} images"
    s = Table(title=f"{m.get('split', '')} split: {scored}")
    s.add_column("metric"), s.add_column("value", justify="right")
    for k in ["accuracy", "macro_f1", "balanced_accuracy", "top2_accuracy", "top3_accuracy", "nll", "ece",
              "ece_calibrated", "unknown_rate"]:
        if k in m:
            s.add_row(k, f"{m[k]:.4f}")
    if foreign.get("n"):  # images of classes the model has no head for: not scored above, but said
        s.add_row(escape(f"images of classes without a head ({', '.join(foreign['classes'])})"), str(foreign["n"]))
        s.add_row("  of them answered unknown", f"{foreign['rejected']:.4f}")
    if m.get("skipped"):
        s.add_row("unreadable files skipped", str(m["skipped"]))
    pc = Table(title="per class")
    for col in ["class", "precision", "recall", "F1", "support"]:
        pc.add_column(col, justify="left" if col == "class" else "right")
    for c, r in m["per_class"].items():
        if r["support"] == 0:  # a head whose class has no image in this split: nothing to score
            pc.add_row(escape(c) + " [dim](no images in this split)[/]", "-", "-", "-", "0")
            continue
        pc.add_row(escape(c), f"{r['precision']:.3f}", f"{r['recall']:.3f}", f"{r['f1']:.3f}", str(r["support"]))
    cm = Table(title="confusion matrix (rows: true, columns: predicted)")
    cm.add_column("")
    for i in range(len(m["classes"])):
        cm.add_column(str(i), justify="right")
    for i, (c, row) in enumerate(zip(m["classes"], m["confusion_matrix"])):
        cm.add_row(escape(f"{i} {c}"), *(str(v) for v in row))
    return [s, pc, cm]


# --- the benchmark report --------------------------------------------------------------------------------


BENCH_COLUMNS = [("accuracy", "acc", "{:.3f}"), ("accuracy_tta", "acc TTA", "{:.3f}"), ("macro_f1", "macro-F1", "{:.3f}"),
                 ("balanced_accuracy", "bal acc", "{:.3f}"), ("top3_accuracy", "top-3", "{:.3f}"),
                 ("nll", "NLL", "{:.3f}"), ("ece", "ECE", "{:.3f}"), ("ece_calibrated", "ECE cal", "{:.3f}"),
                 ("train_seconds", "train s", "{:.2f}"), ("predict_per_second", "pred/s", "{:,.0f}"),
                 ("add_class_seconds", "add-class s", "{:.3f}"), ("accuracy_after_add", "acc after add", "{:.3f}")]


TIME_COLUMNS = ("train_seconds", "add_class_seconds")


def _cell(stat: dict | None, fmt: str, key: str = "") -> str:
    """mean ± std over the seeds (± on every row, zero included, when there are several); times as median
    (min-max): their spread is skewed (one slow run), and a mean ± std wider than the mean says nothing."""
    if not stat:
        return "-"
    several = len(stat.get("values", [])) > 1
    if key in TIME_COLUMNS and several and "median" in stat:
        return f"{fmt.format(stat['median'])} ({fmt.format(stat['min'])}-{fmt.format(stat['max'])})"
    return fmt.format(stat["mean"]) + (f" ±{fmt.format(stat['std'])}" if several and "," not in fmt else "")


TERMINAL_COLUMNS = ("accuracy", "accuracy_tta", "macro_f1", "nll", "ece", "ece_calibrated", "train_seconds", "add_class_seconds",
                    "accuracy_after_add")


@dataclass
class Tab:
    """One table, written once: shown by Rich in the terminal and as Markdown in report.md (JSON has the data)."""
    title: str
    columns: list[str]
    rows: list[list[str]]
    left: int = 1  # columns left-aligned from the start (names); the rest are numbers

    def rich(self) -> Table:
        t = Table(title=escape(self.title))
        for i, c in enumerate(self.columns):
            t.add_column(c, justify="left" if i < self.left else "right", no_wrap=i == 0)
        for r in self.rows:
            t.add_row(*(escape(v) for v in r))
        return t

    def markdown(self) -> str:
        lines = ["| " + " | ".join(self.columns) + " |",
                 "|" + "---|" * self.left + "---:|" * (len(self.columns) - self.left)]
        lines += ["| " + " | ".join(r) + " |" for r in self.rows]
        return "\n".join(lines)


def bench_tabs(rep: dict, terminal: bool = False) -> list[Tab]:
    """The benchmark's tables: one per scenario (terminal: the columns that fit), then the growth table."""
    out = []
    for scen in rep["scenarios"]:
        res = rep["results"][scen]
        cols = [c for c in BENCH_COLUMNS if (not terminal or c[0] in TERMINAL_COLUMNS)
                and any(c[0] in r for r in res.values())]
        title = (f"{scen}: mean ± std over {len(rep['seeds'])} seeds, times median (range) "
                 f"(train {rep['n']['train_per_scenario'][scen]}, test {rep['n']['test']} images)")
        rows = [[m, *(_cell(res[m].get(k), fmt, k) for k, _, fmt in cols)] for m in rep["methods"] if m in res]
        out.append(Tab(title, ["method", *(label for _, label, _ in cols)], rows))
    g = rep.get("growth")
    if g and g["classes"]:
        rows = [[str(n), f"{j:.3f}", f"{gu:.3f}", f"{am:.3f}"]
                for n, j, gu, am in zip(g["classes"], g["joint"], g["grown"], g["argmax"])]
        out.append(Tab("ovr grown one class at a time: test accuracy on the classes so far",
                       ["classes", "joint", "grown, ovr's answer", "grown, plain argmax"], rows, left=0))
    return out


def bench_tables(rep: dict) -> list[Table]:
    """The terminal view (report.md and report.json have every column)."""
    return [t.rich() for t in bench_tabs(rep, terminal=True)]


def _draw_confusion(ax, cm: np.ndarray, title: str, names: list[str]) -> None:
    """The matrix with its classes named on both axes (rows: true, columns: predicted)."""
    ax.imshow(cm, cmap="Blues")
    for (i, j), v in np.ndenumerate(cm):
        if v:
            ax.text(j, i, str(v), ha="center", va="center", fontsize=7, color="white" if v > cm.max() / 2 else "black")
    ax.set_title(title)
    ax.set_xlabel("predicted"), ax.set_ylabel("true")
    size = 7 if len(cm) <= 20 else 5
    ax.set_xticks(range(len(cm)), names, rotation=45, ha="right", fontsize=size)
    ax.set_yticks(range(len(cm)), names, fontsize=size)


def plot_bench(rep: dict, out: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    files = []
    d = rep["plain_seed0"]
    pair = [m for m in ("ovr", "softmax") if m in d]
    fig, axes = plt.subplots(1, len(pair), figsize=(5.5 * len(pair), 4.8))
    for ax, m in zip(np.atleast_1d(axes), pair):
        _draw_confusion(ax, np.array(d[m]["confusion_matrix"]), f"{m}: confusion matrix (test)", rep["classes"])
    fig.tight_layout()
    fig.savefig(out / "confusion.png", dpi=110), plt.close(fig)
    files.append("confusion.png")

    fig, axes = plt.subplots(1, 2, figsize=(10, 4.5), sharey=True)
    for ax, key, title in zip(axes, ["reliability", "reliability_calibrated"], ["before calibration", "after calibration"]):
        ax.plot([0, 1], [0, 1], "k:", lw=1)
        for m in d:
            r = d[m][key]
            ax.plot(r["bin_confidence"], r["bin_accuracy"], "o-", label=m)
        ax.set_title(f"reliability, {title}"), ax.set_xlabel("confidence"), ax.set_ylabel("accuracy")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "reliability.png", dpi=110), plt.close(fig)
    files.append("reliability.png")

    pc = rep["per_class_f1"]["plain"]
    x = np.arange(len(rep["classes"]))
    fig, ax = plt.subplots(figsize=(max(6, 0.6 * len(x)), 4))
    for i, m in enumerate(pair):
        ax.bar(x + (i - 0.5) * 0.4, [pc[m][c]["mean"] for c in rep["classes"]], 0.4,
               yerr=[pc[m][c]["std"] for c in rep["classes"]], label=m)
    ax.set_xticks(x, rep["classes"], rotation=45, ha="right"), ax.set_ylabel("F1 (test)"), ax.set_ylim(0, 1.05)
    ax.set_title("per-class F1, one-vs-rest vs softmax"), ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.tight_layout()
    fig.savefig(out / "per_class_f1.png", dpi=110), plt.close(fig)
    files.append("per_class_f1.png")

    s = rep["add_class_scaling"]
    fig, ax = plt.subplots(figsize=(6, 4))
    for m in s:
        if m != "n_classes":
            ax.plot(s["n_classes"], s[m], "o-", label=f"{m} ({'one new head' if m == 'ovr' else 'retrain all'})")
    ax.set_xlabel("classes after adding one"), ax.set_ylabel("seconds to add a class"), ax.set_title("add-class time")
    ax.set_xticks(s["n_classes"])  # class counts: whole numbers only
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "add_class_time.png", dpi=110), plt.close(fig)
    files.append("add_class_time.png")

    g = rep.get("growth")
    if g and g["classes"]:
        fig, ax = plt.subplots(figsize=(6, 4))
        for key, label in (("joint", "trained on all classes at once"), ("grown", "grown, ovr's answer (with the gate)"),
                           ("argmax", "grown, plain argmax")):
            ax.plot(g["classes"], g[key], "o-", label=label)
        ax.set_xlabel("classes in the model"), ax.set_ylabel("test accuracy"), ax.set_ylim(0, 1.02)
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.set_title("growing a model one class at a time"), ax.legend()
        fig.tight_layout()
        fig.savefig(out / "growth.png", dpi=110), plt.close(fig)
        files.append("growth.png")
    ovr = d.get("ovr", {})
    for f in (plot_curves(ovr.get("heads", {}), out), plot_gallery(ovr.get("errors", []), out)):
        if f:
            files.append(f)
    return files


def write_bench_report(rep: dict, out: str | Path) -> Path:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    plots = plot_bench(rep, out)
    (out / "report.json").write_text(json.dumps(rep, indent=2))
    b = rep["backbone"] or {}
    md = [f"# ovr bench: one-vs-rest vs softmax on {rep['dataset']['root']}", "",
          f"Backbone `{b.get('name')}` (dim {b.get('dim')}), {len(rep['classes'])} classes, "
          f"{rep['n']['train']}/{rep['n']['val']}/{rep['n']['test']} train/val/test images, seeds {rep['seeds']}, "
          f"device {rep['device']}. Every method sees the same cached embeddings and splits.", ""]
    tabs = bench_tabs(rep)
    for scen, tab in zip(rep["scenarios"], tabs):
        md += [f"## {scen} ({rep['n']['train_per_scenario'][scen]} training images)", "", tab.markdown(), ""]
    if len(tabs) > len(rep["scenarios"]):
        g = rep["growth"]
        every = g["classes"] == list(range(2, len(rep["classes"]) + 1))
        md += ["## grown one class at a time (ovr)", "",
               f"From 2 classes to all, one `add-class` at a time; test accuracy on the classes so far"
               f"{'' if every else ' (at these sizes; a joint fit each)'}.", "", tabs[-1].markdown(), ""]
    md += ["## How to read it", "",
           "- *acc*, *macro-F1*, *bal acc*, *top-3*: test-split quality, mean ± std over seeds.",
           "- *NLL*, *ECE*: quality of the confidences. OvR confidences are per-head sigmoids normalised per row "
           "(as scikit-learn's OneVsRestClassifier does); *ECE cal* is after calibration on the val split "
           "(per-head Platt for OvR methods, one temperature for softmax methods).",
           "- *add-class s*: time to go from N-1 to N classes: one new head for OvR methods (for ovr, with its "
           "statistics and gate updated), a full retrain for softmax ones; *acc after add* is the test accuracy of that grown model (ovr: its answer with the gate).",
           "- *imbalance*: odd classes keep a fraction of their training images; *few-shot*: k training images per class.",
           "- *views* (with `--views K`): ovr and softmax trained on each training image plus K augmented views of it; "
           "*acc TTA*: test accuracy with logits averaged over each test image and K augmented views of it.",
           ""]
    md += [f"![{p}]({p})" for p in plots]
    (out / "report.md").write_text("\n".join(md) + "\n")
    return out


# --- one model's report: `ovr evaluate --report DIR` ---------------------------------------------------------

def plot_curves(heads: dict[str, dict], out: Path, limit: int = 30) -> str | None:
    """Small multiples, one panel per head: validation loss vs L2 strength with the chosen one marked (the exact
    solver), or train/validation loss per epoch (Adam heads)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [c for c, h in heads.items() if h.get("l2_path") or h.get("curve")][:limit]
    if not names:
        return None
    cols = min(5, len(names))
    rows = (len(names) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(2.6 * cols, 2.1 * rows), squeeze=False)
    for ax in axes.flat[len(names):]:
        ax.axis("off")
    for ax, c in zip(axes.flat, names):
        h = heads[c]
        if h.get("curve"):
            e = [r[0] for r in h["curve"]]
            ax.plot(e, [r[1] for r in h["curve"]], label="train", lw=1)
            if any(r[2] is not None for r in h["curve"]):
                ax.plot(e, [r[2] for r in h["curve"]], label="val", lw=1)
            ax.set_xlabel("epoch", fontsize=7)
        else:
            pts = [(s, v) for s, v in h["l2_path"] if v is not None]
            ax.semilogx([p[0] for p in pts], [p[1] for p in pts], "o-", ms=2.5, lw=1)
            best = [p for p in pts if p[0] == h["l2"]]
            if best:
                ax.semilogx([best[0][0]], [best[0][1]], "o", color="crimson", ms=5)
            ax.set_xlabel("L2 strength", fontsize=7)
        ax.set_title(c[:24], fontsize=8)
        ax.tick_params(labelsize=6)
    fig.suptitle("per head: validation loss vs L2 strength (red: chosen)" if not any(heads[c].get("curve") for c in names)
                 else "per head: training curves", fontsize=9)
    fig.tight_layout()
    fig.savefig(out / "curves.png", dpi=110), plt.close(fig)
    return "curves.png"


def plot_gallery(errors: list[dict], out: Path, per_row: int = 4) -> str | None:
    """The test images answered wrongly with the highest confidence, per true class, as thumbnails."""
    if not errors:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ..embedding.data import load_image

    by_class: dict[str, list[dict]] = {}
    for e in errors:
        by_class.setdefault(e["true"], []).append(e)
    rows = len(by_class)
    fig, axes = plt.subplots(rows, per_row, figsize=(2.2 * per_row, 2.4 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for i, (c, es) in enumerate(by_class.items()):
        for j, e in enumerate(es[:per_row]):
            ax = axes[i, j]
            try:
                im = load_image(e["path"])
                im.thumbnail((160, 160))
                ax.imshow(im)
            except Exception:  # a file gone since evaluation: an empty panel with its caption
                pass
            ax.set_title(f"true {e['true'][:14]}\nsaid {e['predicted'][:14]} {e['confidence']:.2f}", fontsize=7)
    fig.suptitle("most confident errors, per true class", fontsize=9)
    fig.tight_layout()
    fig.savefig(out / "errors.png", dpi=110), plt.close(fig)
    return "errors.png"


def plot_model_metrics(m: dict, out: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    files = []
    pc = m["per_class"]
    names = list(pc)
    fig, ax = plt.subplots(figsize=(max(6, 0.5 * len(names)), 3.8))
    key = "ap" if m.get("multilabel") else "f1"
    ax.bar(range(len(names)), [pc[c][key] or 0 for c in names])
    ax.set_xticks(range(len(names)), names, rotation=45, ha="right", fontsize=7)
    ax.set_ylim(0, 1.05), ax.set_ylabel("AP" if key == "ap" else "F1"), ax.set_title(f"per-class {key.upper()}")
    fig.tight_layout()
    fig.savefig(out / "per_class.png", dpi=110), plt.close(fig)
    files.append("per_class.png")
    if "confusion_matrix" in m:
        cm = np.array(m["confusion_matrix"])
        fig, ax = plt.subplots(figsize=(max(4, 0.45 * len(cm)), max(3.5, 0.4 * len(cm))))
        _draw_confusion(ax, cm, "confusion matrix", list(m["classes"]))
        fig.tight_layout()
        fig.savefig(out / "confusion.png", dpi=110), plt.close(fig)
        files.append("confusion.png")
    return files


def write_model_report(m: dict, manifest: dict, out: str | Path) -> Path:
    """report.json (the metrics), report.md, and PNGs: per-class scores, confusion matrix, per-head curves, and
    the error gallery."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    plots = plot_model_metrics(m, out)
    for p in (plot_curves(manifest.get("heads", {}), out), plot_gallery(m.get("errors", []), out)):
        if p:
            plots.append(p)
    (out / "report.json").write_text(json.dumps(m, indent=2, ensure_ascii=False))
    b = manifest.get("backbone", {})
    md = [f"# ovr evaluate: {m['model']} on {m['data']} ({m['split']} split)", "",
          f"{m['n']} images, {len(manifest.get('classes', []))} heads on `{b.get('name')}`"
          f"{', TTA ' + str(m['tta']) + ' views' if m.get('tta') else ''}.", "",
          "| metric | value |", "|---|---:|"]
    keys = (MULTILABEL_SCALARS if m.get("multilabel") else
            ["accuracy", "macro_f1", "balanced_accuracy", "top2_accuracy", "nll", "ece", "ece_calibrated"])
    md += [f"| {k} | {m[k]:.4f} |" for k in keys if isinstance(m.get(k), (int, float))]
    md += ["", "| class | " + ("AP | " if m.get("multilabel") else "") + "precision | recall | F1 | support |",
           "|---|" + "---:|" * (5 if m.get("multilabel") else 4)]
    for c, r in m["per_class"].items():
        ap = ("-" if r.get("ap") is None else f"{r['ap']:.3f}") + " | " if m.get("multilabel") else ""
        md.append(f"| {c} | {ap}{r['precision']:.3f} | {r['recall']:.3f} | {r['f1']:.3f} | {r['support']} |")
    notes = {"curves.png": "per head, the validation loss at each L2 strength tried and the one chosen (training "
                           "curves for MLP heads)",
             "errors.png": "per true class, the images answered wrongly with the highest confidence"}
    said = [f"*{p}*: {notes[p]}." for p in plots if p in notes]  # only the plots written (no errors: no gallery)
    md += ["", " ".join(said), ""] if said else [""]
    md += [f"![{p}]({p})" for p in plots]
    (out / "report.md").write_text("\n".join(md) + "\n")
    return out


def multilabel_bench_table(rep: dict) -> Table:
    t = Table(title=f"ovr on multi-label data: mean ± std over {len(rep['seeds'])} resplits ({rep['n']['images']} images)")
    t.add_column("metric"), t.add_column("value", justify="right")
    for k, v in rep["results"].items():
        t.add_row(k, _cell(v, "{:.3f}"))
    return t


def write_multilabel_bench_report(rep: dict, out: str | Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").write_text(json.dumps(rep, indent=2))
    names = rep["classes"]
    fig, ax = plt.subplots(figsize=(max(6, 0.5 * len(names)), 3.8))
    ap = rep["per_class_ap"]
    ax.bar(range(len(names)), [ap[c]["mean"] for c in names], yerr=[ap[c]["std"] for c in names])
    ax.set_xticks(range(len(names)), names, rotation=45, ha="right", fontsize=7)
    ax.set_ylim(0, 1.05), ax.set_ylabel("average precision (test)"), ax.set_title("per-class AP, ovr")
    fig.tight_layout()
    fig.savefig(out / "per_class_ap.png", dpi=110), plt.close(fig)
    md = [f"# ovr bench on multi-label data: {rep['dataset']['root']}", "", rep["note"] + ".", "",
          f"{len(names)} classes, {rep['n']['images']} images, resplits (seeds) {rep['seeds']}.", "",
          "| metric | mean ± std |", "|---|---:|"]
    md += [f"| {k} | {_cell(v, '{:.3f}')} |" for k, v in rep["results"].items()]
    md += ["", "![per_class_ap.png](per_class_ap.png)"]
    (out / "report.md").write_text("\n".join(md) + "\n")
    return out


def backbones_tab(rep: dict) -> Tab:
    """`ovr bench --backbones`: one row per backbone."""
    def ms(st: dict) -> str:
        return f"{st['mean']:.3f} ±{st['std']:.3f}"

    rows = [[r["backbone"] + (" (recommended)" if r["backbone"] == rep["recommended"] else ""), str(r["dim"]),
             f"{r['params'] / 1e6:.1f} M", f"{r['images_per_s']:.1f}", ms(r["ovr_accuracy"]), ms(r["softmax_accuracy"]),
             ms(r["ovr_macro_f1"])] for r in rep["rows"]]
    return Tab(f"backbones on {rep['data']}: test accuracy, mean ± std over {rep['seeds']} resplits; forward images/s "
               "on this machine", ["backbone", "dim", "parameters", "images/s", "ovr acc", "softmax acc",
                                   "ovr macro-F1"], rows)


def write_backbones_report(rep: dict, out: str | Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").write_text(json.dumps(rep, indent=2))
    fig, ax = plt.subplots(figsize=(6, 4))
    for r in rep["rows"]:
        for m, marker in (("ovr", "o"), ("softmax", "s")):
            st = r[f"{m}_accuracy"]
            ax.errorbar(r["images_per_s"], st["mean"], yerr=st["std"], fmt=marker, capsize=3,
                        label=f"{r['backbone']} {m}")
    if rep["min_images_per_s"]:
        ax.axvline(rep["min_images_per_s"], color="k", ls=":", lw=1)
    ax.set_xlabel("forward images/s on this machine"), ax.set_ylabel("test accuracy")
    ax.set_title("accuracy against speed"), ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "backbones.png", dpi=110), plt.close(fig)
    rec = rep["recommended"]
    md = [f"# ovr bench --backbones: {rep['data']}", "", backbones_tab(rep).markdown(), "",
          (f"Recommended: **{rec}**, the most accurate (one-vs-rest, mean) of those at least "
           f"{rep['min_images_per_s']:g} images/s fast." if rec else
           f"None is at least {rep['min_images_per_s']:g} images/s fast on this machine."), "",
          "![backbones.png](backbones.png)"]
    (out / "report.md").write_text("\n".join(md) + "\n")
    return out
