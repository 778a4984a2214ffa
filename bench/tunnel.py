"""Tunnels to an end-device through real processes, against baselines measured in the same run.

The network: an operator (`--replicas 1`), one super-node (the relay), two tunnel-nodes — one
taking direct connections, one started with `--no-direct` so that every tunnel through it is
relayed by the super-node — and a user-node, all `twistd -n meshnode` processes on 127.0.0.1.
The end-device is a helper process of this script (plain sockets, no Twisted) with a sink port
(reads a length-prefixed payload, then answers one byte) and an echo port; it is registered
twice (`operator device add`), once at each tunnel-node's location, with both ports. The
user-node opens one listener per (path, port) through its control socket (POST /v1/tunnels);
clients in this process connect to them with plain sockets. Prints one JSON object per figure
(bench/rpc.py's print_figure: value and baseline are medians of their rounds):

- `loopback_throughput`, `tunnel_direct_throughput`, `tunnel_relayed_throughput` (MB/s,
  10^6 bytes/s): `--bytes` (default 1 GiB) sent from a client to the sink, timed from the
  first payload byte (the tunnel is up: the sink answered the length header) to the sink's
  answer that it has everything; straight to the sink over loopback TCP, through the tunnel
  on the direct path, and through the relayed path. The three share one baseline: the same
  transfer through `ssh -L` (to an sshd of this script's own, see below) when one can be
  started, else loopback TCP itself — the unit says which. ratio = value / baseline; the
  targets are direct >= 1.0 and relayed >= 0.8 times ssh -L. Rounds alternate the paths.
- `tunnel_direct_ttfb_p50`, `_p99`, `tunnel_relayed_ttfb_p50`, `_p99` (ms): time to first
  byte of a new tunnel: connect to the listener, send 1 byte, receive the device's echo;
  `--ttfb-count` tunnels per path (after 10 of each as a warm-up), one at a time, path after
  path (so that each process's CPU per tunnel can be told, see --verbose). Baseline: the same
  percentile of the same exchange straight to the device's echo port (a new loopback TCP
  connection each time). LOWER is better.
- `relay_idle_tunnels` (count) and `relay_memory_per_tunnel` (KiB, VmRSS): idle tunnels on
  the relayed path, opened `--concurrency` at a time (each checked with a 1-byte echo) up to
  `--tunnels` (default 9000), `--idle-seconds` or 20 failures, whichever comes first, then
  all checked again with one more echo each; the count is those that answered. Memory is the
  growth of the super-node's VmRSS (/proc/PID/status) from before the first to after the
  last, per tunnel held. Baseline: the same done through a bare Twisted TCP relay
  (twisted.protocols.portforward, two connections per tunnel like the relay) to the same
  device. Each tunnel also costs two connections in the user-node and in the tunnel-node
  (their growth is on stderr with --verbose) and one in the device and in this process.

Limits. Every process started gets its soft RLIMIT_NOFILE raised to its hard limit; `--tunnels`
is cut to what fits in that (two descriptors per tunnel in each node on the path). The nodes'
config file raises the tunnel-node's and the relay's tunnel limits and the RPC rate limit, so
the open-file limit is what binds.

ssh -L. The sshd is `--sshd` or the first `sshd` on PATH or in /usr/sbin, run in the
foreground on a free port with a host key, authorized key and config of its own; it runs as
the current user, or when that is root, as `--sshd-user` (default nobody: an sshd not run as
root needs no privilege-separation user or directory). `ssh -N -L` runs as the current user
with `--ssh-cipher` if given, else OpenSSH's default. Without an sshd that starts, the ssh
figure is skipped with a note on stderr and loopback TCP becomes the throughput baseline.

Every process started (and its children) is stopped at the end (SIGTERM, then SIGKILL), every
wait is bounded, the temporary directories are removed. `--verbose` prints, on stderr, the
per-round figures and each process's CPU share during each measurement (which side is
saturated), the opening rate of the idle tunnels and the other nodes' memory growth.
"""

import argparse
import json
import os
import pwd
import resource
import selectors
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time

BENCH = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, BENCH)
import dht as dht_bench  # noqa: E402  (free ports, percentiles, CPU seconds of a process)
import rpc as rpc_bench  # noqa: E402  (the figure printer, the checkout's root)

