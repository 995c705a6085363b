"""Nothing lost, nothing half-done (issue 11's rest, issue 12's rest): early checks of what a run will write,
shards flushed by time, concurrent embedders, and the folder-scan edge cases. Real processes, real files."""
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ovr.embedding import data as data_mod
from ovr.embedding.backbones import load_backbone
from ovr.embedding.cache import EmbeddingCache
from ovr.embedding.data import decode_image, scan_folder
from ovr.errors import OvrError
from ovr.embedding.features import default_workers, embed_paths

from conftest import cache_rows as _rows, TINY, cli, make_folder, make_image


@pytest.fixture
def read_only():
    """Make a folder unwritable for real: chmod for a normal user; for root (who ignores permission bits, as in CI
    containers) the immutable attribute. Undone after the test."""
    done: list[Path] = []

    def make(p: Path) -> Path:
        if os.geteuid() == 0:
            if shutil.which("chattr") is None or subprocess.run(["chattr", "+i", str(p)], capture_output=True).returncode:
                pytest.skip("running as root on a filesystem without chattr +i: cannot make a folder read-only")
        else:
            p.chmod(0o555)
        done.append(p)
        return p

    yield make
    for p in done:
        if os.geteuid() == 0:
            subprocess.run(["chattr", "-i", str(p)], capture_output=True)
        else:
            p.chmod(0o755)




# --- checked before any work ------------------------------------------------------------------------------

def test_train_into_read_only_parent_fails_before_embedding(folder, tmp_path, cache_dir, read_only):
    (tmp_path / "ro").mkdir()
    parent = read_only(tmp_path / "ro")
    r = cli("train", folder, "--out", parent / "model", *TINY)
    assert r.exit_code == 2 and "not writable" in r.output and "Traceback" not in r.output
    assert not cache_dir.exists() or _rows(cache_dir) == 0  # nothing was embedded first


def test_out_naming_a_file_is_one_line(folder, tmp_path, cache_dir):
    (tmp_path / "m.txt").write_text("x")
    r = cli("train", folder, "--out", tmp_path / "m.txt", *TINY)
    assert r.exit_code == 2 and "is a file" in r.output
    r = cli("train", folder, "--out", tmp_path / "m.txt" / "model", *TINY)
    assert r.exit_code == 2 and "is a file, not a folder" in r.output
    assert not cache_dir.exists() or _rows(cache_dir) == 0


def test_add_class_to_read_only_model_fails_before_embedding(folder, tmp_path, cache_dir, read_only):
    assert cli("train", folder, "--out", tmp_path / "m", *TINY).exit_code == 0
    rows = _rows(cache_dir)
    new = make_folder(tmp_path / "new", n_classes=4, per_class=5)
    read_only(tmp_path / "m")
    r = cli("add-class", tmp_path / "m", "c3", new / "c3", "--device", "cpu")
    assert r.exit_code == 2 and "cannot update the model" in r.output and "not writable" in r.output
    assert _rows(cache_dir) == rows  # the new class's images were not embedded first


def test_read_only_cache_errors_when_it_must_grow_and_serves_when_it_need_not(folder, tmp_path, monkeypatch, read_only):
    cache = tmp_path / "cache"
    assert cli("embed", folder, *TINY, "--cache-dir", cache).exit_code == 0
    read_only(cache)
    for sub in cache.iterdir():
        if sub.is_dir():
            read_only(sub)
    r = cli("embed", folder, *TINY, "--cache-dir", cache)  # all cached: reads are fine
    assert r.exit_code == 0 and "24 from cache" in r.output
    make_image(folder / "c0" / "new.png", 0, 99)
    r = cli("embed", folder, *TINY, "--cache-dir", cache)
    assert r.exit_code == 2 and "cache" in r.output and "not writable" in r.output and "Traceback" not in r.output


