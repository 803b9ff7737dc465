"""One exception type per kind of user mistake; `kiln.cli` prints them as one line and exits 2."""


class KilnError(Exception):
    """A mistake the user can fix; the message says what is wrong and what to do."""


class DataError(KilnError):
    """Bad or missing data: files, data-set names, formats, checksums, prepared corpora."""


class TokenizerError(KilnError):
    """A tokenizer that cannot be built, loaded, or used on the given text."""


class ConfigError(KilnError):
    """A setting that does not exist or has a value of the wrong kind."""


class TrainingStopped(Exception):
    """Not a mistake: SIGINT or SIGTERM asked a run to stop, and it saved `folder` at `step` first.
    `kiln.cli` says how to resume and exits 128 + the signal's number."""

    def __init__(self, signal_name: str, signal_number: int, step: int, folder):
        super().__init__(f"stopped by {signal_name} at step {step:,}; saved {folder}")
        self.signal_number, self.step, self.folder = signal_number, step, folder
