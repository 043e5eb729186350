"""Logged means weigh each batch by its trained tokens: held-out batches padded with empty rows do not dilute them."""

import numpy as np
import pytest

from mtp.training.metrics import mean_metrics


def test_an_empty_padding_batch_adds_no_zero_agreement():
    full = {"top1_agreement": np.array([0.8, 0.6]), "loss": np.float32(1.0), "trained_tokens": np.int32(300)}
    small = {"top1_agreement": np.array([0.5, 0.3]), "loss": np.float32(2.0), "trained_tokens": np.int32(100)}
    empty = {"top1_agreement": np.array([0.0, 0.0]), "loss": np.float32(0.0), "trained_tokens": np.int32(0)}
    mean = mean_metrics([full, small, empty])
    np.testing.assert_allclose(mean["top1_agreement"], [0.725, 0.525])  # (300 x + 100 y) / 400
    assert mean["loss"] == pytest.approx(1.25) and mean["trained_tokens"] == pytest.approx(400 / 3)
    assert mean_metrics([{"loss": 1.0}, {"loss": 3.0}])["loss"] == pytest.approx(2.0)  # no token counts: plain mean
