"""What a new user trips over: names with brackets, top-k, all-failed predictions, --version, the Python API's
inputs, bad features."""

import time

import numpy as np
import pytest
import torch
from PIL import Image

import ovr
from ovr.config import TrainConfig
from ovr.learn.model import Model

from conftest import TINY, cli, make_folder, make_image

run = cli


@pytest.fixture
def bracket_model(tmp_path, cache_dir):
    for c, name in enumerate(["[old] rocket", "cat [v2]", "plain"]):
        for i in range(8):
            make_image(tmp_path / "data" / name / f"{i}.png", c, i)
    r = run("train", tmp_path / "data", "--out", tmp_path / "m", *TINY)
    assert r.exit_code == 0, r.output
    return tmp_path / "m", r.output


def test_names_with_square_brackets_are_printed_whole(bracket_model, tmp_path):
    model, out = bracket_model
    assert "[old] rocket" in out and "cat [v2]" in out
    r = run("info", model)
    assert "[old] rocket" in r.output and "cat [v2]" in r.output
    r = run("predict", model, tmp_path / "data" / "[old] rocket" / "0.png", "--device", "cpu")
    assert r.exit_code == 0 and "[old] rocket" in r.output


def test_config_errors_keep_their_brackets(tmp_path):
    (tmp_path / "c.toml").write_text("[train]\nfoo = 1\n")
    r = run("train", tmp_path, "--out", tmp_path / "m", "--config", tmp_path / "c.toml")
    assert r.exit_code == 2 and "[train]" in r.output


def test_top_k_must_be_positive_and_all_failed_is_an_error(bracket_model, tmp_path):
    model, _ = bracket_model
    img = tmp_path / "data" / "plain" / "0.png"
    assert run("predict", model, img, "--top-k", "0", "--device", "cpu").exit_code == 2
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not an image")
    r = run("predict", model, bad, "--device", "cpu")
    assert r.exit_code == 1 and "none of the 1 images" in r.output
    r = run("predict", model, bad, img, "--device", "cpu", "--json")
    assert r.exit_code == 0 and len(r.stdout.strip().splitlines()) == 2


def test_version():
    r = run("--version")
    assert r.exit_code == 0 and r.output.strip() == f"ovr {ovr.__version__}"


def test_python_api_takes_paths_folders_globs_images_and_arrays(bracket_model, tmp_path):
    model, _ = bracket_model
    p = ovr.load(model, device="cpu")
    folder = tmp_path / "data" / "plain"
    one = p.predict(str(folder / "0.png"))
    assert len(one) == 1 and one[0]["class"] in p.classes
    assert len(p.predict(folder)) == 8
    assert len(p.predict(str(folder / "*.png"))) == 8
    arr = np.asarray(Image.open(folder / "1.png").convert("RGB"))
    mixed = p.predict([Image.open(folder / "1.png"), folder / "1.png", arr])
    assert [r["class"] for r in mixed] == [mixed[1]["class"]] * 3
    assert mixed[0]["input"] == "<image>" and mixed[1]["input"].endswith("1.png")
    with pytest.raises(ovr.OvrError, match="cannot predict on int"):
        p.predict([3])


def test_model_refuses_nan_and_the_wrong_number_of_features():
    X = torch.randn(20, 4)
    y = torch.arange(2).repeat(10)
    m = Model({"dim": 4}, "standardize", "linear", ["a", "b"])
    bad = X.clone()
    bad[3, 1] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        m.fit_heads(["a", "b"], bad, y, X[:0], y[:0], TrainConfig())
    m.fit_heads(["a", "b"], X, y, X[:0], y[:0], TrainConfig())
    with pytest.raises(ValueError, match=r"features must be \[n, 4\]"):
        m.answer(torch.randn(3, 5))


def test_train_flags_for_what_users_tune(tmp_path, cache_dir):
    from conftest import make_folder
    from ovr.learn.store import load_model

    data = make_folder(tmp_path / "data", n_classes=3, per_class=10)
    r = run("train", data, "--out", tmp_path / "m", *TINY, "--l2-grid", "0.5", "--val-fraction", "0.3",
            "--test-fraction", "0", "--split-seed", "3", "--tol", "0.001")
    assert r.exit_code == 0, r.output
    m = load_model(tmp_path / "m")
    assert {rec.l2 for rec in m.records.values()} == {0.5}
    assert m.config["data"] == {"val_fraction": 0.3, "test_fraction": 0.0, "split_seed": 3}
    assert not any(e["split"] == "test" for e in m.examples)
    for bad in (["--l2-grid", "abc"], ["--val-fraction", "1.5"], ["--val-fraction", "0.6", "--test-fraction", "0.5"]):
        r = run("train", data, "--out", tmp_path / "m2", *TINY, *bad)
        assert r.exit_code == 2 and "error:" in r.output, (bad, r.output)


