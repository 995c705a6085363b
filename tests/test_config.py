"""The config: shipped files load and round-trip, configs/default.toml is the dataclass defaults, and the
precedence defaults < stored < file < flags."""


def test_shipped_configs_load_and_round_trip(tmp_path):
    from pathlib import Path

    from ovr.config import config_to_toml, load_config

    root = Path(__file__).parent.parent / "configs"
    for f in sorted(root.glob("*.toml")):
        cfg = load_config(f)
        (tmp_path / "c.toml").write_text(config_to_toml(cfg))
        assert load_config(tmp_path / "c.toml") == cfg
    assert load_config(root / "tiny.toml", {"epochs": 3}).train.epochs == 3


def test_default_toml_is_the_dataclass_defaults():
    """configs/default.toml is generated from the config dataclasses, the one place defaults live."""
    from pathlib import Path

    from ovr.config import Config, load_config

    from ovr.config import config_to_toml

    path = Path(__file__).parent.parent / "configs" / "default.toml"
    assert load_config(path) == Config()
    assert path.read_text().split("[features]", 1)[1] == config_to_toml(Config()).split("[features]", 1)[1]  # every key


def test_precedence_defaults_stored_file_flags(tmp_path):
    from ovr.config import load_config

    (tmp_path / "c.toml").write_text("[train]\nmax_iter = 7\ntol = 0.01\n")
    stored = {"train": {"max_iter": 50, "tol": 0.001, "seed": 4}, "features": {"batch_size": 8}}
    cfg = load_config(tmp_path / "c.toml", {"tol": 0.5}, stored=stored)
    assert cfg.train.seed == 4 and cfg.features.batch_size == 8  # stored beats defaults
    assert cfg.train.max_iter == 7  # the file beats stored
    assert cfg.train.tol == 0.5  # flags beat the file