ROOT = rpc_bench.ROOT
THIS = os.path.abspath(__file__)
OPERATOR_DOMAIN = 0x00010000
LOCATIONS = {"direct": "d1" * 32, "relayed": "e2" * 32}
MACS = {"direct": "02:00:00:00:00:01", "relayed": "02:00:00:00:00:02"}
CHUNK = 1 << 20
START_TIMEOUT = 20.0
READY_TIMEOUT = 60.0
COMMAND_TIMEOUT = 60.0
IO_TIMEOUT = 60.0
TUNNEL_TIMEOUT = 15.0
MAX_FAILURES = 20
DESCRIPTOR_MARGIN = 200  # descriptors left to a process's own sockets, database and logs
STOP_TIMEOUT = 10.0


def note(text):
    print(text, file=sys.stderr, flush=True)


def parse_size(text):
    """Bytes: an integer with an optional binary suffix K, M or G."""
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    text = text.strip().upper().removesuffix("IB").removesuffix("B")
    if text and text[-1] in units:
        return int(float(text[:-1]) * units[text[-1]])
    return int(text)


def raise_nofile():
    """Raise this process's soft open-file limit to its hard one → the soft limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard
    if hard == resource.RLIM_INFINITY:
        with open("/proc/sys/fs/nr_open") as f:
            target = int(f.read())
    if soft != resource.RLIM_INFINITY and soft < target:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        soft = target
    return soft


def recv_exactly(sock, size):
    data = b""
    while len(data) < size:
        more = sock.recv(size - len(data))
        if not more:
            return None
        data += more
    return data


def exit_with_stdin():
    """End this helper process when the bench that started it closes our stdin (or dies)."""
    def watch():
        try:
            sys.stdin.buffer.read()
        finally:
            os._exit(0)

    threading.Thread(target=watch, daemon=True).start()


def rss_kib(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for {pid}")


def process_tree(pid):
    """`pid` and its descendants now, from /proc (children first)."""
    parents = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    parents.setdefault(int(f.read().rsplit(")", 1)[1].split()[1]), []).append(
                        int(entry))
            except (OSError, IndexError, ValueError):
                continue
    tree, stack = [], [pid]
    while stack:
        one = stack.pop()
        tree.append(one)
        stack.extend(parents.get(one, []))
    return tree[::-1]


def tree_cpu(pid):
    total = 0.0
    for one in process_tree(pid):
        try:
            total += dht_bench.cpu_seconds(one)
        except (OSError, IndexError, ValueError):
            pass
    return total


def machine_busy():
    """CPU seconds spent by all processes on this machine (all cores, /proc/stat)."""
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    idle = fields[3] + fields[4]  # idle, iowait
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def adopt_orphans():
    """Become the parent of our descendants orphaned on the way out (an sshd session whose
    monitor exits first), so reap_orphans() can wait for them: PR_SET_CHILD_SUBREAPER."""
    import ctypes

    try:
        ctypes.CDLL(None, use_errno=True).prctl(36, 1, 0, 0, 0)
    except (OSError, AttributeError):
        pass


def reap_orphans(seconds=2.0):
    """Wait (bounded) for the processes adopted by adopt_orphans() to end and reap them;
    SIGKILL for those still running after `seconds`."""
    deadline, killed = time.monotonic() + seconds, False
    while True:
        left = []
        for pid in process_tree(os.getpid())[:-1]:
            try:
                done, _ = os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                continue  # not ours (a grandchild): its own parent reaps it
            if not done:
                left.append(pid)
        if not left or (killed and time.monotonic() > deadline):
            return
        if time.monotonic() > deadline:
            for pid in left:
                note(f"process {pid} left over: killed")
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            deadline, killed = time.monotonic() + seconds, True
        time.sleep(0.05)


def alive(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


# -- helper processes ----------------------------------------------------------------------------

def run_device():
    """The end-device: an echo port (selectors, many idle connections) and a sink port (a
    thread per connection: 8-byte length, b"r", that many bytes, b"k"). Prints its ports."""
    raise_nofile()
    echo = socket.socket()
    echo.bind(("127.0.0.1", 0))
    echo.listen(4096)
    echo.setblocking(False)
    sink = socket.socket()
    sink.bind(("127.0.0.1", 0))
    sink.listen(128)
    print(json.dumps({"echo": echo.getsockname()[1], "sink": sink.getsockname()[1]}),
          flush=True)
    exit_with_stdin()

    def sink_one(conn):
        with conn:
            try:
                header = recv_exactly(conn, 8)
                if header is None:
                    return
                size = struct.unpack("!Q", header)[0]
                conn.sendall(b"r")
                buffer, received = bytearray(CHUNK), 0
                while received < size:
                    n = conn.recv_into(buffer)
                    if not n:
                        return
                    received += n
                conn.sendall(b"k")
            except OSError:
                pass

    def sink_loop():
        while True:
            try:
                conn, _ = sink.accept()
            except OSError:
                time.sleep(0.01)
                continue
            threading.Thread(target=sink_one, args=(conn,), daemon=True).start()

    threading.Thread(target=sink_loop, daemon=True).start()
    selector = selectors.DefaultSelector()
    selector.register(echo, selectors.EVENT_READ, None)
    while True:
        for key, _ in selector.select():
            if key.data is None:
                try:
                    while True:
                        conn, _ = echo.accept()
                        conn.setblocking(False)
                        selector.register(conn, selectors.EVENT_READ, True)
                except BlockingIOError:
                    pass
                except OSError:  # out of descriptors: let the bench see hung connections
                    time.sleep(0.01)
                continue
            conn = key.fileobj
            try:
                data = conn.recv(65536)
            except BlockingIOError:
                continue
            except OSError:
                data = b""
            if data:
                try:
                    conn.send(data)  # a byte or two at a time: never a partial send
                except OSError:
                    pass
            else:
                selector.unregister(conn)
                conn.close()


def run_bare_relay(target_port):
    """The baseline relay: Twisted's portforward to the device's echo port. Prints its port."""
    raise_nofile()
    from twisted.internet import reactor
    from twisted.protocols import portforward

    port = reactor.listenTCP(0, portforward.ProxyFactory("127.0.0.1", target_port),
                             backlog=1024, interface="127.0.0.1")
    print(json.dumps({"port": port.getHost().port}), flush=True)
    exit_with_stdin()
    reactor.run()


def run_twistd(argv):
    """`twistd ARGV` in this process (started by this script, so its open-file limit is
    raised like every node's)."""
    from twisted.scripts.twistd import run

    sys.argv = ["twistd", *argv]
    run()


# -- clients (in this process) -------------------------------------------------------------------

def transfer(address, size, payload):
    """Send `size` bytes to the sink at `address` → seconds from the first byte to its b"k"."""
    with socket.create_connection(address, timeout=IO_TIMEOUT) as s:
        s.sendall(struct.pack("!Q", size))
        if recv_exactly(s, 1) != b"r":
            raise RuntimeError(f"the sink at {address} did not answer the header")
        started = time.perf_counter()
        left = size
        while left:
            n = min(left, len(payload))
            s.sendall(payload[:n])
            left -= n
        if recv_exactly(s, 1) != b"k":
            raise RuntimeError(f"the sink at {address} did not get everything")
        return time.perf_counter() - started


def first_byte(address):
    """A new connection to `address`, 1 byte out and its echo back → seconds."""
    started = time.perf_counter()
    with socket.create_connection(address, timeout=TUNNEL_TIMEOUT) as s:
        s.sendall(b"x")
        if s.recv(1) != b"x":
            raise RuntimeError(f"no echo through {address}")
        return time.perf_counter() - started


def open_idle(address, count, seconds, concurrency, progress=None):
    """Up to `count` connections to `address`, each checked with a 1-byte echo and kept
    open → (sockets, failures, last error, seconds taken)."""
    state = {"held": [], "inflight": 0, "failures": 0, "error": ""}
    lock = threading.Lock()
    started = time.monotonic()
    deadline = started + seconds

    def worker():
        while True:
            with lock:
                if (len(state["held"]) + state["inflight"] >= count
                        or state["failures"] >= MAX_FAILURES or time.monotonic() > deadline):
                    return
                state["inflight"] += 1
            s = None
            try:
                s = socket.create_connection(address, timeout=TUNNEL_TIMEOUT)
                s.sendall(b"x")
                ok = s.recv(1) == b"x"
                error = "" if ok else "closed without an echo"
            except OSError as e:
                ok, error = False, f"{type(e).__name__}: {e}"
            with lock:
                state["inflight"] -= 1
                if ok:
                    state["held"].append(s)
                    if progress and len(state["held"]) % 1000 == 0:
                        progress(len(state["held"]), time.monotonic() - started)
                else:
                    state["failures"] += 1
                    state["error"] = error
                    if s is not None:
                        s.close()

    threads = [threading.Thread(target=worker, daemon=True) for _ in range(concurrency)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(max(0.0, deadline - time.monotonic()) + TUNNEL_TIMEOUT + 5)
    with lock:
        return (list(state["held"]), state["failures"], state["error"],
                time.monotonic() - started)


def check_held(sockets, seconds=30.0):
    """One more echo through every socket → how many answered within `seconds`."""
    selector = selectors.DefaultSelector()
    for s in sockets:
        try:
            s.sendall(b"y")
            s.setblocking(False)
            selector.register(s, selectors.EVENT_READ)
        except OSError:
            continue
    answered, waiting = 0, len(selector.get_map())
    deadline = time.monotonic() + seconds
    while waiting and time.monotonic() < deadline:
        for key, _ in selector.select(max(0.0, deadline - time.monotonic())):
            try:
                data = key.fileobj.recv(1)
            except BlockingIOError:
                continue
            except OSError:
                data = b""
            selector.unregister(key.fileobj)
            waiting -= 1
            answered += data == b"y"
    selector.close()
    return answered


def close_all(sockets):
    for s in sockets:
        try:
            s.close()
        except OSError:
            pass


# -- the bench -----------------------------------------------------------------------------------

class Bench:
    """The processes and temporary directories of one run."""

    def __init__(self, options):
        self.options = options
        self.verbose = options.verbose
        # A short path: the control sockets' paths must fit a UNIX socket address.
        self.base = tempfile.mkdtemp(prefix="mn-tun-", dir="/tmp")
        self.dirs = [self.base]
        self.processes = {}  # name → Popen
        self.held = []
        self.limit = raise_nofile()
        adopt_orphans()
        self.config = self.path("bench.conf")
        big = 10 * max(options.tunnels, 1000)
        with open(self.config, "w") as f:
            f.write("[rpc]\nrate-limit = 1000000000\nrate-burst = 1000000000\n"
                    f"[tunnel]\ntunnels-per-node = {big}\ntunnels-per-domain = {big}\n"
                    f"tunnels-total = {big}\nidle-timeout = 3600\n"
                    f"[relay]\nrelayed-per-domain = {big}\nrelayed-total = {big}\n")

    def detail(self, text):
        if self.verbose:
            note(text)

    def path(self, name):
        return os.path.join(self.base, name)

    # -- processes ---------------------------------------------------------------------------

    def spawn(self, name, command, user=None, **kwargs):
        """Start `command` (its soft open-file limit raised; as `user`, a pwd entry, if
        given; in a session of its own) and keep it for the end."""
        def prepare():
            raise_nofile()
            if user is not None:
                os.setgroups([])
                os.setgid(user.pw_gid)
                os.setuid(user.pw_uid)

        kwargs.setdefault("stdin", subprocess.DEVNULL)
        kwargs.setdefault("env", dict(os.environ, PYTHONPATH=ROOT))
        process = subprocess.Popen(command, preexec_fn=prepare, start_new_session=True,
                                   cwd=ROOT, **kwargs)
        self.processes[name] = process
        return process

    def helper(self, name, *args):
        """A helper role of this script that prints one JSON line when ready → (process,
        that JSON)."""
        process = self.spawn(name, [sys.executable, THIS, *args], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE)
        ready = {}

        def read():
            ready["line"] = process.stdout.readline()

        reader = threading.Thread(target=read, daemon=True)
        reader.start()
        reader.join(START_TIMEOUT)
        if not ready.get("line"):
            raise RuntimeError(f"the {name} helper did not start")
        return process, json.loads(ready["line"])

    def stop(self):
        close_all(self.held)
        self.held = []
        for name, process in list(self.processes.items())[::-1]:  # ssh before sshd
            if process.stdin:
                try:
                    process.stdin.close()
                except OSError:
                    pass
            if process.poll() is None:
                for pid in process_tree(process.pid):  # children first: each one reaped
                    self._end(name, pid, process)
            if process.stdout:
                process.stdout.close()
        self.processes = {}
        reap_orphans()
        for path in self.dirs:
            shutil.rmtree(path, ignore_errors=True)

    def _end(self, name, pid, process):
        """SIGTERM to `pid` (`process` or one of its descendants), SIGKILL if it is still
        there after STOP_TIMEOUT; a descendant is waited for until its parent reaped it."""
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            return
        if pid == process.pid:
            try:
                process.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                note(f"{name} did not stop on SIGTERM: killed")
                process.kill()
                process.wait(5)
            return
        deadline, exited = time.monotonic() + STOP_TIMEOUT, None
        while os.path.exists(f"/proc/{pid}") and time.monotonic() < deadline:
            if not alive(pid):  # a zombie: its parent reaps it soon, or we move on
                exited = exited or time.monotonic()
                if time.monotonic() - exited > 1.0:
                    return
            time.sleep(0.02)
        if alive(pid):
            note(f"{name}: its process {pid} did not stop on SIGTERM: killed")
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    # -- the network -------------------------------------------------------------------------

    def command(self, *args):
        out = subprocess.run([sys.executable, "-m", "meshnode.cli", *args], capture_output=True,
                             text=True, timeout=COMMAND_TIMEOUT, cwd=ROOT,
                             env=dict(os.environ, PYTHONPATH=ROOT))
        if out.returncode != 0:
            raise RuntimeError(f"meshnode {' '.join(args)}: {out.stdout}{out.stderr}")
        return out.stdout

    def enroll(self, name):
        from twisted.internet import reactor

        from meshnode.core import identity
        from meshnode.roles.operator import signing

        state_dir = self.path(name)
        me = identity.load_or_create(state_dir, reactor)
        _, bundle = signing.sign_node(self.path("op"), me.signing_public, me.agreement_public,
                                       self.domain, name, reactor)
        identity.write_private(os.path.join(state_dir, identity.ENROLLMENT_FILE), bundle)
        return state_dir

    def status(self, name):
        from meshnode.cli import main as cli

        try:
            return cli.control_request(self.path(name), "GET", "/v1/status", None, 5)
        except cli.CommandError:
            return None

    def log_tail(self, name):
        try:
            with open(self.path(f"{name}.log"), errors="replace") as f:
                return f.read()[-2000:]
        except OSError:
            return "(no log)"

    def start_node(self, name, *flags):
        """`twistd -n meshnode` (through run_twistd) on a free port → its RPC port, once its
        control socket answers (the node picks the port, --rpc-port 0, and its status tells
        it)."""
        os.makedirs(self.path(name), mode=0o700, exist_ok=True)
        process = self.spawn(name, [
            sys.executable, THIS, "twistd", "-n", "--pidfile=",
            "--logfile", self.path(f"{name}.log"), "meshnode", "--state-dir", self.path(name),
            "--config", self.config, "--listen-address", "127.0.0.1", "--rpc-port", "0",
            *flags])
        deadline = time.monotonic() + START_TIMEOUT
        while (status := self.status(name)) is None:
            if process.poll() is not None:
                raise RuntimeError(f"{name} exited: {self.log_tail(name)}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"{name} did not start in {START_TIMEOUT} s: "
                                   f"{self.log_tail(name)}")
            time.sleep(0.1)
        return status["rpc_port"]

    def wait(self, what, check, seconds=READY_TIMEOUT, log=None):
        deadline = time.monotonic() + seconds
        while not check():
            if time.monotonic() > deadline:
                raise RuntimeError(f"{what} not within {seconds} s"
                                   + (f": {self.log_tail(log)}" if log else ""))
            time.sleep(0.2)

    def build(self):
        """Device, operator, super-node, the two tunnel-nodes, the user-node and its four
        listeners → {(path, "sink"|"echo"): (host, port)}."""
        from twisted.internet import reactor

        from meshnode.roles.operator import signing

        self.device, ports = self.helper("device", "device")
        self.device_ports = ports
        signing.init_operator(self.path("op"), OPERATOR_DOMAIN, "operator", reactor)
        self.domain = json.loads(self.command("--state-dir", self.path("op"), "operator",
                                              "domain", "create", "acme", "--json"))["domain"]
        for path in ("direct", "relayed"):
            self.command("--state-dir", self.path("op"), "operator", "device", "add",
                         "--domain", "acme", "--name", f"printer-{path}", "--mac", MACS[path],
                         "--address", "127.0.0.1", "--location", LOCATIONS[path],
                         "--port", str(ports["sink"]), "--port", str(ports["echo"]))
        operator_port = self.start_node("op", "--operator", "--replicas", "1",
                                        "--enroll-listen", "tcp:0:interface=127.0.0.1")
        at_operator = ("--operator-rpc", f"127.0.0.1:{operator_port}")
        self.enroll("super1")
        self.start_node("super1", "--super", "--relay-port", "0", *at_operator)
        self.wait("the super-node placed on 0000-ffff",
                  lambda: (self.status("super1") or {}).get("super", {}).get("ranges")
                  == ["0000-ffff"], log="super1")
        for path in ("direct", "relayed"):
            name = f"tunnel-{path}"
            self.enroll(name)
            self.start_node(name, "--tunnel", "--tunnel-port", "0", "--location",
                            LOCATIONS[path], *at_operator,
                            *(["--no-direct"] if path == "relayed" else []))
        self.enroll("user1")
        self.start_node("user1", *at_operator)
        from meshnode.cli import main as cli

        listeners = {}
        for path in ("direct", "relayed"):
            for kind in ("sink", "echo"):
                opened = cli.control_request(self.path("user1"), "POST", "/v1/tunnels", {
                    "device": f"printer-{path}", "listen": "tcp:0:interface=127.0.0.1",
                    "port": ports[kind], "name": f"{path}-{kind}"}, 10)
                host, port = opened["address"].rsplit(":", 1)
                listeners[path, kind] = (host, int(port))
        for path in ("direct", "relayed"):  # the first tunnel that works: all is announced
            address = listeners[path, "echo"]

            def works():
                try:
                    first_byte(address)
                    return True
                except (OSError, RuntimeError):
                    return False

            self.wait(f"a tunnel on the {path} path", works, log="user1")
            used = {one["name"]: one["last_path"]
                    for one in self.status("user1")["user"]["listeners"]}[f"{path}-echo"]
            if used != path:
                raise RuntimeError(f"the {path} listener's tunnel took the {used} path")
        return listeners

    def start_ssh(self, sink_port):
        """sshd and `ssh -N -L` to the sink → the forwarded (host, port), or None (noted)."""
        sshd = self.options.sshd or shutil.which(
            "sshd", path=os.environ.get("PATH", "") + ":/usr/sbin:/sbin")
        if not sshd or not os.path.exists(sshd):
            note("ssh -L: skipped: no sshd (give one with --sshd); the throughput baseline is "
                 "loopback TCP")
            return None
        sshd = os.path.abspath(sshd)  # sshd re-executes itself by its absolute path
        me = pwd.getpwuid(os.geteuid())
        if os.geteuid() == 0:
            user = pwd.getpwnam(self.options.sshd_user)
        else:
            user = me
        drop = user if user.pw_uid != os.geteuid() else None
        home = tempfile.mkdtemp(prefix="mn-ssh-", dir="/tmp")
        self.dirs.append(home)
        key = self.path("ssh_client_key")
        for path in (os.path.join(home, "host_key"), key):
            subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", path],
                           check=True, timeout=COMMAND_TIMEOUT, capture_output=True)
        shutil.copy(key + ".pub", os.path.join(home, "authorized_keys"))
        port = dht_bench.free_port()
        with open(os.path.join(home, "sshd_config"), "w") as f:
            f.write(f"Port {port}\nListenAddress 127.0.0.1\nHostKey {home}/host_key\n"
                    f"PidFile none\nAuthorizedKeysFile {home}/authorized_keys\n"
                    "StrictModes no\nUsePAM yes\nPasswordAuthentication no\n"
                    "KbdInteractiveAuthentication no\nAllowTcpForwarding yes\n"
                    "PermitRootLogin prohibit-password\n")
        if drop is not None:
            for path in [home] + [os.path.join(home, n) for n in os.listdir(home)]:
                os.chown(path, user.pw_uid, user.pw_gid)
        log = open(self.path("sshd.log"), "w")
        server = self.spawn("sshd", [sshd, "-D", "-e", "-f", os.path.join(home, "sshd_config")],
                            user=drop, stdout=log, stderr=log, env=dict(os.environ))
        log.close()
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                pass
            if server.poll() is not None or time.monotonic() > deadline:
                note(f"ssh -L: skipped: sshd did not start: {self.log_tail('sshd')[-500:]}")
                return None
            time.sleep(0.1)
        local = dht_bench.free_port()
        cipher = ["-c", self.options.ssh_cipher] if self.options.ssh_cipher else []
        log = open(self.path("ssh.log"), "w")
        client = self.spawn("ssh", [
            "ssh", "-N", "-i", key, "-p", str(port), "-o", "BatchMode=yes",
            "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null",
            "-o", "ExitOnForwardFailure=yes", "-o", "LogLevel=ERROR", *cipher,
            "-L", f"127.0.0.1:{local}:127.0.0.1:{sink_port}", f"{user.pw_name}@127.0.0.1"],
            stdout=log, stderr=log, env=dict(os.environ))
        log.close()
        while True:
            try:
                transfer(("127.0.0.1", local), 1, b"x")
                break
            except (OSError, RuntimeError):
                pass
            if client.poll() is not None or time.monotonic() > deadline + START_TIMEOUT:
                note(f"ssh -L: skipped: the forward did not work: {self.log_tail('ssh')} "
                     f"{self.log_tail('sshd')[-500:]}")
                return None
            time.sleep(0.2)
        self.detail(f"ssh -L: sshd {sshd} as {user.pw_name}, cipher "
                    f"{self.options.ssh_cipher or 'default'}")
        return ("127.0.0.1", local)

    # -- measurements ------------------------------------------------------------------------

    def cpu_shares(self, names, run):
        """run() → (its result, {process: CPU share over its span}); "client" is this one,
        "others" all the machine's other processes (another load skews every figure)."""
        before = {name: tree_cpu(self.processes[name].pid) for name in names}
        cpu, busy, started = time.process_time(), machine_busy(), time.perf_counter()
        result = run()
        elapsed = time.perf_counter() - started
        shares = {"client": (time.process_time() - cpu) / elapsed}
        for name in names:
            shares[name] = (tree_cpu(self.processes[name].pid) - before[name]) / elapsed
        shares["others"] = max(0.0, (machine_busy() - busy) / elapsed - sum(shares.values()))
        self.elapsed = elapsed
        return result, shares

    def bench_throughput(self, listeners, ssh):
        size = self.options.bytes
        payload = memoryview(os.urandom(CHUNK))
        paths = {"loopback": (("127.0.0.1", self.device_ports["sink"]), ["device"]),
                 "direct": (listeners["direct", "sink"], ["user1", "tunnel-direct", "device"]),
                 "relayed": (listeners["relayed", "sink"],
                             ["user1", "super1", "tunnel-relayed", "device"])}
        if ssh is not None:
            paths["ssh"] = (ssh, ["ssh", "sshd", "device"])
        rates = {path: [] for path in paths}
        for n in range(self.options.rounds):
            for path, (address, names) in paths.items():
                seconds, shares = self.cpu_shares(names,
                                                  lambda: transfer(address, size, payload))
                rates[path].append(size / seconds / 1e6)
                self.detail(f"throughput round {n + 1} {path}: {rates[path][-1]:.0f} MB/s; CPU "
                            + ", ".join(f"{k} {v:.0%}" for k, v in shares.items()))
        if ssh is not None:
            baseline = rates["ssh"]
            cipher = self.options.ssh_cipher or "default cipher"
            unit = f"MB/s (baseline: ssh -L, {cipher})"
        else:
            baseline = rates["loopback"]
            unit = "MB/s (baseline: loopback TCP; no sshd)"
        rpc_bench.print_figure("loopback_throughput", unit, rates["loopback"], baseline)
        rpc_bench.print_figure("tunnel_direct_throughput", unit, rates["direct"], baseline)
        rpc_bench.print_figure("tunnel_relayed_throughput", unit, rates["relayed"], baseline)

    def bench_first_byte(self, listeners):
        count = self.options.ttfb_count
        paths = {"loopback": (("127.0.0.1", self.device_ports["echo"]), ["device"]),
                 "direct": (listeners["direct", "echo"], ["user1", "tunnel-direct", "device"]),
                 "relayed": (listeners["relayed", "echo"],
                             ["user1", "super1", "tunnel-relayed", "device"])}
        for address, _ in paths.values():  # a warm-up
            for _ in range(10):
                first_byte(address)
        samples = {}
        for path, (address, names) in paths.items():
            samples[path], shares = self.cpu_shares(
                names, lambda: [first_byte(address) * 1000 for _ in range(count)])
            per_tunnel = {name: share * self.elapsed / count * 1000
                          for name, share in shares.items()}
            self.detail(f"first byte {path}: p50 {dht_bench.percentile(samples[path], 50):.3f}"
                        f" ms, p99 {dht_bench.percentile(samples[path], 99):.3f} ms; CPU ms per"
                        " tunnel " + ", ".join(f"{k} {v:.2f}" for k, v in per_tunnel.items()))
        for q in (50, 99):
            bare = dht_bench.percentile(samples["loopback"], q)
            for path in ("direct", "relayed"):
                rpc_bench.print_figure(f"tunnel_{path}_ttfb_p{q}", "ms",
                                       [dht_bench.percentile(samples[path], q)], [bare],
                                       digits=3)

    def hold(self, name, address, count, pids, check=None):
        """Idle tunnels through `address`, held → (count answering, RSS growth of each of
        `pids` in KiB); `check()`, if given, says more while they are held (--verbose)."""
        before = {who: rss_kib(pid) for who, pid in pids.items()}
        names = [who for who in pids]

        def progress(held, seconds):
            self.detail(f"{name}: {held} held after {seconds:.0f} s")

        (held, failures, error, seconds), shares = self.cpu_shares(
            names, lambda: open_idle(address, count, self.options.idle_seconds,
                                     self.options.concurrency, progress))
        self.held = held
        answered = check_held(held)
        time.sleep(1.0)  # let the last opened settle (TLS buffers released, timers set)
        growth = {who: rss_kib(pid) - before[who] for who, pid in pids.items()}
        self.detail(f"{name}: {len(held)} opened in {seconds:.1f} s "
                    f"({len(held) / seconds:.0f}/s), {answered} answered again, {failures} "
                    f"failures{': ' + error if error else ''}; CPU while opening "
                    + ", ".join(f"{k} {v:.0%}" for k, v in shares.items())
                    + "; RSS growth per tunnel "
                    + ", ".join(f"{who} {kib / max(answered, 1):.2f} KiB"
                                for who, kib in growth.items()))
        if check is not None:
            self.detail(f"{name}: {check()}")
        if failures:
            note(f"{name}: stopped after {failures} failed tunnels: {error}")
        close_all(held)
        self.held = []
        return answered, growth

    def bench_idle(self, listeners):
        wanted = self.options.tunnels
        # two descriptors per tunnel in each node on the path; one here and in the device
        fits = min(self.limit, raise_nofile()) - DESCRIPTOR_MARGIN
        with open(f"/proc/{self.processes['super1'].pid}/limits") as f:
            for line in f:
                if line.startswith("Max open files"):
                    fits = min(fits, (int(line.split()[3]) - DESCRIPTOR_MARGIN) // 2)
        if fits < wanted:
            note(f"idle tunnels: {wanted} cut to {fits} by the open-file limit")
            wanted = fits
        bare, ready = self.helper("bare-relay", "bare-relay", str(self.device_ports["echo"]))
        bare_address = ("127.0.0.1", ready["port"])
        for _ in range(100):  # warm-up, as the relay had: the TTFB tunnels
            first_byte(bare_address)
        bare_count, bare_growth = self.hold("bare relay", bare_address, wanted,
                                            {"bare-relay": bare.pid})
        pids = {name: self.processes[name].pid
                for name in ("super1", "user1", "tunnel-relayed")}
        def check():
            relay = self.status("super1")["super"]["relay"]
            tunnel = self.status("tunnel-relayed")["tunnel"]
            return (f"the relay counts {relay['open']} open, refused {relay['refused']}; "
                    f"the tunnel-node {tunnel['open']} open, refused {tunnel['refused']}")

        count, growth = self.hold("meshnode relay", listeners["relayed", "echo"], wanted, pids,
                                  check)
        self.wait("the relay's tunnels closed",
                  lambda: self.status("super1")["super"]["relay"]["open"] == 0)
        rpc_bench.print_figure("relay_idle_tunnels", "tunnels", [count], [bare_count])
        rpc_bench.print_figure("relay_memory_per_tunnel", "KiB (VmRSS)",
                               [growth["super1"] / max(count, 1)],
                               [bare_growth["bare-relay"] / max(bare_count, 1)], digits=2)


def bench(options):
    run = Bench(options)
    previous = signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    try:
        listeners = run.build()
        if not options.skip_throughput:
            run.bench_throughput(listeners, run.start_ssh(run.device_ports["sink"]))
        if not options.skip_ttfb:
            run.bench_first_byte(listeners)
        if not options.skip_idle:
            run.bench_idle(listeners)
    finally:
        run.stop()
        signal.signal(signal.SIGTERM, previous)


def main():
    if sys.argv[1:2] == ["twistd"]:
        return run_twistd(sys.argv[2:])
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("role", nargs="?", default="bench")
    parser.add_argument("args", nargs="*")
    parser.add_argument("--bytes", type=parse_size, default=1 << 30,
                        help="bytes per throughput transfer (K/M/G suffixes; default 1G)")
    parser.add_argument("--rounds", type=int, default=3, help="throughput rounds per path")
    parser.add_argument("--ttfb-count", type=int, default=200, help="tunnels timed per path")
    parser.add_argument("--tunnels", type=int, default=9000, help="idle tunnels to hold")
    parser.add_argument("--idle-seconds", type=float, default=300.0,
                        help="time bound for opening the idle tunnels")
    parser.add_argument("--concurrency", type=int, default=16,
                        help="idle tunnels being opened at a time")
    parser.add_argument("--sshd", help="the sshd binary for the ssh -L baseline")
    parser.add_argument("--sshd-user", default="nobody",
                        help="the user sshd runs as when this runs as root")
    parser.add_argument("--ssh-cipher", help="ssh -c CIPHER (default: OpenSSH's)")
    parser.add_argument("--skip-throughput", action="store_true")
    parser.add_argument("--skip-ttfb", action="store_true")
    parser.add_argument("--skip-idle", action="store_true")
    parser.add_argument("--verbose", action="store_true", help="details on stderr")
    options = parser.parse_args()
    if options.role == "device":
        run_device()
    elif options.role == "bare-relay":
        run_bare_relay(int(options.args[0]))
    else:
        bench(options)


if __name__ == "__main__":
    main()
