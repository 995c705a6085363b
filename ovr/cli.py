"""The `ovr` command line: parses flags into a Config and calls the library. The only module importing typer."""
from __future__ import annotations

import json
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from .atomic import check_writable
from .config import AnswerOptions, BenchConfig, DataConfig, FeatureConfig, TrainConfig
from .errors import OvrError
from .apps.serve import MAX_BATCH  # torch-free, FastAPI-free: the module imports its extra inside create_app

# Help text is Rich markup: a bracket before a lowercase word opens a tag and vanishes unless escaped ("ovr\\[serve]").
app = typer.Typer(no_args_is_help=True, rich_markup_mode="rich",
                  help="One-vs-rest image classification on frozen pretrained features.\n\n"
                       "Embeddings are cached per (backbone, weights, preprocessing, image content); "
                       "one binary head per class, trained in parallel; classes can be added one at a time.")
# Piped or redirected output is plain and complete: no terminal width to fit, so tables keep every value whole.
console = Console(width=None if sys.stdout.isatty() else 4096)
err = Console(stderr=True)

def _d(section: type, key: str) -> str:
    """`[default: X]` for help text, read from the config dataclasses (the one place defaults are written)."""
    v = getattr(section(), key)
    if isinstance(v, bool):
        v = "on" if v else "off"
    elif isinstance(v, tuple):
        v = f"{len(v)} values, {v[0]:g} to {v[-1]:g}" if len(v) > 1 else f"{v[0]:g}"
    elif isinstance(v, float):
        v = f"{v:g}"
    return f"\\[default: {v}]"


# Options shared by several commands (None = take it from --config, then the built-in default).
ConfigOpt = Annotated[Optional[Path], typer.Option("--config", help="TOML config file; flags given here override it.")]
BackboneOpt = Annotated[Optional[str], typer.Option(help=f"Backbone name (see `ovr backbones`). {_d(FeatureConfig, 'backbone')}")]
WeightsOpt = Annotated[Optional[str], typer.Option(help="'default' (pretrained), 'none' (random init) or a local .pth/.safetensors state dict.")]
EngineOpt = Annotated[Optional[str], typer.Option(help="What runs the backbone: auto (onnxruntime on the CPU where it is installed, torch on CUDA) | torch | onnxruntime. Both give the same embeddings (to float32 rounding) and share the cache. auto is the default")]
DeviceOpt = Annotated[Optional[str], typer.Option(help=f"auto | cpu | cuda. {_d(FeatureConfig, 'device')}")]
BatchOpt = Annotated[Optional[int], typer.Option("--batch-size", help=f"Images per forward pass. {_d(FeatureConfig, 'batch_size')}")]
WorkersOpt = Annotated[Optional[int], typer.Option(help=f"DataLoader decode workers (-1: on CUDA all cores but one, on CPU the cores the compute threads leave; at most 8). {_d(FeatureConfig, 'workers')}")]
DtypeOpt = Annotated[Optional[str], typer.Option("--dtype", help=f"Storage of new embeddings in the cache: float32 | float16 (half the size) | auto (float16 on CUDA). {_d(FeatureConfig, 'dtype')}")]
FrameOpt = Annotated[Optional[str], typer.Option("--frame", help="What the backbone sees of each image: crop (its own resize + centre crop) | full (the whole image resized to its input size) | auto (crop for single-label data, full for multi-label). Part of the cache key, recorded in the model. auto is the default")]
DecodeOpt = Annotated[Optional[str], typer.Option("--decode", help=f"How images become pixels: pil (PIL decode and resize) | tensor (torchvision.io JPEG decode, nvJPEG on CUDA, resize on tensors; inputs within a gray level or two of pil's, faster to preprocess) | auto (= tensor). Recorded in the cache key and the model. {_d(FeatureConfig, 'decode')}")]
DataArg = Annotated[Path, typer.Argument(help="Image folder: DATA/<class>/* or DATA/train|val|test/<class>/*; or a CSV/TSV manifest with path,labels[,split] columns (labels separated by ; or |: multi-label).")]
TtaOpt = Annotated[int, typer.Option(help="Test-time augmentation: average each head's logits over the image and this many augmented views (0: off).")]
CacheOpt = Annotated[Optional[str], typer.Option("--cache-dir", help="Embedding cache folder. \\[default: $OVR_CACHE_DIR or ~/.cache/ovr]")]
StrictOpt = Annotated[Optional[bool], typer.Option("--strict/--no-strict", help="Treat an unreadable image as an error instead of skipping it.")]


JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON on stdout instead of tables.")]
JsonOutOpt = Annotated[Optional[Path], typer.Option("--json-out", help="Also write the JSON to this file.")]


def _json(obj, as_json: bool, json_out: Path | None) -> bool:
    """The one JSON convention: --json prints it to stdout (and nothing else), --json-out FILE writes it."""
    text = json.dumps(obj, indent=2, ensure_ascii=False)
    if json_out:
        from .atomic import atomic_write_bytes, check_output_file

        atomic_write_bytes(check_output_file(json_out, "cannot write --json-out"), text.encode())
    if as_json:
        print(text)
    return as_json


def _heads_json(model: Path, names: list[str]) -> dict:
    """What the manifest records of these heads (strength and its validation path, solver, calibration,
    threshold, validation metrics, file): the JSON twin of the train table."""
    from .learn.manifest import read_manifest

    heads = read_manifest(model)["heads"]
    return {c: heads[c] for c in names}


def _rule(title: str) -> None:
    """A section title: a rule on a terminal, a plain line when piped (a rule would span the piped width)."""
    if console.is_terminal:
        console.rule(title)
    else:
        console.print(f"== {title} ==", highlight=False)


def _version(value: bool) -> None:
    if value:
        from .version import __version__
        print(f"ovr {__version__}")
        raise typer.Exit()


EMBEDDING_COMMANDS = {"embed", "train", "predict", "evaluate", "add-class", "refresh", "bench", "serve", "demo"}


