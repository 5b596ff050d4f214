"""Region Dice and HD95 on hand-made volumes where the answer is known."""

from __future__ import annotations

import math

import numpy as np
import pytest

from kdcli.metrics.segmentation import aggregate, dice, hd95, region_metrics, stack_cases


def test_dice_counts_two_empty_masks_as_one():
    empty = np.zeros((4, 4, 4), bool)
    assert dice(empty, empty) == 1.0
    full = np.ones((4, 4, 4), bool)
    assert dice(full, empty) == 0.0
    half = full.copy()
    half[:2] = False
    assert dice(half, full) == pytest.approx(2 * 32 / (32 + 64))


def test_hd95_of_a_shifted_cube_is_the_shift_in_millimetres():
    truth = np.zeros((20, 20, 20), bool)
    truth[5:10, 5:10, 5:10] = True
    shifted = np.roll(truth, 2, axis=0)
    assert hd95(shifted, truth) == pytest.approx(2.0)
    assert hd95(shifted, truth, spacing=(3.0, 1.0, 1.0)) == pytest.approx(6.0)
    assert hd95(truth, truth) == 0.0
    assert math.isnan(hd95(np.zeros_like(truth), truth))


def test_regions_follow_the_label_indices_and_aggregate_skips_undefined_hd95():
    truth = np.zeros((8, 8, 4), np.uint8)
    truth[2:6, 2:6] = 2  # oedema
    truth[3:5, 3:5] = 3  # enhancing inside
    pred = truth.copy()
    pred[pred == 3] = 1  # enhancing called necrotic: TC and WT right, ET missed
    metrics = region_metrics(pred, truth)
    assert metrics["dice_wt"] == 1.0 and metrics["dice_tc"] == 1.0 and metrics["dice_et"] == 0.0
    assert math.isnan(metrics["hd95_et"])
    summary = aggregate([metrics, region_metrics(truth, truth)])
    assert summary["dice_et"] == 0.5 and summary["hd95_et"] == 0.0 and summary["hd95_et_undefined"] == 1
    assert summary["dice_mean"] == pytest.approx((1 + 1 + 0.5) / 3)


def test_stack_cases_orders_slices_by_position():
    maps = np.arange(3)[:, None, None] * np.ones((3, 2, 2))
    stacked = stack_cases(["a", "a", "b"], np.array([5, 1, 0]), maps)
    assert stacked["a"].shape == (2, 2, 2) and stacked["a"][0, 0].tolist() == [1, 0]
