"""How the `meshnode` command shows things to people: times, domains, ids, tables, the status.

Only the human output goes through here; --json prints the data as the node or the store gave it.
"""

import datetime
import textwrap

WIDTH = 80  # columns: help and long lines are wrapped to fit
ID_PREFIX = 16  # hex digits of an id where the whole one would crowd a line

# Times in the data, by key: milliseconds since the epoch (records) or seconds (the clock).
_MILLISECONDS = {"expires", "created", "issued", "first_seen", "last_seen"}
_SECONDS = {"at"}
_RELATIVE_ONLY = {"at", "first_seen", "last_seen"}  # "4 s ago" says it all
_DOMAIN_KEYED = {"records_per_domain"}  # sections whose keys are domain ids in hex


def iso(seconds):
    """A time as an ISO 8601 UTC date to the second: 2026-12-31T10:18:44Z."""
    moment = datetime.datetime.fromtimestamp(int(seconds), datetime.timezone.utc)
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")


def relative(seconds, now):
    """A time as a person says it: "in 29 days", "4 s ago", "now"."""
    delta = seconds - now
    span = abs(delta)
    if span < 1:
        return "now"
    if span < 90:
        amount = f"{int(span)} s"
    elif span < 90 * 60:
        amount = f"{round(span / 60)} min"
    elif span < 36 * 3600:
        amount = f"{round(span / 3600)} h"
    else:
        amount = plural(round(span / 86400), "day")
    return f"in {amount}" if delta > 0 else f"{amount} ago"


def moment(milliseconds, now):
    """A record's time (ms since the epoch) as its date and how far it is: both matter."""
    return f"{iso(milliseconds / 1000)} ({relative(milliseconds / 1000, now)})"


def domain(domain_id, name=None):
    """A domain as people know it: its name with its id beside it, or its id alone."""
    if isinstance(domain_id, str):
        domain_id = int(domain_id, 0)
    shown = f"{domain_id:#010x}"
    return f"{name} ({shown})" if name else shown


def short_id(hex_id):
    return hex_id[:ID_PREFIX] + "…" if hex_id and len(hex_id) > ID_PREFIX else hex_id


def plural(count, noun):
    return f"{count} {noun}" + ("" if count == 1 else "s")


def table(rows, columns):
    """Rows of dicts as aligned text columns, headed by the column names."""
    if not rows:
        return "(none)"
    cells = [[str(column).upper() for column in columns]]
    cells += [["-" if row.get(c) is None else str(row[c]) for c in columns] for row in rows]
    widths = [max(len(line[i]) for line in cells) for i in range(len(columns))]
    return "\n".join("  ".join(cell.ljust(width) for cell, width in zip(line, widths)).rstrip()
                     for line in cells)


# -- every field ---------------------------------------------------------------------------------

def details(data, now, own_domain=None):
    """Nested data (a status, a NodeInfo) in full as indented lines: times as dates or
    relative, domains by name where known, counters on one line, lists of records as tables.

    `own_domain`: (id, name) of the node's domain, to name it where it appears as a key."""
    if own_domain is None and data.get("domain") is not None:
        own_domain = (data["domain"], data.get("domain_name"))
    return list(_details(data, now, own_domain, ""))


def _details(data, now, own_domain, indent):
    for key, value in data.items():
        if key == "domain_name":
            continue  # shown with the domain
        label = f"{indent}{key.replace('_', ' ')}"
        if key == "domain" and isinstance(value, int):
            yield f"{label}: {domain(value, data.get('domain_name'))}"
        elif key in _DOMAIN_KEYED and isinstance(value, dict) and value:
            yield f"{label}:"
            for domain_id, count in value.items():
                name = own_domain[1] if own_domain and int(domain_id, 0) == own_domain[0] else None
                yield f"{indent}  {domain(domain_id, name)}: {count}"
        elif isinstance(value, dict) and value and all(_scalar(v) for v in value.values()) \
                and not any(k in _MILLISECONDS | _SECONDS for k in value):
            line = f"{label}: " + ", ".join(f"{k}={_value(k, v, now)}" for k, v in value.items())
            yield from textwrap.wrap(line, WIDTH, subsequent_indent=indent + "  ",
                                     break_long_words=False, break_on_hyphens=False)
        elif isinstance(value, dict) and value:
            yield f"{label}:"
            yield from _details(value, now, own_domain, indent + "  ")
        elif isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
            yield f"{label}:"
            columns = list(value[0])
            rows = [{c: _value(c, v.get(c), now) for c in columns} for v in value]
            yield from (indent + "  " + line for line in table(rows, columns).splitlines())
        elif isinstance(value, (list, dict)):
            yield f"{label}: {', '.join(map(str, value)) or 'none'}"
        else:
            yield f"{label}: {_value(key, value, now)}"


def _scalar(value):
    return not isinstance(value, (dict, list))


def _value(key, value, now):
    if value is None or value == "":
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, list):
        return ", ".join(map(str, value))
    if key in _MILLISECONDS | _SECONDS and isinstance(value, (int, float)):
        seconds = value / 1000 if key in _MILLISECONDS else value
        if key in _RELATIVE_ONLY:
            return relative(seconds, now)
        return f"{iso(seconds)} ({relative(seconds, now)})"
    return str(value)


# -- the status summary --------------------------------------------------------------------------

