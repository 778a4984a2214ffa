"""Real `twistd -n meshnode` processes on loopback: bootstrap, ping, bad input, a datagram flood."""

import os
import random
import socket

from twisted.internet import defer, reactor, task, threads
from twisted.trial.unittest import TestCase

from meshnode.cli import main as cli
from meshnode.core.identity import IdentityService
from meshnode.rpc.messages import Command, Ping
from meshnode.rpc.service import RESTART_SKEW_MS, RPCService
from tests.nodes import Network, meshnode_command, run_command

DOMAIN = 0x00020001
# Bounds of the flood test's waits for the target to count what it was sent.
REPLAY_WAIT_SECONDS, REPLAY_WAIT_POLLS = 10, 200
BATCH_WAIT_SECONDS, BATCH_WAIT_POLLS = 10, 1000


class TwoNodesTests(TestCase):
    timeout = 90

    @defer.inlineCallbacks
    def test_ping_after_get_node_bootstrap(self):
        """Two enrolled nodes that never met ping each other after the GetNode bootstrap."""
        network = Network(self)
        alice = yield network.start(network.enroll("alice", DOMAIN))
        bob = yield network.start(network.enroll("bob", DOMAIN))

        result = yield alice.control("POST", "/v1/ping", {"address": bob.address, "count": 3})

        self.assertEqual(result["name"], "bob")
        self.assertEqual(len(result["rtt_ms"]), 3)
        self.assertTrue(all(rtt > 0 for rtt in result["rtt_ms"]))
        bob_status = yield bob.status()
        # bob first could not open alice's sealed Ping, asked for her Node record, then answered
        self.assertEqual(bob_status["drops"], {"unknown_sender": 1})
        self.assertEqual(bob_status["accepted"]["PING"], 3)
        self.assertEqual(bob_status["accepted"]["NODE"], 1)
        back = yield bob.control("POST", "/v1/ping", {"address": alice.address})
        self.assertEqual(back["name"], "alice")

    @defer.inlineCallbacks
    def test_cli_ping_and_status(self):
        """`meshnode ping` and `meshnode status --json` work against running nodes."""
        network = Network(self)
        alice = yield network.start(network.enroll("alice", DOMAIN))
        bob = yield network.start(network.enroll("bob", DOMAIN))

        code, output = yield run_command(meshnode_command(
            "--state-dir", alice.state_dir, "ping", "--count", "2", bob.address))
        self.assertEqual(code, 0, output)
        self.assertEqual(output.count("Pong from bob"), 2, output)

        code, output = yield run_command(meshnode_command(
            "--state-dir", bob.state_dir, "status", "--json"))
        self.assertEqual(code, 0, output)
        self.assertIn('"name": "bob"', output)

    @defer.inlineCallbacks
    def test_node_restarts_with_the_same_identity(self):
        """A restarted node keeps its keys and still answers a peer that knew it."""
        network = Network(self)
        state_dir = network.enroll("bob", DOMAIN)
        bob = yield network.start(state_dir)
        alice = yield network.start(network.enroll("alice", DOMAIN))
        first = yield alice.control("POST", "/v1/ping", {"address": bob.address})
        yield bob.stop()
        bob = yield network.start(state_dir)
        second = yield alice.control("POST", "/v1/ping", {"address": bob.address})
        self.assertEqual(first["node_id"], second["node_id"])

    @defer.inlineCallbacks
    def test_unenrolled_node_runs_and_drops_what_it_cannot_authenticate(self):
        """A node without a Node record starts, says so in its log, and answers nobody."""
        network = Network(self)
        loner_dir = os.path.join(network.base, "loner")
        loner = yield network.start(loner_dir)
        alice = yield network.start(network.enroll("alice", DOMAIN))

        status = yield loner.status()
        self.assertFalse(status["enrolled"])
        self.assertIn("not enrolled", loner.log())
        with self.assertRaises(cli.CommandError):
            yield alice.control("POST", "/v1/ping", {"address": loner.address, "timeout": 0.5})
        status = yield loner.status()
        self.assertEqual(status["drops"].get("not_enrolled"), 1)

    @defer.inlineCallbacks
    def test_bad_command_line_exits_with_one_line_before_writing(self):
        """A bad flag value exits non-zero with one line and creates no state directory."""
        network = Network(self)
        state_dir = os.path.join(network.base, "never")
        twistd = os.path.join(os.path.dirname(meshnode_command()[0]), "twistd")
        code, output = yield run_command([twistd, "-n", "--pidfile=", "meshnode", "--super",
                                          "--partition", "8000-7fff", "--state-dir", state_dir])
        self.assertNotEqual(code, 0)
        self.assertEqual(output.strip(), "twistd meshnode: partition: '8000-7fff' starts above "
                                         "its end")
        self.assertFalse(os.path.exists(state_dir))

    @defer.inlineCallbacks
    def test_port_in_use_is_one_clear_error(self):
        """A node whose RPC port is taken exits non-zero and says which port."""
        network = Network(self)
        alice = yield network.start(network.enroll("alice", DOMAIN))
        twistd = os.path.join(os.path.dirname(meshnode_command()[0]), "twistd")
        code, output = yield run_command([
            twistd, "-n", "--pidfile=", "meshnode", "--state-dir",
            network.enroll("bob", DOMAIN), "--listen-address", "127.0.0.1",
            "--rpc-port", str(alice.port)])
        self.assertEqual(code, 1, output)
        self.assertIn(f"meshnode cannot start: cannot listen on UDP 127.0.0.1:{alice.port}",
                      output)

    @defer.inlineCallbacks
    def test_unreachable_database_is_one_clear_error(self):
        """A node whose database cannot be opened exits at once, saying why."""
        network = Network(self)
        twistd = os.path.join(os.path.dirname(meshnode_command()[0]), "twistd")
        code, output = yield run_command([
            twistd, "-n", "--pidfile=", "meshnode", "--state-dir", network.enroll("bob", DOMAIN),
            "--listen-address", "127.0.0.1", "--rpc-port", "0", "--database",
            "postgresql+psycopg://nobody@127.0.0.1:1/none"], timeout=20)
        self.assertEqual(code, 1, output)
        self.assertIn("meshnode cannot start: cannot open the database", output)


