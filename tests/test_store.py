"""The model folder cannot be used to escape it, and backbones load no code: symlinks, stored paths, pickles."""
import json
import os
import pickle

import pytest
import torch

from ovr.errors import OvrError
from ovr.embedding.backbones import load_backbone
from ovr.learn.store import load_model

from conftest import TINY, cli, make_folder

run = cli


@pytest.fixture
def model(tmp_path, cache_dir):
    data = make_folder(tmp_path / "data", n_classes=3, per_class=8)
    assert run("train", data, "--out", tmp_path / "m", *TINY).exit_code == 0
    return tmp_path / "m"


def test_heads_symlinked_out_of_the_folder_is_refused_and_nothing_outside_is_deleted(model, tmp_path):
    victim = tmp_path / "elsewhere"
    victim.mkdir()
    (victim / "precious.txt").write_text("keep me")
    for f in (model / "heads").iterdir():
        f.rename(victim / f.name)
    (model / "heads").rmdir()
    (model / "heads").symlink_to(victim, target_is_directory=True)
    new = make_folder(tmp_path / "new", n_classes=4, per_class=8)
    r = run("add-class", model, "c3", new / "c3", "--device", "cpu")
    assert r.exit_code == 2 and "symlink" in r.output and "Traceback" not in r.output
    assert (victim / "precious.txt").read_text() == "keep me"
    assert len(list(victim.iterdir())) == 4


@pytest.mark.parametrize("bad", ["/etc/hostname", "../outside.safetensors", "heads/../../outside.safetensors"])
def test_a_stored_path_outside_the_model_folder_is_refused(model, bad):
    p = model / "manifest.json"
    m = json.loads(p.read_text())
    m["heads"]["c0"]["file"] = bad
    p.write_text(json.dumps(m))
    with pytest.raises(OvrError, match="outside the model folder"):
        load_model(model)


def test_cache_dir_stored_in_a_model_is_not_used(model, tmp_path, cache_dir):
    p = model / "manifest.json"
    m = json.loads(p.read_text())
    m["config"]["features"]["cache_dir"] = str(tmp_path / "planted")
    p.write_text(json.dumps(m))
    new = make_folder(tmp_path / "new", n_classes=4, per_class=8)
    assert run("add-class", model, "c3", new / "c3", "--device", "cpu").exit_code == 0
    assert not (tmp_path / "planted").exists()


def test_random_init_is_seeded_so_its_identity_is_true():
    a = load_backbone("resnet18", "none")
    b = load_backbone("resnet18", "none")
    assert a.fingerprint == b.fingerprint
    x = torch.rand(1, 3, 64, 64)
    assert torch.equal(a.model(x), b.model(x))


class Boom:
    def __reduce__(self):
        return (os.system, ("touch " + os.environ["OVR_TEST_PWNED"],))


def test_a_pickle_planted_in_the_hub_cache_runs_no_code(tmp_path, monkeypatch):
    import torchvision.models as tvm

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setenv("OVR_TEST_PWNED", str(tmp_path / "pwned"))
    url = tvm.get_model_weights("resnet18").DEFAULT.url
    ckpt = tmp_path / "torch" / "hub" / "checkpoints" / url.rsplit("/", 1)[-1]
    ckpt.parent.mkdir(parents=True)
    torch.save({"x": Boom()}, ckpt, pickle_module=pickle)
    with pytest.raises(OvrError):
        load_backbone("resnet18", "default")
    assert not (tmp_path / "pwned").exists()


def test_a_crash_between_the_two_renames_of_train_force_loses_no_model(model, tmp_path, monkeypatch):
    before = load_model(model).classes
    data = make_folder(tmp_path / "data2", n_classes=4, per_class=8)
    monkeypatch.setenv("OVR_TEST_CRASH_BETWEEN_RENAMES", "1")
    with pytest.raises(SystemExit):
        from ovr.config import load_config
        from ovr.apps.pipeline import train_model
        train_model(data, model, load_config(None, {"backbone": "tiny_cnn", "device": "cpu", "workers": 0}), force=True)
    monkeypatch.delenv("OVR_TEST_CRASH_BETWEEN_RENAMES")
    assert not model.exists() and list(tmp_path.glob(".m.old-*"))  # the state a kill there leaves
    assert load_model(model).classes == before  # the next command that opens it puts the old model back
    assert run("train", data, "--out", model, "--force", *TINY).exit_code == 0
    assert load_model(model).classes == ["c0", "c1", "c2", "c3"]
    assert not list(tmp_path.glob(".m.old-*")) and not list(tmp_path.glob(".m.tmp-*"))


