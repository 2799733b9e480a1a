"""Retrieval recall on constructed embeddings; metric logging that survives a dead tracking server."""

from __future__ import annotations

import numpy as np
import pytest

from mmcore.eval.retrieval import retrieval_recall
from mmcore.tracking import MetricLogger, TrackingError, check_reachable


def test_perfect_and_reversed_retrieval():
    captions = [f"caption {i}" for i in range(20)]
    emb = np.eye(20, dtype=np.float32)
    perfect = retrieval_recall(emb, emb, captions)
    assert perfect["image_to_text_recall_1"] == 1.0 and perfect["text_to_image_recall_1"] == 1.0
    assert perfect["chance_recall_1"] == pytest.approx(1 / 20) and perfect["chance_recall_5"] == pytest.approx(5 / 20)
    shifted = retrieval_recall(emb, np.roll(emb, 1, axis=0), captions)
    assert shifted["image_to_text_recall_1"] == 0.0


def test_repeated_captions_count_as_right():
    """Two images share the caption 'a red circle': retrieving either caption copy is right."""
    captions = ["a red circle", "a red circle", "a blue square"]
    images = np.array([[1, 0], [1, 0], [0, 1]], dtype=np.float32)
    texts = np.array([[1, 0.1], [1, 0], [0, 1]], dtype=np.float32)
    scores = retrieval_recall(images, texts, captions, ks=(1,))
    assert scores["image_to_text_recall_1"] == 1.0
    assert scores["chance_recall_1"] == pytest.approx((2 / 3 + 2 / 3 + 1 / 3) / 3)


def test_metric_logging_failures_are_counted_not_raised(capsys):
    logger = MetricLogger("http://127.0.0.1:9", "no-such-run")
    logger.log({"loss": 1.0}, step=1)
    logger.log({"loss": 0.9}, step=2)
    assert logger.failures == 2 and logger.last_error
    assert "MLflow metric logging failed at step 2" in capsys.readouterr().out


def test_unreachable_tracking_server_is_a_clear_error():
    with pytest.raises(TrackingError, match="MLflow at http://127.0.0.1:9 is not reachable"):
        check_reachable("http://127.0.0.1:9")
