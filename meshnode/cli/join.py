"""`meshnode join`: a node's whole way in as one string, as `kubeadm join` or `tailscale up
--auth-key` take it.

`meshnode operator token create` prints the join string: the operator's enrollment URL, the
SHA-256 fingerprint of its certificate, the token, and its fallback port (443), packed and
base64url-encoded after the prefix `mnj1.`, and a checksum after the last dot. `meshnode join STRING` checks
the checksum (a string changed anywhere is refused, nothing written), checks that the operator
presents that certificate when it can be reached, and writes the node's configuration file,
`STATE/meshnode.conf`, which `twistd meshnode` reads when no `--config` is given. Starting the
node then enrolls it: the operator's answer names its RPC endpoints.
"""

import base64
import configparser
import hashlib
import io
import json
import os
import struct

from twisted.python import usage

from meshnode import config
from meshnode.cli.base import Command, CommandError, parse_name

PREFIX = "mnj1."
_CHECK_CONTEXT = b"meshnode join\x00"
CONFIG_FILE = config.NODE_CONFIG_FILE
PROBE_SECONDS = 10


def _b64(data):
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _unb64(text):
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _check(payload):
    return _b64(hashlib.sha256(_CHECK_CONTEXT + payload.encode("ascii")).digest()[:6])


def join_string(url, fingerprint, token, fallback_port):
    """The join string of an enrollment token: the certificate's SHA-256, the fallback port,
    the URL and the token, packed (u8 lengths), base64url, with the checksum."""
    url_bytes, token_bytes = url.encode("ascii"), token.encode("utf-8")
    packed = (bytes.fromhex(fingerprint) + struct.pack(">HB", fallback_port, len(url_bytes))
              + url_bytes + struct.pack(">B", len(token_bytes)) + token_bytes)
    payload = _b64(packed)
    return f"{PREFIX}{payload}.{_check(payload)}"


def read_join_string(text):
    """A join string → {url, fingerprint, token, fallback-port}; ValueError saying what is
    wrong with it."""
    text = text.strip()
    if not text.startswith(PREFIX):
        raise ValueError(f"a join string starts with {PREFIX!r} (it comes from `meshnode "
                         f"operator token create`)")
    payload, dot, check = text[len(PREFIX):].rpartition(".")
    if not dot or not payload.isascii() or _check(payload) != check:
        raise ValueError("the join string is damaged (its checksum does not match): copy it "
                         "again, whole, from `meshnode operator token create`")
    try:
        packed = _unb64(payload)
        fingerprint = packed[:32].hex()
        fallback_port, url_size = struct.unpack_from(">HB", packed, 32)
        url = config.parse_https_url(packed[35:35 + url_size].decode("ascii"))
        token_size = packed[35 + url_size]
        token = packed[36 + url_size:].decode("utf-8")
        if len(packed) != 36 + url_size + token_size or not token:
            raise ValueError("its parts do not add up")
    except (ValueError, IndexError, struct.error) as e:
        raise ValueError(f"the join string holds no usable enrollment ({e})") from None
    return {"url": url, "fingerprint": config.parse_fingerprint(fingerprint), "token": token,
            "fallback-port": fallback_port}


def node_config(joined, name=None, tunnel=False, super_node=False):
    """The text of a node's configuration file from a read join string."""
    parser = configparser.ConfigParser(interpolation=None)
    parser["node"] = {"operator-url": joined["url"],
                      "operator-fingerprint": joined["fingerprint"],
                      "enroll-token": joined["token"]}
    node = parser["node"]
    if joined["fallback-port"]:
        node["fallback-port"] = str(joined["fallback-port"])
    if name is not None:
        node["name"] = name
    if tunnel:
        node["tunnel"] = "yes"
    if super_node:
        node["super"] = "yes"
    out = io.StringIO()
    out.write("# Written by `meshnode join`; `twistd meshnode` reads it from the state "
              "directory.\n# The token is spent on the first start: keep this file private.\n")
    parser.write(out)
    return out.getvalue()


EXAMPLE = join_string("https://operator.example.net:8443", "5c" * 32, "EXAMPLE-TOKEN", 443)


class JoinOptions(Command):
    synopsis = "JOIN-STRING [--name NAME] [--tunnel] [--super] [--print] [--json]"
    longdesc = ("Write this node's configuration from the join string `meshnode operator "
                "token create` printed; then start the node (`twistd meshnode`), which "
                "enrolls with the operator.")
    examples = [("a laptop joins", f"meshnode join {EXAMPLE} --name laptop"),
                ("an office machine joins as the tunnel-node of its LAN, then starts",
                 f"meshnode --state-dir /var/lib/meshnode join {EXAMPLE} --name office-gw "
                 f"--tunnel")]
    optFlags = [
        ["tunnel", None, "run this node as a tunnel-node (it serves its LAN's devices)"],
        ["super", None, "offer this node as a super-node (needs inbound UDP and TCP)"],
        ["print", None, "print the configuration instead of writing it"],
    ]
    optParameters = [["name", None, None, "this node's overlay name (default: the host name)",
                      parse_name]]

    def parseArgs(self, join):
        try:
            self["joined"] = read_join_string(join)
        except ValueError as e:
            raise usage.UsageError(str(e)) from None


def cmd_join(options, global_options):
    text = node_config(options["joined"], options["name"], options["tunnel"],
                       options["super"])
    joined = options["joined"]
    path = os.path.join(global_options["state-dir"], CONFIG_FILE)
    if options["print"]:
        print(text, end="")
        return
    if os.path.exists(path):
        raise CommandError(f"{path} exists: this node has joined already (remove the file to "
                           f"join again, or use --print)")
    _probe(joined)
    os.makedirs(global_options["state-dir"], mode=0o700, exist_ok=True)
    partial = path + ".new"
    with open(os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "w") as f:
        f.write(text)
    os.replace(partial, path)
    data = {"config": path, "operator_url": joined["url"]}
    if options["json"]:
        print(json.dumps(data, indent=2))
        return
    state = global_options["state-dir"]
    print(f"wrote {path}\nstart the node: twistd meshnode --state-dir {state}\n"
          f"(it enrolls with {joined['url']} on its first start; `meshnode --state-dir "
          f"{state} status` shows it)")


def _probe(joined):
    """Refuse a join string whose operator presents another certificate than the one it
    names (a tampered fingerprint); an operator out of reach now is only a warning."""
    from twisted.internet import defer, task

    from meshnode.core.enrollment import EnrollmentClient, EnrollmentError, MismatchedOperator

    outcome = {}

    @defer.inlineCallbacks
    def run(reactor):
        client = EnrollmentClient(reactor, joined["url"], fingerprint=joined["fingerprint"],
                                  fallback_port=joined["fallback-port"],
                                  connect_timeout=PROBE_SECONDS, timeout=PROBE_SECONDS)
        try:
            yield client.probe()
        except EnrollmentError as e:
            outcome["error"] = e
        finally:
            yield client.close()

    try:
        task.react(run)
    except SystemExit:
        pass
    error = outcome.get("error")
    if isinstance(error, MismatchedOperator):
        raise CommandError(f"{joined['url']} is not the operator this join string names: "
                           f"{error}; nothing was written")
    if error is not None:
        print(f"meshnode join: cannot reach the operator now ({error}); the node will enroll "
              f"when it starts and can reach it")
