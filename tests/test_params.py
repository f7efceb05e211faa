"""params.yaml validation: every bad input is one UserError naming the file, the key, the
allowed."""
import os
import subprocess
import sys

import pytest
import yaml

from ablation.core.cli import UserError
from ablation.training import params

from .helpers import PARAMS, ROOT


@pytest.fixture(scope="module")
def good_text():
    with open(PARAMS) as f:
        return f.read()


def test_repository_params_are_valid(good_text):
    out = params.validate(yaml.safe_load(good_text), list(params.SCHEMA))
    assert out["data"]["datasets"] == ["mnist", "fashion_mnist"]
    assert out["train"]["models"] == ["resnet18"] and out["train"]["batch_size"] == 16


def mutate(text, section, key, value):
    p = yaml.safe_load(text)
    if value is DELETE:
        del p[section][key]
    else:
        p[section][key] = value
    return p


DELETE = object()
CASES = [  # (section, key, bad value, text the message must contain)
    ("data", "datasets", ["mnist", "cifar10"], "data.datasets"),
    ("data", "datasets", "mnist", "a non-empty list"),
    ("data", "datasets", [], "a non-empty list"),
    ("data", "datasets", ["mnist", "mnist"], "distinct"),
    ("data", "train_limit", 1, "an integer in [2, 60000] or null"),
    ("data", "train_limit", "all", "data.train_limit"),
    ("train", "models", "resnet18", "a non-empty list of distinct values from resnet18"),
    ("train", "models", ["resnet101"], "resnet18, resnet34, resnet50"),
    ("train", "stem", "vgg", "one of imagenet, cifar"),
    ("train", "batch_size", 0, "train.batch_size"),
    ("train", "batch_size", 16.5, "an integer in [2, 65536]"),
    ("train", "batch_size", [16, 32], "an integer in [2, 65536]"),
    ("train", "optimizer", "rmsprop", "one of sgd, adam"),
    ("train", "optimizer", ["adam"], "one of sgd, adam"),
    ("train", "momentum", 1.5, "<= 1"),
    ("train", "lr", 0, "a number > 0"),
    ("train", "lr", -0.001, "a number > 0"),
    ("train", "lr", "fast", "a number > 0"),
    ("train", "lr", float("nan"), "a number > 0"),
    ("train", "weight_decay", -1, "a number >= 0.0"),
    ("train", "epochs", 0, "an integer in [1, 10000]"),
    ("train", "epochs", True, "an integer in [1, 10000]"),
    ("train", "pin_memory", "yes please", "true or false"),
    ("train", "pin_memory", 1, "true or false"),
    ("train", "num_workers", -1, "an integer in [0, 64]"),
    ("train", "device", "tpu", "one of auto, cpu, cuda, mps"),
    ("train", "loader", "pil", "one of dataloader, resident"),
    ("train", "precision", "fp16", "one of auto, fp32, bf16"),
    ("train", "compile", "max", "true or false"),
    ("train", "seed", -3, "an integer in [0, 4294967295]"),
    ("train", "lr", DELETE, "missing key 'train.lr'"),
    ("train", "small_maps", "maybe", "allowed: auto, true or false"),
    ("train", "fused_optimizer", 1, "allowed: auto, true or false"),
    ("train", "compile_mode", "fast", "one of auto, default, reduce-overhead, max-autotune"),
]


@pytest.mark.parametrize("value", ["auto", True, False, "on", "off"])
def test_switch_values(good_text, value):
    p = mutate(good_text, "train", "channels_last", value)
    assert params.validate(p, ["train"])["train"]["channels_last"] == value


@pytest.mark.parametrize("section,key,value,expect", CASES)
def test_bad_value_is_named(good_text, section, key, value, expect):
    with pytest.raises(UserError) as e:
        params.validate(mutate(good_text, section, key, value), ["data", "train"])
    msg = str(e.value)
    assert msg.startswith("params.yaml: ") and f"{section}.{key}" in msg and expect in msg


def test_typo_key_lists_allowed_keys(good_text):
    p = yaml.safe_load(good_text)
    p["train"]["learning_rate"] = 0.1
    with pytest.raises(UserError, match=r"unknown key 'train.learning_rate' \(allowed keys: "
                                        r"models, stem, batch_size"):
        params.validate(p, ["train"])


@pytest.mark.parametrize("text,expect", [
    ("", "file is empty"),
    ("train: [1, 2\n", "YAML syntax error at line"),
    ("- just\n- a list\n", "expected a mapping of sections"),
    ("data:\n  datasets: [mnist]\n  train_limit: null\n  test_limit: null\n",
     "missing section 'train'"),
    ("data: 3\ntrain: {}\n", "section 'data' must be a mapping"),
])
def test_malformed_file(tmp_path, text, expect):
    p = tmp_path / "params.yaml"
    p.write_text(text)
    with pytest.raises(UserError, match=expect) as e:
        params.load(["data", "train"], str(p))
    assert str(p) in str(e.value)


def test_missing_file(tmp_path):
    with pytest.raises(UserError, match="file not found"):
        params.load(["data"], str(tmp_path / "nope.yaml"))


def test_train_cli_bad_params_exit_2_one_line_nothing_written(good_text, tmp_path):
    p = tmp_path / "params.yaml"
    p.write_text(good_text.replace("optimizer: adam", "optimizer: adamw"))
    out = tmp_path / "out"
    r = subprocess.run(
        [sys.executable, "-m", "ablation.stages.train", "--params", str(p), "--data", "x.npz",
         "--model", "resnet18", "--metrics", str(out / "m.json"), "--out", str(out / "m.pt")],
        cwd=tmp_path, capture_output=True, text=True,
        env=dict(os.environ, PYTHONPATH=os.path.join(ROOT, "src")))
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == [
        f"error: {p}: train.optimizer = 'adamw': allowed: one of sgd, adam"]
    assert not out.exists()


def test_exponent_without_dot_reads_as_a_number(good_text):
    """YAML 1.1 reads `1e-3` as text; users type it, so it means 0.001."""
    p = yaml.safe_load(good_text.replace("lr: 0.001", "lr: 1e-3"))
    assert p["train"]["lr"] == "1e-3"
    assert params.validate(p, ["train"])["train"]["lr"] == 0.001
