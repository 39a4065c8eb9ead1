"""What /proc tells about other processes: the live members of a process group (to stop a
daemon and everything it started), whether one is stopped, the IPv4 TCP sockets of this
network namespace and which a process holds, and, through pidfd_getfd(), whether the sockets of
a running milter have TCP_NODELAY set (without it, a reply written while the MTA's ACK of the
previous one is delayed waits ~40 ms). Linux only; the sockets need ptrace rights over the
process (root, or the same user with ptrace_scope 0)."""

from __future__ import annotations

import ctypes
import os
import socket
from typing import NamedTuple

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


def stopped(pid: int) -> bool:
    """Is process `pid` stopped (SIGSTOP)?"""
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rpartition(")")[2].split()[0] == "T"


class TcpSocket(NamedTuple):
    local_port: int
    remote: tuple[str, int]  # ("0.0.0.0", 0) for a listener
    state: str  # the kernel's hex code: "01" established, "0A" listening
    inode: int


def tcp_sockets() -> list[TcpSocket]:
    """The IPv4 TCP sockets of this network namespace (/proc/net/tcp)."""
    found = []
    with open("/proc/net/tcp") as f:
        next(f)  # the column names
        for line in f:
            parts = line.split()
            local, remote, state, inode = parts[1], parts[2], parts[3], int(parts[9])
            address, port = remote.split(":")
            dotted = socket.inet_ntoa(int(address, 16).to_bytes(4, "little"))
            found.append(
                TcpSocket(int(local.split(":")[1], 16), (dotted, int(port, 16)), state, inode)
            )
    return found


def socket_inodes(pid: int) -> set[int]:
    """The inodes of the sockets process `pid` holds open."""
    inodes = set()
    for name in os.listdir(f"/proc/{pid}/fd"):
        try:
            link = os.readlink(f"/proc/{pid}/fd/{name}")
        except OSError:  # closed meanwhile
            continue
        if link.startswith("socket:["):
            inodes.add(int(link[8:-1]))
    return inodes


def _tcp_inodes(port: int) -> dict[int, str]:
    """inode -> "listen"/"established" for local TCP sockets on 127.0.0.1:port."""
    kinds = {"0A": "listen", "01": "established"}
    return {
        s.inode: kinds[s.state] for s in tcp_sockets() if s.local_port == port and s.state in kinds
    }


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
