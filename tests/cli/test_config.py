import pytest
import yaml

from bitrain.cli import config as C
from bitrain.errors import UserError


def test_layers_later_wins_and_values_are_typed():
    cfg = C.from_layers({"lr": 0.5, "epochs": 3}, {"lr": "0.25"}, {"bits": "32"})
    assert cfg.lr == 0.25 and isinstance(cfg.lr, float)
    assert cfg.epochs == 3 and cfg.bits == 32


@pytest.mark.parametrize(
    "key,value,needle",
    [
        ("lr", -1, "--lr must be positive"),
        ("batch_size", 0, "--batch-size must be at least 1"),
        ("bits", 3.5, "--bits must be an integer"),
        ("bits", 9, "--bits 9 is not valid; choose from"),
        ("bits", 3, "needs a k-bit --weight-quantization"),
        ("lr_mode", "exp", "--lr-mode 'exp' is not valid; choose from: step, poly, cosine, linear"),
        ("optimizer", "lion", "--optimizer 'lion' is not valid"),
        ("momentum", 1.5, "--momentum must be in [0, 1)"),
        ("lr_steps", "30,x", "--lr-steps must be comma-separated numbers"),
        ("approximation", "abc", "--approximation abc is not supported"),
        ("dummy_shape", "3,32,16", "--dummy-shape must be C,H,W with H == W"),
        ("test_run", "maybe", "--test-run must be true or false"),
    ],
)
def test_bad_values_name_the_option(key, value, needle):
    with pytest.raises(UserError) as e:
        C.from_layers({key: value})
    assert needle in str(e.value)


def test_yaml_unknown_key_has_did_you_mean(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("lr-mod: cosine\n")
    with pytest.raises(UserError, match="did you mean 'lr_mode'"):
        C.load_yaml(p)


def test_yaml_must_be_a_mapping(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("- 1\n- 2\n")
    with pytest.raises(UserError, match="mapping"):
        C.load_yaml(p)
    with pytest.raises(UserError, match="does not exist"):
        C.load_yaml(tmp_path / "missing.yaml")


def test_dump_then_load_gives_the_same_config_without_run_control(tmp_path):
    cfg = C.from_layers({"lr": 0.02, "lr_mode": "cosine", "prefix": "somewhere", "interrupt_at": 3, "epochs": 7})
    C.dump_yaml(cfg, tmp_path / "config.yaml")
    data = yaml.safe_load((tmp_path / "config.yaml").read_text())
    assert "prefix" not in data and "interrupt_at" not in data and "resume" not in data
    again = C.from_layers(C.load_yaml(tmp_path / "config.yaml"))
    assert again.to_dict(include_run_control=False) == cfg.to_dict(include_run_control=False)
