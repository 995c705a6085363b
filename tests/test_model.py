"""train / predict / evaluate / add-class / refresh / remove-class / info, end to end on tiny_cnn."""
import hashlib
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

import ovr
from ovr.cli import app
from ovr.learn.store import load_model, read_manifest

from conftest import make_folder, make_image

runner = CliRunner()
TINY = ["--backbone", "tiny_cnn", "--device", "cpu", "--workers", "0"]
QUICK = ["--epochs", "15", "--lr", "0.01"]


def run(*args):
    r = runner.invoke(app, [str(a) for a in args])
    return r


def train(data, out, *extra):
    r = run("train", data, "--out", out, *TINY, *QUICK, *extra)
    assert r.exit_code == 0, r.output
    return r


def head_hashes(model: Path) -> dict[str, str]:
    m = read_manifest(model)
    return {c: hashlib.sha256((model / m["heads"][c]["file"]).read_bytes()).hexdigest() for c in m["classes"]}


@pytest.fixture
def data4(tmp_path):
    return make_folder(tmp_path / "data", n_classes=4, per_class=12)


@pytest.fixture
def model(data4, tmp_path, cache_dir):
    train(data4, tmp_path / "model")
    return tmp_path / "model"


def test_train_predict_evaluate(model, data4, tmp_path):
    m = read_manifest(model)
    assert m["classes"] == ["c0", "c1", "c2", "c3"] and m["backbone"]["name"] == "tiny_cnn"
    for c in m["classes"]:
        h = m["heads"][c]
        assert {"sha256", "seed", "positives", "negatives", "l2", "threshold", "calibration", "val", "created"} <= set(h)
    assert (model / "config.toml").is_file()
    r = run("predict", model, data4 / "c2", "--json", "--top-k", "2")
    rows = [json.loads(line) for line in r.stdout.strip().splitlines()]
    assert len(rows) == 12 and sum(row["class"] == "c2" for row in rows) >= 10
    assert len(rows[0]["top"]) == 2
    r = run("evaluate", model, data4, "--json-out", tmp_path / "ev.json")
    assert r.exit_code == 0, r.output
    ev = json.loads((tmp_path / "ev.json").read_text())
    assert ev["accuracy"] >= 0.75 and len(ev["confusion_matrix"]) == 4 and "ece" in ev and "macro_f1" in ev
    assert sum(map(sum, ev["confusion_matrix"])) == ev["n"]


def test_refuses_overwrite_without_force(model, data4):
    r = run("train", data4, "--out", model, *TINY, *QUICK)
    assert r.exit_code == 2 and "--force" in r.output
    before = head_hashes(model)
    train(data4, model, "--force", "--no-pos-weight")  # other settings, other heads (linear heads ignore --seed)
    assert head_hashes(model) != before


def test_predict_corrupt_image_gets_error_row(model, data4, tmp_path):
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"\x89PNG broken")
    r = run("predict", model, data4 / "c0" / "img000.png", bad, "--json")
    rows = [json.loads(line) for line in r.stdout.strip().splitlines()]
    assert rows[0]["class"] == "c0" and "error" in rows[1] and r.exit_code == 0


def table_rows(output: str) -> list[list[str]]:
    """The body rows of a Rich table, with cells that wrapped onto continuation lines joined back."""
    rows: list[list[str]] = []
    for ln in output.splitlines():
        if ln.startswith("│"):
            cells = [c.strip() for c in ln.split("│")[1:-1]]
            if rows and not cells[0]:
                rows[-1] = [(a + " " + b).strip() for a, b in zip(rows[-1], cells)]
            else:
                rows.append(cells)
    return rows


