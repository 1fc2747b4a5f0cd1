"""kdzoo costs nothing when idle: pytest in an environment with kdzoo installed, ``import kdzoo.cli``
and ``kdzoo --help`` never import torch, and commands that need only methods never import timm.

Checked through ``sys.modules`` in fresh subprocesses; speed itself is measured by
``benchmarks/startup.py``, never asserted here.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

HEAVY = ("torch", "timm", "torchvision", "kdzoo.testing", "kdzoo.models", "kdzoo_plugins")


def clean_env() -> dict[str, str]:
    """The environment of a subprocess that sees every installed plugin, pytest's included."""
    drop = {"PYTEST_ADDOPTS", "PYTEST_PLUGINS", "PYTEST_DISABLE_PLUGIN_AUTOLOAD"}
    return {k: v for k, v in os.environ.items() if k not in drop and not k.startswith("KDZOO_")}


def run_python(code: str, cwd) -> list[str]:
    """Run ``code`` in a fresh interpreter; return the heavy modules it imported."""
    probe = f"{textwrap.dedent(code)}\nimport sys\nprint(sorted(m for m in {HEAVY!r} if m in sys.modules))\n"
    proc = subprocess.run([sys.executable, "-c", probe], cwd=cwd, env=clean_env(), capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr
    return eval(proc.stdout.strip().splitlines()[-1])


def test_pytest_with_kdzoo_installed_starts_without_torch(tmp_path):
    """The pytest11 entry point is loaded in every pytest run of the environment: importing it must not
    import torch, timm or kdzoo's checks. Its fixtures still work, importing them when used."""
    report = tmp_path / "report.json"
    (tmp_path / "test_probe.py").write_text(textwrap.dedent(f"""
        import json, sys

        def test_probe(request):
            plugin = request.config.pluginmanager.get_plugin("kdzoo")
            json.dump({{"plugin": getattr(plugin, "__name__", None),
                        "heavy": [m for m in {HEAVY!r} if m in sys.modules]}}, open({str(report)!r}, "w"))

        def test_fixtures_still_work(kdzoo_netinfo_pairs, kdzoo_check_method):
            assert "identical nets" in kdzoo_netinfo_pairs and callable(kdzoo_check_method)
    """))
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(tmp_path)],
                          cwd=tmp_path, env=clean_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    found = json.loads(report.read_text())
    assert found["plugin"] == "kdzoo.pytest_plugin"  # active through the installed entry point
    assert found["heavy"] == [], f"pytest start-up imported {found['heavy']} through kdzoo's pytest plugin"


def test_cli_import_parser_and_help_do_not_import_torch(tmp_path):
    assert run_python("import kdzoo.cli; kdzoo.cli.build_parser()", tmp_path) == []
    code = """
        import contextlib, io, kdzoo.cli
        with contextlib.redirect_stdout(io.StringIO()):
            try:
                kdzoo.cli.main(["--help"])
            except SystemExit as e:
                assert e.code == 0
    """
    assert run_python(code, tmp_path) == []
    assert run_python("import kdzoo.config, kdzoo.plugins, kdzoo.errors", tmp_path) == []


def test_methods_and_plugins_commands_do_not_import_timm(tmp_path):
    """Listing methods and plugins loads the plugins (torch, for the method classes) but leaves the timm
    plugin's model family unlisted."""
    code = """
        import contextlib, io, kdzoo.cli
        with contextlib.redirect_stdout(io.StringIO()) as out:
            assert kdzoo.cli.main(["methods"]) == 0 and kdzoo.cli.main(["plugins"]) == 0
        text = "".join(c for c in out.getvalue() if c.isalnum())  # rich wraps table cells at the terminal's width
        assert "fitnets" in text and "everytimmmodel" in text
    """
    heavy = run_python(code, tmp_path)
    assert "torch" in heavy and not {"timm", "torchvision"} & set(heavy), heavy
