"""A NAT lab for tests: real routers, NATs, a UPnP gateway and a STUN server built from network
namespaces, one lab per test (the facts behind its choices: NATLAB.md in the shared notes).

Topology (every name below is a namespace f"{prefix}-{role}"; interface names in brackets)::

    pub  198.51.100.10 + .11 [eth0] ─┐
    r1   wan 203.0.113.11 [wan] ─────┼─ inet: bridge [br] 198.51.100.1/24 + 203.0.113.1/24
    r2   wan 203.0.113.12 [wan] ─────┘        (routes only; no link to the host's namespace)
    r1   lan bridge [lan] 10.1.0.1/24 ─┬─ h1 10.1.0.2 [eth0]
                                       └─ d1 10.1.0.3 [eth0] (an end-device, e.g. a printer)
    r2   lan bridge [lan] 10.2.0.1/24 ─── h2 10.2.0.2 [eth0]

NAT types of a router (nftables table `inet filter`, whose chain names miniupnpd expects):

- "eim": masquerade; endpoint-independent mapping, address-and-port-dependent filtering.
- "sym": masquerade random,fully-random; a new public port per destination.
- "fullcone": Linux has no true cone NAT, so the usual lab stand-in: eim plus DMZ-style DNAT of
  every new inbound WAN packet (UDP and TCP, except to the router's own port range
  61000-65535) to h1 (h2), accepted as `ct status dnat`: endpoint-independent mapping and
  filtering, and a listener on the host is reachable by anyone.
- "fw": eim, LAN egress only `tcp dport 443`: no UDP at all, no other TCP, no ICMP.
- "public": no NAT and no filtering: the router only routes. Its LAN is then a public subnet the
  internet routes to it, 192.0.2.0/25 on side 1 (r1 192.0.2.1, h1 192.0.2.2, d1 192.0.2.3) and
  192.0.2.128/25 on side 2 (r2 192.0.2.129, h2 192.0.2.130), so h1 keeps one, public, address
  and still shares a LAN with d1.

Every router drops new packets arriving on its WAN for itself (`iifname "wan" ct state new
drop`) and forwards inbound only for established flows, UPnP mappings and fullcone's DNAT.
"""

import os
import secrets
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import unittest
import uuid

from twisted.internet import defer, protocol

PREFIX_ATTEMPTS = 20
BUILD_TIMEOUT = 20  # seconds, for the whole topology
DAEMON_LIFETIME = 900  # seconds: `timeout` ends a lab daemon whose test process died
DAEMON_START_TIMEOUT = 10  # seconds, for miniupnpd and coturn to be ready
PROCESS_END_TIMEOUT = 5  # seconds, for spawned processes to be reaped at teardown
KILL_ROUNDS = 100  # at teardown, processes die from the leaves of their tree up,
KILL_WAIT_SECONDS = 0.5  # each round waiting at most this long for its processes to end
UPNP_HTTP_PORT = 5000
STUN_PORT = 3478
STUN_ALT_PORT = 3479
# The routers' own sockets (miniupnpd's STUN client) use these ports, so fullcone's DNAT leaves
# them alone and its masquerade never hands them out.
ROUTER_PORTS = (61000, 65535)

NAT_KINDS = ("eim", "sym", "fullcone", "fw")
SIDE_KINDS = NAT_KINDS + ("public",)
ROLES = ("inet", "pub", "r1", "h1", "d1", "r2", "h2")
_SEARCH_PATH = os.pathsep.join([os.environ.get("PATH", ""), "/usr/local/sbin", "/usr/sbin",
                                "/sbin"])
_ENV = dict(os.environ, PATH=_SEARCH_PATH)  # the lab's commands find sbin programs
_BASE_TOOLS = ("ip", "nft", "conntrack", "sysctl", "timeout")

