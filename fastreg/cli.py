"""The `fastreg` command line.

Imports are lazy: `fastreg --help` and `--version` load click and this module only (no Numba,
no BLAS). Ordinary mistakes end in one line on stderr and exit status 2 (click's usage
errors, and `UserError` for what click's types cannot check), never a traceback. Results
(tables, `--json -`) go to stdout, status and progress to stderr.
"""
import click

from ._version import __version__
from .cli_common import UserError, csv_list, require_backend, stderr_console, stdout_console


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="fastreg")
def main():
    """fastreg: fast, trustworthy training of regularized neural networks."""


WORKLOAD_NAMES = ("curve", "wide", "digits")
BACKEND_NAMES = ("numpy", "numba", "cython", "cuda")
PEER_NAMES = ("torch", "torch-cuda", "jax", "sklearn")


@main.command()
@click.option("--workload", "workload", default="all", show_default=True,
              type=click.Choice(WORKLOAD_NAMES + ("all",)),
              help="Built-in workload: curve (1-D regression, 1-64-64-64-1 LeakyReLU, dropout "
                   "0.1, L2 1e-4), wide (784-1024-1024-10 ReLU classifier, dropout 0.2), "
                   "digits (the bundled 8x8 digits, 64-128-10), or all.")
@click.option("--backend", "backends", default=None, metavar="LIST",
              help="Comma-separated fastreg backends (numpy,numba,cython,cuda). Default: every "
                   "available one but the numpy reference (a correctness oracle, run it by "
                   "naming it); a named backend that cannot run here is an error.")
@click.option("--peers", default=None, metavar="LIST",
              help="Comma-separated peers (torch,torch-cuda,jax,sklearn). Default: those "
                   "installed (pip install \"fastreg[bench]\" adds them). --peers '' for none.")
@click.option("--epochs", type=click.IntRange(1), default=None,
              help="Timed epochs per engine, after one warm-up epoch (default per workload).")
@click.option("--repeats", type=click.IntRange(1), default=1, show_default=True,
              help="Repeat the whole interleaved measurement with fresh engines; the median "
                   "is taken over every timed epoch.")
@click.option("--threads", type=click.IntRange(1), default=None,
              help="Threads for every pool (Numba, BLAS, OpenMP, peers). Default: all cores.")
@click.option("--json", "json_path", type=click.Path(dir_okay=False, allow_dash=True),
              default=None, help="Write every figure, the machine and the versions to PATH "
                                 "(- for stdout, instead of the tables).")
@click.option("--quick", is_flag=True,
              help="A smaller, still honest run: fewer samples for wide, fewer epochs.")
@click.option("--seed", type=int, default=0, show_default=True,
              help="Seed of the data and the initial weights (identical across engines).")
def bench(workload, backends, peers, epochs, repeats, threads, json_path, quick, seed):
    """Time every fastreg backend and every installed peer on the same training work.

    Per workload and engine: median epoch time of the interleaved timed epochs, samples/s,
    first-epoch time (compilation included), GFLOP/s (2 x multiply-adds of every forward and
    backward GEMM), percent of the GEMM ceiling measured in the same rounds, speed-up against
    each peer, final train/validation loss (a loss far from the best engine's is flagged with
    !), and the bytes the engine keeps per activation element between forward and backward.
    Progress goes to stderr, the tables to stdout.
    """
    workloads = WORKLOAD_NAMES if workload == "all" else (workload,)
    backends = csv_list(backends)
    for b in backends or []:
        if b not in BACKEND_NAMES:
            raise click.BadParameter(f"unknown backend {b!r}; choose from "
                                     f"{', '.join(BACKEND_NAMES)}", param_hint="--backend")
    for b in backends or []:
        require_backend(b)
    peer_list = csv_list(peers) if peers is not None else None
    if peers is not None and peer_list is None:
        peer_list = []
    for p in peer_list or []:
        if p not in PEER_NAMES:
            raise click.BadParameter(f"unknown peer {p!r}; choose from "
                                     f"{', '.join(PEER_NAMES)}", param_hint="--peers")
    if peer_list:
        from .bench import peers as peer_engines
        for p in peer_list:
            ok, reason = peer_engines.PEERS[p].available()
            if not ok:
                raise UserError(f"--peers {p}: {reason} (pip install \"fastreg[bench]\" adds "
                                f"the CPU peers)")
    from .bench import runner
    runner.run(workloads, backends, peer_list, epochs, repeats, threads, quick, seed, json_path,
               console=stdout_console(), status=runner.Status(stderr_console()))


# `fastreg sweep` and `fastreg study` live beside their helpers in cli_study.
from .cli_study import register as _register_study  # noqa: E402

_register_study(main)


if __name__ == "__main__":    # python -m fastreg.cli
    main()
