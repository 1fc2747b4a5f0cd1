"""Config parsing: YAML → dataclasses, with errors that name the field and suggest close matches."""
from __future__ import annotations

import pytest

from kdzoo import KDZooError
from kdzoo.config import DataConfig, Recipe, RunConfig, parse, parse_assignment, read_yaml


def test_parse_nested_and_coerces_ints_to_floats():
    cfg = parse(RunConfig, {"model": "resnet20", "recipe": {"lr": 1, "milestones": [5, 8], "epochs": 10},
                            "data": {"train_size": 500}})
    assert cfg.recipe.lr == 1.0 and isinstance(cfg.recipe.lr, float)
    assert cfg.recipe.milestones == [5, 8] and cfg.data == DataConfig(train_size=500)
    assert cfg.recipe.momentum == Recipe().momentum  # untouched defaults stay


@pytest.mark.parametrize(
    "mapping, fragment",
    [
        ({"modle": "x"}, "Unknown key 'modle'. Did you mean 'model'"),
        ({"recipe": {"lr_rate": 0.1}}, "Unknown key 'recipe.lr_rate'. Did you mean 'lr'"),
        ({"recipe": {"epochs": "ten"}}, "recipe.epochs must be an integer, got 'ten'"),
        ({"recipe": {"nesterov": 1}}, "recipe.nesterov must be true/false"),
        ({"recipe": {"milestones": [5, "x"]}}, "recipe.milestones[1] must be an integer"),
        ({"data": {"train_size": 1.5}}, "data.train_size must be an integer or null"),
        ({"data": 3}, "data must be a mapping"),
    ],
)
def test_errors_name_the_field(mapping, fragment):
    with pytest.raises(KDZooError) as e:
        parse(RunConfig, mapping)
    assert fragment in str(e.value)


@pytest.mark.parametrize(
    "recipe, fragment",
    [
        (Recipe(schedule="cosin"), "Did you mean 'cosine'"),
        (Recipe(autocast="fp8"), "recipe.autocast"),
        (Recipe(epochs=0), "recipe.epochs must be at least 1"),
        (Recipe(epochs=10, milestones=[11]), "milestones"),
        (Recipe(label_smoothing=1.0), "label_smoothing"),
    ],
)
def test_recipe_validation(recipe, fragment):
    with pytest.raises(KDZooError, match=fragment.replace("(", r"\(")):
        recipe.validate()


def test_read_yaml_errors(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: resnet20\nrecipe: [unclosed\n")
    with pytest.raises(KDZooError, match="not valid YAML at line"):
        read_yaml(bad)
    with pytest.raises(KDZooError, match="Cannot read config file"):
        read_yaml(tmp_path / "missing.yaml")
    listy = tmp_path / "list.yaml"
    listy.write_text("- a\n- b\n")
    with pytest.raises(KDZooError, match="must hold a mapping"):
        read_yaml(listy)
    unsafe = tmp_path / "unsafe.yaml"
    unsafe.write_text("model: !!python/object/apply:os.system ['echo hi']\n")
    with pytest.raises(KDZooError, match="not valid YAML"):  # safe_load refuses python tags
        read_yaml(unsafe)


def test_parse_assignment_reads_yaml_scalars():
    assert parse_assignment("T=2") == ("T", 2)
    assert parse_assignment("w_kd=0.9") == ("w_kd", 0.9)
    assert parse_assignment("cifar_stem=true") == ("cifar_stem", True)
    assert parse_assignment("name=abc") == ("name", "abc")
    with pytest.raises(KDZooError, match="KEY=VALUE"):
        parse_assignment("T2")


@pytest.mark.parametrize("text, field", [
    ("recipe: {lr: .nan}", "recipe.lr"),
    ("recipe: {lr: .inf}", "recipe.lr"),
    ("recipe: {momentum: -.inf}", "recipe.momentum"),
    ("recipe: {warmup_epochs: .NaN}", "recipe.warmup_epochs"),
])
def test_non_finite_numbers_are_refused_naming_the_field(tmp_path, text, field):
    path = tmp_path / "run.yaml"
    path.write_text(f"model: resnet20\n{text}\n")
    with pytest.raises(KDZooError, match=rf"^{field} must be a finite number, got -?(nan|inf)\."):
        parse(RunConfig, read_yaml(path))


def test_non_finite_cli_number_is_refused_before_training(tmp_path, capsys):
    from kdzoo.cli import main

    args = ["train", "--model", "resnet20", "--epochs", "1", "--train-size", "20", "--test-size", "10"]
    assert main(args + ["--lr", "nan", "--out", str(tmp_path / "out")]) == 2
    assert "recipe.lr must be a finite number, got nan" in capsys.readouterr().err
    with pytest.raises(KDZooError, match="recipe.gamma must be a finite number"):
        Recipe(gamma=float("inf")).validate()  # a Recipe built in code is checked too


@pytest.mark.parametrize("recipe, fragment", [
    (Recipe(epochs=5, schedule="multistep", milestones=[3, 1]),
     r"milestones \[3, 1\] is not in increasing order.*\[1, 3\]"),
    (Recipe(epochs=5, schedule="multistep", milestones=[1, 1]), r"milestones \[1, 1\] lists epoch 1 more than once"),
    (Recipe(epochs=5, schedule="multistep", milestones=[2, 4, 2]), r"lists epoch 2 more than once.*\[2, 4\]"),
    (Recipe(epochs=5, schedule="multistep"),
     r"recipe.schedule is multistep but recipe.milestones is empty.*schedule: constant"),
])
def test_milestones_sorted_unique_and_given_for_multistep(recipe, fragment):
    with pytest.raises(KDZooError, match=fragment):
        recipe.validate()
    Recipe(epochs=5, schedule="multistep", milestones=[1, 3]).validate()