@app.callback()
def _root(ctx: typer.Context,
          version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True,
                                                help="Print the version and exit.")] = False,
          threads: Annotated[Optional[int], typer.Option("--threads", help="Compute threads (torch's and onnxruntime's pools); 0: the cores other processes are not using right now. Also $OVR_THREADS. 0 is the default")] = None) -> None:
    """One-vs-rest image classification on frozen pretrained features."""
    import os

    from .embedding.engine import INSTALL_HINT, available

    if ctx.invoked_subcommand in EMBEDDING_COMMANDS and "--engine" not in sys.argv and not available():
        err.print(f"note: the backbone runs on torch; {INSTALL_HINT} for the faster CPU engine", highlight=False)

    if threads is not None:
        if threads < 0:
            _fail(OvrError(f"--threads must be 0 (automatic) or more, got {threads}"))
        os.environ["OVR_THREADS"] = str(threads)


def _on_sigterm(signum, frame) -> None:
    """SIGTERM (torchrun stopping the other ranks when one fails, `timeout`, a service manager) unwinds like Ctrl-C:
    finished batches are written as a shard and temp files removed, instead of a half-written .tmp left behind
    (seen in the killed-rank test)."""
    raise SystemExit(128 + signum)


def main() -> None:
    import signal

    signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        app()
    except OvrError as e:
        err.print(f"[bold red]error:[/] {escape(str(e))}", highlight=False)
        sys.exit(2)


def _fail(e: OvrError) -> None:
    err.print(f"[bold red]error:[/] {escape(str(e))}", highlight=False, soft_wrap=True)
    raise typer.Exit(2)


@contextmanager
def user_errors():
    """OvrError -> one red line and exit code 2, for CliRunner and the console script alike."""
    try:
        yield
    except OvrError as e:
        _fail(e)
    except KeyboardInterrupt:
        err.print("interrupted: finished cache shards and saved models are kept; run again to resume")
        raise typer.Exit(130) from None
    except OSError as e:
        import errno

        if e.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        where = f" writing {e.filename}" if e.filename else ""
        _fail(OvrError(f"no space left on the device{where}; free some space and run again (finished cache "
                       f"shards and saved models are kept, nothing half-written)"))


def _rate(stage: str, done: int, elapsed: float) -> str:
    """Images per second for the stages that count images, once a second has passed (a rate over the first
    batch alone is noise); other stages (solves, benchmark runs) show no rate: theirs means nothing."""
    if elapsed < 1.0 or not done or stage not in ("embed", "hash", "views"):
        return ""
    return f"{done / elapsed:,.0f} img/s"


@contextmanager
def progress_bar():
    """A Rich progress bar and the (stage, done, total) callback the library reports through."""
    with Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                  TextColumn("{task.fields[rate]}"), TimeElapsedColumn(), TimeRemainingColumn(),
                  console=err, transient=False) as prog:
        tasks: dict[str, int] = {}

        def cb(stage: str, done: int, total: int, **info) -> None:
            if stage not in tasks:
                tasks[stage] = prog.add_task(stage, total=total, rate="")
            t = tasks[stage]
            task = prog.tasks[t]
            rate = _rate(stage, done, task.elapsed or 0.0)
            if info:
                rate = " ".join(f"{k}={v}" for k, v in info.items())
            prog.update(t, completed=done, total=total, rate=rate)

        yield cb


def _config(config, **flags):
    from .config import load_config
    return load_config(config, flags)


def _floats(text: str | None, flag: str) -> tuple[float, ...] | None:
    if text is None:
        return None
    try:
        return tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise OvrError(f"{flag} takes numbers separated by commas, got {text!r}") from None


def _early(model: Path | None = None, *, data: Path | None = None, inputs: list[str] | None = None,
           cfg=None, out: Path | None = None, force: bool = False, new_class: str | None = None,
           replace: bool = False, json_out: Path | None = None):
    """The checks users trip over most, before torch is imported (2-3 s): the model's manifest, the data folder
    (scanned in full when cfg is given; the ImageFolder is returned for the library to use), the inputs, --out."""
    from .embedding.data import check_data_path, expand_inputs, scan_folder
    from .learn.manifest import check_can_write, read_manifest

    if model is not None:
        manifest = read_manifest(model)
        if new_class is not None and new_class in manifest.get("classes", []) and not replace:
            raise OvrError(f"class {new_class!r} already exists in {model}; pass --replace to retrain it")
    if out is not None:
        check_can_write(Path(out), force)
    if json_out is not None:
        from .atomic import check_output_file

        check_output_file(json_out, "cannot write --json-out")
    if inputs is not None:
        expand_inputs(inputs)
    if data is not None:
        if cfg is None:
            check_data_path(data)
            return None
        return scan_folder(data, cfg.data.val_fraction, cfg.data.test_fraction, cfg.data.split_seed)
    return None


def _warn_skipped(skipped, notes=()) -> None:
    for note in notes:
        err.print(f"[yellow]note:[/] {escape(note)}", highlight=False, soft_wrap=True)
    for p, why in skipped:
        err.print(f"[yellow]warning:[/] skipped {escape(str(p))}: {escape(str(why))}", highlight=False, soft_wrap=True)


