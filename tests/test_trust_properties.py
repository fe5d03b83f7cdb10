"""The trust properties (tests/trust_props.py) under hypothesis, every category.

Bounded for CI (profile "ci": about 200 cases in all, well under a minute once the Numba
cache is warm); FASTREG_HYPOTHESIS_PROFILE=long runs 20 times as many:

    FASTREG_HYPOTHESIS_PROFILE=long python -m pytest -q tests/test_trust_properties.py

tests/trust_probe.py counts the cases tried and clean per category instead of stopping at the
first failure.
"""
import os

import pytest
from hypothesis import HealthCheck, given, settings

import trust_props

# cases per category in the CI profile; "long" multiplies them
BUDGET = {"nan": 20, "divergence": 30, "arguments": 60, "api_misuse": 15, "files": 40,
          "save": 12, "interrupts": 24, "resume": 10, "threads": 10, "memory": 10}
PROFILE = os.environ.get("FASTREG_HYPOTHESIS_PROFILE", "ci")
SCALE = {"ci": 1, "long": 20}.get(PROFILE)
if SCALE is None:
    raise RuntimeError(f"FASTREG_HYPOTHESIS_PROFILE must be 'ci' or 'long', got {PROFILE!r}")


def _settings(category):
    return settings(max_examples=BUDGET[category] * SCALE, deadline=None, database=None,
                    print_blob=True,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                           HealthCheck.function_scoped_fixture])


@pytest.mark.parametrize("category", sorted(BUDGET))
def test_trust_property(category, tmp_path):
    strategy, check, needs_tmp = trust_props.CATEGORIES[category]

    @_settings(category)
    @given(strategy)
    def prop(case):
        if needs_tmp:
            check(case, str(tmp_path))
        else:
            check(case)

    prop()
