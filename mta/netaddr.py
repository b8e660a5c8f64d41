"""IP addresses as peers and configuration write them, read one way everywhere."""

from __future__ import annotations

import ipaddress

__all__ = ["IPAddress", "ip_address"]

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


def ip_address(text: str) -> IPAddress | None:
    """``text`` as an address, None if it is not one. Brackets (``[::1]``) and a zone id
    (``fe80::1%eth0``) are dropped, and an IPv4-mapped IPv6 address is its IPv4 address, so
    a peer on a dual-stack socket compares equal to the same peer over IPv4."""
    try:
        addr = ipaddress.ip_address(text.strip("[]").partition("%")[0])
    except ValueError:
        return None
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        return addr.ipv4_mapped
    return addr