# Per side: the WAN address and (private, public) LAN addressing as (network, prefix length,
# router, host, device).
_WAN = {1: "203.0.113.11", 2: "203.0.113.12"}
_LANS = {
    1: {"private": ("10.1.0.0", 24, "10.1.0.1", "10.1.0.2", "10.1.0.3"),
        "public": ("192.0.2.0", 25, "192.0.2.1", "192.0.2.2", "192.0.2.3")},
    2: {"private": ("10.2.0.0", 24, "10.2.0.1", "10.2.0.2", None),
        "public": ("192.0.2.128", 25, "192.0.2.129", "192.0.2.130", None)},
}
_INET_ADDRESSES = ("198.51.100.1/24", "203.0.113.1/24")


def tool(name):
    """The absolute path of a program the lab uses, or None when it is not installed."""
    return shutil.which(name, path=_SEARCH_PATH)


def require_root(testcase, *tools):
    """Raise unittest.SkipTest, naming what is missing, unless we are root and the lab's tools
    (and `tools`, e.g. "miniupnpd") are installed."""
    reason = None
    if not sys.platform.startswith("linux"):
        reason = f"the NAT lab needs Linux network namespaces, not {sys.platform}"
    elif os.geteuid() != 0:
        reason = "the NAT lab needs root (network namespaces, nftables)"
    else:
        missing = [name for name in _BASE_TOOLS + tools if tool(name) is None]
        if missing:
            reason = (f"the NAT lab needs {', '.join(missing)} (apt-get install iproute2 "
                      f"nftables conntrack miniupnpd miniupnpc coturn)")
    if reason is not None:
        print(f"\nskipping {testcase.id()}: {reason}", file=sys.stderr)
        raise unittest.SkipTest(reason)


class CommandFailed(subprocess.CalledProcessError):
    """A lab command failed; unlike its base class it shows the command's output."""

    def __str__(self):
        return f"{super().__str__()}\nstdout: {self.stdout}\nstderr: {self.stderr}"


def _check(argv, timeout, input=None):
    try:
        return subprocess.run(argv, input=input, capture_output=True, text=True,
                              timeout=timeout, check=True, env=_ENV)
    except subprocess.CalledProcessError as e:
        raise CommandFailed(e.returncode, e.cmd, e.stdout, e.stderr) from None


class _Watched(protocol.ProcessProtocol):
    """Hands everything to the caller's protocol and says when the process has ended."""

    def __init__(self, inner):
        self.inner = inner
        self.ended = defer.Deferred()

    def makeConnection(self, transport):
        self.transport = transport
        self.inner.makeConnection(transport)

    def childDataReceived(self, childFD, data):
        self.inner.childDataReceived(childFD, data)

    def childConnectionLost(self, childFD):
        self.inner.childConnectionLost(childFD)

    def processExited(self, reason):
        self.inner.processExited(reason)

    def processEnded(self, reason):
        try:
            self.inner.processEnded(reason)
        finally:
            self.ended.callback(None)


