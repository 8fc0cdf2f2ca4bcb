"""CFLOW-AD's decoders: conditional normalizing flows over patch features, in two forms.

Training form (``make_decoder``): FrEIA's ``SequenceINN`` of ``AllInOneBlock`` coupling blocks, as the paper's code
and anomalib build it: affine coupling with soft clamping ``alpha tanh``, a subnet ``Linear(s1 + K, 2 (s1 + K)),
ReLU, Linear(., 2 s2)`` of the passive half ``x1`` (``s1 = C - C // 2`` channels) and the condition, a global
affine ("ActNorm", SOFTPLUS activation) and a hard channel permutation per block. The permutations come from our
seeded generator (FrEIA draws them from numpy's global one) and are stored as indices, not FrEIA's two dense
``[C, C]`` matrices.

Inference form (``compile_decoder``): the same function with every constant folded, shared by the torch scoring
head (``edgead.cflow.model.CflowHead``) and the ONNX head (``edgead.exporters.cflow_head``). Patches are channel
first, ``x [N, C, P]``, so a permutation moves whole rows of P values (a cheap Gather on axis 1) and the front end
needs no transpose. Per block, at patch position ``p``::

    h    = relu(A1 x1 + q[:, p])             A1 = W1[:, :s1], q = W1[:, s1:] pe^T + b1  ([H, P], one per scale)
    s    = alpha tanh(As h + bs)             As, bs = 0.1 W2[:s2], 0.1 b2[:s2]
    x2'  = x2 exp(s) + (At h + bt)           At, bt = 0.1 W2[s2:], 0.1 b2[s2:]
    x    = (concat(x1, x2') g + o)[perm]     g = 0.1 softplus_0.5(global_scale), o = global_offset
    log|det J| += sum(s) + sum(log g)

``q`` is folded from the positional encoding ``pe [P, K]`` (``positional_encoding``) and the condition columns of
``W1``: the condition is a constant of the patch position, so a third or more of the first layer's work goes.
The log-likelihood per dimension of a patch is ``(-C/2 log(2 pi) - |z|^2 / 2 + log|det J|) / C``.
"""
import math

import numpy as np

#: Condition vector size K (the paper's and anomalib's 128), a multiple of 4
CONDITION_DIM = 128
#: Coupling blocks per decoder (the paper's 8)
COUPLING_BLOCKS = 8
#: Soft clamp alpha of the coupling's log-scale (the paper's 1.9)
CLAMP_ALPHA = 1.9
#: Hidden width of the coupling subnet as a multiple of its input width (FrEIA ``subnet_fc``: 2)
HIDDEN_RATIO = 2
#: FrEIA AllInOneBlock's scale of the subnet output and of its SOFTPLUS global affine
_COUPLING_SCALE = 0.1
_SOFTPLUS_BETA = 0.5
#: ``-log(sqrt(2 pi))``: the log-density of a standard normal at 0, per dimension
LOG_NORMAL_CONSTANT = -0.5 * math.log(2.0 * math.pi)


def splits(channels):
    """``(s1, s2)``: the passive and the active half of ``channels`` (FrEIA: ``C - C // 2``, ``C // 2``)."""
    channels = int(channels)
    return channels - channels // 2, channels // 2


def hidden_width(channels, condition_dim=CONDITION_DIM):
    """Subnet hidden width ``H = 2 (s1 + K)``."""
    return HIDDEN_RATIO * (splits(channels)[0] + int(condition_dim))


def positional_encoding(condition_dim, height, width):
    """2-D sinusoidal encoding of the patch positions: float64 ``[height * width, K]`` (row ``y * width + x``).

    As the paper's code (anomalib ``positional_encoding_2d``): half of the K channels encode the column, half the
    row, alternating sin and cos at frequencies ``10000^(-2i / (K/2))``.
    """
    condition_dim, height, width = int(condition_dim), int(height), int(width)
    if condition_dim % 4 or condition_dim < 4:
        raise ValueError("the condition size must be a positive multiple of 4, got {}".format(condition_dim))
    half = condition_dim // 2
    frequencies = np.exp(np.arange(0.0, half, 2.0) * -(math.log(1e4) / half))  # [K / 4]
    columns = np.arange(width, dtype=np.float64)[:, None] * frequencies  # [W, K / 4]
    rows = np.arange(height, dtype=np.float64)[:, None] * frequencies  # [H, K / 4]
    encoding = np.zeros((height, width, condition_dim), np.float64)
    encoding[:, :, 0:half:2] = np.sin(columns)[None, :, :]
    encoding[:, :, 1:half:2] = np.cos(columns)[None, :, :]
    encoding[:, :, half::2] = np.sin(rows)[:, None, :]
    encoding[:, :, half + 1::2] = np.cos(rows)[:, None, :]
    return encoding.reshape(height * width, condition_dim)


