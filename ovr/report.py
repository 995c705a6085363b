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
