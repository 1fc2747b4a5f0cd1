"""``kdzoo new-plugin NAME``: write a ready-to-install method package.

The package (``kdzoo-NAME/``) holds a ``pyproject.toml`` declaring the ``kdzoo`` entry point, a
``src/kdzoo_NAME/__init__.py`` with a working method skeleton (``"ce"`` plus one placeholder
term, ``NAME``: the mean squared difference of the student's and the teacher's logits), a
README, and tests that use :mod:`kdzoo.testing` and pass as generated once it is installed.
"""
from __future__ import annotations

import re
from pathlib import Path
from string import Template
from typing import Iterable

from kdzoo import KDZooError, __version__

NAME_RE = re.compile(r"[a-z][a-z0-9_]*\Z")

PYPROJECT = Template('''\
[build-system]
requires = ["setuptools>=77"]
build-backend = "setuptools.build_meta"

[project]
name = "$dist"
version = "0.1.0"
description = "The $name distillation method for kdzoo."
readme = "README.md"
requires-python = ">=3.10"
license = "MIT"
dependencies = ["kdzoo>=$kdzoo_version"]

[project.optional-dependencies]
test = ["pytest>=8"]

# kdzoo finds the method through this entry point; its name ("$name") is what
# `kdzoo -p no:$name` and KDZOO_DISABLE_PLUGINS=$name turn off.
[project.entry-points.kdzoo]
$name = "$package"

[tool.setuptools.packages.find]
where = ["src"]

[tool.pytest.ini_options]
testpaths = ["tests"]
''')

MODULE = Template('''\
"""The $name distillation method, a kdzoo plugin.

Describe the loss here, with the reference (paper and code) its definition and defaults come from.
"""
from __future__ import annotations

import torch

from kdzoo import KDZooError, hookimpl
from kdzoo.methods import Method
from kdzoo.models import NetInfo, Outputs


class $cls(Method):
    """``w_ce * CE(student, labels) + w_$name * mean((student logits - teacher logits)^2)``.

    Terms: ``"ce"`` and ``"$name"``. Replace the placeholder term with your loss.
    """

    name = "$name"
    needs_teacher = True      # the engine passes the teacher's Outputs (None when False)
    needs_features = False    # True: Outputs.features holds the stage outputs (B, C, H, W), input to output
    needs_embedding = False   # True: Outputs.embedding holds the pooled pre-logit vector (B, D)
    # Every hyperparameter with its published default; loss weights are named w_<term>.
    defaults = {"w_ce": 1.0, "w_$name": 1.0}
    reference = "Where the definition and the defaults come from."

    def __init__(self, student: NetInfo, teacher: NetInfo | None = None, **hparams) -> None:
        super().__init__(student, teacher, **hparams)  # checks hparams, sets self.w_ce, self.w_$name
        if self.w_$name < 0:
            raise KDZooError(f"Method '$name': w_$name must be >= 0, got {self.w_$name}.")
        # Learnable parts (projections, regressors) go here as submodules, built from the
        # NetInfo descriptions (stage_channels, stage_sizes, embed_dim, num_classes): the engine
        # optimises them with the student and saves them in the checkpoint.

    def forward(self, student: Outputs, teacher: Outputs, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        # self.epoch and self.num_epochs are set by the engine before each epoch (0-based).
        placeholder = (student.logits.float() - teacher.logits.detach().float()).pow(2).mean()
        return {
            "ce": self.w_ce * self.ce(student.logits, labels),
            "$name": self.w_$name * placeholder,
        }


@hookimpl
def register_methods(register):
    register($cls)
''')