@app.command()
def backbones(
    measure: Annotated[bool, typer.Option("--measure", help="Also build each backbone whose weights are here and measure its parameters and forward images/s on this machine (a batch of 16, best of 3).")] = False,
    device: DeviceOpt = None, engine: EngineOpt = None, cache_dir: CacheOpt = None, as_json: JsonOpt = False,
) -> None:
    """List the built-in backbones: embedding size, whether their weights are usable offline right now, and with
    --measure their size and speed here. Any timm model is `timm:NAME`, any torchvision one `torchvision:NAME`."""
    with user_errors():
        from .embedding.backbones import REGISTRY

        if measure:
            from .embedding.backbones import load_backbone, measure as measure_backbone
            from .embedding.cache import default_cache_dir
            from .embedding.engine import attach
            from .runtime import resolve_device

            dev = resolve_device(device or "auto")
            root = Path(cache_dir) if cache_dir else default_cache_dir()
        rows = []
        for info in REGISTRY.values():
            row = {"name": info.name, "dim": info.dim, "weights_available": info.available(), "source": info.source}
            if measure:
                row["parameters"] = row["images_per_s"] = None
                if row["weights_available"]:
                    bb = load_backbone(info.name, "default", root, "tensor")
                    attach(bb, engine or "auto", dev, root)
                    r = measure_backbone(bb, dev)
                    row["parameters"], row["images_per_s"] = r["params"], r["images_per_s"]
            rows.append(row)
        where = (f"measured on {dev} with the {engine or 'auto'} engine, {__import__('torch').get_num_threads()} "
                 "threads") if measure else None
        if as_json:
            print(json.dumps({"backbones": rows, **({"measured": where} if where else {})}, indent=2))
            return
        t = Table(title="Backbones (also timm:NAME and torchvision:NAME)")
        for col in ("name", "dim", "weights available", *(("parameters", "images/s") if measure else ()), "source"):
            t.add_column(col, justify="right" if col in ("dim", "parameters", "images/s") else "left")
        for row in rows:
            cells = [escape(row["name"]), str(row["dim"]),
                     "[green]yes[/]" if row["weights_available"] else "[yellow]no[/] (use --weights FILE)"]
            if measure:
                ok = row["parameters"] is not None
                cells += [f"{row['parameters'] / 1e6:.1f} M" if ok else "-", f"{row['images_per_s']:.1f}" if ok else "-"]
            t.add_row(*cells, escape(row["source"]))
        console.print(t)
        if where:
            err.print(where, highlight=False)


@app.command()
def embed(
    data: DataArg,
    *, backbone: BackboneOpt = None, weights: WeightsOpt = None, device: DeviceOpt = None, engine: EngineOpt = None, batch_size: BatchOpt = None,
    workers: WorkersOpt = None, cache_dir: CacheOpt = None, strict: StrictOpt = None, config: ConfigOpt = None,
    dtype: DtypeOpt = None, decode: DecodeOpt = None, frame: FrameOpt = None, as_json: JsonOpt = False, json_out: JsonOutOpt = None,
) -> None:
    """Embed every image of DATA into the cache (a second run over the same images embeds nothing).

    Across processes and machines: torchrun --nproc_per_node=K -m ovr embed DATA (each rank embeds its share of
    what is not cached yet; rank 0 reports)."""
    with user_errors():
        cfg = _config(config, backbone=backbone, weights=weights, device=device, engine=engine, batch_size=batch_size,
                      workers=workers, cache_dir=cache_dir, strict=strict, dtype=dtype, decode=decode, frame=frame)
        folder = _early(data=data, cfg=cfg, json_out=json_out)
        import os

        from .embedding.cache import hash_files
        from .embedding.identity import all_cached

        if os.environ.get("RANK", "0") == "0":  # each file read and hashed once: for the check below and the embedding
            with progress_bar() as cb:
                hashed = hash_files(folder.paths, cb)
        else:
            hashed = hash_files(folder.paths)
        warm = all_cached(folder.paths, cfg.features, hashed, cfg.features.frame_for(folder.multilabel))  # all cached: answered without importing torch
        if warm is not None:
            from .apps.report import summary_of

            _embed_report(summary_of(folder, warm, folder.labels, folder.splits, warm.spec, warm.spec["dim"]),
                          as_json, json_out, folder.notes)
            return
        from contextlib import nullcontext

        from .apps.pipeline import embed_ranked

        with progress_bar() if os.environ.get("RANK", "0") == "0" else nullcontext() as cb:
            rank, emb = embed_ranked(folder, cfg, hashed, cb)
        if rank != 0:
            return
        from .apps.report import embed_summary

        _embed_report(embed_summary(emb), as_json, json_out, emb.folder.notes, emb.result.skipped)


def _embed_report(s: dict, as_json: bool, json_out: Path | None, notes: list[str], skipped=()) -> None:
    _warn_skipped(list(skipped), notes)
    from .apps.report import embed_line, embed_table

    if _json(s, as_json, json_out):
        return
    console.print(embed_table(s))
    console.print(embed_line(s), highlight=False)


def _calibration_label(kind: str, asked: str, ridge: bool, val_positives: int | None = None) -> str:
    """A head's calibration for the train table and `info`; "none" where one was asked for says why (too few
    validation positives to test it on, or it did not help on held-out rows; ridge heads are never calibrated)."""
    if kind != "none" or asked == "none" or ridge:
        return kind
    if val_positives is not None and val_positives < 2:  # `aggregate.fit_calibration` needs one in each half
        return "none: fewer than 2 val positives"
    return "none: no gain on held-out val rows"


def _measured(val: dict | None) -> dict:
    """A head's validation scores, or none where it had no validation positive (its precision, recall and F1 are
    then 0 by convention, not a measurement)."""
    return {} if not val or val.get("positives") == 0 else val


def _train_table(model, title: str, names=None) -> Table:
    t = Table(title=title)
    for col, just in [("class", "left"), ("positives", "right"), ("negatives", "right"), ("L2", "right"),
                      ("iterations", "right"), ("val loss", "right"), ("calibration", "left"), ("threshold", "right"), ("val P", "right"),
                      ("val R", "right"), ("val F1", "right")]:
        # narrow terminals wrap names (never cut them) and keep numbers whole
        t.add_column(col, justify=just, overflow="fold", no_wrap=col != "class")
    for c in names or model.classes:
        r = model.records[c]
        v = r.val or {}
        f = lambda x: "-" if x is None else f"{x:.3f}"  # noqa: E731
        its = (f"0 ({r.solver}: the warm start was already converged)" if r.iterations == 0 and r.solver == "lbfgs"
               else f"{r.iterations} ({r.solver})")
        scored = _measured(v)
        t.add_row(escape(c), str(r.positives), str(r.negatives), f"{r.l2:g}", its,
                  f(r.val_loss), _calibration_label(r.calibration.kind, model.calibration, r.solver == "ridge",
                                                    v.get("positives")),
                  f(r.threshold), *(f(scored.get(k)) for k in ("precision", "recall", "f1")))
    return t