def test_predict_table_shows_top_k_labels_and_error_rows(model, data4, tmp_path, monkeypatch):
    (data4 / "bad.png").write_bytes(b"\x89PNG broken")
    monkeypatch.chdir(data4)  # short relative paths keep the table narrow
    r = run("predict", model, "c2/img001.png", "bad.png", "--top-k", "2", "--multilabel")
    assert r.exit_code == 0, r.output
    good, bad = table_rows(r.output)
    assert good[0] == "c2/img001.png" and good[1] == "c2" and 0.5 < float(good[2]) <= 1.0
    assert good[3].split()[0] in {"c0", "c1", "c3"}  # runner-up: another class
    assert good[4].startswith("c2 ") and good[4].count(",") == 1  # top-2
    assert "c2" in good[5].split(", ")  # multi-label: at least the c2 head fires
    assert bad[0] == "bad.png" and bad[1] == "error: not an image file (format not recognised)"


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_device_cuda_without_cuda_is_a_one_line_error(data4, tmp_path, cache_dir):
    r = run("train", data4, "--out", tmp_path / "m", "--backbone", "tiny_cnn", "--device", "cuda")
    assert r.exit_code == 2 and "CUDA is not available" in r.output and not (tmp_path / "m").exists()


def test_python_api_paths_and_pil(model, data4, cache_dir):
    p = ovr.load(model, device="cpu", cache_dir=cache_dir)
    files = sorted((data4 / "c1").glob("*.png"))[:4]
    a = p.predict(files)
    b = p.predict([Image.open(f) for f in files])
    assert [x["class"] for x in a] == [x["class"] for x in b]
    assert np.allclose([x["confidence"] for x in a], [x["confidence"] for x in b], atol=1e-5)


def test_unknown_answer_and_multilabel(model, data4, tmp_path):
    noise = tmp_path / "noise.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (24, 24, 3), dtype=np.uint8)).save(noise)
    r = run("predict", model, noise, data4 / "c0" / "img001.png", "--json", "--reject-below", "1.01")
    rows = [json.loads(line) for line in r.stdout.strip().splitlines()]
    assert all(row["class"] == "unknown" for row in rows)
    r = run("predict", model, data4 / "c0" / "img001.png", "--json", "--multilabel", "--thresholds", "--calibrated")
    row = json.loads(r.stdout.strip())
    assert "c0" in row["labels"] and row["class"] == "c0"


@pytest.mark.parametrize("damage", ["missing_head", "corrupt_head", "newer_schema", "foreign_backbone", "no_manifest"])
def test_load_errors(model, damage, data4):
    m = read_manifest(model)
    head = model / m["heads"]["c1"]["file"]
    if damage == "missing_head":
        head.unlink()
    elif damage == "corrupt_head":
        head.write_bytes(head.read_bytes()[:-1] + b"\x00")
    elif damage == "newer_schema":
        m["schema_version"] = 99
        (model / "manifest.json").write_text(json.dumps(m))
    elif damage == "foreign_backbone":
        m["backbone"]["fingerprint"] = "0" * 64
        (model / "manifest.json").write_text(json.dumps(m))
    else:
        (model / "manifest.json").unlink()
    r = run("predict", model, data4 / "c0" / "img000.png")
    assert r.exit_code == 2, r.output
    expect = {"missing_head": "missing", "corrupt_head": "corrupt", "newer_schema": "newer",
              "foreign_backbone": "model was made with backbone", "no_manifest": "not an ovr model"}[damage]
    assert expect in r.output and "Traceback" not in r.output


def test_corrupt_manifest_is_a_one_line_error(model, data4):
    (model / "manifest.json").write_text("{not json")
    r = run("predict", model, data4 / "c0" / "img000.png")
    assert r.exit_code == 2 and "corrupt" in r.output and "Traceback" not in r.output
    (model / "manifest.json").write_text("{}")
    r = run("info", model)
    assert r.exit_code == 2 and "no schema_version" in r.output


def test_train_refuses_what_it_cannot_train_and_never_overwrites_a_foreign_folder(tmp_path, cache_dir):
    one = make_folder(tmp_path / "one", n_classes=1, per_class=6)
    r = run("train", one, "--out", tmp_path / "m1", *TINY)
    assert r.exit_code == 2 and "at least two classes" in r.output
    unreadable = make_folder(tmp_path / "bad", n_classes=2, per_class=6)
    for f in (unreadable / "c1").iterdir():
        f.write_bytes(b"not an image")
    r = run("train", unreadable, "--out", tmp_path / "m2", *TINY)
    assert r.exit_code == 2 and "no readable training images for class 'c1'" in r.output
    mine = tmp_path / "my-documents"
    mine.mkdir()
    (mine / "thesis.txt").write_text("irreplaceable")
    r = run("train", make_folder(tmp_path / "ok"), "--out", mine, "--force", *TINY, *QUICK)
    assert r.exit_code == 2 and "not an ovr model" in r.output and "embed" not in r.output  # refused up front
    assert (mine / "thesis.txt").read_text() == "irreplaceable"


