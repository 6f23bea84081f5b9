"""Config files and CLI flags: errors that name the key, values that reach the run."""

from __future__ import annotations

import tomllib

import pytest

from fedtune.compose import checked, compose
from fedtune.cli import main
from fedtune.config import ConfigError, RunConfig, config_from_dict, config_to_toml, load_config


def test_defaults_are_valid_and_survive_a_toml_round_trip():
    config = checked(RunConfig())
    assert config_from_dict(tomllib.loads(config_to_toml(config))) == config


def test_a_file_only_needs_the_keys_it_changes(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text('seed = 4\n[training]\nlocal_steps = 3\n[model]\nlabels = ["a", "b"]\n')
    config = load_config(path)
    assert (config.seed, config.training.local_steps, config.model.labels) == (4, 3, ["a", "b"])
    assert config.training.batch_size == RunConfig().training.batch_size


@pytest.mark.parametrize(
    "text, message",
    [
        ("[training]\nlr = 0.1\n", "unknown key 'training.lr'"),
        ("[trainig]\nlocal_steps = 1\n", "unknown key 'trainig'"),
        ("[training]\nlocal_steps = 'ten'\n", "training.local_steps: expected an integer, got str 'ten'"),
        ("[training]\nlocal_steps = 0\n", "training.local_steps: must be at least 1"),
        ("[federation]\nstrategy = 'fedavgg'\n", "federation.strategy: unknown strategy 'fedavgg'; choose one of: fedadam, fedavg"),
        ("[federation]\nquorum = 1.5\n", "federation.quorum: must be in (0, 1]"),
        ("[federation]\nstrategy = 'fedadam'\n[federation.options]\nserver_lr = 'big'\n", "federation.options (fedadam): option 'server_lr': expected a number, got 'big'"),
        ("[federation]\nstrategy = 'hetlora'\n[federation.options]\nweightng = 'norm'\n", "federation.options: unknown option 'weightng' for this run's strategies (valid options: hetlora: "),
        ("[federation]\nstrategy = 'flexlora'\nshare_a = true\n", "federation.strategy flexlora cannot be combined with federation.share_a (b-kept-on-device): flexlora averages the products"),
        ("[federation]\noptions = 3\n", "federation.options: expected a table"),
        ("[model]\ntask = 'translation'\n", "model.task: unknown task 'translation'"),
        ("[lora]\nlayers = [1, 'x']\n", "lora.layers[1]: expected an integer"),
        ("[server]\ninsecure = 'yes'\n", "server.insecure: expected true or false"),
        ("training = 3\n", "training: expected a table"),
        ("[training\n", "not valid TOML"),
    ],
)
def test_bad_config_files_name_the_key(tmp_path, text, message):
    path = tmp_path / "run.toml"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        checked(load_config(path))
    assert message in str(info.value)


def test_strategy_options_from_a_file_and_from_flags(tmp_path):
    from fedtune.cli import COMMON_KEYS, _config_from_args, build_parser

    path = tmp_path / "run.toml"
    path.write_text("[federation]\nstrategy = 'fedadam'\n[federation.options]\ninner = 'hetlora'\nserver_lr = 0.05\n")
    config = load_config(path)
    strategy = compose(config)
    assert [link.name for link in strategy.chain()] == ["fedadam", "fedlc", "hetlora"]  # the task's default correction stays
    assert strategy.options.server_lr == 0.05 and strategy.heterogeneous
    assert config_from_dict(tomllib.loads(config_to_toml(config))) == config  # survives config.toml
    args = build_parser().parse_args(["simulate", "--config", str(path), "-o", "server_lr=0.2", "-o", "weighting=norm", "--strategy", "fedadam"])
    config = _config_from_args(args, COMMON_KEYS)
    strategy = compose(config)
    assert strategy.options.server_lr == 0.2 and strategy.chain()[-1].options.weighting == "norm"


def test_cli_rejects_a_malformed_option(capsys):
    err = _cli_error(capsys, ["simulate", "-o", "server_lr"])
    assert err == "fedtune simulate: error: --option 'server_lr': expected KEY=VALUE"
    err = _cli_error(capsys, ["simulate", "--strategy", "fedprox", "-o", "nu=1"])
    assert "federation.options: unknown option 'nu' for this run's strategies (valid options: fedavg: freeze_remainder; fedprox: mu)" in err


def _cli_error(capsys, argv) -> str:
    with pytest.raises(SystemExit) as info:
        raise SystemExit(main(argv))
    assert info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err
    return err


def test_cli_reports_a_bad_config_key_in_one_line(tmp_path, capsys):
    path = tmp_path / "run.toml"
    path.write_text("[training]\nlr = 0.1\n")
    err = _cli_error(capsys, ["simulate", "--config", str(path)])
    assert err.count("\n") == 0 and "unknown key 'training.lr'" in err


def test_cli_reports_bad_values_and_missing_files(tmp_path, capsys):
    assert "federation.rounds: must be at least 1" in _cli_error(capsys, ["simulate", "--rounds", "0"])
    assert "unknown strategy 'nope'" in _cli_error(capsys, ["simulate", "--strategy", "nope"])
    assert "cannot read config file" in _cli_error(capsys, ["coordinator", "--config", str(tmp_path / "missing.toml")])
    assert "does not exist" in _cli_error(capsys, ["client", "--coordinator", "127.0.0.1:1", "--data", str(tmp_path / "none.jsonl")])
    assert "neither an embedded model" in _cli_error(capsys, ["simulate", "--model", str(tmp_path / "nowhere")])
    assert "--data: file" in _cli_error(capsys, ["simulate", "--data", str(tmp_path / "none.jsonl")])
    (tmp_path / "fleet.toml").write_text('[[device]]\ntier = "watch"\n')
    assert "unknown device tier 'watch'" in _cli_error(capsys, ["simulate", "--profiles", str(tmp_path / "fleet.toml")])
    assert "unknown tier 'tablet'" in _cli_error(capsys, ["simulate", "--tiers", "phone,tablet"])


def test_cli_rejects_malformed_flags(capsys):
    with pytest.raises(SystemExit) as info:
        main(["simulate", "--rounds", "many"])
    assert info.value.code == 2
    assert "invalid int value: 'many'" in capsys.readouterr().err


def test_plaintext_on_a_public_address_is_refused(capsys, tiny_bert, tmp_path):
    err = _cli_error(capsys, ["coordinator", "--model", tiny_bert, "--labels", "a,b", "--address", "0.0.0.0:0", "--run-dir", str(tmp_path / "run")])
    assert "refusing to serve plaintext" in err


def test_coordinator_identity_flags_reach_the_config(tmp_path, capsys):
    from fedtune.cli import COMMON_KEYS, COORDINATOR_KEYS, _config_from_args, build_parser

    table = tmp_path / "devices.secrets"
    table.write_text("erin erin-secret-0123456789\n")
    path = tmp_path / "run.toml"
    mtls = "tls_cert = 'server.pem'\ntls_key = 'server-key.pem'\ntls_client_ca = 'ca.pem'\n"
    path.write_text("[server]\nmax_clients_per_credential = 9\nbind_names = 'cert'\n" + mtls)
    keys = {**COMMON_KEYS, **COORDINATOR_KEYS}
    argv = ["coordinator", "--tls-cert", "server.pem", "--tls-key", "server-key.pem", "--tls-client-ca", "ca.pem", "--enrollment-secrets-file", str(table), "--max-clients-per-credential", "2", "--bind-names", "cert"]
    server = _config_from_args(build_parser().parse_args(argv), keys).server
    assert (server.enrollment_secrets_file, server.max_clients_per_credential, server.bind_names) == (str(table), 2, "cert")
    # flags override the file; without them the file's values (or the defaults) stay
    argv = ["coordinator", "--config", str(path), "--max-clients-per-credential", "0", "--bind-names", ""]
    server = _config_from_args(build_parser().parse_args(argv), keys).server
    assert (server.enrollment_secrets_file, server.max_clients_per_credential, server.bind_names) == ("", 0, "")
    server = _config_from_args(build_parser().parse_args(["coordinator", "--config", str(path)]), keys).server
    assert (server.max_clients_per_credential, server.bind_names) == (9, "cert")
    assert RunConfig().server.max_clients_per_credential == _config_from_args(build_parser().parse_args(["coordinator"]), keys).server.max_clients_per_credential == 4
    # mistakes name the key, in one line
    assert "server.bind_names: must be" in _cli_error(capsys, ["coordinator", "--bind-names", "name"])
    assert "server.bind_names: \"cert\" needs mutual TLS" in _cli_error(capsys, ["coordinator", "--bind-names", "cert"])
    assert "server.max_clients_per_credential: must be >= 0" in _cli_error(capsys, ["coordinator", "--max-clients-per-credential", "-1"])
    assert "invalid int value" in _cli_error(capsys, ["coordinator", "--max-clients-per-credential", "many"])
    (tmp_path / "bad.secrets").write_text("erin short\n")
    assert "server.enrollment_secrets_file: line 1" in _cli_error(capsys, ["coordinator", "--enrollment-secrets-file", str(tmp_path / "bad.secrets")])


def test_the_split_table_takes_the_split_methods_own_stream_settings():
    """[split]'s stream keys are the fields of the split method's dataclass (names, types and
    defaults), not a copy written out again in the schema that could drift from it."""
    import dataclasses
    import inspect
    import typing

    import fedtune.config as config_module
    from fedtune.config import SplitSection
    from fedtune.methods.split.options import SplitFedOptions, SplitOptions, SplitStream

    section = {f.name: f for f in dataclasses.fields(SplitSection)}
    hints = typing.get_type_hints(SplitSection)
    for f in dataclasses.fields(SplitStream):
        assert f.name in section and section[f.name].default == f.default and hints[f.name] == typing.get_type_hints(SplitStream)[f.name]
        assert f"    {f.name}:" not in inspect.getsource(config_module), f"config.py declares {f.name} itself"
    assert issubclass(SplitFedOptions, SplitStream) and issubclass(SplitOptions, SplitStream)
    loaded = config_from_dict({"split": {"mode": "split", "act_codec": "uniform", "act_bits": 3.0, "head": "server"}})
    assert (loaded.split.act_codec, loaded.split.act_bits, loaded.split.head) == ("uniform", 3.0, "server")
    with pytest.raises(ConfigError, match="split.act_bits"):
        config_from_dict({"split": {"act_bits": "four"}})
