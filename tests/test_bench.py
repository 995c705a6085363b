import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from ovr.apps.bench import METHODS, SCALARS, SCENARIOS
from ovr.cli import app
from ovr.learn.metrics import expected_calibration_error
from ovr.runtime import cpu_model

from conftest import make_folder

runner = CliRunner()


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("bench")
    data = make_folder(tmp / "data", n_classes=4, per_class=20)
    os.environ["OVR_CACHE_DIR"] = str(tmp / "cache")
    r = runner.invoke(app, ["bench", str(data), "--out", str(tmp / "rep"), "--backbone", "tiny_cnn", "--device", "cpu",
                            "--workers", "0", "--seeds", "2", "--epochs", "20"])
    assert r.exit_code == 0, r.output
    return tmp, json.loads((tmp / "rep" / "report.json").read_text()), r.output


def test_report_has_every_method_metric_and_file(report):
    tmp, rep, out = report
    assert rep["methods"] == list(METHODS) and rep["scenarios"] == list(SCENARIOS)
    for scen in SCENARIOS:
        for m in METHODS:
            res = rep["results"][scen][m]
            for k in SCALARS:
                if k in ("add_class_seconds", "accuracy_after_add") and scen != "plain" or k == "accuracy_tta":
                    continue  # accuracy_tta only with --views
                assert k in res and len(res[k]["values"]) == 2, (scen, m, k)
    g = rep["growth"]
    assert g["classes"][-1] == 4 and len(g["grown"]) == len(g["argmax"]) == len(g["joint"]) == len(g["classes"])
    assert all(0 <= v <= 1 for v in g["grown"] + g["argmax"] + g["joint"])
    assert "grown one class at a time" in (tmp / "rep" / "report.md").read_text()
    for f in ["report.md", "report.json", "confusion.png", "reliability.png", "per_class_f1.png", "add_class_time.png",
              "growth.png", "curves.png"]:
        assert (tmp / "rep" / f).stat().st_size > 100
    md = (tmp / "rep" / "report.md").read_text()
    assert all(m in md for m in METHODS) and "How to read it" in md
    assert rep["dataset"]["fingerprint"] and rep["versions"]["torch"] and rep["config"]["train"]
    # the processor's name where the system gives one, not only its architecture (platform.processor() is
    # "x86_64" on Linux)
    assert rep["cpu"] == cpu_model()
    cpuinfo = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    if "model name" in cpuinfo:
        assert rep["cpu"] != platform.machine() and f": {rep['cpu']}" in cpuinfo
    assert "sklearn-multinomial" in out and "softmax" in out
    few = rep["n"]["train_per_scenario"]["few-shot"]
    assert few == 4 * rep["config"]["bench"]["few_shot_k"] < rep["n"]["train"]


def test_tables_read_one_way(report):
    """The growth table has a row for every size from 2 (it jumped from 5 to 7, with no 2), every cell of a
    several-seed table carries its spread (0.967 sat beside 0.967 ±0.000), times are a median and range (a mean
    of 6.00 ±6.92 s says nothing), and the terminal and Markdown tables come from one table model."""
    import re

    from ovr.apps.report import bench_tabs

    tmp, rep, out = report
    assert rep["growth"]["classes"] == [2, 3, 4]
    md = (tmp / "rep" / "report.md").read_text()
    rows = [line for line in md.splitlines() if line.startswith("| ") and not line.startswith("| method")
            and not line.startswith("| classes") and not re.match(r"\| [234] \|", line)]
    assert rows
    for line in rows:
        cells = [c.strip() for c in line.strip("|").split("|")[1:]]
        for c in cells:
            if c in ("-", "") or "," in c:
                continue
            assert "±" in c or re.fullmatch(r"[\d.]+ \([\d.]+-[\d.]+\)", c), (line, c)
    tabs = bench_tabs(rep)
    assert tabs[0].markdown() in md and tabs[-1].markdown() in md
    t = rep["results"]["plain"]["ovr"]["train_seconds"]
    assert f"{t['median']:.2f} ({t['min']:.2f}-{t['max']:.2f})" in md


