"""kdzoo's pytest plugin (entry point ``pytest11``, plugin name ``kdzoo``): the fixtures of :mod:`kdzoo.testing`.

Installing kdzoo registers this module in every pytest run of the environment, kdzoo's users'
projects and unrelated ones alike, so importing it must cost nothing: torch, timm, the contract
checks and the plugins are imported inside the fixtures, when a test asks for one. ``pytest -p
no:kdzoo`` turns the plugin off.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable

import pytest

if TYPE_CHECKING:
    from kdzoo.models import NetInfo
    from kdzoo.plugins import Registry


@pytest.fixture(scope="session")
def kdzoo_registry() -> Registry:
    """The plugins installed in this environment, loaded once per session (``kdzoo.plugins.load_plugins()``)."""
    from kdzoo.plugins import load_plugins

    return load_plugins()


@pytest.fixture
def kdzoo_check_method() -> Callable[..., None]:
    """:func:`kdzoo.testing.check_method`: ``kdzoo_check_method(MyMethod, **hparam_overrides)``."""
    from kdzoo.testing import check_method

    return check_method


@pytest.fixture
def kdzoo_check_model(kdzoo_registry: Registry) -> Callable[..., NetInfo]:
    """:func:`kdzoo.testing.check_model` resolving names in ``kdzoo_registry``: ``kdzoo_check_model("resnet20")``."""
    from kdzoo.testing import check_model

    def check(factory_or_name: Any, **kwargs: Any) -> NetInfo:
        return check_model(factory_or_name, registry=kdzoo_registry, **kwargs)

    return check


@pytest.fixture
def kdzoo_netinfo_pairs() -> dict[str, tuple[NetInfo, NetInfo]]:
    """:data:`kdzoo.testing.NETINFO_PAIRS`: name -> (student NetInfo, teacher NetInfo)."""
    from kdzoo.testing import NETINFO_PAIRS

    return dict(NETINFO_PAIRS)
