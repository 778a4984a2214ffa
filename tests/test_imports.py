"""The import rules of meshnode's layout, read from the source with `ast` (nothing imported):
codec apart from Twisted's network, core apart from roles and CLI, roles apart from each other,
and no private name used outside its module."""

import ast
import os

import attrs
from twisted.trial.unittest import SynchronousTestCase

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# The wire format and records: they know nothing of sockets or services.
CODEC = frozenset({"meshnode.wire", "meshnode.records", "meshnode.rpc.frame",
                   "meshnode.rpc.messages", "meshnode.nat.rules"})
NETWORK = ("twisted.internet", "twisted.application")
ROLES = "meshnode.roles"
# Besides the roles themselves, only these build nodes from roles.
ROLE_USERS = ("meshnode.tap", "meshnode.cli")


@attrs.frozen
class Violation:
    module: str
    line: int
    statement: str  # the import as written
    rule: str

    def __str__(self):
        return f"{self.module}:{self.line}: {self.statement}  -- {self.rule}"


@attrs.frozen
class _Import:
    line: int
    statement: str
    target: str  # the module imported, or the module a name is imported from
    name: str = None  # the name taken from `target` by `from target import name`, if no module


def _within(module, package):
    return module == package or module.startswith(package + ".")


def _role(module):
    """meshnode.roles.X… → X; None for a module that is no role's."""
    parts = module.split(".")
    if len(parts) > 2 and _within(module, ROLES):
        return parts[2]
    return None


def _base(module, package, level, source_module):
    """The absolute module a `from` import of `level` dots in `module` starts from."""
    if level == 0:
        return source_module
    parts = module.split(".") if package else module.split(".")[:-1]
    if level - 1 > len(parts) - 1:
        raise ValueError(f"{module}: relative import beyond the top-level package")
    parts = parts[:len(parts) - (level - 1)]
    return ".".join(parts + ([source_module] if source_module else []))


def _imports(module, source, package, modules):
    """Every import in `source` (at any depth, lazy ones too), resolved: `from a import b`
    imports the module a.b when that module exists (`modules`), else the name b of a."""
    found = []
    for node in ast.walk(ast.parse(source)):
        statement = ast.get_source_segment(source, node) if isinstance(
            node, (ast.Import, ast.ImportFrom)) else None
        if isinstance(node, ast.Import):
            for alias in node.names:
                found.append(_Import(node.lineno, statement, alias.name))
        elif isinstance(node, ast.ImportFrom):
            base = _base(module, package, node.level, node.module)
            for alias in node.names:
                if alias.name == "*":
                    found.append(_Import(node.lineno, statement, base, "*"))
                elif f"{base}.{alias.name}" in modules:
                    found.append(_Import(node.lineno, statement, f"{base}.{alias.name}"))
                else:
                    found.append(_Import(node.lineno, statement, base, alias.name))
    return found


def check(module, source, *, package=False, modules=frozenset()):
    """The import rules `source`, the module `module` (a package's __init__ if `package`),
    breaks → [Violation]. `modules`: every module of the tree, to tell a submodule imported
    with `from a import b` from a name."""
    violations = []

    def broken(one, rule):
        violations.append(Violation(module, one.line, one.statement, rule))

    for one in _imports(module, source, package, modules):
        target = one.target
        # A name imported from a module outside the tree may be a module too: for the codec,
        # `from twisted import internet` is the network.
        maybe = target if one.name is None else f"{target}.{one.name}"
        if module in CODEC and any(_within(target, net) or _within(maybe, net)
                                   for net in NETWORK):
            broken(one, "the codec imports nothing from twisted.internet or "
                        "twisted.application")
        if _within(module, "meshnode.core") and (_within(target, ROLES)
                                                 or _within(target, "meshnode.cli")):
            broken(one, "the core never imports meshnode.roles or meshnode.cli")
        role, their_role = _role(module), _role(target)
        if role is not None and their_role is not None and their_role != role:
            broken(one, f"roles never import each other (role {role} imports role "
                        f"{their_role})")
        if (_within(target, ROLES) and not _within(module, ROLES)
                and not any(_within(module, user) for user in ROLE_USERS)):
            broken(one, "only meshnode.tap and meshnode.cli import meshnode.roles")
        if one.name is not None and _private(one.name):
            broken(one, f"a private name ({one.name}) imported from another module "
                        f"({target})")
        parent, _, last = target.rpartition(".")
        if one.name is None and _private(last) and not _within(module, parent):
            broken(one, f"a private module ({target}) imported from outside its package")
    return sorted(violations, key=lambda one: one.line)


