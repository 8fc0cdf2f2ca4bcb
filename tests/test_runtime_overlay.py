"""Overlays (runtime/overlay.py): heatmap blend, connected-component boxes, drawing, annotate."""
import numpy as np
import pytest

from edgead.runtime import overlay


def _map_with_blobs():
    amap = np.zeros((64, 80), np.float32)
    amap[10:20, 5:15] = 5.0  # 100 px, peak 5
    amap[14, 9] = 7.0
    amap[40:50, 50:70] = 3.0  # 200 px, peak 3
    amap[60:62, 0:3] = 9.0  # 6 px: below min_area
    return amap


def test_anomaly_boxes_regions_peaks_and_order():
    boxes = overlay.anomaly_boxes(_map_with_blobs(), threshold=1.0, min_area=16)
    assert boxes == [(5, 10, 10, 10, 7.0), (50, 40, 20, 10, 3.0)]
    assert overlay.anomaly_boxes(_map_with_blobs(), threshold=1.0, min_area=1)[0] == (0, 60, 3, 2, 9.0)
    assert overlay.anomaly_boxes(_map_with_blobs(), threshold=4.0, min_area=16) == [(5, 10, 10, 10, 7.0)]
    assert overlay.anomaly_boxes(_map_with_blobs(), threshold=100.0) == []
    assert overlay.anomaly_boxes(_map_with_blobs(), threshold=None) == []
    assert overlay.anomaly_boxes(_map_with_blobs()[None], threshold=4.0) == [(5, 10, 10, 10, 7.0)]


def test_anomaly_boxes_diagonal_is_one_region():
    amap = np.zeros((20, 20), np.float32)
    for i in range(10):
        amap[i, i] = amap[i, i + 1] = 1.0
    assert len(overlay.anomaly_boxes(amap, 0.5, min_area=16)) == 1  # 8-connectivity


def test_heatmap_overlay_colors_and_range():
    image = np.full((16, 16, 3), 100, np.uint8)
    amap = np.zeros((16, 16), np.float32)
    amap[:, 8:] = 10.0
    out = overlay.heatmap_overlay(image, amap, vmin=0.0, vmax=10.0, alpha=1.0)
    assert out.shape == image.shape and out.dtype == np.uint8
    assert out[0, 0, 2] > 100 and out[0, 0, 0] < 50  # low values -> blue (RGB)
    assert out[0, 15, 0] > 100 and out[0, 15, 2] < 50  # high values -> red (RGB)
    half = overlay.heatmap_overlay(image, amap, 0.0, 10.0, alpha=0.0)
    np.testing.assert_array_equal(half, image)
    # vmin/vmax None: the map's own range; a flat map does not divide by zero
    flat = overlay.heatmap_overlay(image, np.ones((16, 16), np.float32), alpha=0.5)
    assert flat.shape == image.shape
    # a smaller map is resized to the image
    small = overlay.heatmap_overlay(np.zeros((32, 32, 3), np.uint8), amap, 0, 10, alpha=1.0)
    assert small.shape == (32, 32, 3) and small[0, 31, 0] > 100


def test_draw_boxes_does_not_modify_input_and_draws_color():
    image = np.zeros((80, 60, 3), np.uint8)
    out = overlay.draw_boxes(image, [(10, 40, 20, 15, 3.5)], color=(255, 0, 0))
    assert image.max() == 0
    assert tuple(out[40, 20]) == (255, 0, 0)  # top edge
    assert tuple(out[54, 20]) == (255, 0, 0)  # bottom edge
    assert tuple(out[47, 10]) == (255, 0, 0) and tuple(out[47, 29]) == (255, 0, 0)  # sides
    assert out[47, 20].max() == 0  # inside stays untouched
    assert out[25:39, 10:30].max() > 0  # the peak label sits above the box
    # no room above: the label goes inside, the top edge stays visible
    top = overlay.draw_boxes(image, [(10, 2, 30, 30, 3.5)], color=(255, 0, 0))
    assert tuple(top[2, 35]) == (255, 0, 0)


def test_scale_boxes():
    assert overlay.scale_boxes([(8, 4, 4, 2, 1.5)], (16, 16), (32, 64)) == [(32, 8, 16, 4, 1.5)]


def test_annotate_text_and_boxes():
    image = np.full((64, 80, 3), 50, np.uint8)
    amap = _map_with_blobs()
    out = overlay.annotate(image, amap, 7.0, threshold=1.0, vmin=0.0, vmax=10.0, image_threshold=6.0)
    assert out.shape == image.shape and out.dtype == np.uint8
    plain = overlay.heatmap_overlay(image, amap, 0.0, 10.0)
    assert (out != plain).any(axis=2).sum() > 50  # boxes and text drawn
    red = (out[..., 0] == 255) & (out[..., 1] == 0) & (out[..., 2] == 0)
    assert red[40, 50:70].all() and red[49, 50:70].all()  # the box around the second region
    uncal = overlay.annotate(image, amap, 7.0, None)
    assert not ((uncal[..., 0] == 255) & (uncal[..., 1] == 0) & (uncal[..., 2] == 0))[30:, :].any()


def test_bad_inputs():
    with pytest.raises(ValueError, match="uint8"):
        overlay.heatmap_overlay(np.zeros((4, 4, 3), np.float32), np.zeros((4, 4)))
    with pytest.raises(ValueError, match=r"\[H, W\]"):
        overlay.anomaly_boxes(np.zeros(5), 1.0)
