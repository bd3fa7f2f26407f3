"""Registers the ``aoti`` export target: a trained HSTU retrieval model to an AOTInductor
``.pt2`` ranker package (:func:`gauss_plugins.export.aoti.export_aoti`)."""
from __future__ import annotations

import shutil

from gauss_plugins.components import AVAILABLE, Availability, Component
from gauss_plugins.plugins import hookimpl


def _cxx_available() -> Availability:
    # aoti_compile_and_package builds a shared library with the host C++ compiler.
    for name in ("g++", "c++", "clang++"):
        if shutil.which(name):
            return AVAILABLE
    return Availability(False, "no C++ compiler on PATH (AOTInductor needs one): apt-get install g++")


@hookimpl
def gauss_register_export_targets():
    return [
        Component(
            kind="export_target",
            name="aoti",
            factory="gauss_plugins.export.aoti:export_aoti",
            description="HSTU ranker (retrieval or M-FALCON head) as an AOTInductor .pt2 that serves without Python; "
                        "parity-checked against eager",
            check=_cxx_available,
            priority=10,
        ),
    ]