def _private(name):
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def tree_modules(root, top="meshnode"):
    """Every module under root/top → {dotted name: (path, is a package's __init__)}."""
    found = {}
    for directory, subdirectories, files in os.walk(os.path.join(root, top)):
        subdirectories[:] = sorted(d for d in subdirectories if d != "__pycache__")
        relative = os.path.relpath(directory, root).split(os.sep)
        for name in sorted(files):
            if not name.endswith(".py"):
                continue
            if name == "__init__.py":
                found[".".join(relative)] = (os.path.join(directory, name), True)
            else:
                found[".".join(relative + [name[:-3]])] = (os.path.join(directory, name), False)
        # A directory without __init__.py (a namespace package) is a module all the same.
        found.setdefault(".".join(relative), (None, True))
    return found


def check_tree(root, top="meshnode"):
    """Every violation of the rules in the tree under root/top, by module; the codec's rule
    also holds for every module of the tree the codec imports, at any remove."""
    modules = tree_modules(root, top)
    violations = []
    imported = {}  # module → the tree's modules it imports
    for module, (path, package) in sorted(modules.items()):
        if path is None:
            continue
        with open(path, encoding="utf-8") as f:
            source = f.read()
        violations += check(module, source, package=package, modules=modules)
        imported[module] = [(one, _known(one.target, modules))
                            for one in _imports(module, source, package, modules)]
    violations += _codec_reaches(imported)
    return violations


def _known(target, modules):
    """The module of the tree `target` names (or the nearest package of it that exists)."""
    while target and target not in modules:
        target = target.rpartition(".")[0]
    return target or None


def _codec_reaches(imported):
    """Violations where a codec module reaches Twisted's network through the tree's own
    modules: reported on the codec module's import that leads there, with the path."""
    violations = []
    for module in sorted(CODEC & imported.keys()):
        for first, via in imported[module]:
            if via is None or via == module:
                continue
            path = _network_path(via, imported, {module})
            if path:
                violations.append(Violation(
                    module, first.line, first.statement,
                    "the codec imports nothing from twisted.internet or twisted.application "
                    f"(through {' → '.join(path)})"))
    return violations


def _network_path(module, imported, seen):
    """[module, …, the network module] when `module` reaches Twisted's network, else None."""
    if module in seen or module not in imported:
        return None
    seen.add(module)
    for one, via in imported[module]:
        named = one.target if one.name is None else f"{one.target}.{one.name}"
        for net in NETWORK:
            if _within(one.target, net) or _within(named, net):
                return [module, one.target]
        if via is not None:
            further = _network_path(via, imported, seen)
            if further:
                return [module] + further
    return None


class MeshnodeTreeTests(SynchronousTestCase):
    def test_tree_follows_the_import_rules(self):
        """No module under meshnode/ breaks an import rule; every violation is listed."""
        modules = tree_modules(ROOT)
        self.assertIn("meshnode.rpc.messages", modules)  # the walk found the tree
        self.assertIn("meshnode.roles.operator.enroll", modules)
        violations = check_tree(ROOT)
        self.assertEqual(violations, [], "import rules broken:\n"
                         + "\n".join(str(one) for one in violations))


_TREE = frozenset({"meshnode", "meshnode.wire", "meshnode.records", "meshnode.rpc",
                   "meshnode.rpc.messages", "meshnode.core", "meshnode.core.control",
                   "meshnode.core.ports", "meshnode.cli", "meshnode.cli.main", "meshnode.tap",
                   "meshnode.roles", "meshnode.roles.user", "meshnode.roles.tunnel",
                   "meshnode.roles.operator", "meshnode.roles.operator.enroll",
                   "meshnode.roles.operator.tls", "meshnode.nat", "meshnode.nat.stun"})


def _rules(module, source, package=False):
    """The rules broken by `source` as module `module` → [(line, rule's first words)]."""
    return [(one.line, " ".join(one.rule.split()[:3]))
            for one in check(module, source, package=package, modules=_TREE)]