def _mutations(valid, count, seed):
    """Random, truncated, bit-flipped, oversized and wrongly addressed datagrams."""
    rng = random.Random(seed)
    out = []
    for i in range(count):
        kind = i % 5
        base = bytearray(rng.choice(valid))
        if kind == 0:
            out.append(rng.randbytes(rng.randint(0, 1300)))
        elif kind == 1:
            out.append(bytes(base[:rng.randint(0, len(base) - 1)]))
        elif kind == 2:
            for position in rng.sample(range(len(base)), rng.randint(1, 3)):
                base[position] ^= 1 << rng.randrange(8)
            out.append(bytes(base))
        elif kind == 3:
            out.append(bytes(base) + rng.randbytes(rng.randint(1200 - len(base) + 1, 1500)))
        else:
            base[8:40] = rng.randbytes(32)  # another receiver id
            out.append(bytes(base))
    return out


def _send_all(datagrams, address):
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        for datagram in datagrams:
            sock.sendto(datagram, address)


class RobustnessTests(TestCase):
    timeout = 240

    @defer.inlineCallbacks
    def test_node_survives_100000_bad_datagrams(self):
        """100,000 random and mutated datagrams: none accepted, all counted, Ping still works."""
        network = Network(self)
        target = yield network.start(network.enroll("target", DOMAIN))
        identity_service = IdentityService(state_dir=network.enroll("prober", DOMAIN),
                                           clock=reactor)
        rpc = RPCService(identity=identity_service, reactor=reactor, interface="127.0.0.1")
        identity_service.startService()
        rpc.startService()
        self.addCleanup(rpc.stopService)
        address = ("127.0.0.1", target.port)
        peer = yield rpc.fetch_node(address)
        yield rpc.ping(peer, address)

        # Fresh sealed Pings the target never saw, plus one it accepted (to replay).
        valid = [rpc._seal(peer, Command.PING, 0, Ping(b"x" * i).encode())[1] for i in range(50)]
        replayed = valid[0]
        _send_all([replayed], address)
        deadline = reactor.seconds() + REPLAY_WAIT_SECONDS
        for _ in range(REPLAY_WAIT_POLLS):
            before = yield target.status()
            if before["accepted"].get("PING", 0) >= 2 or reactor.seconds() > deadline:
                break
            yield task.deferLater(reactor, 0.05, lambda: None)
        self.assertGreaterEqual(
            before["accepted"].get("PING", 0), 2,
            f"the target had not counted the two Pings within {REPLAY_WAIT_SECONDS} s or "
            f"{REPLAY_WAIT_POLLS} polls: {before['accepted']}")

        total, batch = 100_000, 100
        sent = 0
        dropped_before = sum(before["drops"].values())
        for start in range(0, total, batch):
            datagrams = _mutations(valid, batch, seed=start)
            datagrams[0] = replayed
            yield threads.deferToThread(_send_all, datagrams, address)
            sent += len(datagrams)
            # Pace the flood to what the node drops, so the kernel's socket buffer (about
            # 200 KiB here) never overflows and every datagram reaches the node.
            # Five polls in a row without a new drop: the rest of the batch was lost.
            last, stalls = -1, 0
            deadline = reactor.seconds() + BATCH_WAIT_SECONDS
            for _ in range(BATCH_WAIT_POLLS):
                status = yield target.status()
                dropped = sum(status["drops"].values()) - dropped_before
                if dropped >= sent:
                    break
                stalls = stalls + 1 if dropped == last else 0
                last = dropped
                if stalls >= 5:
                    break
                if reactor.seconds() > deadline:
                    self.fail(f"the target took more than {BATCH_WAIT_SECONDS} s to drop the "
                              f"batch at {start}: {dropped} of {sent} dropped so far")
            else:
                self.fail(f"the target was still dropping the batch at {start} after "
                          f"{BATCH_WAIT_POLLS} polls: {dropped} of {sent} dropped so far")
        after = yield target.status()
        self.assertTrue(target.running)
        self.assertEqual(after["accepted"], before["accepted"], "a bad datagram was accepted")
        dropped = sum(after["drops"].values()) - sum(before["drops"].values())
        self.assertGreaterEqual(dropped, int(total * 0.99))
        for reason in ("malformed", "decrypt", "receiver", "replay"):
            self.assertGreater(after["drops"].get(reason, 0), 0, reason)
        rtt = yield rpc.ping(peer, address)
        self.assertGreater(rtt, 0)


