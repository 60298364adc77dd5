"""switcher: a stable SSH agent socket that follows your live forwarded sessions."""

__version__ = "0.1.0"
