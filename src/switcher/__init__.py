"""switcher: a stable SSH agent socket that follows your live forwarded sessions."""

__version__ = "0.1.0"

# The version of the control protocol (docs/control-protocol.md), here so
# that the daemon and `switcher ctl` share it without ctl loading the
# daemon's packages.
CONTROL_PROTOCOL_VERSION = 1
