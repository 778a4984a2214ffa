"""Node settings: an INI file whose sections and keys are a whitelist, under command-line flags.

Every setting has one parser, used for the file and the command line alike; a bad value or an
unknown key raises ConfigError naming it, before the node writes anything.
"""

import configparser
import ipaddress
import os
import urllib.parse

DEFAULT_RPC_PORT = 7400


class ConfigError(ValueError):
    """A setting that cannot be used; the message names it and says why."""


def parse_bool(text):
    value = text.strip().lower()
    if value in ("yes", "true", "on", "1"):
        return True
    if value in ("no", "false", "off", "0"):
        return False
    raise ValueError(f"{text!r} is not yes or no")


def parse_port(text):
    try:
        port = int(text)
    except ValueError:
        raise ValueError(f"{text!r} is not a port number") from None
    if not 0 <= port <= 65535:
        raise ValueError(f"{port} is not a port number (0-65535)")
    return port


def parse_address(text):
    if text == "":
        return ""
    try:
        return str(ipaddress.ip_address(text))
    except ValueError:
        raise ValueError(f"{text!r} is not an IP address") from None


def unspecified(host):
    """Whether `host` names no one address: empty (listen-address unset), 0.0.0.0 or ::."""
    return host in ("", "0.0.0.0", "::")


def parse_partition(text):
    """'A-B' in hex, 0000-ffff, A <= B → (A, B)."""
    low, dash, high = text.partition("-")
    if not dash:
        raise ValueError(f"{text!r} is not a range A-B of hex partition keys")
    try:
        bounds = int(low, 16), int(high, 16)
    except ValueError:
        raise ValueError(f"{text!r} is not a range A-B of hex partition keys") from None
    if not all(0 <= b <= 0xFFFF for b in bounds):
        raise ValueError(f"{text!r} is outside 0000-ffff")
    if bounds[0] > bounds[1]:
        raise ValueError(f"{text!r} starts above its end")
    return bounds


def _parse_positive(text, convert, kind):
    try:
        value = convert(text)
    except ValueError:
        raise ValueError(f"{text!r} is not {kind}") from None
    if not value > 0:  # NaN too
        raise ValueError(f"{text!r} is not above zero")
    return value


def parse_positive_float(text):
    return _parse_positive(text, float, "a number")


def parse_positive_int(text):
    return _parse_positive(text, int, "a whole number")


def parse_days(text):
    """A whole number of days, zero or more."""
    try:
        value = int(text)
    except ValueError:
        raise ValueError(f"{text!r} is not a whole number of days") from None
    if value < 0:
        raise ValueError(f"{text!r} is below zero")
    return value


def parse_https_url(text):
    parsed = urllib.parse.urlsplit(text)
    if parsed.scheme != "https" or not parsed.hostname:
        raise ValueError(f"{text!r} is not an https:// URL")
    try:
        parsed.port
    except ValueError:
        raise ValueError(f"{text!r} has a bad port") from None
    return text.rstrip("/")


def parse_proxy_url(text):
    """An HTTP proxy, http://HOST:PORT (a bare HOST:PORT means the same) → 'http://HOST:PORT'.
    Only plain-HTTP proxies that tunnel with CONNECT; no credentials in the URL."""
    candidate = text.strip() if "://" in text else f"http://{text.strip()}"
    parsed = urllib.parse.urlsplit(candidate)
    try:
        port = parsed.port
    except ValueError:
        raise ValueError(f"{text!r} has a bad port") from None
    if parsed.scheme != "http" or not parsed.hostname or not port:
        raise ValueError(f"{text!r} is not an HTTP proxy URL like http://HOST:PORT")
    if parsed.username is not None or parsed.password is not None:
        raise ValueError(f"{text!r}: proxy credentials are not supported")
    if parsed.path not in ("", "/") or parsed.query or parsed.fragment:
        raise ValueError(f"{text!r}: a proxy URL has no path")
    host = f"[{parsed.hostname}]" if ":" in parsed.hostname else parsed.hostname
    return f"http://{host}:{port}"


def parse_fingerprint(text):
    """A SHA-256 certificate fingerprint: 64 hex digits, colons allowed → lowercase hex."""
    digits = text.replace(":", "").strip().lower() if isinstance(text, str) else ""
    if len(digits) != 64 or any(c not in "0123456789abcdef" for c in digits):
        raise ValueError(f"{text!r} is not a SHA-256 fingerprint (64 hex digits)")
    return digits


