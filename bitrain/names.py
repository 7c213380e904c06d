"""Every list of valid names, in one place and free of torch (so ``bitrain --help`` stays fast).

The registries (data sets, quantizers, optimizers, lr schedules, initialisations, stems) are built
from these tuples or checked against them by ``tests/test_names.py``; the config's choices, the
help text and the error messages read them from here.
"""

from __future__ import annotations

# data (bitrain.data; the data sets themselves, with their defaults, are bitrain.data.sets.DATA_SETS)
# BMXNet's --augmentation levels (ImageNet) plus explicit ones for the in-memory sets
AUGMENTATIONS = ("none", "low", "medium", "high", "crop", "crop-flip")

# binary layers (bitrain.binary)
BITS = (1, 2, 3, 4, 5, 6, 7, 8, 32)  # 32 = full precision
KBIT_QUANTIZERS = ("round", "dorefa", "dorefa_quantizer")  # the quantizers that take 2..8 bits (BMXNet, larq)
APPROXIMATIONS = ("", "xnor", "binet")  # weight (and input) scaling of a binary layer
PACKED_KERNELS = ("auto", "numba", "torch")  # packed 1-bit inference (load_packed, $BITRAIN_KERNEL)

# models (bitrain.models)
STEMS = ("imagenet", "grouped_stem", "thumbnail")  # --initial-layers
INITIALIZATIONS = ("gaussian", "default", "msraprelu_avg", "msraprelu_in")
# architecture options (BMXNet flag names with - -> _) that build_model passes through to builders
ARCH_OPTIONS = (
    "fp_downsample_sc",
    "pool_downsample_sc",
    "downsample_sc_groups",
    "slices",
    "reduction",
    "growth_rate",
    "init_features",
    "downsample_structure",
    "block_config",
    "dilated",
)
ARCH_FLAGS = ("fp_downsample_sc", "pool_downsample_sc", "dilated")  # store_true options: False means "not given"

# training (bitrain.train)
OPTIMIZERS = ("sgd", "nag", "adam", "radam", "adamw", "bop")
LR_MODES = ("step", "poly", "cosine", "linear")
DTYPES = ("float32", "bfloat16", "float16")  # compute dtype; the last two through autocast
