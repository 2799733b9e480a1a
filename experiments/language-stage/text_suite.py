"""The text suite on a run directory's final bundle (what `python -m mmcore.train` leaves; not registered):

    python experiments/language-stage/text_suite.py RUN_DIR/final DATASET_DIR
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from mmcore.bundle import ModelBundle
from mmcore.data.dataset import DatasetVersion
from mmcore.eval.text import text

if __name__ == "__main__":
    model, preprocess = ModelBundle.at(Path(sys.argv[1])).load()
    result = text(model, preprocess, DatasetVersion.open(sys.argv[2]))
    print(json.dumps({k: round(v, 4) for k, v in result.metrics.items()}, indent=1))
