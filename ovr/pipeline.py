"""Orchestration of the stages (images -> embeddings -> heads -> aggregate -> report). Prints nothing;
progress goes through a (stage, done, total) callback that the CLI renders."""
from __future__ import annotations

from pathlib import Path

from .config import Config
from .data import scan_folder
from .features import Backbone, EmbeddedFolder, EmbeddingCache, Progress, default_cache_dir, embed_folder, load_backbone
from .runtime import resolve_device


def open_cache(cfg: Config, backbone: Backbone) -> EmbeddingCache:
    return EmbeddingCache(cfg.features.cache_dir or default_cache_dir(), backbone.key)


def embed_data(data: str | Path, cfg: Config, progress: Progress | None = None,
               backbone: Backbone | None = None) -> EmbeddedFolder:
    """Scan DATA, load the backbone, embed through the cache; embeddings end up on the compute device."""
    f = cfg.features
    folder = scan_folder(data, cfg.data.val_fraction, cfg.data.test_fraction, cfg.data.split_seed)
    backbone = backbone or load_backbone(f.backbone, f.weights)
    device = resolve_device(f.device)
    emb = embed_folder(folder, backbone, open_cache(cfg, backbone), device, f.batch_size, f.workers, f.strict, progress)
    emb.backbone = backbone
    return emb
