"""Issue 14: augmented views (cached, deterministic), test-time augmentation, multi-label manifests and their
metrics (against scikit-learn's), per-head curves and the error gallery in `ovr evaluate --report`."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import cache_rows as _rows, TINY, cli, make_folder, make_image




def test_a_view_is_a_function_of_seed_content_and_index(tmp_path):
    from ovr.embedding.views import augment, view_key, view_seed

    make_image(tmp_path / "a.png", 1, 0, size=40)
    im = Image.open(tmp_path / "a.png").convert("RGB")
    a, b = augment(im, view_seed(0, "k", 1)), augment(im, view_seed(0, "k", 1))
    assert np.array_equal(np.asarray(a), np.asarray(b)) and a.size == im.size
    c = augment(im, view_seed(0, "k", 2))
    assert not np.array_equal(np.asarray(a), np.asarray(c))
    assert len({view_key("k", 0, 1), view_key("k", 0, 2), view_key("k", 1, 1), view_key("j", 0, 1)}) == 4


def test_views_train_on_train_images_only_and_a_second_run_embeds_nothing(folder, tmp_path, cache_dir):
    r = cli("train", folder, "--out", tmp_path / "m", *TINY, "--views", "2")
    assert r.exit_code == 0, r.output
    from ovr.learn.store import load_model

    m = load_model(tmp_path / "m")
    plain = [e for e in m.examples if "view" not in e]
    views = [e for e in m.examples if "view" in e]
    n_train = sum(e["split"] == "train" for e in plain)
    assert len(views) == 2 * n_train and all(e["split"] == "train" for e in views)  # val/test stay plain
    # each head saw plain + views of the training images (and plain validation rows, before its refit)
    assert m.records["c0"].positives == 3 * sum(e["split"] == "train" and e["label"] == "c0" for e in plain) + \
        sum(e["split"] == "val" and e["label"] == "c0" for e in plain)
    rows = _rows(cache_dir)
    assert rows == 24 + 2 * n_train
    assert cli("train", folder, "--out", tmp_path / "m", *TINY, "--views", "2", "--force").exit_code == 0
    assert _rows(cache_dir) == rows  # views are cached like any embedding: nothing embedded twice
    m2 = load_model(tmp_path / "m")
    assert all(torch.equal(m.heads[c]["weight"], m2.heads[c]["weight"]) for c in m.classes)  # deterministic


def test_tta_averages_logits_and_is_cached(folder, tmp_path, cache_dir):
    assert cli("train", folder, "--out", tmp_path / "m", *TINY).exit_code == 0
    from ovr.apps.pipeline import Predictor

    p = Predictor(tmp_path / "m", "cpu")
    files = sorted((folder / "c0").glob("*.png"))[:4]
    X, idx, skipped, views = p.embed(files, tta=3)
    assert len(views) == 3 and all(V.shape == X.shape for V in views)
    assert not torch.allclose(views[0], X)
    ans = p.model.answer(X, views=views)
    want = np.mean([p.model.logits(V) for V in (X, *views)], axis=0)
    assert np.allclose(ans.logits, want)
    assert np.allclose(p.model.answer(X, views=[X, X]).logits, p.model.answer(X).logits, atol=1e-6)
    rows = _rows(cache_dir)
    r = cli("predict", tmp_path / "m", *files, "--tta", "3", "--json", "--device", "cpu")
    assert r.exit_code == 0 and _rows(cache_dir) == rows  # the same views, from the cache
    one = [json.loads(line) for line in r.output.splitlines() if line.startswith("{")]
    assert len(one) == 4 and all("class" in o for o in one)
    # in-memory images get views too (not cached), and the same answer as their files
    rows_pil = p.predict([Image.open(f).convert("RGB") for f in files], tta=3)
    assert [r["class"] for r in rows_pil] == [o["class"] for o in one]
    r = cli("evaluate", tmp_path / "m", folder, "--tta", "2", "--json-out", tmp_path / "e.json", "--device", "cpu")
    assert r.exit_code == 0 and json.loads((tmp_path / "e.json").read_text())["tta"] == 2


def _two_pattern_image(path: Path, labels: list[int], i: int) -> None:
    """Left half one class's pattern, right half another's: an image with two labels."""
    from conftest import make_image as mk

    parts = []
    for k, lab in enumerate(labels[:2] * (2 if len(labels) == 1 else 1)):
        p = path.with_name(f".{path.stem}-{k}.png")
        mk(p, lab, i * 7 + k, size=24)
        parts.append(np.asarray(Image.open(p).convert("RGB")))
        p.unlink()
    Image.fromarray(np.concatenate([parts[0][:, :12], parts[1][:, 12:]], 1)).save(path)


def _manifest(tmp_path: Path, n: int = 36, sep: str = ";", tsv: bool = False) -> Path:
    rng = np.random.default_rng(0)
    rows = []
    (tmp_path / "img").mkdir(exist_ok=True)
    for i in range(n):
        labels = sorted(set(rng.choice(3, size=rng.integers(1, 3), replace=True).tolist()))
        _two_pattern_image(tmp_path / "img" / f"{i}.png", labels, i)
        rows.append((f"img/{i}.png", sep.join(f"k{x}" for x in labels)))
    d = "\t" if tsv else ","
    path = tmp_path / ("m.tsv" if tsv else "m.csv")
    path.write_text(f"path{d}labels\n" + "".join(f"{p}{d}{lab}\n" for p, lab in rows))
    return path


def test_manifest_format_and_bad_rows(tmp_path):
    from ovr.embedding.data import scan_folder
    from ovr.errors import OvrError

    path = _manifest(tmp_path, n=12)
    row1 = next(line for line in path.read_text().splitlines() if line.startswith("img/1.png,"))
    with open(path, "a") as f:  # the same image again, by another path to it, with the same labels
        f.write(f"img/nope.png,k1\nimg/0.png,\nimg/../img/1.png,{row1.split(',')[1]},\n")
    text = path.read_text().replace("path,labels\n", "path,labels,split\n")
    lines = text.splitlines()
    lines[3] += ",tset"  # unknown split
    path.write_text("\n".join(lines) + "\n")
    f = scan_folder(path)
    assert f.classes == ["k0", "k1", "k2"] and f.targets.shape == (len(f.paths), 3)
    note = " ".join(f.notes)
    assert "skipped 4 manifest rows" in note and "file not found" in note and "no label" in note
    assert "unknown split 'tset'" in note and "listed twice" in note
    tsv = _manifest(tmp_path, n=6, sep="|", tsv=True)
    assert scan_folder(tsv).targets.sum() >= 6
    (tmp_path / "bad.csv").write_text("path,labels\nnope.png,a\n")
    with pytest.raises(OvrError, match="no usable row"):
        scan_folder(tmp_path / "bad.csv")
    (tmp_path / "nohead.csv").write_text("a.png,x\n")
    with pytest.raises(OvrError, match="path` and `labels"):
        scan_folder(tmp_path / "nohead.csv")
    r = cli("train", tmp_path / "bad.csv", "--out", tmp_path / "m", *TINY)
    assert r.exit_code == 2 and "no usable row" in r.output


def test_manifest_aliases_conflicts_and_odd_files_are_caught(tmp_path):
    """An image reached by two paths (img/../img/x.png and img/x.png) is one image: in two splits, or with two
    labels, it is an error naming the rows (7 of 10 aliased images sat in two splits, silently); a header-only file,
    a field over csv's 131,072-character limit and a decompression bomb's message read right."""
    from ovr.embedding.data import describe_error, scan_folder
    from ovr.errors import OvrError

    path = _manifest(tmp_path, n=6)
    base = path.read_text()
    path.write_text(base.replace("path,labels\n", "path,labels,split\n").replace("img/0.png,", "img/0.png,") +
                    "img/../img/0.png,k0,test\n")
    lines = path.read_text().splitlines()
    path.write_text("\n".join([lines[0], lines[1] + ",train", *lines[2:]]) + "\n")
    with pytest.raises(OvrError, match=r"rows 2 and 8 put img/\.\./img/0.png in splits train and test"):
        scan_folder(path)
    path.write_text(base + "img/./1.png,k2;k1;k0\n")
    with pytest.raises(OvrError, match="labels"):
        scan_folder(path)
    (tmp_path / "head.csv").write_text("path,labels\n")
    with pytest.raises(OvrError, match="a header and no rows"):
        scan_folder(tmp_path / "head.csv")
    (tmp_path / "long.csv").write_text("path,labels\nimg/0.png," + ";".join(f"c{i}" for i in range(40000)) + "\n")
    assert len(scan_folder(tmp_path / "long.csv").classes) == 40000
    from PIL import Image

    msg = describe_error(Image.DecompressionBombError("Image size (200000000 pixels) exceeds limit of 178956970 pixels"))
    assert "pixels pixels" not in msg and "200000000 pixels" in msg


def test_multilabel_heads_train_on_their_own_column_and_metrics_match_sklearn(tmp_path, cache_dir):
    from sklearn.metrics import average_precision_score, f1_score, hamming_loss

    from ovr.embedding.data import scan_folder
    from ovr.apps.pipeline import Predictor, evaluate_model
    from ovr.learn.store import load_model

    path = _manifest(tmp_path, n=48)
    folder = scan_folder(path)
    assert folder.multilabel
    r = cli("train", path, "--out", tmp_path / "m", *TINY)
    assert r.exit_code == 0 and "multi-label data" in r.output, r.output
    m = load_model(tmp_path / "m")
    train_val = np.isin(folder.splits, ["train", "val"])
    for j, c in enumerate(folder.classes):  # positives: every train/val image carrying the label, shared or not
        assert m.records[c].positives == int(folder.targets[train_val, j].sum())
    ev = evaluate_model(tmp_path / "m", path, "all", device="cpu")
    assert ev["multilabel"] and set(ev) >= {"mAP", "micro_f1", "macro_f1", "subset_accuracy", "hamming_loss"}
    pred = Predictor(tmp_path / "m", "cpu")
    X, idx, _ = pred.embed(folder.paths)
    ans = pred.model.answer(X)
    T, fired = folder.targets[idx], ans.multilabel()
    assert ev["mAP"] == pytest.approx(np.mean([average_precision_score(T[:, k], ans.confidences[:, k]) for k in range(3)]))
    assert ev["micro_f1"] == pytest.approx(f1_score(T, fired, average="micro"))
    assert ev["hamming_loss"] == pytest.approx(hamming_loss(T, fired))
    assert ev["subset_accuracy"] == pytest.approx(float((T == fired).all(1).mean()))
    r = cli("predict", tmp_path / "m", folder.paths[0], "--multilabel", "--json", "--device", "cpu")
    assert r.exit_code == 0 and "labels" in json.loads([x for x in r.output.splitlines() if x.startswith("{")][0])
    # removing a label keeps the images that also carry another one
    before = sum(1 for e in m.examples if "k1" in e["labels"] and len(e["labels"]) > 1)
    assert cli("remove-class", tmp_path / "m", "k0").exit_code == 0
    m2 = load_model(tmp_path / "m")
    assert all("k0" not in e["labels"] for e in m2.examples)
    assert sum(1 for e in m2.examples if "k1" in e["labels"]) >= before


def test_evaluate_report_has_curves_and_an_error_gallery(tmp_path, cache_dir):
    data = make_folder(tmp_path / "d", n_classes=4, per_class=10)
    for i in range(3):  # a few mislabelled images, so there are errors to show
        (data / "c1" / f"img{i:03d}.png").rename(data / "c0" / f"from_c1_{i}.png")
    assert cli("train", data, "--out", tmp_path / "m", *TINY).exit_code == 0
    r = cli("evaluate", tmp_path / "m", data, "--split", "all", "--report", tmp_path / "rep", "--device", "cpu")
    assert r.exit_code == 0, r.output
    rep = tmp_path / "rep"
    for name in ("report.md", "report.json", "per_class.png", "confusion.png", "curves.png", "errors.png"):
        assert (rep / name).is_file() and (rep / name).stat().st_size > 500, name
    m = json.loads((rep / "report.json").read_text())
    assert m["errors"] and all(e["true"] != e["predicted"] for e in m["errors"])
    confs = [e["confidence"] for e in m["errors"] if e["true"] == m["errors"][0]["true"]]
    assert confs == sorted(confs, reverse=True)  # most confident first
    im = Image.open(rep / "curves.png")
    assert im.size[0] > 300 and len(set(np.asarray(im.convert("L")).flatten().tolist())) > 10  # not blank
    from ovr.learn.store import load_model

    rec = load_model(tmp_path / "m").records["c0"]
    assert 2 <= len(rec.l2_path) <= 11 and rec.l2 in [s for s, _ in rec.l2_path]  # the path stops past the best
    assert min(rec.l2_path, key=lambda p: p[1])[0] == rec.l2  # the chosen strength is the best on validation


def test_mlp_heads_record_training_curves(folder, tmp_path, cache_dir):
    assert cli("train", folder, "--out", tmp_path / "m", *TINY, "--head", "mlp", "--hidden", "8", "--epochs", "5").exit_code == 0
    from ovr.learn.store import load_model

    rec = load_model(tmp_path / "m").records["c1"]
    assert 1 <= len(rec.curve) <= 5 and all(len(p) == 3 and p[1] > 0 for p in rec.curve)


def test_bench_on_multilabel_data_skips_softmax_and_says_so(tmp_path, cache_dir):
    path = _manifest(tmp_path, n=40)
    r = cli("bench", path, "--out", tmp_path / "rep", *TINY, "--seeds", "2")
    assert r.exit_code == 0, r.output
    assert "softmax baseline skipped" in " ".join(r.output.split())
    rep = json.loads((tmp_path / "rep" / "report.json").read_text())
    assert rep["multilabel"] and rep["methods"] == ["ovr"] and len(rep["results"]["mAP"]["values"]) == 2
    assert 0 <= rep["results"]["mAP"]["mean"] <= 1 and (tmp_path / "rep" / "per_class_ap.png").stat().st_size > 500


def test_evaluate_says_what_it_did_not_score_and_its_report_shows_only_what_it_wrote(tmp_path, cache_dir):
    """Images of a class the model has no head for are counted and their rejection rate printed (they were only
    in --json); a class with no image in the split is marked, not a row of zeros; the confusion matrix names its
    classes; report.md links no error gallery when there are no errors."""
    data = make_folder(tmp_path / "d", n_classes=3, per_class=10)
    assert cli("train", data, "--out", tmp_path / "m", *TINY).exit_code == 0
    extra = make_folder(tmp_path / "e", n_classes=4, per_class=6)  # c3: a class the model does not know
    (extra / "c1" / "empty.png").write_bytes(b"")
    (extra / "c1" / "notes.txt").write_text("not an image")
    r = cli("evaluate", tmp_path / "m", extra, "--split", "all", "--device", "cpu", "--report", tmp_path / "rep")
    assert r.exit_code == 0, r.output
    out = " ".join(r.output.split())
    assert "empty.png: empty file" in out and "non-image file" in out  # said as train says them
    assert "18 images of the model's classes" in out and "images of classes without a head (c3)" in out
    assert "answered unknown" in out
    md = (tmp_path / "rep" / "report.md").read_text()
    m = json.loads((tmp_path / "rep" / "report.json").read_text())
    assert ("errors.png" in md) == bool(m["errors"]) and (tmp_path / "rep" / "errors.png").exists() == bool(m["errors"])
    from ovr.learn.manifest import read_manifest
    from ovr.apps.report import write_model_report

    write_model_report({**m, "errors": []}, read_manifest(tmp_path / "m"), tmp_path / "rep2")  # no errors at all
    assert "errors.png" not in (tmp_path / "rep2" / "report.md").read_text()
    assert not (tmp_path / "rep2" / "errors.png").exists()
    only = make_folder(tmp_path / "o", n_classes=2, per_class=6)  # no c2 images at all
    r = cli("evaluate", tmp_path / "m", only, "--split", "all", "--device", "cpu")
    assert "c2 (no images in this split)" in " ".join(r.output.split())
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ovr.apps.report import _draw_confusion

    fig, ax = plt.subplots()
    _draw_confusion(ax, np.array([[3, 1], [0, 4]]), "cm", ["cat", "dog"])
    assert [t.get_text() for t in ax.get_xticklabels()] == ["cat", "dog"]
    assert [t.get_text() for t in ax.get_yticklabels()] == ["cat", "dog"]
    plt.close(fig)


def test_full_frame_sees_the_borders_and_auto_picks_it_for_multilabel_data(tmp_path, cache_dir):
    """--frame full: the whole image resized to the input size (the centre crop cut away objects at the borders,
    where multi-label images often have them); a different cache key; auto is full for multi-label data."""
    import torch
    from PIL import Image

    from ovr.embedding.backbones import load_backbone
    from ovr.embedding.features import embed_images

    crop = load_backbone("tiny_cnn", "default", None, "tensor", "crop")
    full = load_backbone("tiny_cnn", "default", None, "tensor", "full")
    assert crop.key != full.key and "CenterCrop" in crop.preprocess and "CenterCrop" not in full.preprocess
    blank = Image.new("RGB", (96, 32), (20, 20, 20))
    edge = blank.copy()
    edge.paste((250, 30, 30), (0, 0, 20, 32))  # an object at the left border only
    dev = torch.device("cpu")
    a, b = embed_images([blank, edge], crop, dev), embed_images([blank, edge], full, dev)
    assert torch.allclose(a[0], a[1])  # the crop never sees it
    assert not torch.allclose(b[0], b[1], atol=1e-3)
    path = _manifest(tmp_path, n=24)
    assert cli("train", path, "--out", tmp_path / "ml", *TINY).exit_code == 0
    assert json.loads((tmp_path / "ml" / "manifest.json").read_text())["backbone"]["frame"] == "full"
    data = make_folder(tmp_path / "d", n_classes=2, per_class=6)
    assert cli("train", data, "--out", tmp_path / "sl", *TINY).exit_code == 0
    assert json.loads((tmp_path / "sl" / "manifest.json").read_text())["backbone"]["frame"] == "crop"
