"""The operator role: the only trusted party, which signs the records everyone else checks."""

from twisted.application import service


class OperatorService(service.MultiService):
    """The operator role's place in the service tree."""

    name = "operator"