def block_permutations(channels, blocks, seed, scale):
    """int64 ``[blocks, channels]``: each block's output channel order (``out = v[perm]``), seeded per scale."""
    rng = np.random.default_rng([int(seed), 0xCF10, int(scale)])
    return np.stack([rng.permutation(int(channels)) for _ in range(int(blocks))]).astype(np.int64)


def _subnet(dims_in, dims_out):
    from torch import nn

    return nn.Sequential(nn.Linear(dims_in, HIDDEN_RATIO * dims_in), nn.ReLU(), nn.Linear(HIDDEN_RATIO * dims_in,
                                                                                            dims_out))


def make_decoder(channels, permutations, condition_dim=CONDITION_DIM, clamp_alpha=CLAMP_ALPHA):
    """The training form: FrEIA ``SequenceINN`` of ``len(permutations)`` AllInOneBlocks over ``channels``-vectors,
    conditioned on ``condition_dim``-vectors. Subnet weights are initialised from torch's global generator (seed it
    first); the permutations are ``permutations`` (``block_permutations``). Call: ``z, log_jac = decoder(x, [c])``."""
    import torch
    from FrEIA.framework import SequenceINN
    from FrEIA.modules import AllInOneBlock

    decoder = SequenceINN(int(channels))
    for perm in np.asarray(permutations, np.int64):
        decoder.append(AllInOneBlock, cond=0, cond_shape=(int(condition_dim),), subnet_constructor=_subnet,
                       affine_clamping=float(clamp_alpha), global_affine_type="SOFTPLUS", permute_soft=False)
        block = decoder.module_list[-1]
        matrix = torch.zeros(int(channels), int(channels))
        matrix[torch.arange(int(channels)), torch.from_numpy(perm)] = 1.0  # F.linear(v, w): out[i] = v[perm[i]]
        block.w_perm.data.copy_(matrix)
        block.w_perm_inv.data.copy_(matrix.t())
    return decoder


def log_likelihood_per_dim(z, log_jac_det):
    """Training form's output -> log-likelihood per dimension ``[B]``: ``(C log N(0) - |z|^2 / 2 + log|det|) / C``."""
    channels = z.shape[1]
    return (channels * LOG_NORMAL_CONSTANT - 0.5 * (z * z).sum(dim=1) + log_jac_det) / channels


# ---- parameters: what the bundle stores, and the folded inference form ------------------------------------------
#: Per-block tensors a bundle stores (``cflow.scale{l}.block{b}.<name>``), with their shapes
BLOCK_TENSORS = ("subnet_in_weight", "subnet_in_bias", "subnet_out_weight", "subnet_out_bias", "global_scale",
                 "global_offset", "permutation")


def block_shapes(channels, condition_dim=CONDITION_DIM):
    """``{name: shape}`` of one block's stored tensors (``BLOCK_TENSORS``)."""
    s1, s2 = splits(channels)
    hidden = hidden_width(channels, condition_dim)
    return {"subnet_in_weight": (hidden, s1 + int(condition_dim)), "subnet_in_bias": (hidden,),
            "subnet_out_weight": (2 * s2, hidden), "subnet_out_bias": (2 * s2,), "global_scale": (int(channels),),
            "global_offset": (int(channels),), "permutation": (int(channels),)}


def decoder_parameters(decoder, permutations):
    """Training form -> the stored tensors: a list (one dict per block, keys ``BLOCK_TENSORS``) of float32 / int64
    numpy arrays."""
    blocks = []
    for block, perm in zip(decoder.module_list, np.asarray(permutations, np.int64)):
        blocks.append({
            "subnet_in_weight": block.subnet[0].weight.detach().cpu().numpy().astype(np.float32),
            "subnet_in_bias": block.subnet[0].bias.detach().cpu().numpy().astype(np.float32),
            "subnet_out_weight": block.subnet[2].weight.detach().cpu().numpy().astype(np.float32),
            "subnet_out_bias": block.subnet[2].bias.detach().cpu().numpy().astype(np.float32),
            "global_scale": block.global_scale.detach().cpu().numpy().reshape(-1).astype(np.float32),
            "global_offset": block.global_offset.detach().cpu().numpy().reshape(-1).astype(np.float32),
            "permutation": np.array(perm, np.int64),
        })
    return blocks


