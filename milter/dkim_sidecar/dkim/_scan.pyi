# Type stub of the C helper in _scan.c.
from typing import TypeVar

_B = TypeVar("_B", bytes, memoryview)

BARE_LF: int
LONG_LINE: int
SIMD: str  # the path chosen: "avx2" or "sse2" (x86-64), "swar" (portable)

def edge(data: bytes, prev: int, line_len: int, limit: int, /) -> tuple[int, int]: ...
def relax(data: _B, /) -> _B | bytes: ...
