"""Loaded at start-up by every Python process of the trapped CLI tests (PYTHONPATH points here).

Every socket connection and name lookup outside loopback is refused and written to the file that
CLINICALBLIP_NET_TRAP names, one line each, with the process id: the test then asserts the file is empty.
Unix sockets and 127.0.0.1 / ::1 / localhost (the serve tests, multiprocessing) pass.
"""

import os
import socket

_LOG = os.environ.get("CLINICALBLIP_NET_TRAP")
_LOCAL_NAMES = {"localhost", "127.0.0.1", "::1", "0.0.0.0", "", None}


def _record(what: str) -> None:
    with open(_LOG, "a", encoding="utf-8") as fh:
        fh.write(f"pid {os.getpid()}: {what}\n")


def _local(address) -> bool:
    if not isinstance(address, tuple):  # AF_UNIX path or abstract name
        return True
    host = address[0]
    return host in _LOCAL_NAMES or str(host).startswith("127.")


if _LOG:
    _connect, _connect_ex, _getaddrinfo = socket.socket.connect, socket.socket.connect_ex, socket.getaddrinfo

    def connect(self, address):
        if not _local(address):
            _record(f"connect {address!r}")
            raise ConnectionRefusedError(f"network trapped by the test: {address!r}")
        return _connect(self, address)

    def connect_ex(self, address):
        if not _local(address):
            _record(f"connect_ex {address!r}")
            return 111
        return _connect_ex(self, address)

    def getaddrinfo(host, *args, **kwargs):
        name = host.decode() if isinstance(host, bytes) else host
        if name not in _LOCAL_NAMES and not str(name).startswith("127."):
            _record(f"getaddrinfo {name!r}")
            raise socket.gaierror(socket.EAI_NONAME, f"network trapped by the test: {name!r}")
        return _getaddrinfo(host, *args, **kwargs)

    socket.socket.connect, socket.socket.connect_ex, socket.getaddrinfo = connect, connect_ex, getaddrinfo