@app.command()
def train(
    data: DataArg,
    *, out: Annotated[Path, typer.Option("--out", "-o", help="Model folder to write.")],
    backbone: BackboneOpt = None, weights: WeightsOpt = None, device: DeviceOpt = None, engine: EngineOpt = None, batch_size: BatchOpt = None,
    workers: WorkersOpt = None, cache_dir: CacheOpt = None, strict: StrictOpt = None, dtype: DtypeOpt = None,
    decode: DecodeOpt = None, frame: FrameOpt = None,
    head: Annotated[Optional[str], typer.Option(help=f"linear | mlp. {_d(TrainConfig, 'head')}")] = None,
    hidden: Annotated[Optional[int], typer.Option(help=f"Hidden units of an mlp head. {_d(TrainConfig, 'hidden')}")] = None,
    epochs: Annotated[Optional[int], typer.Option(help=f"Max epochs; each head stops early on its val loss. {_d(TrainConfig, 'epochs')}")] = None,
    lr: Annotated[Optional[float], typer.Option(help=f"Adam learning rate. {_d(TrainConfig, 'lr')}")] = None,
    seed: Annotated[Optional[int], typer.Option(help="Global seed; each head's seed derives from it and its class name.")] = None,
    pos_weight: Annotated[Optional[bool], typer.Option("--pos-weight/--no-pos-weight", help=f"Weight positives by negatives/positives per head. {_d(TrainConfig, 'pos_weight')}")] = None,
    l2_grid: Annotated[Optional[str], typer.Option("--l2-grid", help=f"L2 strengths each head chooses from on the val split, comma-separated (one value: no search). {_d(TrainConfig, 'l2_grid')}")] = None,
    l2_search: Annotated[Optional[str], typer.Option("--l2-search", help=f"How linear heads search the L2 strengths: path (strong to weak, warm-started, each head stops once its validation loss stops improving) | sweep (every strength). {_d(TrainConfig, 'l2_search')}")] = None,
    search_rows: Annotated[Optional[int], typer.Option("--search-rows", help=f"The L2 path runs on at most this many training rows (seeded subset; 0: all), then each head is solved on all rows at its strength. {_d(TrainConfig, 'search_rows')}")] = None,
    tol: Annotated[Optional[float], typer.Option(help=f"Linear heads: stop at this max |gradient| (scikit-learn's tol). {_d(TrainConfig, 'tol')}")] = None,
    val_fraction: Annotated[Optional[float], typer.Option("--val-fraction", help=f"Share of each class held out to choose strengths and calibrate. {_d(DataConfig, 'val_fraction')}")] = None,
    test_fraction: Annotated[Optional[float], typer.Option("--test-fraction", help=f"Share of each class kept for `ovr evaluate`. {_d(DataConfig, 'test_fraction')}")] = None,
    split_seed: Annotated[Optional[int], typer.Option("--split-seed", help=f"Seed of the train/val/test split. {_d(DataConfig, 'split_seed')}")] = None,
    views: Annotated[Optional[int], typer.Option(help=f"Augmented views per training image besides the plain one (random resized crop, flip, colour jitter; seeded, cached). Validation and test stay plain. {_d(TrainConfig, 'views')}")] = None,
    normalize: Annotated[Optional[str], typer.Option(help=f"standardize | l2 feature normalisation. {_d(TrainConfig, 'normalize')}")] = None,
    calibration: Annotated[Optional[str], typer.Option(help=f"platt | temperature | none, fitted per head on val. {_d(TrainConfig, 'calibration')}")] = None,
    force: Annotated[bool, typer.Option("--force", help="Overwrite an existing model folder.")] = False,
    config: ConfigOpt = None, as_json: JsonOpt = False, json_out: JsonOutOpt = None,
) -> None:
    """Embed DATA (through the cache) and train one binary head per class, all in parallel."""
    with user_errors():
        from .apps.report import embed_line, embed_summary

        cfg = _config(config, backbone=backbone, weights=weights, device=device, engine=engine, batch_size=batch_size,
                      workers=workers, cache_dir=cache_dir, strict=strict, head=head, hidden=hidden, epochs=epochs,
                      lr=lr, seed=seed, pos_weight=pos_weight, normalize=normalize, calibration=calibration,
                      l2_grid=_floats(l2_grid, "--l2-grid"), l2_search=l2_search, search_rows=search_rows, tol=tol,
                      val_fraction=val_fraction, test_fraction=test_fraction, split_seed=split_seed, views=views, dtype=dtype,
                      decode=decode, frame=frame)
        folder = _early(data=data, cfg=cfg, out=out, force=force, json_out=json_out)
        from .apps.pipeline import train_model

        with progress_bar() as cb:
            model, emb = train_model(folder, out, cfg, force=force, progress=cb)
        _warn_skipped(emb.result.skipped, emb.folder.notes)
        summary = embed_summary(emb)
        if _json({"model": str(out), "embedding": summary, "heads": _heads_json(out, model.classes)}, as_json,
                 json_out):
            return
        console.print(embed_line(summary), highlight=False)
        console.print(_train_table(model, f"{len(model.classes)} heads ({model.head_type}) trained -> {out}"))


