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
