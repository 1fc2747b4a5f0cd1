"""docs/writing-plugins.md stays true: every hookspec is documented with its exact signature (as
datasette's test does), every name it mentions exists, its contract example passes the contract
checks, and its worked example, built from the guide's own code blocks, installs, is listed,
passes its tests and validates in a benchmark next to the built-in methods."""
from __future__ import annotations

import dataclasses
import inspect
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from torch import nn

import kdzoo.pytest_plugin
import kdzoo.testing
from kdzoo import hookimpl, hookspecs
from kdzoo.cli import build_parser
from kdzoo.methods import _RESERVED, Method
from kdzoo.models import NetInfo, Outputs
from kdzoo.plugins import load_plugins
from kdzoo.testing import check_method

GUIDE = Path(__file__).resolve().parents[1] / "docs" / "writing-plugins.md"
TEXT = GUIDE.read_text()
BLOCKS = re.findall(r"^```(\w*)\n(.*?)^```$", TEXT, re.M | re.S)  # (language, body)
EXAMPLE = "kdzoo-logit-l2"


def hookspec_functions() -> dict[str, object]:
    return {name: fn for name, fn in vars(hookspecs).items() if callable(fn) and hasattr(fn, "kdzoo_spec")}


def test_every_hookspec_is_documented_with_its_exact_signature():
    specs = hookspec_functions()
    assert set(specs) == {"register_methods", "register_models", "register_datasets", "register_checkpoint_formats",
                          "register_observers"}
    reference = TEXT.split("\n## Hook reference\n")[1].split("\n## ")[0]
    documented = dict(re.findall(r"^### `(\w+)(\(.*\))`$", reference, re.M))
    assert set(documented) == set(specs), "document every hookspec under a '### `name(args)`' heading, and only those"
    for name, fn in specs.items():
        assert documented[name] == str(inspect.signature(fn)), name


def test_register_callbacks_accept_what_the_guide_says():
    assert "`register(method_class, name=None)`" in TEXT and "`register(name, factory)`" in TEXT

    class Doc(Method):
        name = "doc_method"
        needs_teacher = False

        def forward(self, student, teacher, labels):
            return {"ce": self.w_ce * self.ce(student.logits, labels)}

    class Plugin:
        @hookimpl
        def register_methods(self, register):
            register(Doc)
            register(Doc, name="doc_alias")

        @hookimpl
        def register_models(self, register):
            register("doc_net", lambda num_classes=10, pretrained=False, **kw: None)

    reg = load_plugins(extra=[("docs", Plugin())], only=[])
    assert reg.methods["doc_method"] is Doc and reg.methods["doc_alias"] is Doc and "doc_net" in reg.models


def test_the_method_contract_is_documented():
    class_attrs = [n for n, t in Method.__annotations__.items() if "ClassVar" in str(t)]
    assert class_attrs == ["name", "family", "needs_teacher", "needs_features", "needs_embedding", "needs_preact",
                           "needs_stem", "needs_indices", "needs_train_labels", "needs_teacher_net", "has_init_stage",
                           "init_uses_student", "defaults", "pair_defaults", "reference", "signed_weights"]
    for attr in class_attrs:
        assert f"| `{attr}` |" in TEXT, f"class attribute {attr} missing from the table"
    for cls in (NetInfo, Outputs):
        for f in dataclasses.fields(cls):
            assert f"| `{f.name}` |" in TEXT, f"{cls.__name__}.{f.name} missing from its table"
    for name in ("start_epoch", "validate_batch_size", "forward", "ce"):
        assert name in vars(Method)
    assert "### `start_epoch(epoch, num_epochs)`" in TEXT and "### `forward(student, teacher, labels)`" in TEXT
    assert "### `validate_batch_size(batch_size)`" in TEXT
    for hook in ("bind_train_set", "bind_teacher", "init_forward", "init_parameters"):
        assert hook in vars(Method), hook
    assert "`bind_train_set(labels)`" in TEXT and "`bind_teacher(net)`" in TEXT
    assert "`init_forward(student, teacher, labels)`" in TEXT and "`PairNotSupported`" in TEXT
    assert f"`__init__{inspect.signature(Method.__init__)}`".replace("'", "") in TEXT
    assert f"`forward{inspect.signature(Method.forward)}`".replace("'", "") in TEXT
    for name in _RESERVED - set(dir(nn.Module)):
        assert f"`{name}`" in TEXT, f"base attribute {name} undocumented"


