"""Contract checks for kdzoo plugins, for plugin authors' own test suites.

Every check runs on tiny random tensors on the CPU (and on CUDA when there is one) and raises
:class:`ContractError`, an ``AssertionError``, whose message says what the author must fix::

    from kdzoo.testing import check_method, check_model

    def test_my_method_follows_the_contract():
        check_method(MyMethod)               # every method check, several teacher/student pairs

    def test_my_backbone_follows_the_contract():
        check_model(my_factory)              # or a registered name: check_model("resnet20")

The method checks run on synthetic teacher/student pairs (:data:`NETINFO_PAIRS`: random outputs
shaped as a ``NetInfo`` says) and, with ``nets={name: (student_factory, teacher_factory)}``, on
real networks too: a method with ``needs_teacher_net`` needs them, since ``bind_teacher`` gets the
teacher network. They bind a method as ``kdzoo.runner.build_method`` does (``bind_teacher``, then
``bind_train_set`` with :data:`TRAIN_SET` synthetic labels) and call it as the engine does
(``indices=`` for ``needs_indices``). A pair whose construction raises
:class:`~kdzoo.methods.PairNotSupported` is skipped: the method declares it cannot serve it.

Installing kdzoo gives every test suite the fixtures ``kdzoo_registry``, ``kdzoo_check_method``,
``kdzoo_check_model`` and ``kdzoo_netinfo_pairs``, from the pytest plugin :mod:`kdzoo.pytest_plugin`
(entry point ``pytest11``, name ``kdzoo``), which imports this module only when a test uses one: a
pytest run that uses none never imports torch. The individual checks are public too, for
an author who needs only some of them (``check_declaration``, ``check_hparams``,
``check_terms``, ``check_gradients``, ``check_state_dict``, ``check_determinism``,
``check_dtypes_and_devices``, ``check_init_stage``, ``check_teacher_net``, ``check_indices``,
``check_pair_defaults``; ``check_feature_info``, ``check_kdnet``, ``check_model_backward``).
"""
from __future__ import annotations

from kdzoo.testing._common import (BATCH, EPOCHS, IMAGE_SIZE, NETINFO_PAIRS, TRAIN_SET, ContractError, Nets, Pairs,
                                   make_labels, make_outputs, make_train_labels)
from kdzoo.testing.methods import (AMBIGUOUS_NAMES, check_declaration, check_determinism, check_dtypes_and_devices,
                                   check_gradients, check_hparams, check_indices, check_init_stage, check_method,
                                   check_pair_defaults, check_registered, check_state_dict, check_teacher_net,
                                   check_terms)
from kdzoo.testing.models import check_feature_info, check_kdnet, check_model, check_model_backward

__all__ = [
    "AMBIGUOUS_NAMES", "BATCH", "EPOCHS", "IMAGE_SIZE", "NETINFO_PAIRS", "TRAIN_SET", "ContractError", "Nets", "Pairs",
    "make_labels", "make_outputs", "make_train_labels",
    "check_declaration", "check_determinism", "check_dtypes_and_devices", "check_gradients", "check_hparams",
    "check_indices", "check_init_stage", "check_method", "check_pair_defaults", "check_registered",
    "check_state_dict", "check_teacher_net", "check_terms",
    "check_feature_info", "check_kdnet", "check_model", "check_model_backward",
]
