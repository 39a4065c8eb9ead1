"""What /proc tells about other processes: the live members of a process group (to stop a
daemon and everything it started), and, through pidfd_getfd(), whether the sockets of a
running milter have TCP_NODELAY set (without it, a reply written while the MTA's ACK of the
previous one is delayed waits ~40 ms). Linux only; the sockets need ptrace rights over the
process (root, or the same user with ptrace_scope 0)."""

from __future__ import annotations

import ctypes
import os
import socket

_SYS_PIDFD_GETFD = 438  # same number on x86_64 and aarch64
_libc = ctypes.CDLL(None, use_errno=True)


def group_members(pgid: int) -> list[int]:
    """Live (non-zombie) processes in process group ``pgid``."""
    members = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if fields[0] != "Z" and int(fields[2]) == pgid:
            members.append(int(entry))
    return members


def _tcp_inodes(port: int) -> dict[int, str]:
    """inode -> "listen"/"established" for local TCP sockets on 127.0.0.1:port."""
    out = {}
    with open("/proc/net/tcp") as f:
        next(f)
        for line in f:
            parts = line.split()
            local, state, inode = parts[1], parts[3], int(parts[9])
            if int(local.split(":")[1], 16) != port:
                continue
            if state == "0A":
                out[inode] = "listen"
            elif state == "01":
                out[inode] = "established"
    return out


def socket_nodelay(pid: int, port: int) -> list[tuple[str, bool]]:
    """(kind, TCP_NODELAY) for each of the process's TCP sockets on `port`: the listening
    socket and the accepted connections, read with getsockopt on a pidfd_getfd() copy."""
    inodes = _tcp_inodes(port)
    found = []
    pidfd = os.pidfd_open(pid)
    try:
        for name in os.listdir(f"/proc/{pid}/fd"):
            try:
                link = os.readlink(f"/proc/{pid}/fd/{name}")
            except OSError:
                continue
            if not link.startswith("socket:["):
                continue
            kind = inodes.get(int(link[8:-1]))
            if kind is None:
                continue
            fd = _libc.syscall(_SYS_PIDFD_GETFD, pidfd, int(name), 0)
            if fd < 0:
                raise OSError(ctypes.get_errno(), "pidfd_getfd failed")
            with socket.socket(fileno=fd) as s:
                found.append((kind, bool(s.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))))
    finally:
        os.close(pidfd)
    return found