def parse_existing_file(text):
    if not os.path.isfile(text):
        raise ValueError(f"{text!r} is not a file")
    return text


def parse_node_name(text):
    if not text or len(text.encode("utf-8")) > 63:
        raise ValueError(f"{text!r} must be 1 to 63 bytes")
    return text


def parse_node_or_id(text):
    """An overlay name (1-63 bytes) or a node id (64 hex digits) → bytes id or str name."""
    if isinstance(text, str) and len(text) == 64:
        try:
            return bytes.fromhex(text)
        except ValueError:
            pass
    return parse_node_name(text)


def parse_server_endpoint(text):
    kind = text.split(":", 1)[0]
    if kind not in ("ssl", "tcp") or ":" not in text:
        raise ValueError(f"{text!r} is not an endpoint like ssl:8443 or "
                         f"ssl:8443:interface=127.0.0.1")
    return text


def parse_listen_endpoint(text):
    """A local listener: tcp:PORT, tcp:PORT:interface=ADDRESS or unix:PATH."""
    parts = text.split(":")
    if parts[0] == "unix" and len(parts) > 1 and parts[1]:
        return text
    if parts[0] != "tcp" or len(parts) < 2:
        raise ValueError(f"{text!r} is not a listener like tcp:9100, "
                         f"tcp:9100:interface=127.0.0.1 or unix:/run/printer.sock")
    try:
        int(parts[1])
    except ValueError:
        raise ValueError(f"{text!r}: {parts[1]!r} is not a port number") from None
    return text


def parse_location(text):
    try:
        value = bytes.fromhex(text)
    except ValueError:
        value = b""
    if len(value) != 32:
        raise ValueError(f"{text!r} is not a 64-hex-digit location id "
                         f"(`meshnode location` prints them)")
    return value


def parse_host_port(text):
    """'HOST:PORT' or '[V6]:PORT' → (host, port)."""
    host, colon, port = text.rpartition(":")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    if not colon or not host:
        raise ValueError(f"{text!r} is not HOST:PORT")
    port_number = parse_port(port)
    if port_number == 0:
        raise ValueError(f"{text!r}: port must be 1-65535")
    return host, port_number


def parse_upnp(text):
    """auto (find the gateway by SSDP), off, or the gateway's root description URL."""
    if text in ("auto", "off") or text.startswith(("http://", "https://")):
        return text
    raise ValueError(f"{text!r} is not auto, off or an http:// description URL")


def parse_replicas(text):
    value = parse_positive_int(text)
    if value > 16:
        raise ValueError(f"{value} replicas per range is over the limit of 16")
    return value


NODE_CONFIG_FILE = "meshnode.conf"  # in the state directory: read when no --config is given


def default_state_dir():
    if os.geteuid() == 0:
        return "/var/lib/meshnode"
    base = os.environ.get("XDG_STATE_HOME") or os.path.expanduser("~/.local/state")
    return os.path.join(base, "meshnode")


# (section, key) → parser. Command-line options of the same name use the same parser.
SETTINGS = {
    ("node", "state-dir"): str,
    ("node", "listen-address"): parse_address,
    ("node", "database"): str,
    ("node", "rpc-port"): parse_port,
    ("node", "operator"): parse_bool,
    ("node", "super"): parse_bool,
    ("node", "partition"): parse_partition,
    ("node", "tunnel"): parse_bool,
    ("node", "user"): parse_bool,
    ("node", "name"): parse_node_name,
    ("node", "operator-url"): parse_https_url,
    ("node", "operator-fingerprint"): parse_fingerprint,
    ("node", "operator-ca"): parse_existing_file,
    ("node", "operator-rpc"): parse_host_port,
    ("node", "enroll-token"): str,
    ("node", "tunnel-port"): parse_port,
    ("node", "relay-port"): parse_port,
    ("node", "location"): parse_location,
    ("node", "stun-server"): parse_host_port,
    ("node", "upnp"): parse_upnp,
    ("node", "fallback-port"): parse_port,
    ("node", "proxy"): parse_proxy_url,
    ("tunnel", "tunnels-per-node"): parse_positive_int,
    ("tunnel", "tunnels-per-domain"): parse_positive_int,
    ("tunnel", "tunnels-total"): parse_positive_int,
    ("tunnel", "idle-timeout"): parse_positive_float,
    ("tunnel", "direct"): parse_bool,
    ("relay", "relayed-per-domain"): parse_positive_int,
    ("relay", "relayed-total"): parse_positive_int,
    ("operator", "enroll-listen"): parse_server_endpoint,
    ("operator", "replicas"): parse_replicas,
    ("operator", "renew-grace-days"): parse_days,
    ("operator", "pending-expiry-days"): parse_positive_int,
    ("operator", "pending-per-location"): parse_positive_int,
    ("operator", "pending-reports-per-minute"): parse_positive_int,
    ("operator", "audit-seconds"): parse_positive_float,
    ("dht", "quota"): parse_positive_int,
    ("rpc", "call-timeout"): parse_positive_float,
    ("rpc", "rate-limit"): parse_positive_int,
    ("rpc", "rate-burst"): parse_positive_int,
}

