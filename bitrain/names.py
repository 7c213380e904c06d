"""Every list of valid names, in one place and free of torch (so ``bitrain --help`` stays fast).

The registries (data sets, quantizers, optimizers, lr schedules, initialisations, stems) are built
from these tuples or checked against them by ``tests/test_names.py``; the config's choices, the
help text and the error messages read them from here. Each quantizer's names and bit widths are its
``QUANTIZER_NAMES`` row (``bitrain.binary.quantizers`` attaches its functions to it); ``flag`` spells
an option's command-line flag for every error message.
"""

from __future__ import annotations

from dataclasses import dataclass


def flag(name: str) -> str:
    """The command-line flag of an option or keyword: ``clip_threshold`` -> ``--clip-threshold``."""
    return "--" + name.replace("_", "-")


# data (bitrain.data; the data sets themselves, with their defaults, are bitrain.data.sets.DATA_SETS)
# BMXNet's --augmentation levels (ImageNet) plus explicit ones for the in-memory sets
AUGMENTATIONS = ("none", "low", "medium", "high", "crop", "crop-flip")

# binary layers (bitrain.binary)
BITS = (1, 2, 3, 4, 5, 6, 7, 8, 32)  # 32 = full precision
ONE_BIT, K_BIT, FULL = (1,), (1, 2, 3, 4, 5, 6, 7, 8), (32,)  # the widths a quantizer takes


@dataclass(frozen=True)
class QuantizerName:
    """A quantizer's names and the widths it takes: the torch-free half of its record. Each row gets one
    ``QuantizerSpec`` (its functions and properties) in ``bitrain.binary.quantizers``; a test holds both to one set."""

    name: str
    bits: tuple[int, ...]  # the widths it accepts; 32 with a smaller width: it has a full-precision form
    aliases: tuple[str, ...] = ()  # larq / bitorch / BMXNet names for the same function


QUANTIZER_NAMES = (
    QuantizerName("det_sign", ONE_BIT, ("ste_sign", "sign")),
    QuantizerName("approx_sign", ONE_BIT + FULL, ("sign_approx_sign", "approxsign")),  # 32 bits: the polynomial
    QuantizerName("swish_sign", ONE_BIT, ("swishsign",)),
    QuantizerName("ste_heaviside", ONE_BIT),
    QuantizerName("steheaviside", ONE_BIT),
    QuantizerName("magnitude_aware_sign", ONE_BIT),
    QuantizerName("round", K_BIT),
    QuantizerName("dorefa", K_BIT),
    QuantizerName("dorefa_quantizer", K_BIT),
    QuantizerName("ste_tern", (2,)),
    QuantizerName("identity", FULL),
    QuantizerName("relu", FULL),
    QuantizerName("clip", FULL),
    QuantizerName("leaky_clip", FULL),
)
#: every quantizer name, aliases included -> its row
QUANTIZERS_BY_NAME = {n: q for q in QUANTIZER_NAMES for n in (q.name, *q.aliases)}
# the quantizers that take every width 2..8 (BMXNet's round / dorefa, larq's DoReFa)
KBIT_QUANTIZERS = tuple(q.name for q in QUANTIZER_NAMES if set(K_BIT[1:]) <= set(q.bits))


def fits(name: str, bits: int, kind: str = "activation") -> bool:
    """True when quantizer ``name`` (or alias) takes ``bits``-bit ``kind``s (activation or weight); at 32 bits
    weights are taken as they are, so only ``identity`` fits them."""
    q = QUANTIZERS_BY_NAME.get(name)
    if q is None or bits not in q.bits:
        return False
    return bits != 32 or kind != "weight" or q.name == "identity"


def quantizers_for(bits: int, kind: str = "activation") -> list[str]:
    """The quantizer names (aliases included, sorted) that fit ``bits``-bit ``kind``s."""
    return sorted(n for n in QUANTIZERS_BY_NAME if fits(n, bits, kind))


def default_quantizer(bits: int, kind: str = "activation") -> str:
    """BMXNet's default quantizer for a bit width: det_sign (1), round/dorefa (2-8), identity (32)."""
    if bits == 1:
        return "det_sign"
    if bits == 32:
        return "identity"
    return "round" if kind == "activation" else "dorefa"


APPROXIMATIONS = ("", "xnor", "binet")  # weight (and input) scaling of a binary layer
PACKED_KERNELS = ("auto", "numba", "torch")  # packed 1-bit inference (load_packed, $BITRAIN_KERNEL)

# models (bitrain.models)
STEMS = ("imagenet", "grouped_stem", "thumbnail")  # --initial-layers; the first is the default
INITIALIZATIONS = ("gaussian", "default", "msraprelu_avg", "msraprelu_in")  # the first is the default
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
# --logger: where the metrics go (a comma list); the last two are optional extras, imported only when asked for
LOGGERS = ("tensorboard", "csv", "mlflow", "wandb")
DEFAULT_LOGGERS = "tensorboard,csv"
