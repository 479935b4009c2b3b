"""Edges every student/teacher logits function keeps (issue: one library contract).

For each function: a per-position ``[B]`` temperature equals row-by-row calls (eager and jitted),
d/dT is finite when ``-inf`` entries are present (no (-inf)/T in the graph), a concrete ``+inf``
logit is a ValueError naming the argument, and a NaN in one row reaches that row only.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kdjax import divergences as D
from kdjax import losses as L
from kdjax import policy as PO

FNS = {
    "forward_kl": D.forward_kl, "reverse_kl": D.reverse_kl,
    "generalized_jsd": lambda a, b, **k: D.generalized_jsd(a, b, beta=.3, **k),
    "total_variation": D.total_variation,
    "skew_forward_kl": lambda a, b, **k: D.skew_forward_kl(a, b, skew=.1, **k),
    "skew_reverse_kl": lambda a, b, **k: D.skew_reverse_kl(a, b, skew=.1, **k),
    "hinton_kd": lambda a, b, **k: L.hinton_kd(a, b, scale_by_t2=True, **k),
    "logit_standardized_kd": L.logit_standardized_kd, "adaptive_kl": L.adaptive_kl,
    "plackett_luce_kd": L.plackett_luce_kd,
    "taid_loss": lambda a, b, **k: L.taid_loss(a, b, interpolation=.5, **k),
    "ce_kd_mixture": lambda a, b, **k: L.ce_kd_mixture(a, b, jnp.argmax(b, -1), ce_weight=.3, **k),
    "minillm_token_reverse_kl": PO.minillm_token_reverse_kl,
    "multi_teacher_kd": lambda a, b, **k: L.multi_teacher_kd(a, jnp.stack([b, b + 1]), **k),
    "topk_tail_kl": lambda a, b, **k: L.topk_tail_kl(a, *L.topk_teacher(b, k=2), **k),
}
S = jax.random.normal(jax.random.key(0), (4, 6))
T = jax.random.normal(jax.random.key(1), (4, 6))


@pytest.mark.parametrize("name", sorted(FNS))
def test_per_position_temperature_is_per_row(name):
  f = FNS[name]
  temp = jnp.array([1.0, 2.0, 3.0, 4.0])
  full = f(S, T, temperature=temp)
  rows = jnp.stack([f(S[i:i + 1], T[i:i + 1], temperature=temp[i])[0] for i in range(4)])
  np.testing.assert_allclose(full, rows, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(jax.jit(lambda a, b, c: f(a, b, temperature=c))(S, T, temp), full,
                             rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", sorted(FNS))
def test_temperature_gradient_finite_with_minus_inf_entries(name):
  f = FNS[name]
  # removed entries (-inf on both sides: no support violation, whose value is +inf)
  s = S.at[1, 1].set(-jnp.inf).at[0, 0].set(-jnp.inf)
  t = T.at[1, 1].set(-jnp.inf).at[0, 0].set(-jnp.inf)
  g = jax.grad(lambda temp: f(s, t, temperature=temp).sum())(2.0)
  assert np.isfinite(float(g))


@pytest.mark.parametrize("name", sorted(FNS))
def test_concrete_plus_inf_is_an_error_and_nan_propagates(name):
  f = FNS[name]
  with pytest.raises(ValueError, match="logits"):
    f(S, T.at[0, 0].set(jnp.inf))
  out = np.asarray(f(S.at[2, 3].set(jnp.nan), T))
  assert np.isnan(out[2]) and np.isfinite(out[[0, 1, 3]]).all()
