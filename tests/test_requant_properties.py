"""Property tests (hypothesis) of the int8 requantisation helpers used by the numpy reference and the C kernels."""

from fractions import Fraction

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from detector.export.quantize import quantize_multiplier, requant

scales = st.floats(min_value=1e-8, max_value=1e6, allow_nan=False, allow_infinity=False)
accs = st.integers(min_value=-(2**31), max_value=2**31 - 1)


@settings(max_examples=300, deadline=None)
@given(scale=scales)
def test_multiplier_is_normalised_and_accurate(scale):
    m, n = quantize_multiplier(np.array([scale]))
    m, n = int(m[0]), int(n[0])
    assert 2**30 <= m < 2**31 and 1 <= n <= 62
    assert abs(m / 2**n - scale) <= scale * 2**-30  # rounding of a 31-bit mantissa


@settings(max_examples=500, deadline=None)
@given(acc=accs, scale=st.floats(min_value=1e-6, max_value=4.0))
def test_requant_is_exact_round_half_up_of_the_fixed_point_product(acc, scale):
    m, n = quantize_multiplier(np.array([scale]))
    m, n = int(m[0]), int(n[0])
    got = int(requant(np.array([acc]), m, n)[0])
    exact = Fraction(acc * m, 2**n)
    assert got == (exact + Fraction(1, 2)).__floor__()  # round half up, in exact rational arithmetic
    assert abs(got - acc * scale) <= 0.5 + abs(acc) * scale * 2**-29 + 1e-9  # close to the real product


@settings(max_examples=200, deadline=None)
@given(a=accs, b=accs, scale=st.floats(min_value=1e-6, max_value=4.0))
def test_requant_is_monotonic(a, b, scale):
    m, n = quantize_multiplier(np.array([scale]))
    lo, hi = sorted((a, b))
    out = requant(np.array([lo, hi]), m[0], n[0])
    assert out[0] <= out[1]
