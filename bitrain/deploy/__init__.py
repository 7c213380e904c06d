"""The packed 1-bit inference engine: above the zoo and the quantizers, below the CLI; nothing under it
imports it (an import-linter contract in pyproject.toml).

- ``export.py``: the packed safetensors format, ``export_packed`` and ``read_metadata``;
  ``settings.py``: ``LayerSettings``, one packed layer's settings (frozen);
- ``load.py``: ``load_packed`` (``bitrain.load_packed``), then the load-time module swaps;
- ``packed.py``: ``PackedQLayer`` and the choice of its kernel; ``reference.py``: the torch reference's
  bit helpers; ``batchnorm.py``: a BatchNorm moved into the conv before it (the kernel's epilogue);
- ``fused.py``: residual blocks as one kernel call each; ``stem.py``: the channels_last stem swaps;
- ``packing.py`` (signs to 64-bit words), ``conv.py`` (the xnor-popcount conv), ``intrinsics.py``
  (llvmlite pieces): numba's kernels, the optional ``[fast]`` extra;
- ``memory.py``: the allocator setting for inference-only commands.
"""