class Lab:
    """One lab per test: namespaces named f"{prefix}-{role}" (prefix unique per lab, short so
    names stay <= 15 chars), torn down by testcase.addCleanup."""

    PUBLIC = "198.51.100.10"  # the public host "pub" (operator, super-nodes)
    PUBLIC_ALT = "198.51.100.11"  # pub's second address (coturn's alternate address)

    def __init__(self, testcase, side1="eim", side2="eim", upnp=None, stun=False):
        for side in (side1, side2):
            if side not in SIDE_KINDS:
                raise ValueError(f"unknown NAT type {side!r}, not one of {SIDE_KINDS}")
        if upnp not in (None, 1, 2):
            raise ValueError(f"upnp is None, 1 or 2, not {upnp!r}")
        self._kinds = {1: side1, 2: side2}
        if upnp is not None and self._kinds[upnp] == "public":
            raise ValueError(f"side {upnp} is public: it has no NAT to map through UPnP")
        tools = (("miniupnpd",) if upnp else ()) + (("turnserver",) if upnp or stun else ())
        require_root(testcase, *tools)
        self._testcase = testcase
        self._upnp_side = upnp
        self._stun = bool(stun or upnp)
        self._daemons = []  # (name, Popen, log path)
        self._spawned = []
        self._namespaces = []
        self._dir = None
        self.upnp_url = None
        self.stun_server = None
        testcase.addCleanup(self._teardown)
        self._create_namespaces()
        self._dir = tempfile.mkdtemp(prefix=f"natlab-{self.prefix}-")
        started = time.monotonic()
        self._build()
        if self._stun:
            self._start_coturn()
        if upnp is not None:
            self._start_miniupnpd(upnp)
        self.build_seconds = time.monotonic() - started

    # --- names and addresses

    def ns(self, role):
        """The full namespace name of `role`."""
        if role not in ROLES:
            raise ValueError(f"unknown role {role!r}, not one of {ROLES}")
        return f"{self.prefix}-{role}"

    def address(self, role):
        """The address others reach `role` at: pub's, a LAN host's own (public on a "public"
        side), a router's WAN address."""
        if role == "pub":
            return self.PUBLIC
        if role in ("r1", "r2"):
            return self.wan(int(role[1]))
        if role == "inet":
            return _INET_ADDRESSES[0].split("/")[0]
        side, index = {"h1": (1, 3), "d1": (1, 4), "h2": (2, 3)}[role]
        return self._lan(side)[index]

    def wan(self, side):
        """Router WAN address of side 1 or 2."""
        return _WAN[side]

    def _lan(self, side):
        return _LANS[side]["public" if self._kinds[side] == "public" else "private"]

    # --- running things in the lab

    def run(self, role, *argv, timeout=10):
        """Run a command in `role`'s namespace to completion (at most `timeout` seconds) →
        CompletedProcess with text output; raises CommandFailed on a non-zero exit."""
        return _check([tool("ip"), "netns", "exec", self.ns(role), *map(str, argv)], timeout)

    def spawn(self, role, argv, protocol, env=None, path=None):
        """reactor.spawnProcess of `argv` in `role`'s namespace (env None: the test's
        environment); the process is killed at cleanup if still running."""
        from twisted.internet import reactor

        watched = _Watched(protocol)
        args = [tool("ip"), "netns", "exec", self.ns(role), *map(str, argv)]
        transport = reactor.spawnProcess(watched, args[0], args, env=env, path=path)
        self._spawned.append(watched)
        return transport

    # --- changing the lab mid-test

    def set_nat(self, side, kind):
        """Change router `side`'s NAT type (not to or from "public", whose addressing
        differs) and flush its conntrack table so old flows do not keep the old behaviour."""
        if kind not in NAT_KINDS:
            raise ValueError(f"set_nat takes one of {NAT_KINDS}, not {kind!r}")
        if self._kinds[side] == "public":
            raise ValueError(f"side {side} is public; its addressing cannot change mid-test")
        self._kinds[side] = kind
        router = f"r{side}"
        _check([tool("ip"), "netns", "exec", self.ns(router), tool("nft"), "-f", "-"], 10,
               input=self._ruleset(side))
        self._conntrack(router, "-F")

    def stop_upnp(self):
        """Stop miniupnpd and remove every mapping it made, and the flows through them."""
        if self._upnp_side is None:
            raise ValueError("this lab has no UPnP gateway")
        router = f"r{self._upnp_side}"
        for name, daemon, _ in self._daemons:
            if name == "miniupnpd" and daemon.poll() is None:
                daemon.send_signal(signal.SIGTERM)
                try:
                    daemon.wait(timeout=2)
                except subprocess.TimeoutExpired:
                    daemon.kill()
                    daemon.wait(timeout=2)
        # miniupnpd leaves its rules behind when it stops.
        _check([tool("ip"), "netns", "exec", self.ns(router), tool("nft"), "-f", "-"], 10,
               input="".join(f"flush chain inet filter {chain}\n" for chain in
                             ("miniupnpd", "prerouting_miniupnpd", "postrouting_miniupnpd")))
        self._conntrack(router, "-D", "--dst-nat")
        self.upnp_url = None

    def _conntrack(self, router, *args):
        # conntrack exits 1 when nothing matched a delete; the table is clean either way.
        subprocess.run([tool("ip"), "netns", "exec", self.ns(router), tool("conntrack"),
                        *args], capture_output=True, timeout=10)

    # --- building

    def _create_namespaces(self):
        """Pick a fresh prefix: `ip netns add` refuses an existing name, so two labs built at
        once (trial -j) never share one."""
        for _ in range(PREFIX_ATTEMPTS):
            self.prefix = "n" + secrets.token_hex(2)
            result = subprocess.run([tool("ip"), "netns", "add", self.ns("inet")],
                                    capture_output=True, text=True, timeout=10)
            if result.returncode == 0:
                break
            if "exists" not in result.stderr:
                raise CommandFailed(result.returncode, result.args, result.stdout,
                                    result.stderr)
        else:
            raise RuntimeError(f"no free lab prefix in {PREFIX_ATTEMPTS} attempts")
        self._namespaces.append(self.ns("inet"))
        for role in ROLES[1:]:
            _check([tool("ip"), "netns", "add", self.ns(role)], 10)
            self._namespaces.append(self.ns(role))

    def _build(self):
        # veths are created straight into their two namespaces: nothing in the host's.
        links = [("inet", "pub", "pub", "eth0"), ("inet", "r1", "r1", "wan"),
                 ("inet", "r2", "r2", "wan"), ("r1", "h1", "h1", "eth0"),
                 ("r1", "d1", "d1", "eth0"), ("r2", "h2", "h2", "eth0")]
        # Each end's ifindex differs from its peer's: the kernel delays activating a link whose
        # ifindex equals its peer's (both 2 in two fresh namespaces) by up to a second, and
        # the first packets through it are dropped meanwhile.
        batch = "".join(f"link add {a_name} netns {self.ns(a)} index {10 + 2 * k} type veth "
                        f"peer name {b_name} netns {self.ns(b)} index {11 + 2 * k}\n"
                        for k, (a, a_name, b, b_name) in enumerate(links))
        _check([tool("ip"), "-batch", "-"], BUILD_TIMEOUT, input=batch)
        self._run_scripts({role: self._setup_script(role) for role in ROLES})

    def _run_scripts(self, scripts):
        """Run shell scripts in their roles' namespaces at once; raise if any fails."""
        running = [(role, subprocess.Popen(
            [tool("ip"), "netns", "exec", self.ns(role), "sh", "-euc", script],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_ENV))
            for role, script in scripts.items()]
        failures = []
        for role, process in running:
            try:
                _, err = process.communicate(timeout=BUILD_TIMEOUT)
            except subprocess.TimeoutExpired:
                process.kill()
                _, err = process.communicate()
            if process.returncode != 0:
                failures.append(f"{role}: exit {process.returncode}: {err.strip()}")
        if failures:
            raise RuntimeError("NAT lab setup failed:\n" + "\n".join(failures))

    def _setup_script(self, role):
        """Shell commands configuring `role` inside its namespace."""
        forwarding = role in ("inet", "r1", "r2")
        # A new namespace inherits IPv4 settings (rp_filter, forwarding) from the host's, so
        # every one is set explicitly, for "all", "default" and each interface.
        lines = [
            "for f in /proc/sys/net/ipv4/conf/*/rp_filter; do echo 0 >$f; done",
            "for f in /proc/sys/net/ipv4/conf/*/send_redirects; do echo 0 >$f; done",
            "for f in /proc/sys/net/ipv6/conf/*/disable_ipv6; do echo 1 >$f; done",
            f"echo {int(forwarding)} >/proc/sys/net/ipv4/ip_forward",
            "sysctl -q -e -w net.bridge.bridge-nf-call-iptables=0 "
            "net.bridge.bridge-nf-call-arptables=0 || true",
            "ip link set dev lo up",
        ]
        if role == "inet":
            lines += ["ip link add name br type bridge mcast_snooping 0",
                      *(f"ip addr add {a} dev br" for a in _INET_ADDRESSES),
                      *(f"ip link set dev {port} master br up" for port in ("pub", "r1", "r2")),
                      "ip link set dev br up"]
            for side in (1, 2):
                network, length, *_ = self._lan(side)
                if self._kinds[side] == "public":
                    lines.append(f"ip route add {network}/{length} via {_WAN[side]}")
        elif role == "pub":
            lines += [f"ip addr add {self.PUBLIC}/24 dev eth0",
                      f"ip addr add {self.PUBLIC_ALT}/24 dev eth0", "ip link set dev eth0 up",
                      f"ip route add default via {_INET_ADDRESSES[0].split('/')[0]} "
                      f"src {self.PUBLIC}"]
        elif role in ("r1", "r2"):
            side = int(role[1])
            _, length, router, _, _ = self._lan(side)
            ports = ("h1", "d1") if side == 1 else ("h2",)
            lines += [f"echo {ROUTER_PORTS[0]} {ROUTER_PORTS[1]} "
                      ">/proc/sys/net/ipv4/ip_local_port_range",
                      f"ip addr add {_WAN[side]}/24 dev wan", "ip link set dev wan up",
                      "ip link add name lan type bridge mcast_snooping 0",
                      f"ip addr add {router}/{length} dev lan",
                      *(f"ip link set dev {port} master lan up" for port in ports),
                      "ip link set dev lan up",
                      f"ip route add default via {_INET_ADDRESSES[1].split('/')[0]}",
                      f"nft -f - <<'EOF'\n{self._ruleset(side)}EOF"]
        else:
            side = int(role[1])
            _, length, router, *_ = self._lan(side)
            lines += [f"ip addr add {self.address(role)}/{length} dev eth0",
                      "ip link set dev eth0 up", f"ip route add default via {router}"]
        return "\n".join(lines) + "\n"

    def _ruleset(self, side):
        """The router's nftables rules for its current NAT type, replacing the previous ones
        in one transaction; miniupnpd's chains keep their mappings."""
        kind = self._kinds[side]
        wan = _WAN[side]
        host = self._lan(side)[3]
        low, high = ROUTER_PORTS
        network, length, *_ = self._lan(side)
        # Only the LAN's packets are translated: the router's own (miniupnpd's STUN test)
        # already carry the WAN address, and a sym or fullcone rule would move their ports.
        lan = f'oifname "wan" ip saddr {network}/{length}'
        t = "inet filter"
        rules = [
            f"add table {t}",
            f"add chain {t} input {{ type filter hook input priority 0; policy accept; }}",
            f"add chain {t} forward {{ type filter hook forward priority 0; policy drop; }}",
            f"add chain {t} prerouting {{ type nat hook prerouting priority -100; "
            f"policy accept; }}",
            f"add chain {t} postrouting {{ type nat hook postrouting priority 100; "
            f"policy accept; }}",
            *(f"add chain {t} {chain}" for chain in
              ("miniupnpd", "prerouting_miniupnpd", "postrouting_miniupnpd")),
            *(f"flush chain {t} {chain}" for chain in
              ("input", "forward", "prerouting", "postrouting")),
            f'add rule {t} input iifname "wan" ct state established,related accept',
        ]
        if self._upnp_side == side:
            # miniupnpd's RFC 5780 test asks for answers from the STUN server's other address
            # and port; it maps nothing unless they arrive.
            rules.append(f'add rule {t} input iifname "wan" ip saddr '
                         f'{{ {self.PUBLIC}, {self.PUBLIC_ALT} }} udp sport '
                         f'{{ {STUN_PORT}, {STUN_ALT_PORT} }} udp dport {low}-{high} accept')
        rules += [
            f'add rule {t} input iifname "wan" ct state new,invalid drop',
            f"add rule {t} forward ct state established,related accept",
            f"add rule {t} forward jump miniupnpd",
            f"add rule {t} prerouting jump prerouting_miniupnpd",
            f"add rule {t} postrouting jump postrouting_miniupnpd",
        ]
        if kind == "public":
            rules.append(f"add rule {t} forward accept")
        elif kind == "fw":
            rules.append(f'add rule {t} forward iifname "lan" oifname "wan" tcp dport 443 '
                         f'accept')
        else:
            rules.append(f'add rule {t} forward iifname "lan" oifname "wan" accept')
        if kind == "fullcone":
            rules += [
                f'add rule {t} prerouting iifname "wan" ip daddr {wan} meta l4proto '
                f'{{ tcp, udp }} th dport != {low}-{high} dnat ip to {host}',
                f'add rule {t} forward iifname "wan" ct status dnat accept',
                f'add rule {t} postrouting {lan} meta l4proto {{ tcp, udp }} '
                f'masquerade to :1024-{low - 1}',
                f'add rule {t} postrouting {lan} masquerade',
            ]
        elif kind == "sym":
            rules.append(f'add rule {t} postrouting {lan} masquerade random,fully-random')
        elif kind in ("eim", "fw"):
            rules.append(f'add rule {t} postrouting {lan} masquerade')
        return "\n".join(rules) + "\n"

    # --- daemons

    def _daemon(self, name, role, argv, ready, what):
        """Start a daemon in `role` under `timeout`, its output in a log file, and wait until
        `ready(log text)` is true."""
        log_path = os.path.join(self._dir, f"{name}.log")
        daemon = subprocess.Popen(
            [tool("ip"), "netns", "exec", self.ns(role), tool("timeout"), "-s", "KILL",
             str(DAEMON_LIFETIME), *argv], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL)
        self._daemons.append((name, daemon, log_path))
        watch = _Readiness(daemon.stdout, log_path, ready)
        if not watch.settled.wait(DAEMON_START_TIMEOUT) or not watch.ready:
            state = "exited" if watch.settled.is_set() else (
                f"not ready in {DAEMON_START_TIMEOUT} s")
            raise RuntimeError(f"{name} {state} ({what}); its log:\n{watch.text[-3000:]}")

    def _start_coturn(self):
        argv = [tool("turnserver"), "-n", "--stun-only", "--no-cli", "--no-tls", "--no-dtls",
                "--listening-ip", self.PUBLIC, "--listening-ip", self.PUBLIC_ALT,
                "--listening-port", str(STUN_PORT), "--alt-listening-port",
                str(STUN_ALT_PORT), "--userdb", os.path.join(self._dir, "turndb"),
                "--pidfile", os.path.join(self._dir, "turnserver.pid"),
                "--log-file", "stdout", "--simple-log", "--no-software-attribute", "-v"]
        self._daemon("coturn", "pub", argv, lambda log: _coturn_ready(log, self),
                     "listening on UDP")
        self.stun_server = (self.PUBLIC, STUN_PORT)

    def _start_miniupnpd(self, side):
        config = os.path.join(self._dir, "miniupnpd.conf")
        with open(config, "w") as f:
            f.write("\n".join([
                "ext_ifname=wan",
                "listening_ip=lan",
                f"http_port={UPNP_HTTP_PORT}",
                "enable_upnp=yes",
                "enable_natpmp=yes",
                "ipv6_disable=yes",
                "secure_mode=no",
                "system_uptime=yes",
                f"uuid={uuid.uuid4()}",
                # miniupnpd refuses a documentation-range WAN address as "reserved" (and
                # ext_ip= as well) unless a STUN server vouches that it is reachable.
                "ext_perform_stun=yes",
                f"ext_stun_host={self.PUBLIC}",
                f"ext_stun_port={STUN_PORT}",
                f"lease_file={os.path.join(self._dir, 'upnp.leases')}",
                # UNIX sockets and pid files are not per namespace: keep clear of the host's.
                f"minissdpdsocket={os.path.join(self._dir, 'minissdpd.sock')}",
                "",
            ]))
        argv = [tool("miniupnpd"), "-f", config, "-d", "-P",
                os.path.join(self._dir, "miniupnpd.pid")]
        self._daemon("miniupnpd", f"r{side}", argv, _miniupnpd_ready,
                     "its STUN test enabling port forwarding, then HTTP")
        self.upnp_url = f"http://{self._lan(side)[2]}:{UPNP_HTTP_PORT}/rootDesc.xml"

    # --- teardown

    def _teardown(self):
        """Kill every process in the lab's namespaces, delete them and the temporary files;
        fires once the processes spawned through the reactor are reaped."""
        self._kill_all()
        for _, daemon, _ in self._daemons:
            try:
                daemon.wait(timeout=PROCESS_END_TIMEOUT)
            except subprocess.TimeoutExpired:
                pass
        if self._namespaces:
            subprocess.run([tool("ip"), "-force", "-batch", "-"], capture_output=True,
                           text=True, timeout=30,
                           input="".join(f"netns delete {ns}\n" for ns in self._namespaces))
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
        waiting = [watched.ended for watched in self._spawned if not watched.ended.called]
        self._namespaces, self._daemons, self._spawned, self._dir = [], [], [], None
        if not waiting:
            return None
        from twisted.internet import reactor

        return defer.DeferredList(waiting).addTimeout(PROCESS_END_TIMEOUT, reactor)

    def _kill_all(self):
        """SIGKILL every process in the lab's namespaces, children before their parents: a
        parent in the lab (`timeout` above a daemon) then reaps them, where an orphan would
        go to PID 1, which in a container may never reap it."""
        for _ in range(KILL_ROUNDS):
            pids = self._pids()
            if not pids:
                return
            parents = {_parent(pid) for pid in pids}
            ending = []
            for pid in [pid for pid in pids if pid not in parents] or pids:
                try:
                    ending.append(os.pidfd_open(pid))
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            try:  # a pidfd turns readable once its process has ended
                select.select(ending, [], [], KILL_WAIT_SECONDS)
            finally:
                for fd in ending:
                    os.close(fd)

    def _pids(self):
        pids = set()
        for ns in self._namespaces:
            result = subprocess.run([tool("ip"), "netns", "pids", ns], capture_output=True,
                                    text=True, timeout=10)
            pids.update(int(word) for word in result.stdout.split())
        pids.discard(os.getpid())
        return pids


