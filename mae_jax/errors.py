"""The project's exceptions, in one place.

Every class here derives from `MaeJaxError`: a mistake or condition the user
can act on (a bad config value, unusable data, a busy workdir, a full disk).
Command lines print these in one `error: ...` line; any other exception is a
bug in the project and keeps its traceback.

Each class also keeps the built-in base that fits it, so callers may catch
either:

  MaeJaxError
    ConfigError (ValueError)              a config field or flag cannot work
    DataError (ValueError)                a data source holds unusable data
      ImageError                          an image file or folder is unusable
    CheckpointError (ValueError)          a checkpoint file or dir is unusable
      CorruptCheckpointError              its data does not match its checksums
    WorkdirLocked (RuntimeError)          another run holds the workdir
    CheckpointSaveError (OSError)         writing a checkpoint failed
    NonFiniteError (FloatingPointError)   loss or gradient norm is NaN or Inf
    MissingExtraError (ImportError)       an optional dependency is missing
"""


class MaeJaxError(Exception):
  """A mistake or condition the user can act on; command lines print it in
  one line."""


class ConfigError(MaeJaxError, ValueError):
  """A config field or flag holds a value that cannot work."""


class DataError(MaeJaxError, ValueError):
  """A data source (dataset, folder, records) holds unusable data."""


class ImageError(DataError):
  """A user-facing problem with an image file or folder."""


class CheckpointError(MaeJaxError, ValueError):
  """A user-facing problem with a checkpoint file or directory."""


class CorruptCheckpointError(CheckpointError):
  """A checkpoint's data does not match the checksums saved with it."""


class WorkdirLocked(MaeJaxError, RuntimeError):
  """Another run holds the workdir."""


class CheckpointSaveError(MaeJaxError, OSError):
  """Writing a checkpoint failed (e.g. a full disk); older ones are intact."""


class NonFiniteError(MaeJaxError, FloatingPointError):
  """Loss or gradient norm turned NaN or Inf."""


class MissingExtraError(MaeJaxError, ImportError):
  """An optional dependency is not installed."""
