"""The suite registry: a suite is a small function with a clear metric, registered by name.

A suite gets the model, its preprocessor and the dataset version, and returns a SuiteResult
(metrics, tables, figures). A suite declares the capabilities it can use (any one suffices) and
runs for every model that has one, whatever its stage: "embed" (encode_image / encode_text),
"generate" and "score" (fusion and unified models), "tokenize_image" (encode / decode: image
tokenizers), "generate_image" (unified models).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import pandas as pd

from mmcore.data.synthetic import questions as attributes
from mmcore.models import CAPABILITIES


class SuiteError(ValueError):
    """A suite cannot run on this model or dataset (wrong family, missing split or labels)."""


SAMPLE_COLUMNS = frozenset(attributes.COLUMNS)
"""The sample corpus's attribute columns, which its suites read."""


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
    needs: frozenset[str]
    """Capabilities the suite can use; a model with any one of them can take it."""
    run: Callable[..., SuiteResult]
    description: str
    columns: frozenset[str] = frozenset()
    """The columns beyond the curated ones that the suite reads in a caption dataset (the sample corpus's
    attributes); on a caption dataset without them it does not apply."""
    kinds: frozenset[str] = frozenset({"captions"})
    """The dataset kinds it reads (captions, instructions: SourceConfig.kind); on another it does not apply."""
    options: frozenset[str] = frozenset()
    """What the user gives evaluation for it (`classes`: mmpipe evaluate --classes FILE), passed to `run` by
    name; without them it does not apply."""

    def not_applicable(self, version, options: dict | None = None) -> str | None:
        """Why the suite does not apply to dataset `version` (with evaluation's `options`), or None when it does."""
        missing = sorted(self.options - set(options or {}))
        if missing:
            return (f"it needs {', '.join(f'--{name}' for name in missing)} (mmpipe evaluate or promote; "
                    f"the flows' gate: {', '.join(missing)})")
        if version.kind not in self.kinds:
            return f"dataset {version.id} holds {version.kind}; the suite reads {' or '.join(sorted(self.kinds))}"
        if version.kind != "captions":
            return None
        missing = sorted(self.columns - set(version.manifest["source"].get("extras", [])))
        if missing:
            return f"dataset {version.id} has no {', '.join(missing)} column(s): the sample corpus's attributes"
        return None


SUITES: dict[str, Suite] = {}


def suite(name: str, needs: set[str], description: str, columns: frozenset[str] = frozenset(),
          kinds: tuple[str, ...] = ("captions",), options: tuple[str, ...] = ()):
    """Register `fn(model, preprocess, version, **options) -> SuiteResult` under `name`; `columns`, `kinds`,
    `options`: Suite's."""
    assert needs <= set(CAPABILITIES), needs

    def register(fn):
        SUITES[name] = Suite(name, frozenset(needs), fn, description, frozenset(columns), frozenset(kinds),
                             frozenset(options))
        return fn
    return register


def get_suite(name: str, can: set[str]) -> Suite:
    """The suite `name`, if a model with capabilities `can` can take it."""
    if name not in SUITES:
        raise SuiteError(f"unknown suite {name!r}; known: {sorted(SUITES)}")
    found = SUITES[name]
    if not found.needs & can:
        raise SuiteError(f"suite {name!r} needs a model that can {' or '.join(sorted(found.needs))}; "
                         f"this one can {' and '.join(sorted(can)) or 'nothing a suite uses'}")
    return found


def default_suites(can: set[str]) -> list[str]:
    return [name for name, s in SUITES.items() if s.needs & can]
