"""Results for people (Rich tables, Markdown, plots) and for machines (JSON-ready dicts)."""
from __future__ import annotations

from typing import Any

from rich.table import Table

from .data import SPLITS


def embed_summary(emb) -> dict[str, Any]:
    folder, res = emb.folder, emb.result
    counts = {c: {s: 0 for s in SPLITS} for c in folder.classes}
    for lab, sp in zip(emb.labels, emb.splits):
        counts[folder.classes[lab]][str(sp)] += 1
    return {
        "data": str(folder.root), "classes": folder.classes, "splits_given": folder.splits_given,
        "images": counts, "usable": len(res.keys), "cached": res.n_cached, "embedded": res.n_new,
        "skipped": [{"path": str(p), "reason": r} for p, r in res.skipped],
        "backbone": emb.backbone.spec() if emb.backbone else None,
        "dim": int(res.embeddings.shape[1]), "seconds": round(res.seconds, 3),
    }


def embed_table(emb) -> Table:
    s = embed_summary(emb)
    t = Table(title=f"Embedded {s['data']}")
    t.add_column("class")
    for sp in SPLITS:
        t.add_column(sp, justify="right")
    for c, row in s["images"].items():
        t.add_row(c, *(str(row[sp]) for sp in SPLITS))
    t.add_row("[bold]total", *(f"[bold]{sum(r[sp] for r in s['images'].values())}" for sp in SPLITS))
    return t


def embed_line(emb) -> str:
    s = embed_summary(emb)
    return (f"{s['usable']} images: {s['cached']} from cache, {s['embedded']} newly embedded, "
            f"{len(s['skipped'])} skipped; backbone {s['backbone']['name']} (dim {s['dim']}); {s['seconds']:.1f} s")


def metrics_tables(m: dict) -> list[Table]:
    s = Table(title=f"{m.get('split', '')} split: {m['n']} images")
    s.add_column("metric"), s.add_column("value", justify="right")
    for k in ["accuracy", "macro_f1", "balanced_accuracy", "top2_accuracy", "top3_accuracy", "nll", "ece",
              "ece_calibrated", "unknown_rate"]:
        if k in m:
            s.add_row(k, f"{m[k]:.4f}")
    pc = Table(title="per class")
    for col in ["class", "precision", "recall", "F1", "support"]:
        pc.add_column(col, justify="left" if col == "class" else "right")
    for c, r in m["per_class"].items():
        pc.add_row(c, f"{r['precision']:.3f}", f"{r['recall']:.3f}", f"{r['f1']:.3f}", str(r["support"]))
    cm = Table(title="confusion matrix (rows: true, columns: predicted)")
    cm.add_column("")
    for i in range(len(m["classes"])):
        cm.add_column(str(i), justify="right")
    for i, (c, row) in enumerate(zip(m["classes"], m["confusion_matrix"])):
        cm.add_row(f"{i} {c}", *(str(v) for v in row))
    return [s, pc, cm]
