"""Pictures of anomaly maps: JET heatmap overlays, boxes around anomalous regions, score text.

Generic (numpy + OpenCV, torch-free): used by ``edgead run``, the workstation demo and eval.
Images are RGB uint8 ``[H, W, 3]``; anomaly maps are float ``[H, W]`` (``[1, H, W]`` accepted) in
anomaly-score units. A map of another size than the image is resized to it (bilinear).
Every function returns a new array and leaves its inputs untouched.
"""
import cv2
import numpy as np

ANOMALY_COLOR = (255, 0, 0)  # RGB red
OK_COLOR = (0, 200, 0)


def _as_map(anomaly_map, shape=None):
    amap = np.asarray(anomaly_map, dtype=np.float32)
    amap = amap.reshape(amap.shape[-2:]) if amap.ndim > 2 else amap
    if amap.ndim != 2:
        raise ValueError("anomaly_map must be [H, W], got shape {}".format(np.shape(anomaly_map)))
    if shape is not None and amap.shape != tuple(shape[:2]):
        amap = cv2.resize(amap, (shape[1], shape[0]), interpolation=cv2.INTER_LINEAR)
    return amap


def _as_image(image_rgb):
    image = np.asarray(image_rgb)
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError("image_rgb must be uint8 [H, W, 3], got {} {}".format(image.dtype, image.shape))
    return image


def heatmap_overlay(image_rgb, anomaly_map, vmin=None, vmax=None, alpha=0.5):
    """Blend a JET heatmap of ``anomaly_map`` over ``image_rgb``.

    vmin/vmax: map values shown as blue/red (None: the map's own min/max). alpha: heatmap weight.
    Returns uint8 ``[H, W, 3]`` RGB.
    """
    image = _as_image(image_rgb)
    amap = _as_map(anomaly_map, image.shape)
    lo = float(np.min(amap)) if vmin is None else float(vmin)
    hi = float(np.max(amap)) if vmax is None else float(vmax)
    scale = 255.0 / (hi - lo) if hi > lo else 0.0
    levels = np.clip((amap - lo) * scale, 0, 255).astype(np.uint8)
    heat = cv2.cvtColor(cv2.applyColorMap(levels, cv2.COLORMAP_JET), cv2.COLOR_BGR2RGB)
    return cv2.addWeighted(heat, float(alpha), np.ascontiguousarray(image), 1.0 - float(alpha), 0.0)


def anomaly_boxes(anomaly_map, threshold, min_area=16):
    """Connected regions (8-connectivity) of ``anomaly_map > threshold`` with at least ``min_area`` pixels.

    Returns a list of ``(x, y, w, h, peak)`` (ints in map pixels, peak = max map value inside the
    region, float), highest peak first. ``threshold`` None -> ``[]`` (uncalibrated model).
    """
    if threshold is None:
        return []
    amap = _as_map(anomaly_map)
    mask = (amap > float(threshold)).astype(np.uint8)
    if not mask.any():
        return []
    count, labels, stats, _ = cv2.connectedComponentsWithStats(mask, connectivity=8)
    boxes = []
    for label in range(1, count):
        x, y, w, h, area = (int(v) for v in stats[label])
        if area < min_area:
            continue
        window = amap[y:y + h, x:x + w]
        peak = float(window[labels[y:y + h, x:x + w] == label].max())
        boxes.append((x, y, w, h, peak))
    boxes.sort(key=lambda b: -b[4])
    return boxes


def _thickness(shape):
    return max(1, int(round(min(shape[:2]) / 200.0)))


def _font_scale(shape):
    return max(0.3, min(shape[:2]) / 600.0)


def _label(image, text, org, color):
    """Text with a filled dark background at ``org`` (x, y top-left), in place."""
    scale, thick = _font_scale(image.shape), _thickness(image.shape)
    (tw, th), base = cv2.getTextSize(text, cv2.FONT_HERSHEY_SIMPLEX, scale, thick)
    x = int(min(max(org[0], 0), max(0, image.shape[1] - tw - 2)))
    y = int(min(max(org[1], 0), max(0, image.shape[0] - th - base - 2)))
    cv2.rectangle(image, (x, y), (x + tw + 2, y + th + base + 2), (0, 0, 0), -1)
    cv2.putText(image, text, (x + 1, y + th + 1), cv2.FONT_HERSHEY_SIMPLEX, scale, color, thick, cv2.LINE_AA)


def draw_boxes(image_rgb, boxes, color=ANOMALY_COLOR):
    """Draw ``(x, y, w, h, peak)`` boxes with their peak value. Returns a new uint8 ``[H, W, 3]``."""
    out = np.ascontiguousarray(_as_image(image_rgb)).copy()
    thick = _thickness(out.shape)
    for box in boxes:
        x, y, w, h = (int(v) for v in box[:4])
        cv2.rectangle(out, (x, y), (x + w - 1, y + h - 1), tuple(int(c) for c in color), thick)
        if len(box) > 4 and box[4] is not None:
            text = "{:.1f}".format(float(box[4]))
            (_, th), base = cv2.getTextSize(text, cv2.FONT_HERSHEY_SIMPLEX, _font_scale(out.shape), thick)
            label_h = th + base + 2
            # above the box when there is room, else just inside it (never over the top edge)
            top = y - label_h - 1 if y - label_h - 1 >= 0 else y + thick
            _label(out, text, (x + thick, top), color)
    return out


def scale_boxes(boxes, from_hw, to_hw):
    """Boxes in a ``from_hw`` map -> pixel boxes in a ``to_hw`` image (peaks unchanged)."""
    sy, sx = float(to_hw[0]) / from_hw[0], float(to_hw[1]) / from_hw[1]
    out = []
    for x, y, w, h, peak in boxes:
        x0, y0 = int(np.floor(x * sx)), int(np.floor(y * sy))
        x1, y1 = int(np.ceil((x + w) * sx)), int(np.ceil((y + h) * sy))
        out.append((x0, y0, max(1, x1 - x0), max(1, y1 - y0), peak))
    return out


def annotate(image_rgb, anomaly_map, score, threshold, vmin=None, vmax=None, image_threshold=None, boxes=None,
             min_area=16, alpha=0.5):
    """Heatmap overlay + boxes of ``anomaly_map > threshold`` + score text. Returns uint8 ``[H, W, 3]``.

    threshold: pixel threshold for boxes (None: no boxes). image_threshold: score threshold for the
    ANOMALY/OK verdict (defaults to ``threshold``; None for both: "uncalibrated").
    boxes: precomputed boxes in image pixels (skips ``anomaly_boxes``); min_area in map pixels.
    """
    image = _as_image(image_rgb)
    amap = _as_map(anomaly_map)
    out = heatmap_overlay(image, amap, vmin, vmax, alpha)
    if boxes is None:
        boxes = scale_boxes(anomaly_boxes(amap, threshold, min_area), amap.shape, image.shape)
    out = draw_boxes(out, boxes)
    verdict_threshold = threshold if image_threshold is None else image_threshold
    if verdict_threshold is None:
        text, color = "score {:.2f} (uncalibrated)".format(float(score)), (255, 255, 255)
    elif float(score) > float(verdict_threshold):
        text, color = "ANOMALY {:.2f} > {:.2f}".format(float(score), float(verdict_threshold)), ANOMALY_COLOR
    else:
        text, color = "OK {:.2f} <= {:.2f}".format(float(score), float(verdict_threshold)), OK_COLOR
    _label(out, text, (2, 2), color)
    return out
