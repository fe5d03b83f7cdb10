"""One line on stderr when a JIT backend compiles fastreg's kernels, so a first run is never
a silent wait.

Numba fires a "numba:compile" event (numba-cuda, with its own copy of the event module,
"numba-cuda:compile") for every function it compiles, and only on a cache miss: loading
kernels cached on disk by an earlier process fires none. The listener prints its line at
the first outermost compile of a fastreg kernel in the process, with how long that compile
usually takes, and stays quiet afterwards.
"""
import sys

# Measured on the 2-core bench machine with an empty cache (README, "Start-up"): a Numba
# network's first epoch took 25-30 s of CPU there (round 2, the machine loaded).
USUAL_SECONDS = {"Numba": "20-30 s", "numba-cuda": "20-60 s"}


class CompileNotice:
    def __init__(self, what):
        self.what = what
        self.depth = 0
        self.said = False

    def on_start(self, event):
        if self.depth == 0 and not self.said and _is_ours(event):
            self.said = True
            sys.stderr.write(f"fastreg: compiling the {self.what} kernels, first run only "
                             f"(usually {USUAL_SECONDS.get(self.what, 'a while')}; cached on "
                             f"disk for later runs)...\n")
            sys.stderr.flush()
        self.depth += 1

    def on_end(self, event):
        self.depth -= 1


def _is_ours(event):
    dispatcher = (event.data or {}).get("dispatcher")
    func = getattr(dispatcher, "py_func", None)
    return getattr(func, "__module__", "").startswith("fastreg.")


def install(event_module, what, kind="numba:compile"):
    """Listen to `event_module`'s compile events (numba.core.event's "numba:compile", or
    numba-cuda's own "numba-cuda:compile")."""
    notice = CompileNotice(what)

    class _Listener(event_module.Listener):
        def on_start(self, event):
            notice.on_start(event)

        def on_end(self, event):
            notice.on_end(event)

    event_module.register(kind, _Listener())
    return notice
