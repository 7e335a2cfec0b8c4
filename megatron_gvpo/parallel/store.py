"""TCPStore servers that listen on one address, not on every interface.

``torch.distributed.TCPStore(is_master=True)`` listens on all IPv4 and IPv6 interfaces whatever
host name it is given, and the store is unauthenticated. :func:`listening_store` binds the socket
itself to the address the job needs (loopback for a single node, the address peers dial
otherwise) and hands it to the store through ``master_listen_fd``.
"""

from __future__ import annotations

import socket
from datetime import timedelta

import torch.distributed as dist


def _bound_socket(address: str, port: int) -> socket.socket:
    family, kind, proto, _, sockaddr = socket.getaddrinfo(
        address, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
    )[0]
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(sockaddr)
    except OSError as e:
        sock.close()
        raise OSError(e.errno, f"cannot listen on {address}:{port} for the TCPStore: {e}") from e
    sock.listen(1024)
    return sock


def listening_store(
    address: str, port: int, world_size: int, timeout: timedelta, wait_for_workers: bool = False
) -> dist.TCPStore:
    """A server TCPStore listening on ``address:port`` only (port 0: any free one, see
    ``store.port``). The store owns the socket from then on."""
    sock = _bound_socket(address, port)
    try:
        return dist.TCPStore(
            address,
            sock.getsockname()[1],
            world_size,
            is_master=True,
            timeout=timeout,
            wait_for_workers=wait_for_workers,
            master_listen_fd=sock.detach(),
        )
    finally:
        sock.close()