@app.command()
def predict(
    model: Annotated[Path, typer.Argument(help="Model folder.")],
    *, paths: Annotated[list[str], typer.Argument(help="Image files, folders or glob patterns.")],
    top_k: Annotated[int, typer.Option("--top-k", help="Classes to show per image.")] = 1,
    reject_below: Annotated[Optional[float], typer.Option("--reject-below", help="Answer 'unknown' when the best confidence is below T.")] = None,
    thresholds: Annotated[bool, typer.Option("--thresholds", help="Answer 'unknown' when the answer's head does not pass its stored threshold.")] = False,
    multilabel: Annotated[bool, typer.Option("--multilabel", help="Also list every class whose head fires.")] = False,
    calibrated: Annotated[bool, typer.Option("--calibrated", help="Use the stored per-head calibration.")] = False,
    tta: TtaOpt = 0,
    as_json: Annotated[bool, typer.Option("--json", help="One JSON object per image on stdout.")] = False,
    device: DeviceOpt = None, engine: EngineOpt = None, cache_dir: CacheOpt = None,
) -> None:
    """Classify images with a trained model (a corrupt image gets an error row; the rest are still predicted).

    With the onnxruntime engine (the default on a CPU), a few images are answered without importing torch once the
    backbone's graph and this model's answer for these options are in the cache (the first such predict makes them)."""
    with user_errors():
        from .embedding.data import expand_inputs

        options = AnswerOptions(top_k=top_k, reject_below=reject_below, thresholds=thresholds,
                                 multilabel=multilabel, calibrated=calibrated, tta=tta)
        ignored: dict[str, int] = {}
        files = expand_inputs(paths, ignored)
        _early(model=model)
        if ignored:
            from .embedding.data import describe_ignored
            _warn_skipped([], [describe_ignored(ignored) + " in the folders given"])
        from .apps import quick

        rows = quick.predict(model, files, options, cache_dir=cache_dir, engine=engine or "auto",
                             device=device or "auto")
        pred = None
        if rows is None:  # the torch path
            from .apps.pipeline import Predictor

            pred = Predictor(model, device or "auto", cache_dir, engine or "auto")
            rows = pred.predict(files, options)
        failed = _print_predictions(rows, f"Predictions of {model}", top_k, multilabel, as_json)
        if pred is not None:  # after the answers are out: what the torch-free path needs next time
            quick.prepare(pred, options)
        if failed:
            raise typer.Exit(1)


def _print_predictions(rows: list[dict], title: str, top_k: int, multilabel: bool, as_json: bool) -> bool:
    """predict's rows as JSON lines or a Rich table; True when none of the images could be read."""
    failed = all("error" in r for r in rows)
    if as_json:
        for r in rows:
            print(json.dumps(r, ensure_ascii=False))
        return failed
    t = Table(title=title)
    for col in ["file", "class", "confidence", "runner-up"] + (["top-k"] if top_k > 1 else []) + (["labels"] if multilabel else []):
        t.add_column(col, justify="right" if col == "confidence" else "left")
    for r in rows:
        if "error" in r:
            t.add_row(escape(r["input"]), "[red]error: " + escape(r["error"]), "", "")
            continue
        ru = r.get("runner_up")
        extra = [", ".join(f"{x['class']} {x['confidence']:.2f}" for x in r["top"])] if top_k > 1 else []
        extra += [", ".join(r["labels"])] if multilabel else []
        t.add_row(escape(r["input"]), escape(r["class"]), f"{r['confidence']:.3f}",
                  escape(f"{ru['class']} {ru['confidence']:.3f}") if ru else "", *map(escape, extra))
    console.print(t)
    if failed:
        err.print(f"[bold red]error:[/] none of the {len(rows)} images could be read", highlight=False)
    return failed


@app.command()
def evaluate(
    model: Annotated[Path, typer.Argument(help="Model folder.")],
    data: Annotated[Path, typer.Argument(help="Image folder (or CSV/TSV manifest), split as at training time.")],
    *, split: Annotated[str, typer.Option(help="train | val | test | all (every image of DATA).")] = "test",
    reject_below: Annotated[Optional[float], typer.Option("--reject-below")] = None,
    thresholds: Annotated[bool, typer.Option("--thresholds", help="Unknown when the answer's head does not pass its stored threshold.")] = False,
    calibrated: Annotated[bool, typer.Option("--calibrated", help="Use the stored per-head calibration.")] = False,
    tta: TtaOpt = 0,
    report: Annotated[Optional[Path], typer.Option("--report", help="Also write DIR/report.md + report.json + PNGs: per-class scores, confusion matrix, per-head curves, error gallery.")] = None,
    as_json: JsonOpt = False, json_out: JsonOutOpt = None,
    device: DeviceOpt = None, engine: EngineOpt = None, cache_dir: CacheOpt = None,
) -> None:
    """Accuracy, macro-F1, balanced accuracy, per-class metrics, confusion matrix and ECE on one split."""
    with user_errors():
        from .embedding.data import check_split

        check_split(split)
        options = AnswerOptions(reject_below=reject_below, thresholds=thresholds, calibrated=calibrated, tta=tta)
        _early(model=model, data=data, json_out=json_out)
        if report is not None:
            from .atomic import check_output_folder

            check_output_folder(report, "cannot write the report: folder")
        from .apps.pipeline import evaluate_model
        from .apps.report import metrics_tables

        with progress_bar() as cb:
            m = evaluate_model(model, data, split, options, device=device, cache_dir=cache_dir, engine=engine, progress=cb)
        _warn_skipped(m.get("skipped_files", []), m.get("notes", []))  # as train says them
        if report is not None:
            from .learn.manifest import read_manifest
            from .apps.report import write_model_report

            write_model_report(m, read_manifest(model), report)
            err.print(f"report: {escape(str(report / 'report.md'))}", highlight=False)
        if _json(m, as_json, json_out):
            return
        for t in metrics_tables(m):
            console.print(t)


def _grow_config(model: Path, config, **flags):
    from .apps.pipeline import model_config
    return model_config(model, config, **flags)


def _print_confused(confused: dict[str, float]) -> None:
    if confused:
        names = ", ".join(f"{escape(c)} ({r:.0%})" for c, r in sorted(confused.items(), key=lambda x: -x[1]))
        console.print(f"[yellow]old heads that fire on the new images:[/] {names}\n"
                      f"  they never saw this class as a negative; each answer already weighs them by the gate "
                      f"(the chance that the image is of a class they never saw), and `ovr refresh MODEL` would retrain just those.",
                      highlight=False)


