"""Giving memory back: a freed large block leaves the process at once; the heap's free pages can be returned."""

from __future__ import annotations

import subprocess
import sys

# In a process of its own (mallopt changes the whole process): 200 blocks of 2 MiB, freed; RSS before and after.
PROBE = """
import sys
from gateway import memory
def rss_kib():
    return int(open('/proc/self/statm').read().split()[1]) * 4
if sys.argv[1] == 'separately':
    assert memory.map_large_blocks_separately()
base = rss_kib()
for _ in range(3):
    blocks = [bytearray(2 * 1024 * 1024) for _ in range(100)]
    for b in blocks:
        b[::4096] = b"x" * len(b[::4096])
    del blocks
print(rss_kib() - base)
"""


def grown_kib(mode: str) -> int:
    out = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True, check=True)
    return int(out.stdout)


def test_large_blocks_mapped_separately_leave_the_process_when_freed() -> None:
    assert grown_kib("default") > 100 * 1024  # glibc's own way: the freed 200 MiB stay with the process
    assert grown_kib("separately") < 16 * 1024


TREE = """
from lxml import etree
from gateway import memory
def rss_kib():
    return int(open('/proc/self/statm').read().split()[1]) * 4
base = rss_kib()
root = etree.fromstring(b"<r>" + b"<a>1</a>" * 300_000 + b"</r>")  # ~70 MiB of small nodes
del root
freed = rss_kib() - base
memory.trim()
print(freed, rss_kib() - base)
"""


def test_trim_returns_what_a_freed_tree_of_small_nodes_left_in_the_heap() -> None:
    out = subprocess.run([sys.executable, "-c", TREE], capture_output=True, text=True, check=True)
    freed, trimmed = map(int, out.stdout.split())
    assert freed > 32 * 1024 and trimmed < 8 * 1024, (freed, trimmed)
