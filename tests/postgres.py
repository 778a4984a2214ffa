"""A throwaway PostgreSQL cluster for tests: started lazily once per process, gone at exit.

`postgres_url()` is a database in that cluster; `fresh_database()` makes a new empty one;
`skip_reason()` says why PostgreSQL tests cannot run here (None when they can).

The cluster lives in a fresh temporary directory, listens on a free TCP port on 127.0.0.1 only
(its UNIX socket inside that directory), trusts every local connection and never fsyncs. As root
(initdb refuses to run as root) initdb and pg_ctl run as the `postgres` user through `runuser`.
"""

import atexit
import glob
import itertools
import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import threading

SUPERUSER = "postgres"
DATABASE = "meshnode_test"
START_TIMEOUT = 30  # seconds, for initdb and for `pg_ctl -w -t` start
COMMAND_TIMEOUT = 60  # seconds, a bound on any subprocess beyond pg_ctl's own
CONNECT_TIMEOUT = 10  # seconds, psycopg's connect_timeout
SETTINGS = {
    "listen_addresses": "'127.0.0.1'",
    "fsync": "off",
    "synchronous_commit": "off",
    "full_page_writes": "off",
    "max_connections": "50",
    "shared_buffers": "16MB",
}

_lock = threading.Lock()
_cluster = None
_names = itertools.count(1)


def bin_dir():
    """The directory of PostgreSQL 15's programs, else the newest installed, else None."""
    preferred = "/usr/lib/postgresql/15/bin"
    if os.access(os.path.join(preferred, "initdb"), os.X_OK):
        return preferred

    def version(path):
        name = path.split(os.sep)[-3]
        return [int(part) for part in re.findall(r"\d+", name)]

    found = [os.path.dirname(initdb) for initdb in glob.glob("/usr/lib/postgresql/*/bin/initdb")
             if os.access(initdb, os.X_OK)]
    return max(found, key=version) if found else None


def skip_reason():
    """None when a cluster can be started here, else a one-line reason to skip."""
    directory = bin_dir()
    if directory is None:
        return "PostgreSQL binaries not found in /usr/lib/postgresql/*/bin"
    for program in ("pg_ctl", "postgres"):
        if not os.access(os.path.join(directory, program), os.X_OK):
            return f"PostgreSQL's {program} not found in {directory}"
    try:
        import psycopg  # noqa: F401
    except ImportError:
        return "the psycopg module (psycopg 3) is not installed"
    if os.geteuid() == 0:
        if shutil.which("runuser") is None:
            return "running as root, and runuser (to run initdb as postgres) is missing"
        try:
            pwd.getpwnam(SUPERUSER)
        except KeyError:
            return "running as root, and there is no postgres user to run initdb as"
    return None


def postgres_url():
    """The SQLAlchemy URL of a database in this process's throwaway cluster."""
    return _get_cluster().url(DATABASE)


def fresh_database():
    """Create a new empty database in the cluster; returns its SQLAlchemy URL."""
    cluster = _get_cluster()
    name = f"{DATABASE}_{os.getpid()}_{next(_names)}"
    cluster.create_database(name)
    return cluster.url(name)


def _get_cluster():
    global _cluster
    with _lock:
        if _cluster is None:
            reason = skip_reason()
            if reason is not None:
                raise RuntimeError(f"cannot start PostgreSQL: {reason}")
            cluster = _Cluster(bin_dir())
            atexit.register(cluster.stop)
            cluster.start()
            cluster.create_database(DATABASE)
            _cluster = cluster
        return _cluster


def _free_tcp_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class _Cluster:
    def __init__(self, bin_directory):
        self.bin = bin_directory
        self.port = None
        self.base = tempfile.mkdtemp(prefix="mn-pg-", dir="/tmp")
        self.data = os.path.join(self.base, "data")
        self.log = os.path.join(self.base, "server.log")
        self.as_root = os.geteuid() == 0
        if self.as_root:
            user = pwd.getpwnam(SUPERUSER)
            os.chown(self.base, user.pw_uid, user.pw_gid)
        self.removed = False

    def _run(self, program, *args, timeout=COMMAND_TIMEOUT):
        command = [os.path.join(self.bin, program), *args]
        if self.as_root:
            command = ["runuser", "-u", SUPERUSER, "--", *command]
        # No PG* variables from the caller's environment may redirect the tools elsewhere.
        env = {key: value for key, value in os.environ.items() if not key.startswith("PG")}
        env.update(LC_ALL="C", LANG="C")
        return subprocess.run(command, cwd=self.base, env=env, stdin=subprocess.DEVNULL,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              errors="replace", timeout=timeout)

    def _log_tail(self):
        try:
            with open(self.log, errors="replace") as f:
                return f.read()[-2000:]
        except OSError:
            return ""

    def start(self):
        try:
            done = self._run("initdb", "-D", self.data, "-U", SUPERUSER, "--auth=trust",
                             "--encoding=UTF8", "--locale=C", "--no-sync",
                             timeout=START_TIMEOUT + 30)
            if done.returncode != 0:
                raise RuntimeError(f"initdb failed ({done.returncode}): {done.stdout[-2000:]}")
            with open(os.path.join(self.data, "postgresql.conf"), "a") as conf:
                conf.write("".join(f"{key} = {value}\n" for key, value in SETTINGS.items()))
            # A port free a moment ago may be taken by the time the server binds it (other
            # test processes do the same): try a few.
            for _ in range(3):
                self.port = _free_tcp_port()
                done = self._run("pg_ctl", "-D", self.data, "-l", self.log, "-o",
                                 f"-p {self.port} -k {self.base}", "-w", "-t",
                                 str(START_TIMEOUT), "start")
                if done.returncode == 0:
                    return
                if "could not bind" not in self._log_tail():
                    break
            raise RuntimeError(f"pg_ctl start failed ({done.returncode}): {done.stdout[-1000:]}"
                               f"\n{self._log_tail()}")
        except BaseException:
            self.stop()
            raise

    def url(self, database):
        return f"postgresql+psycopg://{SUPERUSER}@127.0.0.1:{self.port}/{database}"

    def create_database(self, name):
        import psycopg
        from psycopg import sql

        with psycopg.connect(host="127.0.0.1", port=self.port, user=SUPERUSER,
                             dbname="postgres", autocommit=True,
                             connect_timeout=CONNECT_TIMEOUT) as connection:
            connection.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))

    def _postmaster_pid(self):
        try:
            with open(os.path.join(self.data, "postmaster.pid")) as f:
                return int(f.readline())
        except (OSError, ValueError):
            return None

    def _kill(self, pid):
        """Never leave a server behind: SIGKILL the postmaster if it is still this cluster's."""
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if self.data.encode() not in f.read():
                    return
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass

    def stop(self):
        """Stop the server (immediate shutdown) and remove the directory; safe to call twice."""
        if self.removed:
            return
        self.removed = True
        try:
            pid = self._postmaster_pid()
            if pid is not None:
                try:
                    stopped = self._run("pg_ctl", "-D", self.data, "-m", "immediate", "-w",
                                        "-t", "10", "stop", timeout=20).returncode == 0
                except subprocess.TimeoutExpired:
                    stopped = False
                if not stopped:
                    self._kill(pid)
        finally:
            shutil.rmtree(self.base, ignore_errors=True)