def test_threads_count_cores_other_processes_really_use():
    """Real busy loops on every core: /proc/stat sees them, and ovr takes one thread."""
    import os
    import subprocess
    import sys

    import ovr.runtime as rt

    if not os.path.exists("/proc/stat"):
        pytest.skip("no /proc/stat")
    cores = len(os.sched_getaffinity(0))
    loops = [subprocess.Popen([sys.executable, "-c", "import time\nt = time.time()\nwhile time.time() - t < 5: pass"])
             for _ in range(cores)]
    try:
        time.sleep(0.5)
        assert rt.busy_cores(cores, window=0.3) > cores - 0.6
        assert rt.compute_threads(0) == 1
    finally:
        for p in loops:
            p.kill()


def test_threads_from_the_free_cores_or_as_asked(monkeypatch):
    import os

    import ovr.runtime as rt

    cores = len(os.sched_getaffinity(0))
    # /proc/stat's aggregate line (user nice system idle iowait ...), read twice: the busy share between them
    busy = iter([[100, 0, 0, 100, 0, 0, 0, 0], [100 + 100 * cores, 0, 0, 100, 0, 0, 0, 0]])
    monkeypatch.setattr(rt, "_cpu_times", lambda: next(busy))
    assert rt.compute_threads(0) == 1  # a machine busy with other work: one thread
    # an idle machine whose load average reads high (a VM's phantom load of 1.0 gave 1 thread of 2): all cores
    idle = iter([[100, 0, 0, 100, 0, 0, 0, 0], [101, 0, 0, 100 + 100 * cores, 0, 0, 0, 0]])
    monkeypatch.setattr(rt, "_cpu_times", lambda: next(idle))
    monkeypatch.setattr(os, "getloadavg", lambda: (float(cores), 0.0, 0.0))
    assert rt.compute_threads(0) == cores
    assert rt.compute_threads(3) == 3
    monkeypatch.setattr(rt, "_cpu_times", lambda: (_ for _ in ()).throw(OSError("no /proc")))
    assert rt.compute_threads(0) == 1  # without /proc/stat: the load average
    before = torch.get_num_threads()
    try:
        monkeypatch.setenv("OVR_THREADS", "1")
        monkeypatch.setattr(rt, "_THREADS_SET", False)
        assert rt.configure_threads() == 1 and torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
    assert run("--threads", "-1", "info", "x").exit_code == 2


