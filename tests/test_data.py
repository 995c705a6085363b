import io

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from ovr.cli import app
from ovr.embedding.data import decode_image, expand_inputs, scan_folder
from ovr.errors import OvrError

from conftest import make_folder, make_image

runner = CliRunner()


def _bytes(im: Image.Image, fmt: str, **kw) -> bytes:
    b = io.BytesIO()
    im.save(b, fmt, **kw)
    return b.getvalue()


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "BMP", "WEBP", "TIFF", "GIF"])
def test_formats_decode_to_rgb(fmt):
    im = Image.new("RGB", (10, 6), (200, 30, 30))
    out = decode_image(_bytes(im, fmt))
    assert out.mode == "RGB" and out.size == (10, 6)
    assert abs(int(out.getpixel((5, 3))[0]) - 200) < 30


def test_modes_become_rgb():
    gray = Image.new("L", (4, 4), 128)
    assert decode_image(_bytes(gray, "PNG")).getpixel((0, 0)) == (128, 128, 128)
    pal = Image.new("RGB", (4, 4), (0, 0, 255)).convert("P")
    assert decode_image(_bytes(pal, "PNG")).getpixel((0, 0)) == (0, 0, 255)
    rgba = Image.new("RGBA", (4, 4), (255, 0, 0, 0))  # fully transparent -> white background
    assert decode_image(_bytes(rgba, "PNG")).getpixel((0, 0)) == (255, 255, 255)
    deep = Image.fromarray(np.full((4, 4), 65535, np.uint16))
    assert decode_image(_bytes(deep, "PNG")).getpixel((0, 0)) == (255, 255, 255)


def test_gif_first_frame():
    frames = [Image.new("RGB", (4, 4), c) for c in [(255, 0, 0), (0, 255, 0)]]
    b = io.BytesIO()
    frames[0].save(b, "GIF", save_all=True, append_images=frames[1:])
    r, g, _ = decode_image(b.getvalue()).getpixel((0, 0))
    assert r > 200 and g < 50


def test_exif_orientation_applied():
    im = Image.new("RGB", (10, 4), (0, 0, 0))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees: width and height swap
    out = decode_image(_bytes(im, "JPEG", exif=exif.tobytes()))
    assert out.size == (4, 10)


def test_truncated_and_non_image_raise():
    good = _bytes(Image.new("RGB", (64, 64), (1, 2, 3)), "JPEG")
    with pytest.raises(OSError):
        decode_image(good[: len(good) // 2])
    with pytest.raises(OSError):  # PIL.UnidentifiedImageError
        decode_image(b"not an image at all")


def test_split_is_stratified_seeded_and_hidden_files_ignored(tmp_path):
    root = make_folder(tmp_path / "d", n_classes=2, per_class=20)
    (root / "c0" / ".DS_Store").write_bytes(b"junk")
    make_image(root / ".hidden" / "x.png", 0, 0)
    a = scan_folder(root, 0.2, 0.2, seed=1)
    b = scan_folder(root, 0.2, 0.2, seed=1)
    c = scan_folder(root, 0.2, 0.2, seed=2)
    assert a.classes == ["c0", "c1"] and len(a.paths) == 40
    assert list(a.splits) == list(b.splits) and list(a.splits) != list(c.splits)
    for k in range(2):
        sp = a.splits[a.labels == k]
        assert (sp == "val").sum() == 4 and (sp == "test").sum() == 4


def test_given_splits(tmp_path):
    for split in ["train", "val", "test"]:
        make_folder(tmp_path / "d" / split, n_classes=2, per_class=2)
    f = scan_folder(tmp_path / "d")
    assert f.splits_given and f.classes == ["c0", "c1"]
    assert sorted(set(f.splits)) == ["test", "train", "val"]


def test_expand_inputs_glob_folder_file(tmp_path):
    root = make_folder(tmp_path / "d", n_classes=1, per_class=3)
    assert len(expand_inputs([str(root)])) == 3
    assert len(expand_inputs([str(root / "c0" / "*.png")])) == 3
    with pytest.raises(OvrError):
        expand_inputs([str(tmp_path / "nope.png")])


@pytest.mark.parametrize("case", ["missing", "empty_class", "no_classes", "not_a_folder"])
def test_bad_folders_are_one_line_errors(tmp_path, cache_dir, case):
    root = tmp_path / "d"
    if case == "empty_class":
        make_folder(root, n_classes=1, per_class=2)
        (root / "empty").mkdir()
    elif case == "no_classes":
        root.mkdir()
        (root / "loose.png").write_bytes(b"x")
    elif case == "not_a_folder":
        root.write_text("x")
    r = runner.invoke(app, ["embed", str(root), "--backbone", "tiny_cnn", "--device", "cpu", "--workers", "0"])
    assert r.exit_code == 2, r.output
    assert "error:" in r.output and "Traceback" not in r.output
    assert len([ln for ln in r.output.strip().splitlines() if ln.strip()]) <= 2
