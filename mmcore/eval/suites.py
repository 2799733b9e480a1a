"""The suite registry: a suite is a small function with a clear metric, registered by name.

A suite gets the model, its preprocessor and the dataset version, and returns a SuiteResult
(metrics, tables, figures). Later stages add suites (captioning, VQA) with `@suite(...)`
without touching the runner.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import pandas as pd


class SuiteError(ValueError):
    """A suite cannot run on this model or dataset (wrong family, missing split or labels)."""


@dataclass
class SuiteResult:
    metrics: dict[str, float]
    """Named scalar results; the suite's headline metric is metrics[primary]."""
    primary: str
    tables: dict[str, pd.DataFrame] = field(default_factory=dict)
    figures: dict[str, bytes] = field(default_factory=dict)
    """PNG images by file name (confusion matrices, example grids)."""


@dataclass
class Suite:
    name: str
    families: frozenset[str]
    """Model families (ClipModel.family, ...) the suite can evaluate."""
    run: Callable[..., SuiteResult]
    description: str


SUITES: dict[str, Suite] = {}


def suite(name: str, families: set[str], description: str):
    """Register `fn(model, preprocess, version) -> SuiteResult` under `name`."""
    def register(fn):
        SUITES[name] = Suite(name, frozenset(families), fn, description)
        return fn
    return register


def get_suite(name: str, family: str) -> Suite:
    if name not in SUITES:
        raise SuiteError(f"unknown suite {name!r}; known: {sorted(SUITES)}")
    found = SUITES[name]
    if family not in found.families:
        raise SuiteError(f"suite {name!r} evaluates {sorted(found.families)} models, not a {family!r} model")
    return found


def default_suites(family: str) -> list[str]:
    return [name for name, s in SUITES.items() if family in s.families]