def test_bench_and_demo_check_their_out_folder_first(folder, tmp_path, cache_dir):
    (tmp_path / "f").write_text("x")
    r = cli("bench", folder, "--out", tmp_path / "f" / "rep", *TINY)
    assert r.exit_code == 2 and "is a file, not a folder" in r.output
    r = cli("demo", "--out", tmp_path / "f" / "demo")
    assert r.exit_code == 2 and "is a file, not a folder" in r.output


# --- lose at most seconds; concurrent embedders -----------------------------------------------------------

def test_shards_are_flushed_by_time_as_well_as_count(folder, cache_dir):
    bb = load_backbone("tiny_cnn")
    cache = EmbeddingCache(cache_dir, bb.key)
    paths = sorted(folder.rglob("*.png"))
    embed_paths(paths, bb, cache, torch.device("cpu"), batch_size=4, workers=0, flush_seconds=0.0)
    # 24 images in batches of 4, flushed after every batch: a kill loses at most one batch, not 1,024 images
    assert len(list(cache.dir.glob("shard-*.safetensors"))) == 6 and _rows(cache_dir) == 24


def test_index_never_drops_another_writers_shard(cache_dir):
    a, b = EmbeddingCache(cache_dir, "k" * 64), EmbeddingCache(cache_dir, "k" * 64)  # both opened before writing
    a.put(["x1", "x2"], torch.ones(2, 3))
    b.put(["y1"], torch.zeros(1, 3))
    fresh = EmbeddingCache(cache_dir, "k" * 64)
    assert torch.equal(fresh.get(["y1", "x2"]), torch.tensor([[0.0] * 3, [1.0] * 3])) and len(fresh) == 3
    a._compact()  # the index rebuilt by one writer covers the other's shard too
    b.put(["y2"], torch.full((1, 3), 2.0))
    b._compact()
    fresh = EmbeddingCache(cache_dir, "k" * 64)
    assert len(fresh._extra) == 0 and sorted(fresh._keys.astype(str).tolist()) == ["x1", "x2", "y1", "y2"]


def test_index_compacts_past_64_uncovered_shards_and_reads_legacy_json(cache_dir):
    c = EmbeddingCache(cache_dir, "j" * 64)
    for i in range(70):
        c.put([f"k{i}"], torch.full((1, 2), float(i)))
    assert not (c.dir / "index.npz").exists()  # writers never rewrite the index
    fresh = EmbeddingCache(cache_dir, "j" * 64)  # 70 > 64 uncovered shards: this opener compacts
    assert (c.dir / "index.npz").is_file() and len(fresh._extra) == 0 and len(fresh) == 70
    assert torch.equal(fresh.get(["k69", "k3"]), torch.tensor([[69.0, 69.0], [3.0, 3.0]]))
    (c.dir / "index.npz").unlink()
    (c.dir / "index.json").write_text(json.dumps({"whatever": ["k0"]}))  # an index from ovr before 0.2
    fresh = EmbeddingCache(cache_dir, "j" * 64)
    assert not (c.dir / "index.json").exists() and (c.dir / "index.npz").is_file() and len(fresh) == 70