DEFAULTS = {
    "listen-address": "",
    "rpc-port": DEFAULT_RPC_PORT,
    "call-timeout": 2.0,
    "rate-limit": 2000,
    "rate-burst": 4000,
    "enroll-listen": "ssl:8443",
    "replicas": 3,
    "renew-grace-days": 90,
    "pending-expiry-days": 7,
    "pending-per-location": 256,
    "pending-reports-per-minute": 12,
    "audit-seconds": 60.0,
    "tunnel-port": 7401,
    "relay-port": 7402,
    "tunnels-per-node": 16,
    "tunnels-per-domain": 256,
    "tunnels-total": 1024,
    "idle-timeout": 600.0,
    "direct": True,
    "relayed-per-domain": 256,
    "relayed-total": 4096,
    "listeners": (),
    "quota": 10_000,
    "upnp": "auto",
    "fallback-port": 443,
}


def parse_setting(key, text):
    """Parse one setting by its key, raising ConfigError('KEY: reason')."""
    for (_, name), parser in SETTINGS.items():
        if name == key:
            try:
                return parser(text)
            except ValueError as e:
                raise ConfigError(f"{key}: {e}") from None
    raise ConfigError(f"unknown setting {key}")


def read_config(path):
    """Read an INI file into {key: value}; unknown sections or keys are errors."""
    parser = configparser.ConfigParser(interpolation=None)
    try:
        with open(path) as f:
            parser.read_file(f)
    except OSError as e:
        raise ConfigError(f"{path}: {e.strerror}") from None
    except configparser.Error as e:
        raise ConfigError(f"{path}: {e.message.splitlines()[0]}") from None
    known_sections = {section for section, _ in SETTINGS}
    values = {}
    listeners = []
    for section in parser.sections():
        if section.startswith(LISTENER_SECTION):
            listeners.append(_read_listener(path, section, dict(parser.items(section))))
            continue
        if section not in known_sections:
            raise ConfigError(f"{path}: unknown section [{section}]")
        for key, text in parser.items(section):
            parser_for = SETTINGS.get((section, key))
            if parser_for is None:
                raise ConfigError(f"{path}: unknown key {key!r} in [{section}]")
            try:
                values[key] = parser_for(text)
            except ValueError as e:
                raise ConfigError(f"{path}: [{section}] {key}: {e}") from None
    if listeners:
        values["listeners"] = tuple(listeners)
    return values


LISTENER_SECTION = "tunnel:"
_LISTENER_KEYS = {"device": str, "port": parse_port, "listen": parse_listen_endpoint}


def _read_listener(path, section, items):
    """A `[tunnel:NAME]` section: a local listener for one device → its settings."""
    name = section[len(LISTENER_SECTION):]
    try:
        parse_node_name(name)
    except ValueError as e:
        raise ConfigError(f"{path}: [{section}]: {e}") from None
    spec = {"name": name, "port": None}
    for key, text in items.items():
        if key not in _LISTENER_KEYS:
            raise ConfigError(f"{path}: unknown key {key!r} in [{section}]")
        try:
            spec[key] = _LISTENER_KEYS[key](text)
        except ValueError as e:
            raise ConfigError(f"{path}: [{section}] {key}: {e}") from None
    for key in ("device", "listen"):
        if key not in spec:
            raise ConfigError(f"{path}: [{section}] needs {key}")
    return spec
