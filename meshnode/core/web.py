"""The base of every JSON web resource a node serves (control socket, enrollment API).

Answers are JSON with a status; unknown paths get a JSON 404, a wrong method a JSON 405, and a
refusal (`HTTPError`) its status and reason as `{"error": reason}`.
"""

import json

from twisted.internet import defer
from twisted.logger import Logger
from twisted.web import resource, server
from twisted.web.error import UnsupportedMethod

_log = Logger()


class HTTPError(Exception):
    """A request refused with an HTTP `status` and a `reason` a person can read."""

    def __init__(self, status, reason):
        super().__init__(reason)
        self.status = status
        self.reason = reason


def json_body(request, status, body):
    """Set `status` and the JSON headers on `request` → the encoded `body`."""
    request.setResponseCode(status)
    request.setHeader(b"content-type", b"application/json")
    request.setHeader(b"cache-control", b"no-store")
    return json.dumps(body).encode("utf-8") + b"\n"


class NotFound(resource.Resource):
    isLeaf = True

    def render(self, request):
        return json_body(request, 404, {"error": "no such resource"})


class Routes(resource.Resource):
    """A path level whose unknown children and own URL answer with a JSON 404."""

    def getChild(self, path, request):
        return NotFound()

    def render(self, request):
        return NotFound().render(request)


class JSONResource(resource.Resource):
    """A leaf answering JSON: `render_METHOD` methods return `self.serve(request, handler)`,
    where `handler(request)` gives the body (or a Deferred of it) or raises HTTPError."""

    isLeaf = True

    def render(self, request):
        try:
            return super().render(request)
        except UnsupportedMethod as e:
            request.setHeader(b"allow", b", ".join(e.allowedMethods))
            return json_body(request, 405, {"error": "method not allowed"})

    def serve(self, request, handler):
        d = defer.maybeDeferred(handler, request)
        d.addCallbacks(lambda body: self._reply(request, 200, body), self._fail,
                       errbackArgs=(request,))
        return server.NOT_DONE_YET

    def _reply(self, request, status, body):
        request.write(json_body(request, status, body))
        request.finish()

    def _fail(self, failure, request):
        if failure.check(HTTPError):
            self._reply(request, failure.value.status, {"error": failure.value.reason})
        else:
            _log.failure("{path} request failed", failure, path=request.path.decode())
            self._reply(request, 500, {"error": str(failure.value) or failure.type.__name__})