def test_numbers_agree_with_sklearn_on_the_same_predictions(report):
    """Refit the deterministic scikit-learn reference on the same embeddings and recompute its metrics."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import accuracy_score, balanced_accuracy_score, f1_score, log_loss
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    from ovr.config import load_config
    from ovr.apps.pipeline import embed_data

    tmp, rep, _ = report
    cfg = load_config(None, {"backbone": "tiny_cnn", "device": "cpu", "workers": 0, "cache_dir": str(tmp / "cache")})
    emb = embed_data(tmp / "data", cfg)
    assert emb.result.n_new == 0  # the bench embedded these already
    X, y, _ = emb.split("train")
    Xt, yt, _ = emb.split("test")
    from ovr.apps.bench import _scenario_train

    keep = _scenario_train(y.numpy(), "plain", rep["seeds"][0], cfg)  # the first seed's training rows
    m = make_pipeline(StandardScaler(), LogisticRegression(max_iter=1000)).fit(X.numpy()[keep], y.numpy()[keep])
    pred, proba = m.predict(Xt.numpy()), m.predict_proba(Xt.numpy())
    res = rep["results"]["plain"]["sklearn-multinomial"]
    assert res["accuracy"]["values"][0] == pytest.approx(accuracy_score(yt, pred))
    assert res["macro_f1"]["values"][0] == pytest.approx(f1_score(yt, pred, average="macro"))
    assert res["balanced_accuracy"]["values"][0] == pytest.approx(balanced_accuracy_score(yt, pred))
    assert res["nll"]["values"][0] == pytest.approx(log_loss(yt, proba), rel=1e-3)
    assert res["ece"]["values"][0] == pytest.approx(expected_calibration_error(proba, yt.numpy()), abs=1e-6)


def test_ece_by_hand():
    proba = np.array([[0.9, 0.1], [0.6, 0.4], [0.2, 0.8], [0.3, 0.7]])
    y = np.array([0, 1, 1, 1])
    # bins: 0.9 -> correct, 0.6 -> wrong, 0.8 -> correct, 0.7 -> correct; 15 equal bins, each its own bin
    expect = (abs(1 - 0.9) + abs(0 - 0.6) + abs(1 - 0.8) + abs(1 - 0.7)) / 4
    assert expected_calibration_error(proba, y) == pytest.approx(expect)


def test_bench_needs_val_and_test(tmp_path, cache_dir):
    for split in ["train"]:
        make_folder(tmp_path / "d" / split, n_classes=3, per_class=4)
    r = runner.invoke(app, ["bench", str(tmp_path / "d"), "--out", str(tmp_path / "r"), "--backbone", "tiny_cnn",
                            "--device", "cpu", "--workers", "0"])
    assert r.exit_code == 2 and "val and test" in r.output


@pytest.mark.slow
def test_demo_end_to_end(tmp_path):
    """The README's main job, as a user runs it: a real process, the real pretrained backbone, offline."""
    env = {**os.environ, "OVR_CACHE_DIR": str(tmp_path / "cache"), "HF_HUB_OFFLINE": "1", "MPLBACKEND": "Agg"}
    p = subprocess.run([sys.executable, "-m", "ovr", "demo", "--out", str(tmp_path / "demo"), "--seeds", "1"],
                       env=env, capture_output=True, text=True, timeout=1200)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    rep = json.loads((tmp_path / "demo" / "report" / "report.json").read_text())
    assert rep["results"]["plain"]["ovr"]["accuracy"]["mean"] > 0.85  # pretrained features separate digits
    m = json.loads((tmp_path / "demo" / "model" / "manifest.json").read_text())
    assert m["classes"][-1] == "digit_9" and len(m["classes"]) == 10
    assert "report:" in p.stdout


def test_bench_views_scenario_and_tta(tmp_path, cache_dir):
    data = make_folder(tmp_path / "data", n_classes=3, per_class=14)
    r = runner.invoke(app, ["bench", str(data), "--out", str(tmp_path / "rep"), "--backbone", "tiny_cnn", "--device",
                            "cpu", "--workers", "0", "--seeds", "1", "--epochs", "5", "--no-sklearn", "--views", "2"])
    assert r.exit_code == 0, r.output
    rep = json.loads((tmp_path / "rep" / "report.json").read_text())
    assert rep["views"] == 2 and "views" in rep["scenarios"]
    assert set(rep["results"]["views"]) == {"ovr", "softmax"}
    assert rep["n"]["train_per_scenario"]["views"] == 3 * rep["n"]["train_per_scenario"]["plain"]
    for scen in ("plain", "views"):
        assert 0 <= rep["results"][scen]["ovr"]["accuracy_tta"]["mean"] <= 1
    assert "acc TTA" in (tmp_path / "rep" / "report.md").read_text()