@app.command("add-class")
def add_class_cmd(
    model: Annotated[Path, typer.Argument(help="Model folder.")],
    name: Annotated[str, typer.Argument(help="Name of the new class.")],
    images: Annotated[list[str], typer.Argument(help="Its images: folders, files or glob patterns.")],
    *, negatives: Annotated[Optional[Path], typer.Option(help="Extra negatives: an image folder (its images are never this class).")] = None,
    replace: Annotated[bool, typer.Option("--replace", help="Retrain the class if it already exists.")] = False,
    refresh_confused: Annotated[bool, typer.Option("--refresh", help="Then retrain the old heads that fire on the new images (as `ovr refresh` would); the rest stay byte-identical.")] = False,
    backbone: BackboneOpt = None, device: DeviceOpt = None, engine: EngineOpt = None, cache_dir: CacheOpt = None, strict: StrictOpt = None,
    config: ConfigOpt = None, as_json: JsonOpt = False, json_out: JsonOutOpt = None,
) -> None:
    """Train one new head (negatives: the model's cached training embeddings); every other head file stays byte-identical."""
    with user_errors():
        _early(model=model, inputs=images, new_class=name, replace=replace,  # an existing class: before any work
               json_out=json_out)
        from .apps.pipeline import add_class, load_model, refresh as do_refresh

        cfg = _grow_config(model, config, backbone=backbone, device=device, engine=engine, cache_dir=cache_dir, strict=strict)
        with progress_bar() as cb:
            r = add_class(model, name, images, cfg, replace=replace, negatives=negatives, progress=cb)
        _warn_skipped(r.skipped)
        for other, n in r.remembered_as.items():
            err.print(f"[yellow]warning:[/] {n} of these images are already examples of {escape(other)}; "
                      f"both classes now claim them (remove-class {escape(other)} if it was a mistake)", highlight=False)
        rr = None
        if refresh_confused and r.confused:
            with progress_bar() as cb:
                rr = do_refresh(model, sorted(r.confused), cfg, progress=cb)
        refreshed = rr.changed if rr else []
        if _json({"model": str(model), "added": name, "images": r.images, "seconds": r.seconds,
                  "train_seconds": r.train_seconds, "old_heads_firing": r.confused, "refreshed": refreshed,
                  "refresh_seconds": rr.seconds if rr else 0.0, "heads": _heads_json(model, [name, *refreshed])},
                 as_json, json_out):
            return
        console.print(f"added [bold]{escape(name)}[/] from {r.images} images in {r.seconds:.1f} s "
                      f"(head and gate {r.train_seconds:.2f} s)", highlight=False)
        console.print(_train_table(load_model(model), f"new head in {model}", [name]))
        if rr is None:
            _print_confused(r.confused)
            return
        n = len(rr.changed)
        console.print(f"refreshed {n} old head{'s' * (n != 1)} that fired on {escape(name)} in {rr.seconds:.1f} s", highlight=False)
        console.print(_train_table(load_model(model), f"refreshed heads in {model}", rr.changed))


@app.command()
def refresh(
    model: Annotated[Path, typer.Argument(help="Model folder.")],
    classes: Annotated[Optional[list[str]], typer.Argument(help="Heads to retrain; none: those confused by newer classes.")] = None,
    device: DeviceOpt = None, engine: EngineOpt = None, cache_dir: CacheOpt = None, config: ConfigOpt = None,
    as_json: JsonOpt = False, json_out: JsonOutOpt = None,
) -> None:
    """Retrain chosen old heads with all current negatives; the other heads stay byte-identical."""
    with user_errors():
        _early(model=model, json_out=json_out)
        from .apps.pipeline import load_model, refresh as do_refresh

        cfg = _grow_config(model, config, device=device, engine=engine, cache_dir=cache_dir)
        with progress_bar() as cb:
            r = do_refresh(model, classes or [], cfg, progress=cb)
        if _json({"model": str(model), "refreshed": r.changed, "seconds": r.seconds,
                  "heads": _heads_json(model, r.changed)}, as_json, json_out):
            return
        if not r.changed:
            console.print("no head fires on newer classes; nothing to refresh")
            return
        n = len(r.changed)
        console.print(f"refreshed {n} head{'s' * (n != 1)} in {r.seconds:.1f} s", highlight=False)
        console.print(_train_table(load_model(model), f"refreshed heads in {model}", r.changed))


@app.command("remove-class")
def remove_class_cmd(
    model: Annotated[Path, typer.Argument(help="Model folder.")],
    name: Annotated[str, typer.Argument(help="Class to remove.")],
    as_json: JsonOpt = False, json_out: JsonOutOpt = None,
) -> None:
    """Remove one head; the rest stay byte-identical."""
    with user_errors():
        _early(model=model, json_out=json_out)
        from .apps.pipeline import remove_class

        remove_class(model, name)
        if _json({"model": str(model), "removed": name}, as_json, json_out):
            return
        console.print(f"removed {escape(name)} from {escape(str(model))}", highlight=False)


