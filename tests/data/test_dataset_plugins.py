"""Datasets come in through the `gauss_register_datasets` hook, built-in or third-party."""
from __future__ import annotations

import numpy as np
import pytest

from gauss_plugins import Component, hookimpl
from gauss_plugins.data import UserSequences, load_dataset


def test_builtin_datasets_registered(fresh_registry):
    names = fresh_registry.get_registry().names("dataset")
    assert {"ml-100k", "ml-1m", "ml-20m", "ml-25m", "seqfile", "synthetic"} <= set(names)


class _ThirdParty:
    @staticmethod
    def tiny(path=None, n=3):
        items = np.arange(1, 3 * n + 1, dtype=np.int64)
        return UserSequences(user_ids=np.arange(n), offsets=np.arange(0, 3 * n + 1, 3), items=items, name="tiny")

    @hookimpl
    def gauss_register_datasets(self):
        return [Component("dataset", "tiny", _ThirdParty.tiny, description="three-item users")]


class _Broken:
    @hookimpl
    def gauss_register_datasets(self):
        return [Component("dataset", "broken", lambda path=None: [1, 2, 3])]


def test_third_party_dataset_loads_through_the_registry(fresh_registry, monkeypatch):
    pm = fresh_registry.get_plugin_manager()
    pm.register(_ThirdParty(), name="third-party-tiny")
    pm.register(_Broken(), name="broken")
    # rebuild the process registry from the manager that now holds the extra plugins
    monkeypatch.setattr(fresh_registry, "_registry", fresh_registry.Registry(pm))
    seqs = load_dataset("tiny", None, n=4)
    assert seqs.num_users == 4 and seqs.num_events == 12
    with pytest.raises(TypeError, match="expected gauss_plugins.data.UserSequences"):
        load_dataset("broken")


def test_unknown_dataset_lists_the_known_ones(fresh_registry):
    with pytest.raises(KeyError, match="ml-100k"):
        load_dataset("no-such-dataset")


def test_wrong_options_are_a_clear_error(fresh_registry):
    with pytest.raises(ValueError, match="does not take these options"):
        load_dataset("synthetic", None, num_userz=3)