class _Readiness:
    """Copies a daemon's output to its log file in a thread; `settled` is set once
    `ready(output so far)` holds (`ready` True) or the output ends (the daemon exited)."""

    def __init__(self, pipe, log_path, ready):
        self.text = ""
        self.ready = False
        self.settled = threading.Event()
        self._check = ready
        threading.Thread(target=self._copy, args=(pipe, log_path), daemon=True).start()

    def _copy(self, pipe, log_path):
        with pipe, open(log_path, "wb") as log:
            for line in pipe:  # until the daemon's end closes the pipe
                log.write(line)
                log.flush()
                if not self.settled.is_set():
                    self.text += line.decode(errors="replace")
                    if self._check(self.text):
                        self.ready = True
                        self.settled.set()
        self.settled.set()


def _parent(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            # The command name, in parentheses, may hold spaces: fields count from its end.
            return int(f.read().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return None


def _coturn_ready(log, lab):
    # With -v coturn names each UDP listener it opened: both addresses, both ports.
    return all(f"UDP listener opened on: {address}:{port}" in log
               for address in (lab.PUBLIC, lab.PUBLIC_ALT) for port in (STUN_PORT, STUN_ALT_PORT))


def _miniupnpd_ready(log):
    # It maps nothing until its STUN test has found the WAN address reachable.
    return "Port forwarding is now enabled" in log and "HTTP listening on port" in log
