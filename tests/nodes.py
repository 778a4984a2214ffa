"""Real `twistd -n meshnode` processes for integration tests, with bounded waits and cleanup."""

import os
import shutil
import signal
import sys
import tempfile

from twisted.internet import defer, protocol, reactor, task, threads

from meshnode import config
from meshnode.cli import main as cli

from meshnode.core import identity
from meshnode.roles.operator import signing

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OPERATOR_DOMAIN = 0x00010000


def environment():
    """The test's environment for a node, without the machine's proxy settings (a test that
    wants a proxy gives it)."""
    proxy_variables = ("https_proxy", "no_proxy")
    return dict({name: value for name, value in os.environ.items()
                 if name.lower() not in proxy_variables}, PYTHONPATH=ROOT)


class _Exit(protocol.ProcessProtocol):
    def __init__(self):
        self.ended = defer.Deferred()
        self.output = []

    def outReceived(self, data):
        self.output.append(data)

    errReceived = outReceived

    def processEnded(self, reason):
        self.ended.callback(reason.value.exitCode)


def run_command(args, timeout=30):
    """Run a command to completion → Deferred[(exit code, output text)], killed at timeout."""
    exit_watch = _Exit()
    transport = reactor.spawnProcess(exit_watch, args[0], args, env=environment(), path=ROOT)

    def kill():
        if transport.pid is not None:
            transport.signalProcess("KILL")

    timer = reactor.callLater(timeout, kill)

    def done(code):
        if timer.active():
            timer.cancel()
        return code, b"".join(exit_watch.output).decode(errors="replace")

    return exit_watch.ended.addCallback(done)


class Node:
    """One running node: its state directory, RPC port and process."""

    def __init__(self, state_dir, port, transport, exit_watch, host="127.0.0.1"):
        self.state_dir = state_dir
        self.port = port
        self.transport = transport
        self.exit_watch = exit_watch
        self.host = host

    @property
    def address(self):
        return f"{self.host}:{self.port}"

    @property
    def running(self):
        return not self.exit_watch.ended.called

    def control(self, method, path, body=None, timeout=30):
        """A control-socket request made from a thread, so the test's reactor keeps running."""
        return threads.deferToThread(cli.control_request, self.state_dir, method, path, body,
                                     timeout)

    def status(self):
        return self.control("GET", "/v1/status")

    @defer.inlineCallbacks
    def wait_enrolled(self, timeout=30):
        """The node's status once it is enrolled; fails after `timeout` seconds with its log."""
        deadline = reactor.seconds() + timeout
        while True:
            status = yield self.status()
            if status["enrolled"]:
                return status
            if reactor.seconds() > deadline:
                raise AssertionError(f"not enrolled within {timeout} s: {self.log()[-2000:]}")
            yield task.deferLater(reactor, 0.1, lambda: None)

    @defer.inlineCallbacks
    def enroll_port(self, timeout=10):
        """An operator's enrollment API port once it listens (on a free port: ssl:0);
        fails after `timeout` seconds with its log."""
        deadline = reactor.seconds() + timeout
        while True:
            port = (yield self.status())["operator"]["enroll_port"]
            if port is not None:
                return port
            if reactor.seconds() > deadline:
                raise AssertionError(f"no enrollment API within {timeout} s: "
                                     f"{self.log()[-2000:]}")
            yield task.deferLater(reactor, 0.1, lambda: None)

    def log(self):
        with open(os.path.join(self.state_dir, "twistd.log"), errors="replace") as f:
            return f.read()

    @defer.inlineCallbacks
    def stop(self, timeout=10):
        if not self.running:
            return
        self.transport.signalProcess("TERM")
        timer = reactor.callLater(timeout, self._kill)
        yield self.exit_watch.ended
        if timer.active():
            timer.cancel()

    def _kill(self):
        if self.running:
            self.transport.signalProcess(signal.SIGKILL)


