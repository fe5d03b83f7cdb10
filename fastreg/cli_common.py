"""What the `fastreg` commands share: the user-error exit, dependency and backend checks
made before any work, and the two consoles (results on stdout, status on stderr)."""
import click


class UserError(click.ClickException):
    """A mistake in what the user asked for (a missing file, a bad cell, a backend that
    cannot run here): one line on stderr, exit status 2 like click's usage errors."""
    exit_code = 2


def csv_list(value):
    return [v.strip() for v in value.split(",") if v.strip()] if value else None


def require_modules(*modules, extra, what):
    """Fail now, before any training, when an optional dependency is missing."""
    import importlib
    for mod in modules:
        try:
            importlib.import_module(mod)
        except ImportError:
            raise UserError(f"{what} needs {mod}, which is not installed: "
                            f"pip install \"fastreg[{extra}]\"") from None


def require_backend(name, option="--backend"):
    """The backend `name` must run here (checked before any work), else one line saying how
    to get it."""
    from . import backend as backends
    try:
        backends.resolve(name)
    except backends.BackendUnavailable as exc:
        raise UserError(f"{option} {name}: {exc}") from None
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint=option) from None


def stdout_console():
    """Results go to stdout; a file or a pipe gets a wide console so no column is cut."""
    from rich.console import Console
    console = Console()
    return console if console.is_terminal else Console(width=200)


def stderr_console():
    """Status and progress: stderr, as wide as stdout's console when it is not a terminal."""
    from rich.console import Console
    console = Console(stderr=True)
    return console if console.is_terminal else Console(stderr=True, width=200)