def test_add_class_needs_the_training_embeddings_in_this_cache(model, data4, tmp_path):
    r = run("add-class", model, "c9", data4 / "c0", "--cache-dir", tmp_path / "empty-cache", "--device", "cpu")
    assert r.exit_code == 2 and "must be embedded on this machine first" in r.output, r.output


def test_crash_during_save_leaves_old_model(model):
    from ovr.learn.store import save_model

    before = head_hashes(model)
    m = load_model(model)
    m.heads["c2"] = {"weight": "not a tensor"}
    with pytest.raises(AttributeError):  # a str has no .detach(): fails half way through writing the heads
        save_model(m, model, force=True)
    assert head_hashes(model) == before and load_model(model).classes == ["c0", "c1", "c2", "c3"]
    assert not [p for p in model.parent.iterdir() if p.name.startswith(".model.tmp")]


def test_unsafe_and_unicode_class_names(tmp_path, cache_dir):
    root = tmp_path / "d"
    for i, name in enumerate(["Ünïcødé 猫", "A", "a", "dots..\\back"]):
        for j in range(8):
            make_image(root / name / f"{j}.png", i, j)
    train(root, tmp_path / "m")
    m = read_manifest(tmp_path / "m")
    files = [m["heads"][c]["file"] for c in m["classes"]]
    assert len({f.lower() for f in files}) == 4  # no case-insensitive collision
    assert all(f.startswith("heads/") and "/" not in f[6:] and ".." not in f for f in files)
    r = run("add-class", tmp_path / "m", "../escape", root / "A", "--device", "cpu")
    assert r.exit_code == 0, r.output
    assert not (tmp_path / "escape").exists()
    f = read_manifest(tmp_path / "m")["heads"]["../escape"]["file"]
    assert (tmp_path / "m" / f).resolve().parent == (tmp_path / "m" / "heads").resolve()


# --- issue 5: growing a model ------------------------------------------------------------------------------

def test_add_class_keeps_other_heads_byte_identical(model, tmp_path, cache_dir):
    new = make_folder(tmp_path / "new", n_classes=5, per_class=12)  # c4 is the new class
    before = head_hashes(model)
    r = run("add-class", model, "c4", new / "c4", "--device", "cpu")
    assert r.exit_code == 0, r.output
    after = head_hashes(model)
    assert {c: after[c] for c in before} == before and "c4" in after
    m = read_manifest(model)
    assert m["classes"][-1] == "c4" and m["heads"]["c4"]["positives"] > 0
    assert m["heads"]["c4"]["negatives"] == sum(h["positives"] for c, h in m["heads"].items() if c != "c4")
    assert len(list((model / "heads").iterdir())) == 5
    r = run("predict", model, new / "c4", "--json", "--top-k", "2")
    rows = [json.loads(line) for line in r.stdout.strip().splitlines()]
    # the new head fires on its class (old heads may too, until `refresh`: see the refresh test)
    assert sum("c4" in [t["class"] for t in row["top"]] for row in rows) >= 9
    r = run("add-class", model, "c4", new / "c4", "--device", "cpu")
    assert r.exit_code == 2 and "--replace" in r.output
    r = run("add-class", model, "c4", str(new / "c4" / "*.png"), "--replace", "--device", "cpu")
    assert r.exit_code == 0, r.output
    assert {c: head_hashes(model)[c] for c in before} == before


def test_add_class_embeds_only_new_images(model, tmp_path, cache_dir):
    from ovr.embedding.backbones import load_backbone
    from ovr.embedding.cache import EmbeddingCache

    new = make_folder(tmp_path / "new", n_classes=5, per_class=6)
    n0 = len(EmbeddingCache(cache_dir, load_backbone("tiny_cnn").key))
    run("add-class", model, "c4", new / "c4", "--device", "cpu")
    assert len(EmbeddingCache(cache_dir, load_backbone("tiny_cnn").key)) == n0 + 6