class CodecRuleTests(SynchronousTestCase):
    def test_codec_importing_the_reactor_is_caught(self):
        """`from twisted.internet import reactor` in a codec module is a violation."""
        self.assertEqual(_rules("meshnode.wire", "import struct\n"
                                                 "from twisted.internet import reactor\n"),
                         [(2, "the codec imports")])

    def test_every_spelling_of_the_network_is_caught(self):
        """Plain, dotted, application and `from twisted import internet` imports all count,
        at any depth of the module."""
        source = ("import twisted.internet.defer\n"
                  "from twisted.application import service\n"
                  "from twisted import internet\n"
                  "def later():\n"
                  "    from twisted.internet.task import Clock\n")
        self.assertEqual([line for line, _ in _rules("meshnode.rpc.messages", source)],
                         [1, 2, 3, 5])

    def test_codec_may_use_the_rest_of_twisted_and_others_may_use_the_network(self):
        """twisted.python in the codec, and the reactor outside it, are allowed."""
        self.assertEqual(_rules("meshnode.records", "from twisted.python import failure\n"), [])
        self.assertEqual(_rules("meshnode.nat.stun", "from twisted.internet import defer\n"),
                         [])

    def test_codec_reaching_the_network_through_the_tree_is_caught(self):
        """A codec module importing a tree module that imports twisted.internet is a
        violation naming the path."""
        imported = {}
        for module, source in (("meshnode.wire", "from meshnode import helper\n"),
                               ("meshnode.helper", "from twisted.internet import defer\n")):
            imported[module] = [(one, _known(one.target, {"meshnode.wire", "meshnode.helper"}))
                                for one in _imports(module, source, False,
                                                    {"meshnode.wire", "meshnode.helper"})]
        [violation] = _codec_reaches(imported)
        self.assertEqual((violation.module, violation.line), ("meshnode.wire", 1))
        self.assertIn("meshnode.helper → twisted.internet", violation.rule)


class CoreRuleTests(SynchronousTestCase):
    def test_core_importing_roles_or_cli_is_caught(self):
        """The core importing a role (also relatively) or the CLI is a violation."""
        source = ("from meshnode.roles.user import UserService\n"
                  "import meshnode.cli.main\n"
                  "from .. import roles\n"
                  "from meshnode import cli\n")
        self.assertEqual([(line, rule) for line, rule in _rules("meshnode.core.control", source)
                          if rule == "the core never"], [(1, "the core never"),
                                                         (2, "the core never"),
                                                         (3, "the core never"),
                                                         (4, "the core never")])

    def test_core_importing_the_core_is_allowed(self):
        """The core importing itself and shared modules is no violation."""
        self.assertEqual(_rules("meshnode.core.control",
                                "from meshnode.core import ports\nfrom . import ports\n"
                                "from meshnode import records\n"), [])


class RoleRuleTests(SynchronousTestCase):
    def test_role_importing_another_role_is_caught(self):
        """roles/user importing roles/tunnel, or roles/operator/enroll importing roles/user
        relatively, is a violation."""
        self.assertEqual(_rules("meshnode.roles.user",
                                "from meshnode.roles.tunnel import Limits\n"),
                         [(1, "roles never import")])
        self.assertEqual(_rules("meshnode.roles.operator.enroll", "from ..user import x\n"
                                                                  "from .. import tunnel\n"),
                         [(1, "roles never import"), (2, "roles never import")])

    def test_role_importing_itself_is_allowed(self):
        """A role's modules importing each other, absolutely or relatively, is allowed."""
        self.assertEqual(_rules("meshnode.roles.operator.enroll",
                                "from meshnode.roles.operator import tls\n"
                                "from . import tls\n"
                                "from .tls import load\n"
                                "from meshnode.roles import operator\n"), [])
        self.assertEqual(_rules("meshnode.roles.operator", "from . import enroll\n",
                                package=True), [])

    def test_name_of_the_roles_package_is_no_role(self):
        """A name (not a submodule) imported from meshnode.roles is not another role's."""
        self.assertEqual(_rules("meshnode.roles.user", "from meshnode.roles import helper\n"),
                         [])