def test_train_force_waits_for_the_model_lock(model, tmp_path, monkeypatch):
    from filelock import FileLock

    data = make_folder(tmp_path / "data2", n_classes=4, per_class=8)
    monkeypatch.setenv("OVR_LOCK_TIMEOUT", "0.5")
    with FileLock(str(tmp_path / ".m.lock")):  # another writer (an add-class) holds the model
        r = run("train", data, "--out", model, "--force", *TINY)
    assert r.exit_code == 2 and "locked by another ovr process" in r.output
    assert load_model(model).classes == ["c0", "c1", "c2"]


def _edit(model, fn):
    p = model / "manifest.json"
    m = json.loads(p.read_text())
    m = fn(m)
    p.write_text(json.dumps(m))


def _rewrite_head(model, tensors):
    from safetensors.torch import save

    m = json.loads((model / "manifest.json").read_text())
    data = save(tensors)
    (model / m["heads"]["c0"]["file"]).write_bytes(data)
    import hashlib
    m["heads"]["c0"]["sha256"] = hashlib.sha256(data).hexdigest()
    (model / "manifest.json").write_text(json.dumps(m))


DAMAGE = {
    "a JSON list": lambda model: _edit(model, lambda m: [m]),
    "schema_version alone": lambda model: _edit(model, lambda m: {"schema_version": 1}),
    "a class with no head entry": lambda model: _edit(model, lambda m: {**m, "classes": m["classes"] + ["ghost"]}),
    "no sha256": lambda model: _edit(model, lambda m: (m["heads"]["c0"].pop("sha256"), m)[1]),
    "threshold null": lambda model: _edit(model, lambda m: (m["heads"]["c0"].update(threshold=None), m)[1]),
    "an unknown record key": lambda model: _edit(model, lambda m: (m["heads"]["c0"].update(bogus=1), m)[1]),
    "wrong tensor names": lambda model: _rewrite_head(model, {"w": torch.zeros(64), "bias": torch.zeros(())}),
    "wrong shape": lambda model: _rewrite_head(model, {"weight": torch.zeros(7), "bias": torch.zeros(())}),
    "NaN weights": lambda model: _rewrite_head(model, {"weight": torch.full((64,), float("nan")), "bias": torch.zeros(())}),
    "a corrupt examples file": lambda model: [p.write_text("{") for p in model.glob("examples-*.json")],
}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_a_damaged_model_folder_is_a_one_line_error(model, damage, tmp_path):
    DAMAGE[damage](model)
    for args in (["info", model], ["info", model, "--verify"],
                 ["predict", model, tmp_path / "data" / "c0" / "img000.png", "--device", "cpu"]):
        r = run(*args)
        if damage in ("wrong tensor names", "wrong shape", "NaN weights", "a corrupt examples file") and args[1:] == [model]:
            assert r.exit_code == 0 and "`ovr info --verify` reads and checks them" in r.output
            continue  # plain info reads the manifest only, and says so
        assert r.exit_code == 2, (damage, args[0], r.output)
        assert "Traceback" not in r.output and r.output.count("\n") <= 2 and "error:" in r.output, r.output


def test_info_verify_on_a_sound_model(model):
    r = run("info", model, "--verify")
    assert r.exit_code == 0 and "verified: 3 head files" in r.output


def test_a_reader_that_raced_an_update_sees_the_new_model_not_an_error(model, tmp_path):
    from ovr.learn.store import read_manifest

    stale = read_manifest(model)  # a reader has read the manifest...
    new = make_folder(tmp_path / "new", n_classes=3, per_class=9, prefix="x")
    assert run("add-class", model, "c1", new / "x1", "--replace", "--device", "cpu").exit_code == 0
    assert not (model / stale["heads"]["c1"]["file"]).exists()  # ...and a writer pruned the head it names
    m = load_model(model, manifest=stale)
    assert m.records["c1"].positives == 9  # the new model, whole
