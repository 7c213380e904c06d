"""The kernels' numba cache is keyed by all their sources, not only the defining file (numba's own rule)."""

import re
from pathlib import Path

import pytest

from bitrain.deploy import kernel_cache

DEPLOY = Path(kernel_cache.__file__).parent


def _copies(tmp_path):
    paths = []
    for name in kernel_cache.KERNEL_MODULES:
        (tmp_path / name).write_bytes((DEPLOY / name).read_bytes())
        paths.append(tmp_path / name)
    return paths


def test_fingerprint_changes_with_any_kernel_module_and_only_then(tmp_path):
    paths = _copies(tmp_path)
    base = kernel_cache.fingerprint(paths)
    assert base == kernel_cache.fingerprint() and re.fullmatch(r"[0-9a-f]{16}", base)
    seen = {base}
    for path in paths:  # an inlined helper edited alone (counts.py, intrinsics.py) is a new folder too
        original = path.read_bytes()
        path.write_bytes(original + b"# edited\n")
        seen.add(kernel_cache.fingerprint(paths))
        path.write_bytes(original)
    assert len(seen) == len(paths) + 1
    assert kernel_cache.fingerprint(paths) == base


def test_every_module_with_numba_code_is_in_the_fingerprint():
    numba_code = re.compile(r"@jit\b|@intrinsic\b|njit|register_jitable|@overload")
    with_code = {p.name for p in DEPLOY.glob("*.py") if numba_code.search(p.read_text())}
    assert with_code <= set(kernel_cache.KERNEL_MODULES), with_code - set(kernel_cache.KERNEL_MODULES)


def test_base_dir_follows_numba_cache_dir_then_xdg(monkeypatch, tmp_path):
    monkeypatch.setenv("NUMBA_CACHE_DIR", str(tmp_path / "n"))
    assert kernel_cache.base_dir() == tmp_path / "n"
    monkeypatch.delenv("NUMBA_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "x"))
    assert kernel_cache.base_dir() == tmp_path / "x" / "bitrain" / "numba"
    assert kernel_cache.cache_dir() == tmp_path / "x" / "bitrain" / "numba" / f"kernels-{kernel_cache.fingerprint()}"


def test_unwritable_base_means_no_cache(monkeypatch, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    monkeypatch.setenv("NUMBA_CACHE_DIR", str(blocker / "sub"))
    assert kernel_cache.cache_dir() is None


def test_cached_kernels_live_in_the_fingerprint_folder():
    pytest.importorskip("numba", reason="the [fast] extra (numba) is not installed")
    from bitrain.deploy import conv, epilogue, packing

    if packing._CACHE_DIR is None:
        pytest.skip("no writable cache folder on this machine: the kernels are compiled at each start")
    from bitrain.deploy import counts

    for kernel in (conv._conv, epilogue._affine_rows, packing._pack, *_inlined(counts), *_inlined(conv)):
        path = Path(kernel._cache._impl.locator.get_cache_path())
        assert path.is_relative_to(packing._CACHE_DIR), path
        assert packing._CACHE_DIR.name == f"kernels-{kernel_cache.fingerprint()}"


def test_no_kernel_asks_numba_for_its_own_cache():
    """``cache=True`` outside packing.cached_njit would put a kernel back in __pycache__, keyed by one file."""
    for path in DEPLOY.glob("*.py"):
        lines = [line for line in path.read_text().splitlines() if "cache=True" in line]
        assert path.name == "packing.py" and len(lines) == 1 or not lines, (path.name, lines)


def _inlined(module):
    """The module's numba dispatchers (the inline="always" helpers among them)."""
    from numba.core.registry import CPUDispatcher

    return [v for v in vars(module).values() if isinstance(v, CPUDispatcher)]
