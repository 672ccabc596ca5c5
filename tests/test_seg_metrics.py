"""Segmentation metrics against an independent numpy transcription of mmseg's ``mean_iou`` (histograms of
the whole data set at once), on random labels with ignored pixels and classes absent from batches; across
two gloo processes."""

import math

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from beitfast.segmentation.metrics import SegmentationMetrics, format_table
from beitfast.testing import leaving_the_group


def numpy_mean_iou(predictions, labels, num_classes, ignore_index=255):
    """mmseg 0.x ``intersect_and_union`` + ``total_area_to_metrics``, in numpy, over all images at once."""
    pred = np.concatenate([p.ravel() for p in predictions])
    label = np.concatenate([lab.ravel() for lab in labels])
    keep = label != ignore_index
    pred, label = pred[keep], label[keep]
    bins = np.arange(num_classes + 1) - 0.5
    intersect = np.histogram(pred[pred == label], bins=bins)[0].astype(np.float64)
    area_pred = np.histogram(pred, bins=bins)[0].astype(np.float64)
    area_label = np.histogram(label, bins=bins)[0].astype(np.float64)
    union = area_pred + area_label - intersect
    with np.errstate(invalid="ignore", divide="ignore"):
        iou, acc = intersect / union, intersect / area_label
    return {"aAcc": intersect.sum() / area_label.sum(), "IoU": iou, "Acc": acc,
            "mIoU": np.nanmean(iou), "mAcc": np.nanmean(acc)}


def random_batches(seed, num_classes, shapes):
    rng = np.random.default_rng(seed)
    predictions, labels = [], []
    for i, shape in enumerate(shapes):
        # Each batch uses only some classes, so that many are absent from a batch; class num_classes - 1
        # never occurs in labels (only in predictions), class num_classes - 2 nowhere.
        present = rng.choice(num_classes - 2, size=rng.integers(1, num_classes - 2), replace=False)
        label = rng.choice(present, size=shape)
        label[rng.random(shape) < 0.2] = 255
        pred = np.where(rng.random(shape) < 0.6, np.where(label == 255, present[0], label),
                        rng.choice(present, size=shape))
        pred[rng.random(shape) < 0.05] = num_classes - 1
        predictions.append(pred.astype(np.int64))
        labels.append(label.astype(np.int64))
    return predictions, labels


def assert_matches(result, expected):
    for key in ("aAcc", "mIoU", "mAcc"):
        assert result[key] == pytest.approx(expected[key], rel=1e-12)
    np.testing.assert_allclose(np.array(result["IoU"]), expected["IoU"], rtol=1e-12)  # NaN where NaN
    np.testing.assert_allclose(np.array(result["Acc"]), expected["Acc"], rtol=1e-12)


def test_counts_over_batches_match_numpy_mean_iou():
    num_classes = 9
    predictions, labels = random_batches(0, num_classes, [(2, 17, 23), (1, 31, 5), (3, 8, 8)])
    metrics = SegmentationMetrics(num_classes)
    for pred, label in zip(predictions, labels):
        metrics.update(torch.from_numpy(pred), torch.from_numpy(label).to(torch.uint8))
    result = metrics.compute()
    expected = numpy_mean_iou(predictions, labels, num_classes)
    assert_matches(result, expected)
    assert math.isnan(result["IoU"][num_classes - 2])  # in no label and no prediction: out of the mean
    assert result["IoU"][num_classes - 1] == 0.0  # predicted but never labelled: counts as 0
    assert math.isnan(result["Acc"][num_classes - 1])
    assert result["pixels"] == sum(int((lab != 255).sum()) for lab in labels)
    assert "mIoU" in format_table(result) and "nan" in format_table(result)


def test_bad_labels_and_shapes_are_refused():
    metrics = SegmentationMetrics(4)
    with pytest.raises(ValueError, match=r"labels must be in \[0, 4\).*\[7\]"):
        metrics.update(torch.zeros(2, 3, dtype=torch.long), torch.full((2, 3), 7))
    with pytest.raises(ValueError, match="same shape"):
        metrics.update(torch.zeros(2, 3, dtype=torch.long), torch.zeros(3, 2, dtype=torch.long))
    with pytest.raises(TypeError, match="integer"):
        metrics.update(torch.zeros(2, 3), torch.zeros(2, 3, dtype=torch.long))
    assert metrics.counts.sum() == 0  # nothing counted from a refused batch


def _rank_main(rank, world_size, rendezvous, out):
    dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=world_size)
    with leaving_the_group():
        predictions, labels = random_batches(1, 7, [(2, 13, 11)] * 4)
        metrics = SegmentationMetrics(7)
        for pred, label in list(zip(predictions, labels))[rank::world_size]:
            metrics.update(torch.from_numpy(pred), torch.from_numpy(label))
        metrics.all_reduce()
        if rank == 0:
            torch.save(metrics.compute(), out)


def test_two_gloo_ranks_give_the_numbers_of_the_whole_set(tmp_path):
    out = tmp_path / "result.pt"
    # fork: a spawned process could not import this test module (the repository root is off sys.path).
    mp.start_processes(_rank_main, args=(2, str(tmp_path / "rendezvous"), str(out)), nprocs=2, join=True,
                       start_method="fork")
    predictions, labels = random_batches(1, 7, [(2, 13, 11)] * 4)
    assert_matches(torch.load(out), numpy_mean_iou(predictions, labels, 7))
