#!/usr/bin/env python3
"""The throughput baseline: a bare twisted.web leaf resource that answers YES.

The same Site setup as distributex (a Site subclass with the access log
off, one leaf resource, the default reactor), and nothing else: what
twisted.web itself costs per request on this machine.

    python bench/baseline_server.py PORT      # listens on 127.0.0.1:PORT until SIGTERM
"""

import sys

from twisted.internet import endpoints, reactor
from twisted.web.resource import Resource
from twisted.web.server import Site


class Yes(Resource):
    isLeaf = True

    def render(self, request):
        request.setHeader(b"content-type", b"text/plain")
        return b"YES"


class QuietSite(Site):
    noisy = False

    def log(self, request):
        pass


def main() -> None:
    port = int(sys.argv[1])
    endpoint = endpoints.serverFromString(reactor, f"tcp:{port}:interface=127.0.0.1:backlog=4096")
    endpoint.listen(QuietSite(Yes()))
    reactor.run()


if __name__ == "__main__":
    main()
