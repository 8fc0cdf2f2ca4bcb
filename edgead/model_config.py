"""The model.json fields every method shares, built one way for all of them (``edgead.fit``, ``edgead.patchcore``)."""
from edgead import backbones, blur
from edgead.errors import ConfigError


def shared_config(method, backbone_name, weights_description, extractor, input_hw, out_indices, blur_sigma=4.0):
    """model.json dict with ``method``, ``backbone``, ``input``, ``postprocess`` and ``calibration`` (None) filled in,
    and ``embedding.grid`` (``input // strides[0]``); the method adds the rest.

    extractor: the truncated backbone (``backbones.create_feature_extractor``) returning the stages ``out_indices``.
    ConfigError when the input size is not a multiple of the deepest stride.
    """
    spec = backbones.get_spec(backbone_name)
    height, width = (int(v) for v in input_hw)
    channels, strides = backbones.stage_info(extractor)
    if height % strides[-1] or width % strides[-1]:
        raise ConfigError("input size {}x{} must be a multiple of {}".format(height, width, strides[-1]))
    return {
        "method": method,
        "backbone": {
            "name": spec.name,
            "arch": backbones.arch_name(spec),
            "out_indices": [int(i) for i in out_indices],
            "strides": strides,
            "channels": channels,
            "weights": weights_description,
        },
        "input": {
            "height": height,
            "width": width,
            "mean": list(spec.mean),
            "std": list(spec.std),
            "channel_order": "RGB",
            "resize": "area",
        },
        "embedding": {"grid": [height // strides[0], width // strides[0]]},
        "postprocess": {"blur_sigma": float(blur_sigma), "blur_radius": blur.blur_radius(blur_sigma)},
        "calibration": None,
    }
