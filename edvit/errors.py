"""The small exception tree. Library errors are translated to these at the boundary."""


class EdvitError(Exception):
    """Base of every error edvit raises on purpose."""


class ConfigError(EdvitError):
    """A bad CLI argument, settings file, dataset path or bundle: the user must fix something."""


class BadPayload(EdvitError):
    """A message on the wire that does not follow the contract; it is dropped and counted."""


class IntegrityError(BadPayload):
    """A model or bundle file whose sha256 does not match what the plan or manifest says."""


class BrokerError(EdvitError):
    """The MQTT broker could not be started or reached."""