def summary(status, now):
    """`meshnode status`: who this node is and one line per part that is doing something."""
    rows = [("node", f"{status['name'] or '(no name: not enrolled)'} "
                     f"({short_id(status['node_id'])})")]
    if status.get("domain") is not None:
        shown = domain(status["domain"], status.get("domain_name"))
        if status.get("domain_suspended"):
            shown += " — SUSPENDED by its operator: refused everywhere until resumed"
        rows.append(("domain", shown))
    rows.append(("roles", ", ".join(status["roles"])))
    if status["enrolled"] and status.get("expires"):
        enrolled = f"until {moment(status['expires'], now)}"
    elif status.get("expired"):
        enrolled = (f"no: the Node record expired {moment(status['expired'], now)} "
                    f"— renewing, see the log")
    else:
        enrolled = "no"
    rows.append(("enrolled", enrolled))
    rows.append(("rpc", _rpc(status)))
    directory = status.get("directory")
    if directory is not None:
        replicas = directory["replicas_per_range"]
        text = f"{len(directory['super_nodes'])} known, {plural(replicas, 'replica')} per range"
        if directory.get("lies"):
            text += (f"; wrong answers {_counts(directory['lies'])} from "
                     f"{plural(len(directory['lies_by_super_node']), 'super-node')}")
        rows.append(("super-nodes", text))
    for section, describe in _SECTIONS:
        if status.get(section) is not None:
            rows += [(section if label is None else label, text)
                     for label, text in describe(status[section], now)]
    width = max(len(label) for label, _ in rows) + 2
    return [f"{label + ':':<{width}}{text}" for label, text in rows]


def _rpc(status):
    reachability = status.get("reachability", {})
    addresses = reachability.get("addresses") or [f"port {status['rpc_port']}"]
    mode = status.get("transport", {}).get("mode", "udp")
    parts = [f"{addresses[0]} ({mode})"]
    seen = [e for e in reachability.get("observed", []) if e not in addresses]
    if seen:
        parts.append(f"seen as {', '.join(seen)}")
    parts.append(f"NAT {reachability.get('nat', 'unknown').replace('_', '-')}")
    parts.append(plural(status["peers"], "peer"))
    return ", ".join(parts)


def _counts(counter):
    """{reason: n} as "3 (a 2, b 1)"; "0" when empty."""
    total = sum(counter.values())
    if not total:
        return "0"
    return f"{total} (" + ", ".join(f"{k} {v}" for k, v in counter.items()) + ")"


def _operator(section, now):
    port = section["enroll_port"]
    parts = [f"enrollment on port {port}" if port is not None else "enrollment not listening",
             f"TLS fingerprint {short_id(section['tls_fingerprint'])}",
             f"{plural(len(section['super_nodes']), 'super-node')} placed"]
    if section["ranges"]:
        parts.append(f"serving {', '.join(section['ranges'])} itself")
    yield None, ", ".join(parts)
    audit = section.get("audit")
    if audit and audit["probes"]:
        text = f"{plural(audit['probes'], 'probe')}, wrong answers {_counts(audit['lies'])}"
        if audit["removed"]:
            text += f", removed {', '.join(audit['removed'])}"
        yield "audit", text


def _super(section, now):
    if section["ranges"]:
        text = f"serving {', '.join(section['ranges'])}, {plural(section['records'], 'record')}"
    else:
        reason = f" ({section['reason']})" if section["reason"] else ""
        text = f"{section['state']}{reason}, offering {section['offer']}"
    relay = section.get("relay")
    if relay is not None:
        text += (f"; relay port {relay['port']}, {relay['open']} open, "
                 f"{relay['relayed']} relayed")
    yield None, text


def _tunnel(section, now):
    port = f"port {section['port']}" if section["port"] is not None else "no direct port"
    text = (f"{port}, {plural(section['devices'], 'device')} at "
            f"{plural(len(section['locations']), 'location')}, {section['open']} open, "
            f"opened {_counts(section['opened'])}")
    if section["refused"]:
        text += f", refused {_counts(section['refused'])}"
    yield None, text


def _user(section, now):
    for listener in section["listeners"]:
        device = listener["device"] + (f":{listener['port']}" if listener["port"] else "")
        text = (f"{listener['name']} → {device} on {listener['address']}, "
                f"{plural(listener['connections'], 'connection')}")
        if listener["failures"]:
            text += f", {plural(listener['failures'], 'failure')}"
        if listener["last_path"]:
            text += f", last path {listener['last_path']}"
        if listener["last_error"]:
            text += f", last error: {listener['last_error']}"
        yield "listener", text


def _punch(section, now):
    if section["accepting"]:
        yield None, f"accepting {plural(len(section['accepting']), 'peer')}"


def _upnp(section, now):
    if section["gateway"] in ("none", "off") and not section["last_error"]:
        return
    text = f"gateway {section['gateway']}"
    if section["external_address"]:
        text += f", external {section['external_address']}"
    text += f", {plural(len(section['mappings']), 'mapping')}"
    if section["last_error"]:
        text += f", last error: {section['last_error']}"
    yield None, text


# The role sections of the summary, in order: section → its lines (label None: the section's).
_SECTIONS = [("operator", _operator), ("super", _super), ("tunnel", _tunnel), ("user", _user),
             ("punch", _punch), ("upnp", _upnp)]