def test_add_class_of_an_existing_class_says_so_before_any_work(tmp_path):
    """Before torch is imported or an image read (it used to hash every image first)."""
    import subprocess
    import sys

    data = make_folder(tmp_path / "data", n_classes=2, per_class=6)
    assert cli("train", data, "--out", tmp_path / "m", *TINY).exit_code == 0
    code = ("import sys\nfrom ovr.cli import main\n"
            f"sys.argv = ['ovr', 'add-class', {str(tmp_path / 'm')!r}, 'c0', {str(data / 'c1')!r}]\n"
            "try:\n    main()\nexcept SystemExit as e:\n    print('exit', e.code, 'torch' in sys.modules)\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert "exit 2 False" in r.stdout, r.stdout + r.stderr
    assert "class 'c0' already exists" in r.stderr and "--replace" in r.stderr


def test_train_table_says_why_a_head_took_no_iterations(tmp_path):
    """A head whose warm start was already converged read "0 (lbfgs)", as if it had not been trained."""
    from rich.console import Console

    from ovr.cli import _train_table
    from ovr.learn.store import load_model

    data = make_folder(tmp_path / "data", n_classes=2, per_class=14)  # 2 validation positives a class
    assert cli("train", data, "--out", tmp_path / "m", *TINY).exit_code == 0
    model = load_model(tmp_path / "m")
    model.records["c0"].iterations = 0
    from ovr.learn.records import Calibration

    model.records["c1"].calibration = Calibration("none")  # platt asked for, identity kept: say why
    con = Console(record=True, width=300)
    con.print(_train_table(model, "t"))
    text = con.export_text()
    assert "already converged" in text and "0 (lbfgs)" not in text
    assert "none: no gain on held-out val rows" in text


def test_bench_help_says_a_manifest_works():
    """`bench --help` said "Image folder (as for train)" though a CSV manifest works."""
    r = cli("bench", "--help")
    text = " ".join(r.output.split())
    assert "CSV/TSV manifest" in text and "as for train" not in text


def test_help_keeps_every_square_bracket_of_its_text():
    """Help is Rich markup: `pip install "ovr[serve]"` printed as `pip install "ovr"` (the "[serve]" read as a
    tag). Every bracketed word of every command's and option's help must reach the screen."""
    import re

    import typer

    from ovr.cli import app

    group = typer.main.get_command(app)
    for name, command in group.commands.items():
        texts = [command.help or ""] + [getattr(p, "help", None) or "" for p in command.params]
        words = {w for t in texts for w in re.findall(r"\[[^\]\s]+\]", t) if not w.startswith("[default")}
        out = " ".join(cli(name, "--help").output.replace("│", " ").split())
        for w in words:
            assert w in out, f"ovr {name} --help lost {w}"


def test_train_add_refresh_and_remove_speak_json_for_machines(tmp_path, cache_dir):
    """`train`, `add-class`, `refresh` and `remove-class` printed Rich tables only: a script had to read the
    manifest. With --json stdout is one JSON object (the manifest's records of the heads the command wrote) and
    nothing else; --json-out writes the same object to a file."""
    import json

    data = make_folder(tmp_path / "data", n_classes=3, per_class=10)
    extra = make_folder(tmp_path / "extra", n_classes=4, per_class=10, prefix="n")
    model = tmp_path / "m"
    r = cli("train", data, "--out", model, *TINY, "--json", "--json-out", tmp_path / "train.json")
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout)
    assert out == json.loads((tmp_path / "train.json").read_text())
    manifest = json.loads((model / "manifest.json").read_text())
    assert out["heads"] == manifest["heads"] and list(out["heads"]) == manifest["classes"]
    assert out["embedding"]["usable"] == 30 and out["model"] == str(model)

    new = "n3"
    r = cli("add-class", model, new, extra / new, *TINY[2:4], "--json", "--refresh")
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout)
    manifest = json.loads((model / "manifest.json").read_text())
    assert out["added"] == new and out["images"] == 10
    assert set(out["refreshed"]) == {c for c in out["old_heads_firing"]}
    assert list(out["heads"]) == [new, *out["refreshed"]]
    assert all(out["heads"][c] == manifest["heads"][c] for c in out["heads"])

    old = manifest["classes"][0]
    r = cli("refresh", model, old, *TINY[2:4], "--json")
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout)
    assert out["refreshed"] == [old] and list(out["heads"]) == [old]
    r = cli("remove-class", model, old, "--json")
    assert r.exit_code == 0 and json.loads(r.stdout) == {"model": str(model), "removed": old}
    assert old not in json.loads((model / "manifest.json").read_text())["classes"]


def test_a_head_without_validation_positives_shows_no_scores(tmp_path, cache_dir):
    """A class of three images has none held out: its head's validation precision, recall and F1 read 0.000
    (scikit-learn's zero_division convention), as if the head had been measured and failed, and its calibration
    "no gain on held-out val rows", though there was none to test it on. The scores are '-' in the train table and
    `info`, the calibration says why, and the manifest records the head's validation positives (0)."""
    import json

    data = make_folder(tmp_path / "data", n_classes=3, per_class=10)
    for p in sorted((data / "c2").iterdir())[3:]:
        p.unlink()
    r = cli("train", data, "--out", tmp_path / "m", *TINY)
    assert r.exit_code == 0, r.output
    row = next(line for line in r.stdout.splitlines() if line.startswith("│ c2"))
    assert [c.strip() for c in row.split("│")[-4:-1]] == ["-"] * 3, row  # val P, R, F1
    assert "none: fewer than 2 val positives" in row  # not "no gain": calibration could not be tested
    heads = json.loads((tmp_path / "m" / "manifest.json").read_text())["heads"]
    assert heads["c2"]["val"]["positives"] == 0 and heads["c0"]["val"]["positives"] == 2
    info = next(line for line in cli("info", tmp_path / "m").stdout.splitlines() if line.startswith("│ c2"))
    assert [c.strip() for c in info.split("│")][5] == "-", info