TESTS = Template('''\
"""$cls against the kdzoo contract, and its loss against a hand computation.

The fixtures kdzoo_check_method and kdzoo_registry come from kdzoo's pytest plugin
(kdzoo.pytest_plugin), which pytest loads automatically when kdzoo is installed.
"""
import pytest
import torch

from kdzoo.models import NetInfo, Outputs
from kdzoo.testing import check_registered
from $package import $cls

NET = NetInfo(stage_channels=(8, 16), stage_sizes=((8, 8), (4, 4)), embed_dim=16, num_classes=3)


def test_follows_the_kdzoo_contract(kdzoo_check_method):
    kdzoo_check_method($cls)


def test_installed_package_registers_the_method(kdzoo_registry):
    check_registered($cls, kdzoo_registry)


def test_loss_matches_a_hand_computation():
    # Update this when you replace the placeholder: compute the expected value independently.
    student = torch.tensor([[2.0, 0.0, -1.0], [0.5, 0.5, 0.0]])
    teacher = torch.tensor([[1.0, 0.0, 1.0], [0.5, -0.5, 0.0]])
    terms = $cls(NET, NET, w_$name=2.0)(Outputs(student), Outputs(teacher), torch.tensor([0, 1]))
    # squared differences: 1, 0, 4 and 0, 1, 0 -> mean 1.0; weighted by w_$name = 2
    assert terms["$name"].item() == pytest.approx(2.0)
''')

README = Template('''\
# $dist

The `$name` distillation method as a [kdzoo](https://pypi.org/project/kdzoo/) plugin.

```bash
pip install -e ".[test]"       # kdzoo finds it through the `kdzoo` entry point
kdzoo plugins                  # lists plugin "$name" from $dist 0.1.0
kdzoo methods                  # $name, with its defaults
pytest                         # kdzoo.testing's contract checks and the loss test
kdzoo distill --teacher runs/teacher/checkpoint.pt --student resnet8x4 --method $name
```

In a benchmark YAML, name it next to the built-in methods: `methods: [kd, $name]`.

## The loss

`w_ce * CE + w_$name * (placeholder)`: describe yours, its terms and its defaults here.
''')


def plugin_names(name: str) -> dict[str, str]:
    """The names derived from a method name: distribution, package, class. ``KDZooError`` if invalid."""
    if not NAME_RE.match(name or ""):
        raise KDZooError(
            f"'{name}' cannot name a method: use lowercase letters, digits and underscores, starting with a "
            "letter (e.g. dkd or my_kd). It becomes the method name, the entry point and the package kdzoo_NAME."
        )
    if name == "ce":
        raise KDZooError("'ce' is kdzoo's builtin cross-entropy method; choose another name.")
    return {
        "name": name,
        "dist": "kdzoo-" + name.replace("_", "-"),
        "package": f"kdzoo_{name}",
        "cls": "".join(part.capitalize() for part in name.split("_")),
        "kdzoo_version": __version__.split("+")[0],
    }


def render(name: str) -> dict[str, str]:
    """The files of the package for method ``name``: relative path -> text."""
    n = plugin_names(name)
    return {
        "pyproject.toml": PYPROJECT.substitute(n),
        "README.md": README.substitute(n),
        f"src/{n['package']}/__init__.py": MODULE.substitute(n),
        f"tests/test_{name}.py": TESTS.substitute(n),
    }


def new_plugin(name: str, directory: str | Path = ".", taken: Iterable[str] = ()) -> Path:
    """Write the package for method ``name`` into ``directory/kdzoo-NAME``; return that folder.

    Refuses (``KDZooError``) an invalid name, a name in ``taken`` (the registered methods), and
    an existing folder: nothing is ever overwritten.
    """
    files = render(name)
    if name in set(taken):
        raise KDZooError(
            f"A method named '{name}' is already registered (see `kdzoo methods`); two plugins with one "
            "method name clash. Choose another name."
        )
    folder = Path(directory) / plugin_names(name)["dist"]
    if folder.exists():
        raise KDZooError(f"{folder} already exists; kdzoo new-plugin never overwrites. Remove it or pass --dir.")
    for rel, text in files.items():
        path = folder / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return folder