def test_add_class_equals_the_head_trained_alone_with_same_data(model, tmp_path, cache_dir):
    """The new head depends on the data and its seed only: adding it twice gives the same head file."""
    new = make_folder(tmp_path / "new", n_classes=5, per_class=8)
    run("add-class", model, "c4", new / "c4", "--device", "cpu")
    h1 = head_hashes(model)
    run("add-class", model, "c4", new / "c4", "--replace", "--device", "cpu")
    assert head_hashes(model) == h1


def test_same_data_and_seed_give_the_same_head_files(model, data4, tmp_path):
    """Content addressing only works if equal heads are equal bytes (safetensors once wrote metadata keys
    in a random order, so a retrained identical head got another sha256 about half the time)."""
    for k in range(2):
        train(data4, tmp_path / f"again{k}")
        assert head_hashes(tmp_path / f"again{k}") == head_hashes(model)
    files = lambda m: sorted(p.name for p in (m / "heads").iterdir())  # noqa: E731
    assert files(tmp_path / "again0") == files(model)


def test_remove_class_and_info(model):
    before = head_hashes(model)
    r = run("remove-class", model, "c1")
    assert r.exit_code == 0
    after = head_hashes(model)
    assert "c1" not in after and all(after[c] == before[c] for c in after)
    assert run("remove-class", model, "nope").exit_code == 2
    r = run("info", model)
    assert r.exit_code == 0 and "tiny_cnn" in r.output
    # the class column of the table's rows (a search of the whole output would also hit the sha256 column)
    assert [row[0] for row in table_rows(r.output)] == ["c0", "c2", "c3"]
    info = json.loads(run("info", model, "--json").stdout)
    assert info["classes"] == ["c0", "c2", "c3"]


@pytest.fixture
def twin_data(tmp_path):
    """Three classes, and a new class that looks like c0 (same pattern, other noise): the c0 head fires on it."""
    root = tmp_path / "d"
    for c in range(3):
        for i in range(12):
            make_image(root / f"c{c}" / f"{i}.png", c, i)
    for i in range(12):
        make_image(tmp_path / "look_alike" / f"{i}.png", 0, 100 + i)
    return root


def test_refresh_retrains_only_confused_heads(twin_data, tmp_path, cache_dir):
    train(twin_data, tmp_path / "m")
    before = head_hashes(tmp_path / "m")
    r = run("add-class", tmp_path / "m", "c0-twin", tmp_path / "look_alike", "--device", "cpu")
    assert r.exit_code == 0 and "c0" in r.output.split("fire on the new images")[-1], r.output
    r = run("refresh", tmp_path / "m", "--device", "cpu")
    assert r.exit_code == 0 and "refreshed" in r.output, r.output
    after = head_hashes(tmp_path / "m")
    m = read_manifest(tmp_path / "m")
    assert after["c0"] != before["c0"]
    assert after["c1"] == before["c1"] and after["c2"] == before["c2"]
    assert m["heads"]["c0"]["negatives"] > load_model(tmp_path / "m").records["c1"].negatives - 1
    r = run("refresh", tmp_path / "m", "c1", "--device", "cpu")
    assert r.exit_code == 0 and head_hashes(tmp_path / "m")["c1"] != before["c1"]
    assert head_hashes(tmp_path / "m")["c2"] == before["c2"]


def test_add_class_refresh_equals_add_then_refresh(twin_data, tmp_path, cache_dir):
    import shutil

    train(twin_data, tmp_path / "m1")
    shutil.copytree(tmp_path / "m1", tmp_path / "m2")
    before = head_hashes(tmp_path / "m1")
    r = run("add-class", tmp_path / "m1", "c0-twin", tmp_path / "look_alike", "--refresh", "--device", "cpu")
    assert r.exit_code == 0 and "refreshed 1 old head that fired on c0-twin" in r.output, r.output
    one_step = head_hashes(tmp_path / "m1")
    assert one_step["c0"] != before["c0"] and one_step["c1"] == before["c1"] and one_step["c2"] == before["c2"]
    run("add-class", tmp_path / "m2", "c0-twin", tmp_path / "look_alike", "--device", "cpu")
    run("refresh", tmp_path / "m2", "c0", "--device", "cpu")
    assert head_hashes(tmp_path / "m2") == one_step