@app.command()
def info(
    model: Annotated[Path, typer.Argument(help="Model folder.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print the manifest as JSON.")] = False,
    verify: Annotated[bool, typer.Option("--verify", help="Also read every head, example and gate file: sha256, tensor names, shapes, finite values (loads torch; slower).")] = False,
) -> None:
    """The model's backbone and a table of its heads (from the manifest; --verify checks the files too)."""
    with user_errors():
        from .learn.manifest import GATE_METHODS, read_manifest

        m = read_manifest(model)
        if verify:
            from .learn.store import load_model

            load_model(model)  # every check a prediction relies on; the first problem is an OvrError
        if as_json:
            print(json.dumps(m, indent=2, ensure_ascii=False))
            return
        b = m["backbone"]
        console.print(f"[bold]{escape(str(model))}[/]: {len(m['classes'])} {m['head_type']} heads on [bold]{b['name']}[/] "
                      f"(weights {b['weights']}, dim {b['dim']}, fingerprint {b['fingerprint'][:12]}, "
                      f"decode {b.get('decode', 'pil')}, frame {b.get('frame', 'crop')}), "
                      f"{m['examples']['count']} remembered examples, ovr {m['ovr_version']}", highlight=False)
        if any(h.get("trained_with") is None for h in m["heads"].values()):
            console.print("this model was written before ovr recorded which classes each head saw: they are inferred "
                          "from when each head was created (heads of one training run saw each other)", highlight=False)
        t = Table(title="heads")
        right = ("positives", "negatives", "L2", "val F1", "threshold", "saw")
        for col in ["class", "positives", "negatives", "L2", "val F1", "calibration", "threshold", "saw", "created",
                    "sha256"]:
            t.add_column(col, justify="right" if col in right else "left", overflow="fold", no_wrap=col != "class")
        for c in m["classes"]:
            h = m["heads"][c]
            val = h.get("val") or {}
            f1 = _measured(val).get("f1")
            tw = h.get("trained_with")
            saw = "?" if tw is None else f"{len(set(tw) & set(m['classes']))}/{len(m['classes'])}"
            t.add_row(escape(c), str(h["positives"]), str(h["negatives"]), f"{h['l2']:g}",
                      "-" if f1 is None else f"{f1:.3f}", _calibration_label((h.get("calibration") or {}).get("kind", "none"), m.get("calibration", "platt"),
                                        m.get("head_type") == "ridge", val.get("positives")), f"{h['threshold']:.3f}", saw,
                      h["created"][:19],
                      h["sha256"][:12])
        console.print(t)
        console.print(f"verified: {len(m['classes'])} head files (sha256, tensors, shapes, finite values), examples"
                      f"{' and gate' if m.get('gate') else ''}" if verify else
                      "head files not read (the manifest was checked); `ovr info --verify` reads and checks them",
                      highlight=False)
        if m.get("gate"):
            console.print("some heads never saw some classes (saw < all): their confidences are weighed by "
                          f"the gate ({GATE_METHODS.get(m['gate'].get('method', 'lda'), '?')}, {escape(m['gate']['file'])})",
                          highlight=False)


@app.command()
def bench(
    data: DataArg,
    *, out: Annotated[Path, typer.Option("--out", "-o", help="Report folder: report.json, report.md, PNG plots.")],
    backbone: BackboneOpt = None, weights: WeightsOpt = None, device: DeviceOpt = None, engine: EngineOpt = None, batch_size: BatchOpt = None,
    workers: WorkersOpt = None, cache_dir: CacheOpt = None,
    seeds: Annotated[Optional[int], typer.Option(help=f"Seeds per method and scenario. {_d(BenchConfig, 'seeds')}")] = None,
    sklearn: Annotated[Optional[bool], typer.Option("--sklearn/--no-sklearn", help="Include the scikit-learn references.")] = None,
    head: Annotated[Optional[str], typer.Option(help="linear | mlp, for both OvR and softmax.")] = None,
    epochs: Annotated[Optional[int], typer.Option(help="Max epochs for both.")] = None,
    views: Annotated[int, typer.Option(help="Also a 'views' scenario: ovr and softmax trained with K augmented views per training image, and accuracy with test-time augmentation over K views (0: off).")] = 0,
    backbones_: Annotated[Optional[str], typer.Option("--backbones", help="Compare backbones instead, comma-separated (e.g. efficientnet_lite0,efficientnet_lite1,timm:NAME): accuracy of ovr and softmax heads over --seeds resplits, and images/s here; names the most accurate within --min-img-s.")] = None,
    min_img_s: Annotated[float, typer.Option("--min-img-s", help="With --backbones: the slowest forward images/s you accept.")] = 0.0,
    config: ConfigOpt = None,
) -> None:
    """One-vs-rest vs softmax (and scikit-learn) on the same features: quality, calibration, time, add-class.
    With --backbones: which backbone suits this data, at what speed."""
    with user_errors():
        cfg = _config(config, backbone=backbone, weights=weights, device=device, engine=engine, batch_size=batch_size,
                      workers=workers, cache_dir=cache_dir, seeds=seeds, sklearn=sklearn, head=head, epochs=epochs)
        from .atomic import check_output_folder

        check_output_folder(out, "cannot write the report: folder")  # before the long part
        folder = _early(data=data, cfg=cfg)
        if backbones_ is not None:
            names = [b.strip() for b in backbones_.split(",") if b.strip()]
            if not names:
                raise OvrError("--backbones takes backbone names separated by commas")
            from .apps.bench import compare_backbones
            from .apps.report import backbones_tab, write_backbones_report

            with progress_bar() as cb:
                rep = compare_backbones(folder, names, cfg, min_img_s, progress=cb)
            write_backbones_report(rep, out)
            console.print(backbones_tab(rep).rich())
            console.print(f"recommended: [bold]{escape(rep['recommended'])}[/]" if rep["recommended"] else
                          f"none reaches {min_img_s:g} images/s here", highlight=False)
            err.print(f"report: {escape(str(out / 'report.md'))}", highlight=False)
            return
        from .apps.bench import run_bench
        from .config import config_to_toml
        from .apps.pipeline import bench_views, embed_data
        from .apps.report import bench_tables, write_bench_report

        if views < 0:
            raise OvrError(f"--views must be 0 (off) or more, got {views}")
        if folder.multilabel:
            from .apps.bench import MULTILABEL_NOTE, run_bench_multilabel
            from .apps.report import multilabel_bench_table, write_multilabel_bench_report

            err.print(f"[yellow]note:[/] {MULTILABEL_NOTE}", highlight=False, soft_wrap=True)
        with progress_bar() as cb:
            emb = embed_data(folder, cfg, progress=cb)
            _warn_skipped(emb.result.skipped, emb.folder.notes)  # as train says them
            if folder.multilabel:
                rep = run_bench_multilabel(emb, cfg, progress=cb)
            else:
                rep = run_bench(emb, cfg, progress=cb, views=bench_views(emb, cfg, views, cb))
        (write_multilabel_bench_report if folder.multilabel else write_bench_report)(rep, out)
        (out / "config.toml").write_text(config_to_toml(cfg))
        for t in [multilabel_bench_table(rep)] if folder.multilabel else bench_tables(rep):
            console.print(t)
        console.print(f"report: {out / 'report.md'} (JSON: {out / 'report.json'})", highlight=False)


