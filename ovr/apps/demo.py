"""`ovr demo`: the main job, offline, as steps: scikit-learn's digits as image files -> train one-vs-rest heads on
digits 0-8 -> add digit 9 without retraining the others -> predict a few images -> benchmark one-vs-rest against
softmax. This module does the work and prints nothing: each step is yielded for the CLI to show."""
from __future__ import annotations

import shutil
from pathlib import Path
from typing import Iterator

from ..config import Config
from ..embedding.features import Progress


def run(out: Path, cfg: Config, *, device: str | None = None, engine: str | None = None,
        cache_dir: str | None = None, progress: Progress | None = None) -> Iterator[tuple[str, object]]:
    """Yields ("step", title) before each step's work, then its result: ("trained", (model, embedded folder)),
    ("added", GrowResult), ("predicted", rows), ("bench", report dict, written under OUT/report)."""
    from .bench import run_bench
    from ..embedding.data import write_digits_folder
    from .pipeline import Predictor, add_class, embed_data, model_config, train_model
    from .report import write_bench_report

    digits = write_digits_folder(out / "digits")
    nine = out / "digits-0-8"
    if not nine.exists():  # the first nine classes; digit_9 comes later through add-class
        shutil.copytree(digits, nine, ignore=lambda d, names: ["digit_9"] if Path(d) == digits else [])
    yield "step", f"1. train one-vs-rest heads on digits 0-8 ({cfg.features.backbone} features, cached)"
    yield "trained", train_model(nine, out / "model", cfg, force=True, progress=progress)
    yield "step", "2. add digit_9 without retraining the others"
    mcfg = model_config(out / "model", device=device, cache_dir=cache_dir, engine=engine)
    yield "added", add_class(out / "model", "digit_9", [str(digits / "digit_9")], mcfg, progress=progress)
    yield "step", "3. predict a few images"
    samples = [sorted((digits / f"digit_{d}").glob("*.png"))[-1] for d in (0, 3, 9)]
    pred = Predictor(out / "model", mcfg.features.device, mcfg.features.cache_dir or None, mcfg.features.engine)
    yield "predicted", pred.predict(samples, top_k=2)
    yield "step", "4. benchmark one-vs-rest vs softmax on all ten digits"
    rep = run_bench(embed_data(digits, cfg, progress), cfg, progress=progress)
    write_bench_report(rep, out / "report")
    yield "bench", rep
