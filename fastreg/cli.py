"""The `fastreg` command line."""
import click

from . import __version__


def _csv(value):
    return [v.strip() for v in value.split(",") if v.strip()] if value else None


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="fastreg")
def main():
    """fastreg: fast, trustworthy training of regularized neural networks."""


@main.command()
@click.option("--workload", "workload", default="all", show_default=True,
              type=click.Choice(["curve", "wide", "digits", "all"]),
              help="Built-in workload: curve (1-D regression, 1-64-64-64-1 LeakyReLU, dropout "
                   "0.1, L2 1e-4), wide (784-1024-1024-10 ReLU classifier, dropout 0.2), "
                   "digits (scikit-learn's 8x8 digits, 64-128-10), or all.")
@click.option("--backend", "backends", default=None, metavar="LIST",
              help="Comma-separated fastreg backends (numpy,numba,cython,cuda). Default: all "
                   "(with --quick: all but the numpy reference); an unavailable one is listed "
                   "with the reason.")
@click.option("--peers", default=None, metavar="LIST",
              help="Comma-separated peers (torch,jax,sklearn). Default: those installed. "
                   "Pass --peers '' for none.")
@click.option("--epochs", type=click.IntRange(1), default=None,
              help="Timed epochs per engine, after one warm-up epoch (default per workload).")
@click.option("--repeats", type=click.IntRange(1), default=1, show_default=True,
              help="Repeat the whole interleaved measurement with fresh engines; the median "
                   "is taken over every timed epoch.")
@click.option("--threads", type=click.IntRange(1), default=None,
              help="Threads for every pool (Numba, BLAS, OpenMP, peers). Default: all cores.")
@click.option("--json", "json_path", type=click.Path(dir_okay=False, writable=True),
              default=None, help="Write every figure, the machine and the versions to PATH.")
@click.option("--quick", is_flag=True,
              help="A smaller, still honest run: fewer samples for wide, fewer epochs, and the "
                   "numpy reference left out unless --backend names it.")
@click.option("--seed", type=int, default=0, show_default=True,
              help="Seed of the data and the initial weights (identical across engines).")
def bench(workload, backends, peers, epochs, repeats, threads, json_path, quick, seed):
    """Time every fastreg backend and every installed peer on the same training work.

    Per workload and engine: median epoch time of the interleaved timed epochs, samples/s,
    first-epoch time (compilation included), GFLOP/s (2 x multiply-adds of every forward and
    backward GEMM), percent of the GEMM ceiling measured in the same run, speed-up against each
    peer, final train/validation loss (a loss far from the best engine's is flagged with !),
    and the bytes the engine keeps per activation element between forward and backward.
    """
    from .bench import peers as peer_engines
    from .bench import runner
    workloads = runner.WORKLOADS if workload == "all" else (workload,)
    backends = _csv(backends)
    for b in backends or []:
        if b not in runner.FASTREG_BACKENDS:
            raise click.BadParameter(f"unknown backend {b!r}; choose from "
                                     f"{', '.join(runner.FASTREG_BACKENDS)}",
                                     param_hint="--backend")
    peer_list = _csv(peers) if peers is not None else None
    if peers is not None and peer_list is None:
        peer_list = []
    for p in peer_list or []:
        if p not in peer_engines.PEERS:
            raise click.BadParameter(f"unknown peer {p!r}; choose from "
                                     f"{', '.join(peer_engines.PEERS)}", param_hint="--peers")
    runner.run(workloads, backends, peer_list, epochs, repeats, threads, quick, seed, json_path)


# `fastreg sweep` and `fastreg study` live beside their helpers in cli_study.
from .cli_study import register as _register_study  # noqa: E402

_register_study(main)
