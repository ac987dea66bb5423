"""Named model shapes (``model.preset``): pure constants, so a preset never drifts.

Each preset is a tuple of ``(shape, dtype)`` pairs, one per layer, in upload order. They
mimic real models closely enough to exercise what a platform must get right: mixed dtypes,
0-d and 4-D tensors, an integer counter that must stay an integer.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType

LayerShape = tuple[tuple[int, ...], str]

#: ~1k parameters: two dense layers with biases and one int64 counter.
TINY: tuple[LayerShape, ...] = (
    ((16, 32), "float32"),
    ((32,), "float32"),
    ((32, 12), "float32"),
    ((12,), "float32"),
    ((1,), "int64"),
)

#: ~50k parameters, mixed dtypes: float32 weights, a float64 bias, a float16 matrix and an
#: int32 counter.
SMALL: tuple[LayerShape, ...] = (
    ((256, 128), "float32"),
    ((128,), "float64"),
    ((128, 128), "float16"),
    ((128,), "float32"),
    ((128, 10), "float32"),
    ((10,), "float32"),
    ((1,), "int32"),
)

#: ~1M float32 parameters (about 4 MB per upload) over six layers.
MLP_1M: tuple[LayerShape, ...] = (
    ((1024, 768), "float32"),
    ((768,), "float32"),
    ((768, 256), "float32"),
    ((256,), "float32"),
    ((256, 64), "float32"),
    ((64,), "float32"),
)

#: ~26k parameters shaped like a small CNN: 4-D conv kernels, batch-norm statistics and
#: its 0-d int64 ``num_batches_tracked``, then a dense head.
CNN_SMALL: tuple[LayerShape, ...] = (
    ((16, 3, 3, 3), "float32"),
    ((16,), "float32"),
    ((32, 16, 3, 3), "float32"),
    ((32,), "float32"),
    ((32,), "float32"),  # batch-norm weight
    ((32,), "float32"),  # batch-norm bias
    ((32,), "float32"),  # running mean
    ((32,), "float32"),  # running var
    ((), "int64"),  # num_batches_tracked
    ((10, 2048), "float32"),
    ((10,), "float32"),
)

PRESETS: Mapping[str, tuple[LayerShape, ...]] = MappingProxyType(
    {"tiny": TINY, "small": SMALL, "mlp_1m": MLP_1M, "cnn_small": CNN_SMALL}
)
