"""bitrain.deploy.memory: keeping freed memory in the process (glibc), so a large tensor made again does not page-fault."""

from __future__ import annotations

import subprocess
import sys

import pytest

# a 64 MiB tensor written and freed, sixteen times: the minor page faults of the last write. glibc takes
# up to about eight rounds to settle on blocks it reuses (the heap grows until freed blocks coalesce into
# one that fits torch's aligned request; where small allocations land decides how soon), so eight rounds
# were not always enough. torch, not numpy: numpy asks for huge pages itself.
PROBE = """
import resource, sys
import torch
if sys.argv[1] == "keep":
    from bitrain.deploy.memory import keep_freed_memory
    print(keep_freed_memory())
    print(keep_freed_memory())
def faults(): return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(16):
    before = faults()
    b = torch.ones(16 << 20)
    del b
print(faults() - before)
"""


def _last_write_faults(mode: str) -> tuple[list[str], int]:
    out = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True, check=True).stdout
    lines = out.splitlines()
    return lines[:-1], int(lines[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="mallopt is glibc's")
def test_keep_freed_memory_stops_the_page_faults_of_a_large_tensor_made_again():
    _, plain = _last_write_faults("system")
    lines, kept = _last_write_faults("keep")
    if not lines[0].startswith("allocator: glibc"):
        pytest.skip(f"not glibc here: {lines[0]}")
    assert lines == [lines[0]] * 2  # one setting per process, the same line on a second call
    pages = (64 << 20) // 4096
    assert plain > pages // 2  # the system allocator maps the block afresh: a fault per page
    assert kept < pages // 20, (plain, kept)
