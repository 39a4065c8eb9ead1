# Type stub of the C helper in _scan.c.
BARE_LF: int
TAB: int
SPACE_RUN: int
SPACE_CRLF: int
LONG_LINE: int

def scan(data: bytes, prev: int, line_len: int, limit: int, /) -> tuple[int, int]: ...