def test_every_name_the_guide_mentions_exists():
    registry = load_plugins(strict=True)
    for hook in set(re.findall(r"(?<![.\w])register_\w+", TEXT)):  # not nn.Module's self.register_buffer
        assert hook in hookspec_functions(), hook
    sub = next(a for a in build_parser()._actions if a.__class__.__name__ == "_SubParsersAction")
    commands = set(re.findall(r"`kdzoo (?:-p \S+ )?([a-z][\w-]*)", TEXT))
    commands |= {line.split()[1] for lang, body in BLOCKS if lang == "bash" for line in body.splitlines()
                 if line.startswith("kdzoo ")}
    assert {"plugins", "methods", "new-plugin", "bench", "distill"} <= commands
    assert commands <= set(sub.choices), commands - set(sub.choices)
    for check in set(re.findall(r"`(check_\w+)\(", TEXT)):
        assert callable(getattr(kdzoo.testing, check, None)), check
    fixtures = re.findall(r"^\| `(kdzoo_\w+)` \|", TEXT, re.M)
    assert sorted(fixtures) == ["kdzoo_check_method", "kdzoo_check_model", "kdzoo_netinfo_pairs", "kdzoo_registry"]
    for fixture in fixtures:
        assert callable(getattr(kdzoo.pytest_plugin, fixture)), fixture
    own = re.search(r"kdzoo's own methods \((.*?)\)", TEXT, re.S).group(1)
    builtin = set(re.findall(r"`(\w+)`", own))
    assert builtin == {n for n, o in ((n, registry.owner[("method", n)]) for n in registry.methods)
                       if registry.plugin(o).dist == "kdzoo" and o != "builtin"}
    documented_methods = set(re.findall(r"--method (\w+)", TEXT))
    for lang, body in BLOCKS:
        if lang == "yaml":
            documented_methods |= {m if isinstance(m, str) else m["name"] for m in yaml.safe_load(body)["methods"]}
    assert documented_methods - set(registry.methods) == {"logit_l2"}  # the worked example's method


def test_the_contract_example_passes_the_contract_checks():
    (body,) = [b for lang, b in BLOCKS if lang == "python" and "class MyMethod(Method)" in b]
    namespace: dict = {}
    exec(compile(body, "writing-plugins.md", "exec"), namespace)
    check_method(namespace["MyMethod"])


def example_files() -> dict[str, str]:
    files = {}
    for _, body in BLOCKS:
        first = body.partition("\n")[0]
        m = re.fullmatch(rf"# ({EXAMPLE}/\S+)", first)
        if m:
            files[m.group(1)] = body  # the path comment is valid TOML, Python and YAML
    return files


def test_worked_example_from_the_guide(tmp_path, install_package, monkeypatch):
    files = example_files()
    assert sorted(files) == [f"{EXAMPLE}/bench.yaml", f"{EXAMPLE}/pyproject.toml",
                             f"{EXAMPLE}/src/kdzoo_logit_l2/__init__.py", f"{EXAMPLE}/tests/test_logit_l2.py"]
    for rel, text in files.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(text)
    pkg = install_package(tmp_path / EXAMPLE)

    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider"], cwd=pkg.source,
                          capture_output=True, text=True, env=pkg.env(), timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    assert re.search(r"\b3 passed\b", proc.stdout), proc.stdout[-500:]  # what the guide says pytest prints
    listed = {p["name"]: p for p in json.loads(pkg.kdzoo("plugins", "--json").stdout)}
    assert (listed["logit_l2"]["dist"], listed["logit_l2"]["version"], listed["logit_l2"]["methods"]) \
        == ("kdzoo-logit-l2", "0.1.0", ["logit_l2"])
    row = next(line for line in pkg.kdzoo("methods").stdout.splitlines() if "logit_l2" in line)
    assert "w_ce=0.0, w_l2=1.0" in row and "teacher" in row  # as the guide shows

    # The guide's benchmark file validates: every model and method is built and run on a dry forward.
    from kdzoo import bench
    from kdzoo.config import BenchConfig, parse
    from kdzoo.data import DataShape

    monkeypatch.syspath_prepend(str(pkg.site))
    try:
        registry = load_plugins(strict=True)
        plan = bench.expand(parse(BenchConfig, yaml.safe_load(files[f"{EXAMPLE}/bench.yaml"])),
                            DataShape("cifar10", "fingerprint", 10, (32, 32), 50000), registry)
        assert [v.label for v in plan.variants] == ["ce", "kd", "logit_l2", "logit_l2+ce"]
        bench.validate(plan, registry)
    finally:
        sys.modules.pop("kdzoo_logit_l2", None)


@pytest.mark.parametrize("phrase", ["-p no:NAME", "KDZOO_DISABLE_PLUGINS", "KDZOO_LOAD_PLUGINS", "--strict-plugins",
                                    "[project.entry-points.kdzoo]", "pytest11", "inference_mode", "method_state"])
def test_the_guide_covers(phrase):
    assert phrase in TEXT
