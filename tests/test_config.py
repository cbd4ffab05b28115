import pytest

from fedsqueeze.config import build_config, parse_sets, to_toml
from fedsqueeze.errors import ConfigError
from fedsqueeze.methods import get_method


def test_precedence_file_cli_set(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text('method = "head"\nrounds = 3\nclients = 6\n[options]\nserver_lr = 0.5\n')
    cfg = build_config(path, {"rounds": 4, "clients": None}, parse_sets(["clients=8", "optimizer=sgd"]))
    assert (cfg.method, cfg.rounds, cfg.clients) == ("head", 4, 8)
    assert cfg.options == {"server_lr": 0.5, "optimizer": "sgd"}


def test_toml_roundtrip(tmp_path):
    cfg = build_config(None, {"method": "head"}, {"lr": 0.01, "server_lr": 0.5})
    path = tmp_path / "c.toml"
    path.write_text(to_toml(cfg))
    assert build_config(path) == cfg


def test_bad_values():
    with pytest.raises(ConfigError):
        parse_sets(["novalue"])
    with pytest.raises(ConfigError):
        build_config(None, {"clients_per_round": 20, "clients": 10})
    with pytest.raises(ConfigError):
        build_config(None, None, {"rounds": "many"})


def test_unknown_method_and_option_name_the_choices():
    with pytest.raises(ConfigError, match="fedavg"):
        get_method("nosuch")
    cfg = build_config(None, {"method": "fedavg"}, {"server_lrr": 1.0})
    with pytest.raises(ConfigError, match="server_lr"):
        get_method("fedavg")(cfg)


def test_an_image_model_without_a_dataset_takes_fashion_mnist(tmp_path):
    """`run --model effnet-lite0` needs no --dataset; a dataset that is given always wins."""
    from fedsqueeze.api import run_config
    from fedsqueeze.models.catalogue import default_dataset

    pick = {"dataset_for_model": default_dataset}
    assert build_config(None, {"model": "effnet-lite0", "dataset": None}, **pick).dataset == "fashion-mnist"
    assert build_config(None, None, {"model": "effnet-lite0"}, **pick).dataset == "fashion-mnist"
    assert build_config(None, {"model": "effnet-lite0", "dataset": "wordnet"}, **pick).dataset == "wordnet"
    assert build_config(None, {"model": "effnet-lite0"}).dataset == "wordnet"  # no rule given: the plain default
    f = tmp_path / "c.toml"
    f.write_text('model = "effnet-lite0"\ndataset = "wordnet"\n')
    assert build_config(f, **pick).dataset == "wordnet"
    for model in ("minilm", "mpnet", "smollm2", "tiny", "tiny-lm", "some/hub-id"):
        assert build_config(None, {"model": model}, **pick).dataset == "wordnet"
    assert run_config(model="effnet-lite0").dataset == "fashion-mnist"
    assert run_config(model="effnet-lite0", dataset="wordnet").dataset == "wordnet"


def test_the_cli_resolves_an_image_models_dataset(monkeypatch):
    """`fedsqueeze run --model effnet-lite0` builds its config with the catalogue's dataset rule."""
    from typer.testing import CliRunner

    from fedsqueeze import cli, runners

    seen = []

    def fake_run(cfg, **kw):
        seen.append(cfg.dataset)
        raise ConfigError("stop here")

    monkeypatch.setattr(runners, "run", fake_run)
    for args, want in ((["--model", "effnet-lite0"], "fashion-mnist"), (["--model", "effnet-lite0", "--dataset", "wordnet"], "wordnet")):
        result = CliRunner().invoke(cli.app, ["run", *args, "--method", "head", "--rounds", "1"])
        assert isinstance(result.exception, ConfigError) and str(result.exception) == "stop here"
        assert seen.pop() == want
