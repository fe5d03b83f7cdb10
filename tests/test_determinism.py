"""Same seed, same data: bitwise-identical weights whatever NUMBA_NUM_THREADS is."""
import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

SCRIPT = textwrap.dedent("""
    import hashlib, json, numpy as np, fastreg as fr
    rng = np.random.default_rng(7)
    X = rng.standard_normal((700, 20)).astype(np.float32)
    y = rng.integers(0, 4, 700)
    model = fr.Sequential([fr.Dense(300, "relu", dropout=0.2, regularizer=fr.L2(1e-4)),
                           fr.Dense(260, "tanh", dropout=0.1, regularizer=fr.L1(1e-5)),
                           fr.Dense(4)], input_dim=20, seed=11)
    model.compile(loss="sparse_categorical_crossentropy", optimizer=fr.Adam(1e-3),
                  backend="numba")
    model.fit(X, y, epochs=2, batch_size=256, verbose=0)
    import numba
    digest = hashlib.sha256(b"".join(w.tobytes() for w in model.get_weights())).hexdigest()
    print(json.dumps({"threads": numba.get_num_threads(), "digest": digest}))
""")


@pytest.mark.slow
def test_weights_identical_for_one_and_two_threads():
    results = []
    for threads in ("1", "2"):
        env = dict(os.environ, NUMBA_NUM_THREADS=threads)
        out = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True,
                             text=True, timeout=900)
        assert out.returncode == 0, out.stderr
        results.append(json.loads(out.stdout.strip().splitlines()[-1]))
    assert [r["threads"] for r in results] == [1, 2]
    assert results[0]["digest"] == results[1]["digest"]