class RoleUsersRuleTests(SynchronousTestCase):
    def test_other_modules_importing_roles_are_caught(self):
        """meshnode.nat.stun importing a role (plainly or as a submodule name) is a
        violation."""
        self.assertEqual(_rules("meshnode.nat.stun", "import meshnode.roles.tunnel\n"
                                                     "from meshnode import roles\n"
                                                     "from meshnode.roles import user\n"),
                         [(1, "only meshnode.tap and"), (2, "only meshnode.tap and"),
                          (3, "only meshnode.tap and")])

    def test_tap_and_cli_may_import_roles(self):
        """meshnode.tap and meshnode.cli.main importing roles is allowed."""
        self.assertEqual(_rules("meshnode.tap", "from meshnode.roles.user import UserService\n"),
                         [])
        self.assertEqual(_rules("meshnode.cli.main", "from meshnode.roles.operator import tls\n"),
                         [])


class PrivateNameRuleTests(SynchronousTestCase):
    def test_private_names_are_caught_in_every_form(self):
        """`from a import _b`, relative forms and lazy imports all count."""
        source = ("from meshnode.records import _canonical\n"
                  "from . import _helper\n"
                  "from .ports import _reason as reason\n"
                  "def later():\n"
                  "    from twisted.python.failure import _Frame\n")
        self.assertEqual(_rules("meshnode.core.control", source),
                         [(1, "a private name"), (2, "a private name"), (3, "a private name"),
                          (5, "a private name")])

    def test_private_module_from_outside_its_package_is_caught(self):
        """A private module imported from another package is a violation; from its own
        package it is not."""
        modules = _TREE | {"meshnode.core._impl"}
        source = "import meshnode.core._impl\nfrom meshnode.core import _impl\n"
        self.assertEqual([one.line for one in check("meshnode.nat.stun", source,
                                                    modules=modules)], [1, 2])
        self.assertEqual(check("meshnode.core.control", source + "from . import _impl\n",
                               modules=modules), [])

    def test_public_and_dunder_names_are_allowed(self):
        """Public names, modules and `__future__`/dunder names are no violation."""
        self.assertEqual(_rules("meshnode.core.control",
                                "from __future__ import annotations\n"
                                "from meshnode import __version__\n"
                                "import meshnode.core.ports\n"
                                "from meshnode.core.ports import listen_tcp\n"), [])


class ResolutionTests(SynchronousTestCase):
    def test_submodule_and_name_are_told_apart_by_the_tree(self):
        """`from meshnode.roles import operator` is the module; `from meshnode.roles.operator
        import OperatorService` is a name of that module."""
        [module] = _imports("meshnode.tap", "from meshnode.roles import operator\n", False,
                            _TREE)
        self.assertEqual((module.target, module.name), ("meshnode.roles.operator", None))
        [name] = _imports("meshnode.tap", "from meshnode.roles.operator import OperatorService\n",
                          False, _TREE)
        self.assertEqual((name.target, name.name), ("meshnode.roles.operator",
                                                    "OperatorService"))

    def test_relative_imports_resolve_from_module_and_package(self):
        """One dot is a module's package, or a package's own __init__."""
        [one] = _imports("meshnode.roles.operator.enroll", "from . import tls\n", False, _TREE)
        self.assertEqual(one.target, "meshnode.roles.operator.tls")
        [two] = _imports("meshnode.roles.operator", "from .tls import x\n", True, _TREE)
        self.assertEqual((two.target, two.name), ("meshnode.roles.operator.tls", "x"))
        [three] = _imports("meshnode.roles.operator.enroll", "from ...core import ports\n",
                           False, _TREE)
        self.assertEqual(three.target, "meshnode.core.ports")

    def test_all_violations_are_reported_at_once(self):
        """A module breaking several rules gets every violation, each naming its import."""
        found = check("meshnode.core.control",
                      "from meshnode.roles.user import _private\n"
                      "import meshnode.cli\n", modules=_TREE)
        self.assertEqual(sorted({(one.line, one.statement) for one in found}),
                         [(1, "from meshnode.roles.user import _private"),
                          (2, "import meshnode.cli")])
        self.assertEqual(len(found), 4)  # core, role users, private name; core
        self.assertIn("meshnode.core.control:2: import meshnode.cli", str(found[-1]))