class RestartReplayTests(TestCase):
    timeout = 90

    @defer.inlineCallbacks
    def _counted(self, node, done, what, seconds=10):
        """`node`'s status once `done(status)` holds; fails after `seconds` naming `what`."""
        deadline = reactor.seconds() + seconds
        while True:
            status = yield node.status()
            if done(status):
                return status
            if reactor.seconds() > deadline:
                self.fail(f"{what} not counted within {seconds} s: drops {status['drops']}, "
                          f"accepted {status['accepted']}")
            yield task.deferLater(reactor, 0.05, lambda: None)

    @defer.inlineCallbacks
    def test_datagrams_captured_before_a_restart_are_dropped_after_it(self):
        """Sealed Pings a node took over real UDP, sent again from a raw socket after it
        restarted (same identity, fresh replay windows), are dropped as replays; a fresh Ping
        from the same sender is answered."""
        network = Network(self)
        state_dir = network.enroll("target", DOMAIN)
        target = yield network.start(state_dir)
        identity_service = IdentityService(state_dir=network.enroll("sender", DOMAIN),
                                           clock=reactor)
        rpc = RPCService(identity=identity_service, reactor=reactor, interface="127.0.0.1")
        identity_service.startService()
        rpc.startService()
        self.addCleanup(rpc.stopService)
        address = ("127.0.0.1", target.port)
        peer = yield rpc.fetch_node(address)
        yield rpc.ping(peer, address)
        captured = [rpc._seal(peer, Command.PING, 0, Ping(b"captured %d" % i).encode())[1]
                    for i in range(3)]
        _send_all(captured, address)
        yield self._counted(target, lambda s: s["accepted"].get("PING", 0) >= 4,
                            "the captured Pings")
        # Past the skew a restarted node allows for: captured well before it starts again.
        yield task.deferLater(reactor, RESTART_SKEW_MS / 1000 + 0.5, lambda: None)
        yield target.stop()
        target = yield network.start(state_dir)
        address = ("127.0.0.1", target.port)
        rtt = yield rpc.ping(peer, address)
        self.assertGreater(rtt, 0)
        _send_all(captured, address)
        status = yield self._counted(target, lambda s: s["drops"].get("replay", 0) >= 3,
                                     "three replays")
        self.assertEqual(status["drops"]["replay"], 3)
        self.assertEqual(status["accepted"].get("PING", 0), 1)
        self.assertGreater((yield rpc.ping(peer, address)), 0)