@app.command()
def export(
    model: Annotated[Path, typer.Argument(help="Model folder.")],
    out: Annotated[Path, typer.Argument(help="ONNX file to write, e.g. model.onnx.")],
    heads_only: Annotated[bool, typer.Option("--heads-only", help="Only the heads: input float32 embeddings [B, dim] instead of uint8 images.")] = False,
    opset: Annotated[int, typer.Option(help="ONNX opset.")] = 18,
    cache_dir: CacheOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """One ONNX graph: uint8 crops [B, S, S, 3] -> backbone -> every head -> logits, confidences, answer.

    Outputs logits, confidences (raw and calibrated, gated for a grown model) and class_index.

    Class names, thresholds, calibration and the resize/crop to apply before the graph are in its metadata
    (`ovr.*` keys). Needs the export extra: pip install "ovr\\[export]"."""
    with user_errors():
        _early(model=model)
        from .apps.export import export_model

        with err.status("exporting (torch.export + ONNX) ..."):
            info = export_model(model, out, heads_only=heads_only, opset=opset, cache_dir=cache_dir)
        if as_json:
            print(json.dumps(info, ensure_ascii=False))
            return
        i = info["input"]
        console.print(f"wrote {escape(str(out))} ({info['bytes'] / 1e6:.1f} MB, opset {opset}): {len(info['classes'])} "
                      f"heads{' with the gate of a grown model' if info['grown'] else ''}; "
                      f"input {i['name']} {i['dtype']} {i['shape']}; outputs logits, confidences, calibrated, class_index",
                      highlight=False)


@app.command()
def serve(
    model: Annotated[Path, typer.Argument(help="Model folder.")],
    *, host: Annotated[str, typer.Option(help="Address to bind; the default serves this machine only (there is no "
                                           "authentication: put a proxy in front to expose it).")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="TCP port.")] = 8000,
    name: Annotated[Optional[str], typer.Option(help="Model name under /v2/models/ (default: the folder's name).")] = None,
    token: Annotated[Optional[str], typer.Option(help="Require `Authorization: Bearer TOKEN` on every request but the page and health checks. Also $OVR_TOKEN.", envvar="OVR_TOKEN")] = None,
    max_upload_mb: Annotated[float, typer.Option("--max-upload-mb", help="Largest request body accepted (413 beyond).")] = 20.0,
    max_batch: Annotated[int, typer.Option("--max-batch", min=1, help="Images per forward pass, gathered from the requests waiting for it (1: one request per pass).")] = MAX_BATCH,
    device: DeviceOpt = None, engine: EngineOpt = None, cache_dir: CacheOpt = None,
) -> None:
    """HTTP API and a web page. POST /predict (multipart images) -> JSON; GET /classes, /health, /docs; POST /reload.
    The Open Inference Protocol (KServe v2: tritonclient, KServe and MLServer clients) under /v2.

    Needs the serve extra: pip install "ovr\\[serve]"."""
    with user_errors():
        _early(model=model)
        from .apps.serve import create_app, run

        app_ = create_app(model, device=device or "auto", cache_dir=cache_dir, engine=engine or "auto", max_upload_mb=max_upload_mb,
                          max_batch=max_batch, model_name=name, token=token)
        if host not in ("127.0.0.1", "localhost", "::1") and not token:
            err.print(f"[yellow]warning:[/] serving on {escape(host)} without a token: anyone who can reach it can "
                      "call it; set --token (or $OVR_TOKEN), and put TLS in front", highlight=False)
        err.print(f"serving {escape(str(model))} on http://{host}:{port}/ (API docs: /docs; Open Inference "
                  f"Protocol: /v2); Ctrl-C stops", highlight=False)
        run(app_, host, port)


@app.command()
def demo(
    out: Annotated[Path, typer.Option(help="Folder for the demo's data, model and report.")] = Path("ovr-demo"),
    seeds: Annotated[Optional[int], typer.Option(help=f"Benchmark seeds. {_d(BenchConfig, 'seeds')}")] = None,
    device: DeviceOpt = None, engine: EngineOpt = None, cache_dir: CacheOpt = None,
) -> None:
    """The main job, offline: scikit-learn's digits as images -> embed -> train 9 classes -> add the 10th -> predict -> bench."""
    with user_errors():
        from .apps import demo as workflow
        from .apps.report import bench_tables, embed_line, embed_summary

        cfg = _config(None, device=device, engine=engine, cache_dir=cache_dir, seeds=seeds)
        check_writable(out, "cannot write the demo: folder")
        bar: dict = {}
        steps = workflow.run(out, cfg, device=device, engine=engine, cache_dir=cache_dir,
                             progress=lambda *a, **k: bar["cb"](*a, **k))
        while True:
            with progress_bar() as bar["cb"]:  # each step's work under its own bars
                try:
                    kind, result = next(steps)
                except StopIteration:
                    break
            if kind == "step":
                _rule(result)
            elif kind == "trained":
                model, emb = result
                console.print(embed_line(embed_summary(emb)), highlight=False)
                console.print(_train_table(model, f"{len(model.classes)} heads -> {out / 'model'}"))
            elif kind == "added":
                console.print(f"added digit_9 from {result.images} images; its head and the gate took "
                              f"{result.train_seconds:.2f} s", highlight=False)
                _print_confused(result.confused)
            elif kind == "predicted":
                t = Table()
                for col in ["file", "class", "confidence", "runner-up"]:
                    t.add_column(col)
                for row in result:
                    t.add_row(escape(row["input"]), escape(row["class"]), f"{row['confidence']:.3f}",
                              escape(f"{row['runner_up']['class']} {row['runner_up']['confidence']:.3f}"))
                console.print(t)
            elif kind == "bench":
                for tb in bench_tables(result):
                    console.print(tb)
                console.print(f"[bold]report:[/] {out / 'report' / 'report.md'} (plots and report.json beside it)",
                              highlight=False)
