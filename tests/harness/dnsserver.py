"""A DNS server on loopback that answers TXT questions from a table: the stand-in for the DNS
this machine cannot reach, spoken over real UDP in real DNS wire format (dnspython), so that
the resolver code under test runs as it would against a name server.

    with TxtServer({"s1._domainkey.example.com": [[b"v=DKIM1; ", b"p=..."]]}) as dns:
        resolver = dns.resolver()

Each name maps to its TXT records, each record to its character-strings. A name not in the
table is NXDOMAIN; a name mapped to [] exists with no TXT (NOERROR, no answer); a name mapped
to None gets SERVFAIL.
"""

from __future__ import annotations

import socket
import threading
from collections.abc import Mapping, Sequence

import dns.exception
import dns.flags
import dns.message
import dns.rcode
import dns.rdataclass
import dns.rdatatype
import dns.resolver
import dns.rrset


class TxtServer:
    def __init__(self, table: Mapping[str, Sequence[Sequence[bytes]] | None]) -> None:
        self.table = {name.rstrip(".").lower(): records for name, records in table.items()}
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.settimeout(0.2)
        self.port = self.sock.getsockname()[1]
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)

    def __enter__(self) -> TxtServer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)
        self.sock.close()

    def resolver(self) -> dns.resolver.Resolver:
        r = dns.resolver.Resolver(configure=False)
        r.nameservers = ["127.0.0.1"]
        r.port = self.port
        return r

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                data, peer = self.sock.recvfrom(4096)
            except TimeoutError:
                continue
            except OSError:
                return
            try:
                query = dns.message.from_wire(data)
            except dns.exception.DNSException:
                continue  # not a DNS query: dropped, as a server would
            reply = dns.message.make_response(query)
            reply.flags |= dns.flags.AA
            question = query.question[0]
            name = question.name.to_text().rstrip(".").lower()
            if name not in self.table:
                reply.set_rcode(dns.rcode.NXDOMAIN)
            elif self.table[name] is None:
                reply.set_rcode(dns.rcode.SERVFAIL)
            elif question.rdtype == dns.rdatatype.TXT:
                records = self.table[name] or []
                if records:
                    texts = [
                        " ".join('"' + s.decode("ascii") + '"' for s in strings)
                        for strings in records
                    ]
                    reply.answer.append(
                        dns.rrset.from_text_list(
                            question.name, 60, dns.rdataclass.IN, dns.rdatatype.TXT, texts
                        )
                    )
            self.sock.sendto(reply.to_wire(), peer)
