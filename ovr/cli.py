"""The `ovr` command line: parses flags into a Config and calls the library. The only module importing typer."""
from __future__ import annotations

import json
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from .errors import OvrError

app = typer.Typer(add_completion=False, no_args_is_help=True, rich_markup_mode="rich",
                  help="One-vs-rest image classification on frozen pretrained features.\n\n"
                       "Embeddings are cached per (backbone, weights, preprocessing, image content); "
                       "one binary head per class, trained in parallel; classes can be added one at a time.")
console = Console()
err = Console(stderr=True)

# Options shared by several commands (None = take it from --config, then the built-in default).
ConfigOpt = Annotated[Optional[Path], typer.Option("--config", help="TOML config file; flags given here override it.")]
BackboneOpt = Annotated[Optional[str], typer.Option(help="Backbone name (see `ovr backbones`). [default: efficientnet_lite0]")]
WeightsOpt = Annotated[Optional[str], typer.Option(help="'default' (pretrained), 'none' (random init) or a local .pth/.safetensors state dict.")]
DeviceOpt = Annotated[Optional[str], typer.Option(help="auto | cpu | cuda. [default: auto]")]
BatchOpt = Annotated[Optional[int], typer.Option("--batch-size", help="Images per forward pass. [default: 64]")]
WorkersOpt = Annotated[Optional[int], typer.Option(help="DataLoader decode workers (-1: one per core, max 4).")]
CacheOpt = Annotated[Optional[str], typer.Option("--cache-dir", help="Embedding cache folder. [default: $OVR_CACHE_DIR or ~/.cache/ovr]")]
StrictOpt = Annotated[Optional[bool], typer.Option("--strict/--no-strict", help="Treat an unreadable image as an error instead of skipping it.")]


def main() -> None:
    try:
        app()
    except OvrError as e:
        err.print(f"[bold red]error:[/] {e}", highlight=False)
        sys.exit(2)


def _fail(e: OvrError) -> None:
    err.print(f"[bold red]error:[/] {e}", highlight=False, soft_wrap=True)
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
        raise typer.Exit(130)


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
            rate = ""
            if task.elapsed and done:
                unit = "img/s" if stage in ("embed", "hash") else "/s"
                rate = f"{done / task.elapsed:,.0f} {unit}"
            if info:
                rate = " ".join(f"{k}={v}" for k, v in info.items())
            prog.update(t, completed=done, total=total, rate=rate)

        yield cb


def _config(config, **flags):
    from .config import load_config
    return load_config(config, flags)


def _warn_skipped(skipped) -> None:
    for p, why in skipped:
        err.print(f"[yellow]warning:[/] skipped {p}: {why}", highlight=False, soft_wrap=True)


@app.command()
def backbones() -> None:
    """List the backbones, their embedding size, and whether their weights are usable offline right now."""
    from .features import REGISTRY

    t = Table(title="Backbones")
    t.add_column("name"), t.add_column("dim", justify="right"), t.add_column("weights available"), t.add_column("source")
    for info in REGISTRY.values():
        ok = info.available()
        t.add_row(info.name, str(info.dim), "[green]yes[/]" if ok else "[yellow]no[/] (use --weights FILE)", info.source)
    console.print(t)


@app.command()
def embed(
    data: Annotated[Path, typer.Argument(help="Image folder: DATA/<class>/* or DATA/train|val|test/<class>/*.")],
    backbone: BackboneOpt = None, weights: WeightsOpt = None, device: DeviceOpt = None, batch_size: BatchOpt = None,
    workers: WorkersOpt = None, cache_dir: CacheOpt = None, strict: StrictOpt = None, config: ConfigOpt = None,
    json_out: Annotated[Optional[Path], typer.Option("--json", help="Also write the summary as JSON here.")] = None,
) -> None:
    """Embed every image of DATA into the cache (a second run over the same images embeds nothing)."""
    with user_errors():
        from .pipeline import embed_data

        cfg = _config(config, backbone=backbone, weights=weights, device=device, batch_size=batch_size,
                      workers=workers, cache_dir=cache_dir, strict=strict)
        with progress_bar() as cb:
            emb = embed_data(data, cfg, progress=cb)
        _warn_skipped(emb.result.skipped)
        from .report import embed_line, embed_summary, embed_table
        console.print(embed_table(emb))
        console.print(embed_line(emb), highlight=False)
        if json_out:
            json_out.write_text(json.dumps(embed_summary(emb), indent=2))


@app.command()
def demo(
    out: Annotated[Path, typer.Option(help="Folder for the demo's data, model and report.")] = Path("ovr-demo"),
    device: DeviceOpt = None, cache_dir: CacheOpt = None,
) -> None:
    """The main job on the embedded default data: scikit-learn's digits as an image folder, end to end, offline."""
    with user_errors():
        from .data import write_digits_folder
        from .pipeline import embed_data
        from .report import embed_line, embed_table

        cfg = _config(None, device=device, cache_dir=cache_dir)
        data = write_digits_folder(out / "digits")
        console.rule("1. embed the digits with the default backbone (cached)")
        with progress_bar() as cb:
            emb = embed_data(data, cfg, progress=cb)
        console.print(embed_table(emb))
        console.print(embed_line(emb), highlight=False)
