"""A real DNS server on loopback UDP, answering from a zone the test writes."""

from __future__ import annotations

import socket
import threading
from typing import Any

import dns.flags
import dns.message
import dns.rcode
import dns.rdatatype
import dns.rrset


class DNSServer:
    """Authoritative answers from ``zone`` over real UDP on 127.0.0.1.

    zone: name -> "NXDOMAIN" | "SERVFAIL" | {"MX": [(pref, host)], "A": [ip], "AAAA": [ip],
    "TXT": ['"text" "more"'], "TLSA": ["3 1 1 <hex>"]} (values in presentation format)
    An entry may carry "TTL": seconds for its answers (default ``ttl``) and "SECURE": True
    (its answers, empty ones too, carry the AD bit, as a validating resolver sets it for
    DNSSEC-validated data). With
    ``negative_ttl`` set, NXDOMAIN and empty answers carry an SOA whose TTL and MINIMUM are
    that (RFC 2308: how long the "no" may be cached); without it, no SOA.
    """

    def __init__(self, zone: dict[str, Any], ttl: int = 60,
                 negative_ttl: int | None = None) -> None:
        self.zone = {k.lower().rstrip("."): v for k, v in zone.items()}
        self.ttl = ttl
        self.negative_ttl = negative_ttl
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.queries: list[tuple[str, str]] = []
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._running = True
        self._thread.start()

    def _answer(self, query: dns.message.Message) -> dns.message.Message:
        resp = dns.message.make_response(query)
        resp.flags |= dns.flags.AA
        q = query.question[0]
        name = q.name.to_text(omit_final_dot=True).lower()
        rtype = dns.rdatatype.to_text(q.rdtype)
        self.queries.append((name, rtype))
        entry = self.zone.get(name)
        if entry is None or entry == "NXDOMAIN":
            resp.set_rcode(dns.rcode.NXDOMAIN)
            self._add_soa(resp)
        elif entry == "SERVFAIL":
            resp.set_rcode(dns.rcode.SERVFAIL)
        else:
            if entry.get("SECURE"):
                resp.flags |= dns.flags.AD
            values = entry.get(rtype, [])
            if values:
                texts = [f"{p} {h}." if h != "." else f"{p} ." for p, h in values] \
                    if rtype == "MX" else list(values)
                resp.answer.append(dns.rrset.from_text_list(
                    q.name, entry.get("TTL", self.ttl), "IN", rtype, texts))
            else:
                self._add_soa(resp)
        return resp

    def _add_soa(self, resp: dns.message.Message) -> None:
        if self.negative_ttl is not None:
            n = self.negative_ttl
            resp.authority.append(dns.rrset.from_text(
                ".", n, "IN", "SOA", f"ns.test. hostmaster.test. 1 3600 600 86400 {n}"))

    def _serve(self) -> None:
        self.sock.settimeout(0.2)
        while self._running:
            try:
                data, addr = self.sock.recvfrom(4096)
            except TimeoutError:
                continue
            except OSError:
                return
            try:
                self.sock.sendto(self._answer(dns.message.from_wire(data)).to_wire(), addr)
            except Exception:  # a broken query must not kill the test server
                continue

    def close(self) -> None:
        """Stop answering and close the socket."""
        self._running = False
        self.sock.close()
        self._thread.join(2)
