"""Count the trust properties' cases: tried and clean per category, without stopping at the
first failure (tests/test_trust_properties.py stops and shrinks; this only counts).

    python tests/trust_probe.py                  # 40 cases per category
    python tests/trust_probe.py 200 files nan    # 200 cases of the named categories
    python tests/trust_probe.py --json out.json  # the table as JSON too

The CUDA cases run on numba-cuda's simulator unless a GPU is present (as in the tests).
"""
import json
import os
import shutil
import sys
import tempfile
import time
from collections import Counter

if shutil.which("nvidia-smi") is None:
    os.environ.setdefault("NUMBA_ENABLE_CUDASIM", "1")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from hypothesis import HealthCheck, Phase, given, settings  # noqa: E402

import trust_props  # noqa: E402


def run(category, n, tmp):
    strategy, check, needs_tmp = trust_props.CATEGORIES[category]
    outcome = Counter()
    holes = Counter()

    @settings(max_examples=n, phases=[Phase.generate], database=None, deadline=None,
              suppress_health_check=list(HealthCheck))
    @given(strategy)
    def probe(case):
        outcome["tried"] += 1
        try:
            check(case, tmp) if needs_tmp else check(case)
        except KeyboardInterrupt:        # a Ctrl-C that escaped its fit
            holes["KeyboardInterrupt escaped the check"] += 1
            return
        except Exception as exc:    # every failure is counted, none stops the count
            what = str(exc).split("\n")[0][:160]
            holes[f"{type(exc).__name__}: {what}"] += 1
            return
        outcome["clean"] += 1

    probe()
    return outcome["tried"], outcome["clean"], holes


def main(argv):
    out_json = None
    if "--json" in argv:
        i = argv.index("--json")
        out_json = argv[i + 1]
        argv = argv[:i] + argv[i + 2:]
    n = int(argv[0]) if argv and argv[0].isdigit() else 40
    names = [a for a in argv if not a.isdigit()] or list(trust_props.CATEGORIES)
    table = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in names:
            t0 = time.time()
            tried, clean, holes = run(name, n, tmp)
            table[name] = {"tried": tried, "clean": clean, "failing": tried - clean,
                           "seconds": round(time.time() - t0, 1),
                           "holes": dict(holes.most_common(12))}
            print(f"{name:12s} tried {tried:4d}  clean {clean:4d}  failing {tried - clean:4d}"
                  f"  ({time.time() - t0:.0f} s)", flush=True)
            for what, count in holes.most_common(6):
                print(f"    {count:4d}  {what}", flush=True)
    if out_json:
        with open(out_json, "w") as f:
            json.dump(table, f, indent=1)


if __name__ == "__main__":
    main(sys.argv[1:])
