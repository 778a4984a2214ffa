"""Many meshnode nodes in one process, for integration tests that need more nodes than cores.

Each node is a whole service tree built by `meshnode.tap.build_node` — its own state
directory, identity, store, UDP socket and control socket — sharing one reactor:

    python -m tests.swarm LOGFILE [--lies LIE,...] STATE_DIR... -- TWISTD-MESHNODE-FLAGS...

The flags (e.g. `--operator-rpc 127.0.0.1:7400 --listen-address 127.0.0.1 --rpc-port 0`) apply
to every node; with `--lies`, every node lies as tests/byzantine.py says once started. The
process runs until it is signalled.
"""

import sys

from twisted.internet import defer, reactor
from twisted.logger import globalLogBeginner, textFileLogObserver

from meshnode import tap
from tests import byzantine


def main(argv):
    split = argv.index("--")
    log_file, state_dirs, flags = argv[0], argv[1:split], argv[split + 1:]
    lies = None
    if state_dirs[:1] == ["--lies"]:
        lies, state_dirs = state_dirs[1].split(","), state_dirs[2:]
    log = open(log_file, "a")
    globalLogBeginner.beginLoggingTo([textFileLogObserver(log)], redirectStandardIO=False)
    nodes = []
    for state_dir in state_dirs:
        options = tap.Options()
        options.parseOptions(["--state-dir", state_dir, *flags])
        node = tap.build_node(options.settings, reactor)
        node.privilegedStartService()
        node.startService()
        if lies is not None:
            byzantine.Liar(node, lies)
        nodes.append(node)
    reactor.addSystemEventTrigger("before", "shutdown", lambda: defer.DeferredList(
        [defer.maybeDeferred(node.stopService) for node in nodes]))
    reactor.run()


if __name__ == "__main__":
    main(sys.argv[1:])
