"""Keras-style progress for fit(): verbose=1 a bar per epoch with the running loss,
verbose=2 one line per epoch, verbose=0 nothing. When stdout is not a terminal (a log file,
a pipe) a bar cannot redraw: verbose=1 then writes verbose=2's plain lines, on a console
wide enough that no field is cut.

A compiled epoch runs in chunks of whole batches (same steps, same masks: chunking changes
nothing but how often Python looks): at most `max_batches` a chunk, which fit sizes so a
chunk is short (a Ctrl-C acts between chunks), and for a live bar at most 1/20 of the epoch.
"""
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

CHUNKS_PER_EPOCH = 20


class EpochProgress:
    def __init__(self, epochs, n_batches, verbose):
        self.epochs = epochs
        self.n_batches = n_batches
        self.verbose = verbose
        self.console = Console(stderr=False)
        if verbose and not (self.console.is_terminal or self.console.is_jupyter):
            self.console = Console(stderr=False, width=200)
            verbose = self.verbose = 2
        self._progress = None
        self._task = None
        if verbose == 1:
            self._progress = Progress(TextColumn("{task.description}"), BarColumn(),
                                      MofNCompleteColumn(), TimeElapsedColumn(),
                                      TextColumn("{task.fields[metrics]}"),
                                      console=self.console)
            self._progress.start()

    def chunks(self, epoch, max_batches=None):
        """(first_batch, end_batch) ranges covering the epoch, at most max_batches each."""
        size = self.n_batches
        if self.verbose == 1:
            self._task = self._progress.add_task(f"Epoch {epoch + 1}/{self.epochs}",
                                                 total=self.n_batches, metrics="")
            size = max(1, -(-self.n_batches // CHUNKS_PER_EPOCH))
        if max_batches is not None:
            size = max(1, min(size, int(max_batches)))
        for first in range(0, self.n_batches, size):
            yield first, min(self.n_batches, first + size)

    def update(self, epoch, batches_done, running_loss):
        if self._progress is not None and self._task is not None:
            self._progress.update(self._task, completed=batches_done,
                                  metrics=f"loss {running_loss:.4g}")

    def end_epoch(self, epoch, logs):
        text = "  ".join(f"{k} {v:.4g}" for k, v in logs.items())
        if self._progress is not None and self._task is not None:
            self._progress.update(self._task, completed=self.n_batches, metrics=text)
        elif self.verbose == 2:
            self.console.print(f"Epoch {epoch + 1}/{self.epochs}  {text}", highlight=False)

    def note(self, text):
        """A line under the epochs (e.g. what early stopping did), at any verbose > 0."""
        if self.verbose:
            self.console.print(text, highlight=False, markup=False)

    def close(self):
        if self._progress is not None:
            self._progress.stop()
            self._progress = None