def load_decoder(blocks, condition_dim=CONDITION_DIM, clamp_alpha=CLAMP_ALPHA):
    """The stored tensors (``decoder_parameters``) -> the training form (FrEIA), e.g. to check a bundle against it."""
    import torch

    permutations = [b["permutation"] for b in blocks]
    decoder = make_decoder(len(permutations[0]), permutations, condition_dim, clamp_alpha)
    with torch.no_grad():
        for block, stored in zip(decoder.module_list, blocks):
            block.subnet[0].weight.copy_(torch.as_tensor(stored["subnet_in_weight"]))
            block.subnet[0].bias.copy_(torch.as_tensor(stored["subnet_in_bias"]))
            block.subnet[2].weight.copy_(torch.as_tensor(stored["subnet_out_weight"]))
            block.subnet[2].bias.copy_(torch.as_tensor(stored["subnet_out_bias"]))
            block.global_scale.copy_(torch.as_tensor(stored["global_scale"]).reshape(block.global_scale.shape))
            block.global_offset.copy_(torch.as_tensor(stored["global_offset"]).reshape(block.global_offset.shape))
    return decoder


def softplus_scale(global_scale):
    """float64 ``g = 0.1 softplus_0.5(global_scale) = 0.2 log(1 + exp(0.5 a))`` (FrEIA's SOFTPLUS activation)."""
    a = np.asarray(global_scale, np.float64)
    return _COUPLING_SCALE * np.logaddexp(0.0, _SOFTPLUS_BETA * a) / _SOFTPLUS_BETA


def compile_decoder(blocks, encoding, clamp_alpha=CLAMP_ALPHA):
    """The inference form of one scale's decoder (module docstring), folded in float64, returned as float32 numpy,
    laid out for channel-first patches ``[N, C, P]`` (matrices multiply from the left, as ``nn.Linear`` stores them).

    blocks: the stored tensors (``decoder_parameters``); encoding: ``positional_encoding`` ``[P, K]`` float64.
    Returns a dict: ``blocks`` (per block ``in_weight [H, s1]``, ``condition_weight [H, K]``, ``in_bias [H]``,
    ``scale_weight [s2, H]``, ``scale_bias [s2]``, ``shift_weight [s2, H]``, ``shift_bias [s2]``, ``gain [C]``,
    ``offset [C]``, ``permutation [C]`` int64), ``encoding [K, P]`` (transposed), ``clamp`` (float),
    ``log_det_constant`` (float: ``sum over blocks of sum(log g)``), ``channels``, ``split`` (s1).
    ``q^T = condition_weight @ encoding + in_bias`` ``[H, P]`` is left to the consumer (torch: once at load; ONNX: a
    constant subgraph folded by the runtime at load), so files store ``[H, K]`` per block, not ``[H, P]``.
    """
    channels = len(blocks[0]["permutation"])
    s1, s2 = splits(channels)
    compiled, log_det = [], 0.0
    for stored in blocks:
        w_in = np.asarray(stored["subnet_in_weight"], np.float64)
        w_out = np.asarray(stored["subnet_out_weight"], np.float64) * _COUPLING_SCALE
        b_out = np.asarray(stored["subnet_out_bias"], np.float64) * _COUPLING_SCALE
        gain = softplus_scale(stored["global_scale"])
        log_det += float(np.log(gain).sum())
        compiled.append({
            "in_weight": w_in[:, :s1], "condition_weight": w_in[:, s1:],
            "in_bias": np.asarray(stored["subnet_in_bias"], np.float64),
            "scale_weight": w_out[:s2], "scale_bias": b_out[:s2],
            "shift_weight": w_out[s2:], "shift_bias": b_out[s2:],
            "gain": gain, "offset": np.asarray(stored["global_offset"], np.float64),
            "permutation": np.asarray(stored["permutation"], np.int64),
        })
    as32 = [{k: (v if v.dtype == np.int64 else np.ascontiguousarray(v, np.float32)) for k, v in b.items()}
            for b in compiled]
    return {"blocks": as32, "encoding": np.ascontiguousarray(np.asarray(encoding, np.float64).T, np.float32),
            "clamp": float(clamp_alpha), "log_det_constant": log_det, "channels": channels, "split": s1}


#: Inference-form matrices an fp16 export stores as float16 (biases, gains, offsets and the encoding stay float32)
FP16_MATRICES = ("in_weight", "condition_weight", "scale_weight", "shift_weight")


def with_storage_precision(compiled, precision):
    """``compile_decoder`` output with ``FP16_MATRICES`` rounded through float16 (``precision`` ``fp16``), as an fp16
    export stores them; ``fp32``: unchanged."""
    if precision == "fp32":
        return compiled
    if precision != "fp16":
        raise ValueError("precision must be 'fp32' or 'fp16', not {!r}".format(precision))
    blocks = [{k: (v.astype(np.float16).astype(np.float32) if k in FP16_MATRICES else v) for k, v in b.items()}
              for b in compiled["blocks"]]
    return dict(compiled, blocks=blocks)
