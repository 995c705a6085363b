"""`torchrun -m ovr embed`: two CPU ranks (gloo) fill the cache exactly as one process does; a killed rank leaves
only whole shards, and a rerun embeds the rest."""
import os
import subprocess
import sys

import torch

from conftest import TINY, make_folder


def _torchrun(data, cache, extra_env=None, timeout=240):
    env = {**os.environ, "OVR_CACHE_DIR": str(cache), "OMP_NUM_THREADS": "1", **(extra_env or {})}
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           "-m", "ovr", "embed", str(data), *TINY, "--batch-size", "8", "--json"],
                          env=env, capture_output=True, text=True, timeout=timeout)


def _all(data, cache):
    """Every image's embedding from this cache (in file order), embedding nothing new."""
    from ovr.embedding.backbones import load_backbone
    from ovr.embedding.cache import EmbeddingCache
    from ovr.embedding.features import embed_paths

    bb = load_backbone("tiny_cnn")
    r = embed_paths(sorted(data.rglob("*.png")), bb, EmbeddingCache(cache, bb.key), torch.device("cpu"), workers=0)
    return r


def test_two_ranks_fill_the_cache_like_one_process(tmp_path):
    data = make_folder(tmp_path / "data", n_classes=3, per_class=16)
    # rank 1 starts 3 s late: rank 0 must not write before rank 1 has seen what is missing
    r = _torchrun(data, tmp_path / "c2", {"OVR_FLUSH_SECONDS": "0", "OVR_TEST_RANK_DELAY": "1:3"})
    assert r.returncode == 0, r.stderr[-2000:]
    import json

    s = json.loads(r.stdout[r.stdout.index("{"):])  # rank 0 reports; the others print nothing
    assert s["embedded"] == 48 and s["usable"] == 48 and r.stdout.count('"embedded"') == 1
    assert len(list((tmp_path / "c2").rglob("shard-*.safetensors"))) >= 2  # both ranks wrote shards
    two = _all(data, tmp_path / "c2")
    assert two.n_new == 0  # complete
    one = _all(data, tmp_path / "c1")  # the single-process reference
    assert torch.allclose(one.embeddings, two.embeddings, atol=1e-6)


def test_a_killed_rank_leaves_whole_shards_and_a_rerun_completes(tmp_path):
    data = make_folder(tmp_path / "data", n_classes=3, per_class=16)
    r = _torchrun(data, tmp_path / "c", {"OVR_FLUSH_SECONDS": "0", "OVR_TEST_DIE_AFTER_SHARDS": "1",
                                         "OVR_TEST_DIE_RANK": "1"})
    assert r.returncode != 0
    from safetensors import safe_open

    shards = list((tmp_path / "c").rglob("shard-*.safetensors"))
    rows = 0
    for s in shards:  # every shard on disk is whole
        with safe_open(str(s), "pt") as f:
            rows += f.get_tensor("embeddings").shape[0]
    assert 0 < rows < 48 and not list((tmp_path / "c").rglob("*.tmp"))
    again = _torchrun(data, tmp_path / "c")
    assert again.returncode == 0, again.stderr[-2000:]
    done = _all(data, tmp_path / "c")
    assert done.n_new == 0
    assert torch.allclose(done.embeddings, _all(data, tmp_path / "ref").embeddings, atol=1e-6)
