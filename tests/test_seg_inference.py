"""Sliding-window and whole-image inference against a plain per-window, per-image float64 transcription of
mmseg's ``slide_inference``, on odd image sizes (larger than the crop, and smaller than it)."""

import pytest
import torch
import torch.nn.functional as F

from beitfast import BEiTConfig, BEiTForSegmentation
from beitfast.segmentation import SegmentationConfig
from beitfast.segmentation.inference import default_stride, segment_logits, window_boxes

SIZE = 32


def tiny_model() -> BEiTForSegmentation:
    config = BEiTConfig(img_size=SIZE, patch_size=8, embed_dim=32, depth=4, num_heads=2, vocab_size=0,
                        use_shared_rel_pos_bias=False, use_rel_pos_bias=True, kernels="eager")
    segmentation = SegmentationConfig(num_classes=3, out_indices=(0, 1, 2, 3), channels=16,
                                      auxiliary_channels=0)
    model = BEiTForSegmentation(config, segmentation)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():  # random weights everywhere (not the initialisation's zeros), positive variances
        for name, t in model.state_dict().items():
            if t.is_floating_point():
                t.copy_(torch.rand(t.shape, generator=generator) + 0.5 if name.endswith("running_var")
                        else torch.randn(t.shape, generator=generator) * 0.3)
    return model.double().eval()


def reference_slide(model, image, crop, stride):
    """mmseg 0.x ``slide_inference`` for one image [3, H, W], one window at a time; windows smaller than
    the model's input padded (bottom/right, zeros) and their logits cut back."""
    _, h_img, w_img = image.shape
    h_grids = max(h_img - crop + stride - 1, 0) // stride + 1
    w_grids = max(w_img - crop + stride - 1, 0) // stride + 1
    preds = count = None
    for h_idx in range(h_grids):
        for w_idx in range(w_grids):
            y1, x1 = h_idx * stride, w_idx * stride
            y2, x2 = min(y1 + crop, h_img), min(x1 + crop, w_img)
            y1, x1 = max(y2 - crop, 0), max(x2 - crop, 0)
            window = image[:, y1:y2, x1:x2]
            padded = torch.zeros(3, SIZE, SIZE, dtype=torch.float64)
            padded[:, :y2 - y1, :x2 - x1] = window
            logits = F.interpolate(model(padded[None]), size=(SIZE, SIZE), mode="bilinear",
                                   align_corners=False)
            logits = logits[0, :, :y2 - y1, :x2 - x1]
            if preds is None:
                preds = torch.zeros(logits.shape[0], h_img, w_img, dtype=torch.float64)
                count = torch.zeros(h_img, w_img, dtype=torch.float64)
            preds += F.pad(logits, (x1, w_img - x2, y1, h_img - y2))
            count[y1:y2, x1:x2] += 1
    assert count.min() >= 1  # the windows cover the image
    return preds / count


@pytest.mark.parametrize("height, width", [(45, 71), (19, 50)])
def test_slide_matches_the_per_window_reference(height, width):
    model = tiny_model()
    images = torch.randn(2, 3, height, width, dtype=torch.float64)
    stride = default_stride((SIZE, SIZE))[0]
    expected = torch.stack([reference_slide(model, image, SIZE, stride) for image in images])
    for windows_per_batch in (3, 64):
        logits = segment_logits(model, images, windows_per_batch=windows_per_batch)
        assert logits.dtype == torch.float64 and logits.shape == (2, 3, height, width)
        torch.testing.assert_close(logits, expected, rtol=1e-10, atol=1e-10)


def test_official_strides_and_window_cover():
    assert default_stride((512, 512)) == (341, 341) and default_stride((640, 640)) == (426, 426)
    boxes = window_boxes(512, 683, (512, 512), (341, 341))  # ADE20K's usual test size
    assert boxes == [(0, 512, 0, 512), (0, 512, 171, 683)]


def test_whole_image_pads_to_the_model_input():
    model = tiny_model()
    images = torch.randn(1, 3, 27, 31, dtype=torch.float64)
    padded = F.pad(images, (0, SIZE - 31, 0, SIZE - 27))
    expected = F.interpolate(model(padded), size=(SIZE, SIZE), mode="bilinear", align_corners=False)
    expected = expected[..., :27, :31]
    torch.testing.assert_close(segment_logits(model, images, mode="whole"), expected, rtol=0, atol=0)
    with pytest.raises(ValueError, match="mode 'whole' takes images up to"):
        segment_logits(model, torch.randn(1, 3, 40, 20, dtype=torch.float64), mode="whole")
    with pytest.raises(ValueError, match="mode must be one of"):
        segment_logits(model, images, mode="tiles")