def test_add_class_errors(model, tmp_path):
    assert run("add-class", model, "x", tmp_path / "nope", "--device", "cpu").exit_code == 2
    assert run("add-class", tmp_path / "nomodel", "x", model, "--device", "cpu").exit_code == 2
    imgs = make_folder(tmp_path / "imgs", n_classes=1, per_class=3)
    r = run("add-class", model, "x", imgs / "c0", "--backbone", "resnet18", "--device", "cpu")
    assert r.exit_code == 2 and "backbone" in r.output
    r = run("add-class", model, "x", model, "--device", "cpu")  # a folder without image files
    assert r.exit_code == 2 and "no image files given" in r.output


def test_two_concurrent_add_class_processes_both_land(model, tmp_path, cache_dir):
    new = make_folder(tmp_path / "new", n_classes=6, per_class=8)
    env = {**__import__("os").environ, "OVR_CACHE_DIR": str(cache_dir)}
    procs = [subprocess.Popen([sys.executable, "-m", "ovr", "add-class", str(model), f"c{k}", str(new / f"c{k}"),
                               "--device", "cpu"], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
             for k in (4, 5)]
    outs = [p.communicate(timeout=240)[0].decode() for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    m = load_model(model)  # verifies every sha256
    assert set(m.classes) == {"c0", "c1", "c2", "c3", "c4", "c5"}
    labels = {e["label"] for e in m.examples}
    assert {"c4", "c5"} <= labels


def test_mlp_heads_train_save_load_predict(data4, tmp_path, cache_dir):
    train(data4, tmp_path / "mlp", "--head", "mlp", "--hidden", "16")
    m = load_model(tmp_path / "mlp")
    assert m.head_type == "mlp" and set(m.heads["c0"]) == {"w1", "b1", "w2", "b2"} and m.heads["c0"]["w1"].shape[1] == 16
    r = run("evaluate", tmp_path / "mlp", data4, "--json-out", tmp_path / "ev.json")
    assert r.exit_code == 0 and json.loads((tmp_path / "ev.json").read_text())["accuracy"] > 0.5


def test_add_class_with_extra_negatives(model, tmp_path, cache_dir):
    new = make_folder(tmp_path / "new", n_classes=6, per_class=8)
    negs = tmp_path / "negs"
    (negs / "other").mkdir(parents=True)
    for p in sorted((new / "c5").glob("*.png")):
        p.rename(negs / "other" / p.name)
    before = load_model(model).records
    r = run("add-class", model, "c4", new / "c4", "--negatives", negs, "--device", "cpu")
    assert r.exit_code == 0, r.output
    m = load_model(model)
    old_negatives = sum(before[c].positives for c in before)
    assert m.records["c4"].negatives > old_negatives  # the extra images were used as negatives
    assert sum(e["label"] is None for e in m.examples) == 8  # and remembered for heads trained later


def test_fitting_heads_imports_no_scikit_learn():
    """Training scores its heads with numpy alone: importing scikit-learn (about a second) was part of every fresh
    process's first fit, a sizeable share of a small one's time."""
    code = ("import sys, torch\nfrom ovr.config import TrainConfig\nfrom ovr.learn.model import Model\n"
            "g = torch.Generator().manual_seed(0)\nX = torch.randn(120, 8, generator=g)\ny = torch.arange(120) % 3\n"
            "X[:, 0] += 3 * y\nm = Model({'dim': 8}, 'standardize', 'linear', ['a', 'b', 'c'])\n"
            "m.fit_heads(m.classes, X[:90], y[:90], X[90:], y[90:], TrainConfig())\n"
            "print(len(m.records), 'sklearn' in sys.modules)\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.split() == ["3", "False"]
