"""hvjit: a hypervisor library for Python."""

__version__ = "0.1.0"