class Network:
    """An operator's state and enrolled nodes in a fresh temporary directory of `testcase`."""

    def __init__(self, testcase):
        self._testcase = testcase
        # Short paths: the control socket's path must fit a UNIX socket address.
        self.base = tempfile.mkdtemp(prefix="mn-", dir="/tmp")
        testcase.addCleanup(shutil.rmtree, self.base, ignore_errors=True)
        self.operator_dir = os.path.join(self.base, "operator")
        signing.init_operator(self.operator_dir, OPERATOR_DOMAIN, "operator", reactor)

    def enroll(self, name, domain, days=30):
        """A state directory with fresh keys and an operator-signed enrollment file."""
        state_dir = os.path.join(self.base, name)
        me = identity.load_or_create(state_dir, reactor)
        _, bundle = signing.sign_node(self.operator_dir, me.signing_public, me.agreement_public,
                                       domain, name, reactor, days)
        identity.write_private(os.path.join(state_dir, identity.ENROLLMENT_FILE), bundle)
        return state_dir

    def start(self, state_dir, *flags, timeout=20, port=None, host="127.0.0.1", lab=None,
              role=None):
        """Start `twistd -n meshnode` on a free port (or `port`) of `host` — in the NAT lab
        `lab`'s namespace `role` when given; fires when its control socket answers, or fails
        after `timeout` seconds with the node's log.

        The node itself picks the free port (--rpc-port 0), read back from its status: a
        port picked here and bound later by the child could be taken in between."""
        os.makedirs(state_dir, mode=0o700, exist_ok=True)  # for the log file
        flags = _free_role_ports(flags, state_dir)
        args = [os.path.join(os.path.dirname(sys.executable), "twistd"), "-n", "--pidfile=",
                "--logfile", os.path.join(state_dir, "twistd.log"), "meshnode",
                "--state-dir", state_dir, "--listen-address", host,
                "--rpc-port", str(port or 0), *flags]
        exit_watch = _Exit()
        if lab is None:
            transport = reactor.spawnProcess(exit_watch, args[0], args, env=environment(),
                                             path=ROOT)
        else:
            transport = lab.spawn(role, args, exit_watch, env=environment(), path=ROOT)
        node = Node(state_dir, port, transport, exit_watch, host)
        self._testcase.addCleanup(node.stop)
        return _started([node], timeout).addCallback(lambda nodes: nodes[0])

    def start_swarm(self, state_dirs, *flags, timeout=60, lies=None):
        """Start one process running a node per state directory (tests/swarm.py), each on its
        own free loopback port; fires with their Nodes when every control socket answers.
        `lies`: the tests/byzantine.py lies every node of it tells."""
        for state_dir in state_dirs:
            os.makedirs(state_dir, mode=0o700, exist_ok=True)
        # A name of its own even for swarms started at the same moment.
        descriptor, log = tempfile.mkstemp(prefix="swarm-", suffix=".log", dir=self.base)
        os.close(descriptor)
        lying = ["--lies", ",".join(lies)] if lies else []
        args = [sys.executable, "-m", "tests.swarm", log, *lying, *state_dirs, "--",
                "--listen-address", "127.0.0.1", "--rpc-port", "0", *_free_role_ports(flags)]
        exit_watch = _Exit()
        transport = reactor.spawnProcess(exit_watch, args[0], args, env=environment(), path=ROOT)
        nodes = [Node(state_dir, None, transport, exit_watch) for state_dir in state_dirs]
        nodes[0].log = lambda: open(log, errors="replace").read()
        self._testcase.addCleanup(nodes[0].stop)
        return _started(nodes, timeout)


def _free_role_ports(flags, state_dir=None):
    """Super-nodes' relay and tunnel-nodes' tunnel ports on free ports unless a test set them,
    so several run on one host (roles from the flags, or from the configuration `meshnode
    join` wrote in `state_dir`)."""
    flags = list(flags)
    joined = os.path.join(state_dir or "", config.NODE_CONFIG_FILE)
    roles = config.read_config(joined) if state_dir and os.path.exists(joined) else {}
    for role, option in (("super", "--relay-port"), ("tunnel", "--tunnel-port")):
        if (f"--{role}" in flags or roles.get(role)) and option not in flags:
            flags += [option, "0"]
    return flags


@defer.inlineCallbacks
def _started(nodes, timeout):
    """`nodes` once each control socket answers (their `port` filled in from the status);
    fails after `timeout` seconds with the first node's log."""
    deadline = reactor.seconds() + timeout
    for node in nodes:
        while True:
            if not node.running:
                raise AssertionError(f"the node exited: {nodes[0].log()[-2000:]}")
            try:
                status = yield node.status()
            except cli.CommandError:
                status = None
            if status is not None:
                node.port = status["rpc_port"]
                break
            if reactor.seconds() > deadline:
                raise AssertionError(f"the node did not start in {timeout} s: "
                                     f"{nodes[0].log()[-2000:]}")
            yield task.deferLater(reactor, 0.05, lambda: None)
    return nodes


def meshnode_command(*args):
    return [sys.executable, "-m", "meshnode.cli", *args]
