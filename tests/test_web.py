"""The twisted.web plumbing under the HTTP API: the Site and its Request."""

import io

from twisted.internet.testing import StringTransport
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET

from distributex.web import DistributexRequest, DistributexSite


class Recorder(Resource):
    """A leaf that records the requests it renders and answers YES."""

    isLeaf = True

    def __init__(self):
        super().__init__()
        self.seen = []

    def render(self, request):
        self.seen.append(request)
        request.setHeader(b"content-length", b"3")
        request.write(b"YES")
        request.finish()
        return NOT_DONE_YET


def serve(site, raw: bytes) -> bytes:
    channel = site.buildProtocol(None)
    transport = StringTransport()
    channel.makeConnection(transport)
    channel.dataReceived(raw)
    return transport.value()


def test_a_small_body_is_kept_in_memory():
    assert isinstance(DistributexSite(Recorder()).getContentFile(17), io.BytesIO)


def test_a_large_body_or_one_of_unknown_length_goes_to_a_temporary_file():
    site = DistributexSite(Recorder())
    for length in (None, 100_000):
        body = site.getContentFile(length)
        try:
            assert not isinstance(body, io.BytesIO)
            assert body.fileno() >= 0
        finally:
            body.close()


def test_every_path_goes_to_the_sites_one_resource_without_traversal():
    resource = Recorder()
    site = DistributexSite(resource)
    for path in (b"/get/", b"/a/b/c", b"/%2e%2e/x"):
        answer = serve(site, b"GET " + path + b"?pool=p HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        assert answer.startswith(b"HTTP/1.1 200 ") and answer.endswith(b"YES")
    assert [type(r) for r in resource.seen] == [DistributexRequest] * 3
    assert [r.path for r in resource.seen] == [b"/get/", b"/a/b/c", b"/%2e%2e/x"]
    assert resource.seen[0].args == {b"pool": [b"p"]}
