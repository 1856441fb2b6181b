"""Exceptions of dmf.

Every error a user can cause is one of these, with a message that names the file, row, column or
config key involved and says what to do. The command line prints them without a traceback.
"""

from __future__ import annotations


class DmfError(Exception):
    """Base class of all errors dmf raises on purpose."""


class ConfigError(DmfError, ValueError):
    """A config file or override has an unknown key or a bad value (the message names the key)."""


class InputError(DmfError, ValueError):
    """Raw rating input is malformed: the message names the file, line or row, and column."""


class StoreError(DmfError):
    """A store is missing, incomplete, corrupt, or does not match its manifest."""


class CheckpointError(DmfError):
    """A checkpoint is corrupt or belongs to a different config or store."""


class TrainingError(DmfError, FloatingPointError):
    """Training produced a non-finite value or cannot proceed."""


class ClusterError(DmfError):
    """The cluster cannot run the work given to it: every worker stays paused for memory."""


class ModelError(DmfError):
    """A model directory is missing, incomplete or incompatible."""


class DownloadError(DmfError):
    """A dataset download failed or did not match its checksum."""


class LeaseError(DmfError):
    """A model directory or store is in use by another run (the message names it: host, pid,
    since when), or a run lost its lease on one."""
