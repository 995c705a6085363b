"""The decode paths (ovr.embedding.pixels): the tensor path matches PIL's within measured gray levels on every kind of file,
the batched-decode branch a CUDA run takes (exercised here on CPU) agrees with per-file decoding, and the path is
part of the cache key and the model."""
import hashlib
import io
import json

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import TINY, cli, make_folder


def _photo(w: int = 96, h: int = 72) -> Image.Image:
    """Smooth gradients plus texture, so a resize has something to get wrong."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:h, :w]
    arr = np.stack([xx * 255 / w, yy * 255 / h, (xx + yy) * 127 / (w + h) + 60], -1)
    arr += rng.normal(0, 20, arr.shape)
    return Image.fromarray(arr.clip(0, 255).astype(np.uint8))


def _save(im: Image.Image, fmt: str, **kw) -> bytes:
    b = io.BytesIO()
    im.save(b, fmt, **kw)
    return b.getvalue()


def _files() -> dict[str, bytes]:
    im = _photo()
    exif = im.getexif()
    exif[0x0112] = 6  # rotate 90 degrees on display
    arr16 = (np.asarray(im.convert("L"), dtype=np.uint16) * 257)
    pal = im.convert("RGBA")
    pal.putalpha(128)
    return {
        "jpeg": _save(im, "JPEG", quality=90),
        "gray jpeg": _save(im.convert("L"), "JPEG"),
        "cmyk jpeg": _save(im.convert("CMYK"), "JPEG"),
        "progressive jpeg": _save(im, "JPEG", progressive=True),
        "exif-rotated jpeg": _save(im, "JPEG", exif=exif.tobytes()),
        "png": _save(im, "PNG"),
        "palette png": _save(im.convert("P"), "PNG"),
        "rgba png": _save(pal, "PNG"),
        "16-bit png": _save(Image.fromarray(arr16), "PNG"),
    }


@pytest.mark.parametrize("name", ["tiny_cnn", "efficientnet_lite0"])  # bilinear and bicubic resizes
def test_tensor_path_matches_pil_within_two_gray_levels(name):
    from ovr.embedding.backbones import REGISTRY, load_backbone

    if not REGISTRY[name].available():
        pytest.skip(f"{name} weights not installed")
    pil = load_backbone(name, decode="pil").pixels()
    ten = load_backbone(name, decode="tensor").pixels()
    std = min(ten.prep.std)
    for kind, data in _files().items():
        a, _ = pil.batch([pil.item(data)])
        b, bad = ten.batch([ten.item(data)])
        assert not bad and a.shape == b.shape, kind
        levels = float((a - b).abs().max()) * std * 255
        assert levels <= 2.01, f"{kind}: {levels:.2f} gray levels apart"  # an unrotated EXIF file would be ~100


def test_batched_decode_branch_agrees_with_per_file_decoding():
    """The branch a CUDA run takes (workers pass plain JPEGs on as bytes, `batch` decodes them together), run on
    CPU: same inputs as decoding each file in the worker; files a batch decoder cannot take stay on the CPU."""
    from ovr.embedding.backbones import load_backbone

    bb = load_backbone("tiny_cnn", decode="tensor")
    per_file, batched = bb.pixels(batch_decode=False), bb.pixels(batch_decode=True)
    files = _files()
    items = [batched.item(d) for d in files.values()]
    as_bytes = {k for k, x in zip(files, items) if x.ndim == 1}
    assert as_bytes == {"jpeg", "gray jpeg", "progressive jpeg"}  # not CMYK, not EXIF-rotated, not PNG
    a, _ = per_file.batch([per_file.item(d) for d in files.values()])
    b, bad = batched.batch(items)
    assert not bad and torch.equal(a, b)


def test_a_jpeg_the_batch_decoder_refuses_is_reported_and_the_rest_kept():
    from ovr.embedding.backbones import load_backbone

    px = load_backbone("tiny_cnn", decode="tensor").pixels(batch_decode=True)
    good = _save(_photo(), "JPEG")
    n = len(good)
    broken = good[:n // 2] + b"\xff\xd8\xff\xd8" + good[n // 2 + 4:]  # a marker inside the scan; still ends in EOI
    items = [px.item(good), px.item(broken), px.item(good)]
    assert [x.ndim for x in items] == [1, 1, 1]
    x, bad = px.batch(items)
    assert [i for i, _ in bad] == [1] and "broken data stream" in bad[0][1]
    ref, _ = px.batch([px.item(good)])
    assert x.shape[0] == 2 and torch.equal(x[0], ref[0]) and torch.equal(x[1], ref[0])


def test_a_batch_decoded_on_threads_gives_the_items_of_decoding_one_by_one(tmp_path):
    """`_Decode` on a CPU without worker processes decodes a batch on threads (`map_decoding`): the same items, in
    order, with the errors of the files that fail, as decoding them one at a time."""
    from ovr.embedding.backbones import load_backbone
    from ovr.embedding.data import map_decoding
    from ovr.embedding.features import _Decode

    files = {**_files(), "not an image": b"hello", "truncated jpeg": _files()["jpeg"][:300]}
    paths = []
    for i, data in enumerate(files.values()):
        paths.append(tmp_path / f"{i}.bin")
        paths[-1].write_bytes(data)
    d = _Decode(paths, load_backbone("tiny_cnn", decode="tensor").pixels())
    a, b = map_decoding(d.__getitem__, list(range(len(paths))), 1), map_decoding(d.__getitem__, list(range(len(paths))), 4)
    assert [i for _, i, _ in b] == list(range(len(paths)))
    assert [why for _, _, why in a] == [why for _, _, why in b] and sum(bool(why) for _, _, why in b) == 2
    assert all((x is None and y is None) or torch.equal(x, y) for (x, _, _), (y, _, _) in zip(a, b))


def test_only_batches_of_files_large_enough_to_gain_are_decoded_on_threads(tmp_path):
    """Small files decode in less time than threads take to hand the GIL around: a batch of them stays on the
    calling thread; a batch of photo-sized files goes to the threads."""
    import threading

    from ovr.embedding.backbones import load_backbone
    from ovr.embedding.features import THREADED_DECODE_BYTES, _Decode

    class Spy(_Decode):
        def __getitem__(self, i):
            self.where.add(threading.current_thread() is threading.main_thread())
            return super().__getitem__(i)

    small = [tmp_path / f"s{i}.png" for i in range(4)]
    large = [tmp_path / f"l{i}.png" for i in range(4)]
    for i, (s, big) in enumerate(zip(small, large)):
        s.write_bytes(_save(_photo(24, 24), "PNG"))
        big.write_bytes(_save(_photo(320, 240), "PNG"))
    assert max(p.stat().st_size for p in small) < THREADED_DECODE_BYTES < min(p.stat().st_size for p in large)
    px = load_backbone("tiny_cnn", decode="tensor").pixels()
    for paths, on_main in ((small, {True}), (large, {False})):
        d = Spy(paths, px, threads=2)
        d.where = set()
        assert all(x is not None for x, _, _ in d.__getitems__([0, 1, 2, 3])) and d.where == on_main


def test_decoding_on_threads_leaves_the_warning_filters_as_they_were():
    """catch_warnings (the decoders use it) swaps process-wide state: two threads entering and leaving it out of
    order leave one thread's filter behind (here: every warning ignored for the rest of the process).
    `map_decoding` restores the filters as they were."""
    import time
    import warnings

    from ovr.embedding.data import map_decoding

    def work(delays):  # enter, stay, leave: the first thread's block ends inside the second's
        before, inside = delays
        time.sleep(before)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            warnings.warn("decoding trouble")
            time.sleep(inside)
        return delays

    filters = list(warnings.filters)
    assert map_decoding(work, [(0, 0.05), (0.01, 0.1)], threads=2) == [(0, 0.05), (0.01, 0.1)]
    assert warnings.filters == filters
    with pytest.warns(UserWarning, match="still shown"):
        warnings.warn("still shown")


def _embed(data, *args) -> dict:
    out = data.parent / "embed.json"
    r = cli("embed", data, *TINY, *args, "--json-out", out)
    assert r.exit_code == 0, r.output
    return json.loads(out.read_text())


def test_decode_path_is_part_of_the_cache_key_and_the_model(tmp_path, cache_dir):
    data = tmp_path / "data"
    make_folder(data, n_classes=2, per_class=6)
    for p in list(data.rglob("*.png"))[:6]:  # half JPEGs (the tensor decoder), half PNGs (PIL, tensor resize)
        Image.open(p).convert("RGB").save(p.with_suffix(".jpg"), quality=95)
        p.unlink()
    assert _embed(data)["embedded"] == 12  # auto: the tensor path
    assert _embed(data, "--decode", "pil")["embedded"] == 12  # its own namespace: nothing reused
    assert _embed(data, "--decode", "tensor")["embedded"] == 0
    r = cli("train", data, "-o", tmp_path / "m", *TINY, "--epochs", "5")
    assert r.exit_code == 0, r.output
    spec = json.loads((tmp_path / "m" / "manifest.json").read_text())["backbone"]
    assert spec["decode"] == "tensor"
    assert "decode tensor" in " ".join(cli("info", tmp_path / "m").output.split())
    import ovr

    pred = ovr.load(tmp_path / "m", device="cpu")
    assert pred.backbone.decode == "tensor"
    _, _, skipped = pred.embed(sorted(data.rglob("*.*")))
    assert not skipped
    n_shards = len(list(cache_dir.rglob("shard-*.safetensors")))
    pred.predict(sorted(data.rglob("*.*")))  # all cached in the tensor path's namespace: nothing new written
    assert len(list(cache_dir.rglob("shard-*.safetensors"))) == n_shards


def test_truncated_jpeg_is_skipped_with_the_same_reason_on_both_paths(tmp_path, cache_dir):
    data = make_folder(tmp_path / "data", n_classes=2, per_class=3)
    jpg = _save(_photo(), "JPEG")
    (data / "c0" / "cut.jpg").write_bytes(jpg[: len(jpg) // 2])
    reasons = []
    for decode in ("pil", "tensor"):
        out = _embed(data, "--decode", decode)
        assert out["embedded"] == 6 and len(out["skipped"]) == 1
        reasons.append(out["skipped"][0])
    assert reasons[0] == reasons[1]


def test_bad_decode_value_is_one_line(tmp_path):
    r = cli("embed", make_folder(tmp_path / "d", 2, 2), *TINY, "--decode", "nvjpeg")
    assert r.exit_code == 2 and "decode must be auto, pil or tensor" in r.output
    assert len(r.output.strip().splitlines()) == 1


def test_models_from_before_the_decode_path_load_as_pil():
    from ovr.embedding.backbones import load_backbone, model_backbone

    spec = load_backbone("tiny_cnn", decode="pil").spec()
    del spec["decode"]
    assert model_backbone(spec).decode == "pil"
    old_key = hashlib.sha256(f"tiny_cnn\n{spec['fingerprint']}\n{spec['preprocess']}".encode()).hexdigest()
    assert model_backbone(spec).key == old_key  # the PIL path kept the key it always had: old caches still serve


def test_a_file_only_pil_can_read_in_a_device_batch_is_cropped_once():
    """The per-file fallback of the batched branch: bytes that reach the batch decoder but are not a JPEG it can
    take (here a PNG) are decoded by PIL and resized and cropped once, like any other file (Lite0's resize + crop
    applied twice would move the pixels)."""
    from ovr.embedding.backbones import REGISTRY, load_backbone

    if not REGISTRY["efficientnet_lite0"].available():
        pytest.skip("efficientnet_lite0 weights not installed")
    px = load_backbone("efficientnet_lite0", decode="tensor").pixels(batch_decode=True)
    png, jpg = _save(_photo(), "PNG"), _save(_photo(), "JPEG")
    as_bytes = torch.frombuffer(bytearray(png), dtype=torch.uint8)
    x, bad = px.batch([px.item(jpg), as_bytes])
    ref, _ = px.batch([px.item(jpg), px.item(png)])
    assert not bad and torch.equal(x, ref)


def test_embedding_loop_on_the_batched_branch_skips_a_refused_file_and_keeps_the_rest(tmp_path):
    """The loop a CUDA run takes (bytes out of the workers, decoded per batch), run on CPU by forcing the batched
    branch: a JPEG the batch decoder and PIL both refuse is skipped with PIL's reason; the others match the
    per-file tensor path's embeddings."""
    import dataclasses

    from ovr.embedding.backbones import Backbone, load_backbone
    from ovr.embedding.cache import EmbeddingCache
    from ovr.embedding.features import embed_paths

    class Batched(Backbone):
        def pixels(self, device="cpu", batch_decode=None):
            return super().pixels(device, batch_decode=True)

    bb = load_backbone("tiny_cnn", decode="tensor")
    batched = Batched(**{f.name: getattr(bb, f.name) for f in dataclasses.fields(bb)})
    good = [_save(_photo(64 + 8 * i, 48), "JPEG") for i in range(3)]
    broken = good[0][: len(good[0]) // 2] + b"\xff\xd8\xff\xd8" + good[0][len(good[0]) // 2 + 4:]
    paths = []
    for i, data in enumerate([good[0], broken, good[1], good[2]]):
        paths.append(tmp_path / f"{i}.jpg")
        paths[-1].write_bytes(data)
    r = embed_paths(paths, batched, EmbeddingCache(tmp_path / "c1", bb.key), torch.device("cpu"), batch_size=4,
                    workers=0)
    assert [p.name for p, _ in r.skipped] == ["1.jpg"] and "broken data stream" in r.skipped[0][1]
    ref = embed_paths([paths[i] for i in (0, 2, 3)], bb, EmbeddingCache(tmp_path / "c2", bb.key),
                      torch.device("cpu"), workers=0)
    assert torch.equal(r.embeddings, ref.embeddings)


STRIP_RSS = """
import io, resource, sys
import numpy as np
from PIL import Image
from ovr.embedding.backbones import load_backbone
im = Image.fromarray(np.random.default_rng(0).integers(0, 255, (1, 100_000, 3), dtype=np.uint8))
b = io.BytesIO(); im.save(b, "PNG")
px = load_backbone("tiny_cnn", decode=sys.argv[1]).pixels()
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
x = px.item(b.getvalue())
assert tuple(x.shape) == (3, 32, 32)
print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) // 1024)
"""


@pytest.mark.parametrize("decode", ["pil", "tensor"])
def test_a_long_strip_is_cut_before_the_resize_not_blown_up(decode):
    """A 1 x 100,000 strip (a small PNG) resized to a short side of 32 used to become 32 x 3,200,000 (300 MB of
    pixels, 1.2 GB as floats) before the centre crop threw nearly all of it away."""
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-c", STRIP_RSS, decode], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    assert int(r.stdout.strip()) < 100  # MB of peak memory the image added


def test_the_cut_leaves_ordinary_images_alone_and_export_cuts_alike():
    from ovr.embedding.backbones import load_backbone

    bb = load_backbone("tiny_cnn", decode="pil")
    px = bb.pixels()
    im = _photo(96, 72)  # 4:3
    assert torch.equal(px.image(im), bb.transform(im))
    strip = _photo(400, 40)  # 10:1: cut to 160 x 40 around the middle
    assert px.prep.cut_box(400, 40) == (120, 0, 280, 40)
    assert torch.equal(px.image(strip), bb.transform(strip.crop((120, 0, 280, 40))))
    ten = load_backbone("tiny_cnn", decode="tensor")
    crop = ten.pixels().image(strip).permute(1, 2, 0).numpy()
    from ovr.embedding.pixels import split_transform

    assert np.array_equal(split_transform(ten.transform, "tensor")(strip), crop)  # what export's users run


@pytest.mark.parametrize("geometry", [
    [{"op": "resize", "size": 256, "interpolation": "bicubic", "max_size": None, "antialias": True},
     {"op": "center_crop", "size": [224, 224]}],
    [{"op": "resize", "size": [40], "interpolation": "bilinear", "max_size": None, "antialias": True},
     {"op": "center_crop", "size": [32, 32]}],
    [{"op": "resize", "size": [48, 48], "interpolation": "bicubic", "max_size": None, "antialias": True}],  # full frame
])
def test_torch_free_crop_gives_the_pixels_of_torchvisions_pil_path(geometry):
    """ovr.embedding.geometry (the torch-free predict's resize + crop) against torchvision's Resize + CenterCrop on
    the same PIL images: identical uint8 crops, including upscaled, portrait, square and very elongated (cut) ones."""
    from ovr.embedding.geometry import crop_pil, normalized
    from ovr.embedding.pixels import compose, split_transform

    record = {"geometry": geometry, "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}
    prep = split_transform(compose(record), "pil")
    rng = np.random.default_rng(0)
    for w, h in [(24, 24), (300, 200), (200, 301), (1000, 30), (33, 500), (256, 256), (640, 427)]:
        im = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).filter(
            __import__("PIL.ImageFilter", fromlist=["x"]).GaussianBlur(2))
        ours = crop_pil(record, im)
        assert ours is not None and np.array_equal(ours, prep(im)), (w, h)
        ref = compose(record)(prep.cut_pil(im)).numpy()  # ToTensor + Normalize in torch
        assert np.array_equal(normalized(ours[None], record)[0], ref)