def test_second_embedder_waits_then_embeds_only_what_is_left(folder, cache_dir):
    """While one process holds the cache's embed lock and stores the images, a second `ovr embed` waits, then
    finds them cached: every image is stored once, not twice."""
    from filelock import FileLock

    bb = load_backbone("tiny_cnn")
    cache = EmbeddingCache(cache_dir, bb.key)
    lock = FileLock(str(cache.dir / ".embed.lock"))
    lock.acquire()
    env = {**os.environ, "OVR_CACHE_DIR": str(cache_dir)}
    proc = subprocess.Popen([sys.executable, "-m", "ovr", "embed", str(folder), *TINY, "--json"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        paths = sorted(folder.rglob("*.png"))
        from ovr.embedding.cache import content_key
        from ovr.embedding.data import load_image

        x = torch.stack([bb.transform(load_image(p)) for p in paths])
        with torch.inference_mode():
            cache.put([content_key(p.read_bytes()) for p in paths], bb.model(x))
        assert proc.poll() is None  # still waiting for the lock
    finally:
        lock.release()
    out, errs = proc.communicate(timeout=120)
    assert proc.returncode == 0, errs.decode()
    s = json.loads(out)
    assert s["embedded"] == 0 and s["cached"] == 24 and _rows(cache_dir) == 24


def test_two_concurrent_embeds_store_each_image_once(folder, cache_dir):
    env = {**os.environ, "OVR_CACHE_DIR": str(cache_dir)}
    procs = [subprocess.Popen([sys.executable, "-m", "ovr", "embed", str(folder), *TINY, "--json"], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE) for _ in range(2)]
    outs = [json.loads(p.communicate(timeout=120)[0]) for p in procs]
    assert all(p.returncode == 0 for p in procs)
    assert sorted(o["embedded"] for o in outs)[1] == 24 and sum(o["embedded"] for o in outs) == 24
    assert _rows(cache_dir) == 24
    bb = load_backbone("tiny_cnn")
    assert len(EmbeddingCache(cache_dir, bb.key)) == 24


def test_decode_workers_and_compute_threads_fit_the_cores():
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    old = torch.get_num_threads()
    try:
        for threads in range(1, cores + 1):
            torch.set_num_threads(threads)
            assert default_workers(-1, "cpu") + threads <= max(cores, threads)
        assert default_workers(-1, "cuda") == max(0, min(8, cores - 1))
        assert default_workers(3, "cpu") == 3  # asked for is what you get
    finally:
        torch.set_num_threads(old)


# --- folder scans -----------------------------------------------------------------------------------------

def test_class_folder_symlinked_to_the_root_is_skipped_with_a_note(folder):
    (folder / "all").symlink_to(folder, target_is_directory=True)
    f = scan_folder(folder)
    assert f.classes == ["c0", "c1", "c2"] and len(f.paths) == 24  # not 48
    assert any("all" in n and "symlink" in n for n in f.notes)


def test_nested_class_folders_are_detected(tmp_path):
    make_folder(tmp_path / "photos" / "data", n_classes=3, per_class=3)
    make_folder(tmp_path / "photos" / "later", n_classes=2, per_class=3, prefix="k")
    with pytest.raises(OvrError, match="one level too high.*pass one of them"):
        scan_folder(tmp_path / "photos")
    r = cli("train", tmp_path / "photos", "--out", tmp_path / "m", *TINY)
    assert r.exit_code == 2 and "one level too high" in r.output


def test_classes_named_like_splits(tmp_path):
    # classes literally named train and val (images directly inside) are classes, not a split layout
    for name, cls in (("train", 0), ("val", 1), ("cat", 2)):
        for i in range(3):
            make_image(tmp_path / "d" / name / f"{i}.png", cls, i)
    f = scan_folder(tmp_path / "d")
    assert f.classes == ["cat", "train", "val"] and not f.splits_given
    # a split folder beside class folders is a mix, said in words
    make_folder(tmp_path / "mix" / "train", n_classes=2, per_class=3)
    make_folder(tmp_path / "mix", n_classes=1, per_class=3, prefix="dog")
    with pytest.raises(OvrError, match="mixes split folders \\(train"):
        scan_folder(tmp_path / "mix")


def test_unreadable_class_folder_says_permission_denied():
    """Run as an unprivileged user (root reads everything), in a world-readable temp folder."""
    base = Path(tempfile.mkdtemp())
    try:
        base.chmod(0o755)
        make_folder(base / "d", n_classes=2, per_class=2)
        for p in [base / "d", *(base / "d").rglob("*")]:
            p.chmod(0o755 if p.is_dir() else 0o644)
        (base / "d" / "c1").chmod(0o000)
        code = f"from ovr.embedding.data import scan_folder\nscan_folder({str(base / 'd')!r})"
        kw = {}
        if os.geteuid() == 0:
            kw["preexec_fn"] = lambda: (os.setgid(65534), os.setuid(65534))
        try:
            r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=base, **kw)
            stderr = r.stderr
        except PermissionError:
            # root whose Python lives under /root (CI): nobody cannot run it, and root reads any folder; the
            # kernel's answer to an unprivileged reader is given instead, at the one call that meets it
            real = os.listdir

            def listdir(p="."):
                if Path(p) == base / "d" / "c1":
                    raise PermissionError(13, "Permission denied", str(p))
                return real(p)

            with pytest.MonkeyPatch.context() as mp:
                mp.setattr(data_mod.os, "listdir", listdir)
                with pytest.raises(OvrError) as e:
                    scan_folder(base / "d")
            stderr = str(e.value)
        assert "cannot read folder" in stderr and "permission denied" in stderr, stderr[-500:]
    finally:
        (base / "d" / "c1").chmod(0o755)
        shutil.rmtree(base)


def test_trailing_space_class_can_be_replaced(tmp_path, cache_dir):
    make_folder(tmp_path / "d", n_classes=3, per_class=8)
    (tmp_path / "d" / "c2").rename(tmp_path / "d" / "cat ")
    assert cli("train", tmp_path / "d", "--out", tmp_path / "m", *TINY).exit_code == 0
    r = cli("add-class", tmp_path / "m", "cat ", tmp_path / "d" / "cat ", "--replace", "--device", "cpu")
    assert r.exit_code == 0, r.output
    assert cli("add-class", tmp_path / "m", "  ", tmp_path / "d" / "c0", "--device", "cpu").exit_code == 2


# --- decoding ---------------------------------------------------------------------------------------------

def test_float_tiff_in_unit_range_is_not_black(tmp_path):
    arr = np.full((8, 8), 0.5, np.float32)
    Image.fromarray(arr, mode="F").save(tmp_path / "f.tif")
    im = decode_image((tmp_path / "f.tif").read_bytes())
    assert abs(np.asarray(im).mean() - 127.5) < 1.5  # was 0 (black): 0.5 / 255 -> 0


def test_huge_images_are_reduced_or_refused_in_words(tmp_path, monkeypatch):
    monkeypatch.setattr(data_mod, "MAX_PIXELS", 100 * 100)
    rng = np.random.default_rng(0)
    big = Image.fromarray(rng.integers(0, 255, (400, 400, 3), dtype=np.uint8))
    big.save(tmp_path / "big.jpg")
    big.save(tmp_path / "big.png")
    im = decode_image((tmp_path / "big.jpg").read_bytes())
    assert im.size[0] * im.size[1] <= 4 * 100 * 100 and im.size[0] < 400  # decoded at a reduced scale
    with pytest.raises(ValueError, match="too large to decode safely"):
        decode_image((tmp_path / "big.png").read_bytes())
    from ovr.embedding.data import describe_error

    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # PIL's own bomb error, past 2x its limit
    with pytest.raises(Image.DecompressionBombError) as e:
        decode_image((tmp_path / "big.png").read_bytes())
    assert describe_error(e.value).startswith("image too large to decode safely")


def test_help_defaults_come_from_the_config():
    src = (Path(__file__).parents[1] / "ovr" / "cli.py").read_text()
    import re

    assert not re.findall(r"\[default: [0-9a-z]", src)  # written once, in ovr/config.py
    from ovr.config import TrainConfig

    r = cli("train", "--help")
    assert f"[default: {TrainConfig().hidden}]" in r.output


def test_progress_rate_waits_for_a_second():
    from ovr.cli import _rate

    assert _rate("embed", 64, 0.0004) == ""  # one batch used to read 166,600 img/s
    assert _rate("embed", 640, 2.0) == "320 img/s"


@pytest.mark.parametrize("args", [
    ["train", "{x}/nope", "--out", "{x}/m"], ["embed", "{x}/nope"], ["predict", "{x}/nope", "{x}/a.png"],
    ["evaluate", "{x}/nope", "{x}"], ["add-class", "{x}/nope", "c", "{x}"], ["bench", "{x}/nope", "--out", "{x}/r"],
    ["info", "{x}/nope"], ["remove-class", "{x}/nope", "c"],
])
def test_error_paths_do_not_import_torch(args, tmp_path):
    """A mistyped path answers in a fraction of a second: torch (2-3 s to import) is not loaded for it."""
    code = ("import sys\nfrom typer.testing import CliRunner\nfrom ovr.cli import app\n"
            "r = CliRunner().invoke(app, sys.argv[1:])\nprint(r.exit_code, 'torch' in sys.modules, r.output.strip()[:200])")
    r = subprocess.run([sys.executable, "-c", code, *(a.format(x=tmp_path) for a in args)], capture_output=True,
                       text=True, timeout=120)
    code_, torch_loaded, *msg = r.stdout.split(" ", 2)
    assert code_ == "2" and torch_loaded == "False", r.stdout + r.stderr


def test_float16_cache_halves_the_shards_and_reads_back_float32(folder, tmp_path):
    r16 = cli("embed", folder, *TINY, "--cache-dir", tmp_path / "c16", "--dtype", "float16")
    r32 = cli("embed", folder, *TINY, "--cache-dir", tmp_path / "c32", "--dtype", "float32")
    assert r16.exit_code == 0 and r32.exit_code == 0
    size = lambda d: sum(p.stat().st_size for p in d.rglob("shard-*.safetensors"))  # noqa: E731
    assert size(tmp_path / "c32") - size(tmp_path / "c16") == 24 * 64 * 2  # 2 bytes less per value (24 x 64)
    bb = load_backbone("tiny_cnn")
    c32 = EmbeddingCache(tmp_path / "c32", bb.key)
    keys = list(c32._extra) + c32._keys.astype(str).tolist()
    a = EmbeddingCache(tmp_path / "c16", bb.key).get(keys)
    b = EmbeddingCache(tmp_path / "c32", bb.key).get(keys)
    assert a.dtype == torch.float32 and torch.allclose(a, b, rtol=1e-3, atol=1e-3) and not torch.equal(a, b)


def test_sigterm_unwinds_like_ctrl_c_finished_batches_kept_no_temp_files(tmp_path):
    """SIGTERM (torchrun stopping the surviving ranks, `timeout`) used to kill the process where it stood: the
    batches since the last shard were lost and a half-written .tmp could stay (seen once in the killed-rank test).
    With the CLI's handler it unwinds like Ctrl-C."""
    import signal

    from ovr.cli import _on_sigterm

    data = make_folder(tmp_path / "d", n_classes=2, per_class=12)
    bb = load_backbone("tiny_cnn")
    cache = EmbeddingCache(tmp_path / "c", bb.key)

    def progress(stage, done, total):
        if stage == "embed" and done >= 8:
            os.kill(os.getpid(), signal.SIGTERM)

    old = signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        with pytest.raises(SystemExit) as e:
            embed_paths(scan_folder(data).paths, bb, cache, torch.device("cpu"), batch_size=4, workers=0,
                        progress=progress, flush_seconds=3600)
    finally:
        signal.signal(signal.SIGTERM, old)
    assert e.value.code == 128 + signal.SIGTERM
    assert 8 <= _rows(tmp_path / "c") < 24 and not list((tmp_path / "c").rglob("*.tmp"))


def test_outputs_are_regular_files_outside_model_folders(tmp_path, cache_dir):
    """`export M /dev/null`, a FIFO, `--json-out M/manifest.json`, a report inside the model and a missing folder
    were replaced, destroyed the model or created folders; now each is a one-line error before any work, and a
    symlink is followed to the file it names."""
    import os

    data = make_folder(tmp_path / "d", n_classes=2, per_class=6)
    assert cli("train", data, "--out", tmp_path / "m", *TINY).exit_code == 0
    manifest = (tmp_path / "m" / "manifest.json").read_bytes()
    os.mkfifo(tmp_path / "fifo")
    cases = [
        (["export", tmp_path / "m", tmp_path / "fifo", "--heads-only"], "FIFO"),
        (["export", tmp_path / "m", tmp_path / "m" / "manifest.json", "--heads-only"], "inside the model folder"),
        (["export", tmp_path / "m", tmp_path / "no" / "deep" / "x.onnx", "--heads-only"], "does not exist"),
        (["evaluate", tmp_path / "m", data, "--json-out", tmp_path / "m" / "manifest.json", "--device", "cpu"],
         "inside the model folder"),
        (["evaluate", tmp_path / "m", data, "--report", tmp_path / "m" / "rep", "--device", "cpu"],
         "inside the model folder"),
        (["embed", data, *TINY, "--json-out", tmp_path / "fifo"], "FIFO"),
    ]
    if os.path.exists("/dev/null"):
        cases.append((["export", tmp_path / "m", "/dev/null", "--heads-only"], "device"))
    for args, message in cases:
        r = cli(*args)
        assert r.exit_code == 2 and message in r.output and "Traceback" not in r.output, (args, r.output)
    assert (tmp_path / "m" / "manifest.json").read_bytes() == manifest and (tmp_path / "fifo").is_fifo()
    assert not (tmp_path / "no").exists() and not (tmp_path / "m" / "rep").exists()
    (tmp_path / "link.json").symlink_to(tmp_path / "real.json")
    r = cli("embed", data, *TINY, "--json-out", tmp_path / "link.json")
    assert r.exit_code == 0 and (tmp_path / "link.json").is_symlink() and (tmp_path / "real.json").is_file()


def test_python_api_bad_inputs_are_one_line_ovr_errors(tmp_path, cache_dir):
    """Nine raw exceptions (TypeError, ZeroDivisionError, PIL's "Cannot handle this data type") and a walk of the
    current folder for predict("") are each an OvrError naming what was given."""
    import numpy as np
    from PIL import Image

    import ovr

    data = make_folder(tmp_path / "d", n_classes=2, per_class=6)
    assert cli("train", data, "--out", tmp_path / "m", *TINY).exit_code == 0
    for bad in (None, 123, ""):
        with pytest.raises(ovr.OvrError, match="model folder"):
            ovr.load(bad)
    p = ovr.load(tmp_path / "m", device="cpu")
    for bad, message in [(None, "NoneType"), (42, "int"), (b"\x89PNG", "bytes"), ("", "empty path"),
                         (np.zeros((8, 8, 5), np.uint8), "HxWx4 uint8"), (np.zeros((8, 8), np.float32), "uint8"),
                         (np.zeros((0, 0, 3), np.uint8), "nothing to classify"),
                         (Image.new("RGB", (0, 3)), "nothing to classify")]:
        with pytest.raises(ovr.OvrError, match=message):
            p.predict(bad)
    for kw in ({"tta": "3"}, {"reject_below": float("nan")}, {"reject_below": 2.0}):
        with pytest.raises(ovr.OvrError):
            p.predict([data / "c0" / "img000.png"], **kw)
    gray = p.predict(np.full((8, 8, 1), 128, np.uint8))  # one channel is an image too
    assert gray[0]["class"] in ("c0", "c1")


def test_full_disk_is_one_line_naming_the_file(tmp_path, capsys):
    """A real ENOSPC (/dev/full) inside a command: one line, exit 2, instead of a traceback (ovr's own writes,
    atomic_write_bytes, add the file's name to the error)."""
    import typer

    from ovr.cli import user_errors

    if not os.path.exists("/dev/full"):
        pytest.skip("no /dev/full")
    with pytest.raises(typer.Exit) as e:
        with user_errors():
            with open("/dev/full", "wb") as f:
                f.write(b"x" * 10)
    assert e.value.exit_code == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "no space left on the device" in err and "Traceback" not in err


def test_next_writer_removes_what_killed_writers_left(tmp_path, cache_dir):
    """Hidden temp files of killed writers (.manifest.json.HEX.tmp, heads/.NAME.HEX.tmp) and a train's temp folder
    beside the model stayed for good; the next writer (add-class, train) removes them."""
    data = make_folder(tmp_path / "d", n_classes=3, per_class=6)
    m = tmp_path / "m"
    (tmp_path / ".m.tmp-dead0001").mkdir()  # a train killed before its rename
    ((tmp_path / ".m.tmp-dead0001") / "manifest.json").write_text("{}")
    assert cli("train", data, "--out", m, *TINY).exit_code == 0
    assert not (tmp_path / ".m.tmp-dead0001").exists()
    junk = [m / ".manifest.json.0123abcd.tmp", m / ".gate-1.safetensors.99.tmp", m / "heads" / ".c0.safetensors.42.tmp"]
    for j in junk:
        j.write_bytes(b"half")
    extra = make_folder(tmp_path / "e", n_classes=4, per_class=6)
    assert cli("add-class", m, "c3", extra / "c3", "--device", "cpu").exit_code == 0
    assert not any(j.exists() for j in junk)


def test_damaged_cache_rows_are_caught_and_embedded_again(folder, cache_dir, tmp_path):
    """Shard rows overwritten with random floats gave silently wrong answers; NaN rows printed "confidence: NaN";
    an index pointing past a shard and a cache root that is a file were tracebacks. Now a damaged shard is set
    aside and its images embedded again (same rows as before), and the rest are one-line errors."""
    import torch
    from safetensors.torch import load_file, save_file

    from ovr.embedding.backbones import load_backbone
    from ovr.embedding.cache import EmbeddingCache
    from ovr.embedding.features import embed_paths

    bb = load_backbone("tiny_cnn", "default", None, "tensor")
    paths = sorted(folder.rglob("*.png"))
    first = embed_paths(paths, bb, EmbeddingCache(cache_dir, bb.key), torch.device("cpu"), workers=0)
    shard = next((cache_dir / bb.key[:24]).glob("shard-*.safetensors"))
    t = load_file(str(shard))
    from safetensors import safe_open

    with safe_open(str(shard), "pt") as f:
        meta = f.metadata()
    t["embeddings"] = torch.randn_like(t["embeddings"])  # same shape, other values: only the checksum tells
    save_file(t, str(shard), metadata=meta)
    again = embed_paths(paths, bb, EmbeddingCache(cache_dir, bb.key), torch.device("cpu"), workers=0)
    assert torch.allclose(again.embeddings, first.embeddings, atol=1e-5) and again.n_new == len(paths)
    assert list((cache_dir / bb.key[:24]).glob("damaged-shard-*"))
    cache = EmbeddingCache(cache_dir, bb.key)
    with pytest.raises(OvrError, match="non-finite"):
        cache.put(["k" * 64], torch.full((1, 64), float("nan")))
    blocked = tmp_path / "cachefile"
    blocked.write_text("not a folder")
    r = cli("embed", folder, *TINY, "--cache-dir", blocked)
    assert r.exit_code == 2 and "Traceback" not in r.output and "cache" in r.output


@pytest.mark.parametrize("damage", [
    lambda m: m["backbone"].pop("preprocess"),
    lambda m: m["backbone"].update(weights=7),
    lambda m: m["backbone"].pop("fingerprint"),
    lambda m: m["heads"]["c0"].update(calibration={"a": "x"}),
    lambda m: m["heads"]["c0"].update(created="yesterday"),
    lambda m: m.update(created="yesterday"),
], ids=["no preprocess", "weights an int", "no fingerprint", "calibration a string", "head created", "created"])
def test_verify_means_every_command_can_use_the_model(tmp_path, cache_dir, damage):
    """Manifest damages that `info --verify` passed and other commands then crashed on (KeyError, TypeError, a
    numpy error in predict, a 500 on every /predict after /reload): now one line everywhere, and /reload refuses
    the damaged model and keeps serving the old one."""
    data = make_folder(tmp_path / "d", n_classes=2, per_class=6)
    assert cli("train", data, "--out", tmp_path / "m", *TINY).exit_code == 0
    good = (tmp_path / "m" / "manifest.json").read_text()
    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    from ovr.apps.serve import create_app

    client = TestClient(create_app(tmp_path / "m", device="cpu", warm=False))
    m = json.loads(good)
    damage(m)
    (tmp_path / "m" / "manifest.json").write_text(json.dumps(m))
    for args in (["info", tmp_path / "m", "--verify"], ["info", tmp_path / "m"],
                 ["predict", tmp_path / "m", data / "c0" / "img000.png", "--device", "cpu"]):
        r = cli(*args)
        assert r.exit_code == 2 and "damaged" in r.output and "Traceback" not in r.output, (args, r.output)
    assert client.post("/reload").status_code == 400
    img = (data / "c1" / "img000.png").read_bytes()
    r = client.post("/predict", files=[("files", ("a.png", img, "image/png"))])
    assert r.status_code == 200 and r.json()["results"][0]["class"] == "c1"  # the old model still serves


def test_a_huge_non_jpeg_is_refused_from_its_header_without_reading_it_whole(tmp_path, monkeypatch):
    """A file is hashed in blocks and read for decoding only after its header's size passed the pixel limit."""
    import ovr.embedding.data as data_mod
    from ovr.embedding.cache import content_key, hash_files
    from ovr.embedding.data import read_image_file

    big = tmp_path / "big.png"
    Image.new("1", (3000, 3000)).save(big)
    with open(big, "ab") as f:  # trailing bytes past the image: a file much larger than its header says
        f.write(b"\0" * (3 << 20))
    monkeypatch.setattr(data_mod, "MAX_PIXELS", 1000 * 1000)
    reads = []
    real_open = open

    def spy(path, mode="r", *a, **k):
        f = real_open(path, mode, *a, **k)
        if str(path) == str(big) and "b" in mode:
            orig = f.read
            f.read = lambda n=-1: (reads.append(n), orig(n))[1]
        return f

    monkeypatch.setattr("builtins.open", spy)
    with pytest.raises(ValueError, match="too large to decode safely"):
        read_image_file(big)
    assert reads == [data_mod.HEADER_BYTES]  # the header only, never the rest
    keys, bad = hash_files([big])
    assert keys == [content_key(big.read_bytes())] and not bad and all(0 < n <= 1 << 20 for n in reads[1:])


def test_the_package_shows_its_flow_and_no_function_takes_more_than_eight_positional_parameters():
    """ovr/embedding imports nothing from ovr/learn or ovr/apps, ovr/learn nothing from ovr/apps, and the shared
    top-level modules (config, errors, atomic, runtime) none of the three; long parameter lists are keyword-only."""
    import ast
    from pathlib import Path

    root = Path(__file__).parents[1] / "ovr"
    later = {"embedding": ("learn", "apps"), "learn": ("apps",), "": ("embedding", "learn", "apps")}
    for f in root.rglob("*.py"):
        package = f.parent.name if f.parent != root else ""
        tree = ast.parse(f.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.level:
                target = (node.module or "").split(".")[0]
                if package == "" and f.name in ("cli.py", "__init__.py", "__main__.py"):
                    continue  # the CLI and the package root sit on top
                assert target not in later.get(package, ()), f"{f.relative_to(root)} imports {node.module}"
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                assert len(node.args.posonlyargs) + len(node.args.args) <= 8, f"{f.name}: {node.name}"
