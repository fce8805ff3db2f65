r"""Natural gradients for the whitened :math:`q(v) = \mathcal N(m, \Sigma)`, as an optax
transformation.

With natural parameters :math:`\theta_1 = \Sigma^{-1} m`, :math:`\theta_2 = -\tfrac12 \Sigma^{-1}`
and expectation parameters :math:`\eta_1 = m`, :math:`\eta_2 = \Sigma + m m^\top`, the
natural gradient of the ELBO :math:`\mathcal L` in :math:`\theta` is its ordinary gradient
in :math:`\eta` (Salimbeni, Eleftheriadis & Hensman 2018):

.. math::

    \theta \leftarrow \theta + \gamma \nabla_\eta \mathcal L, \qquad
    \nabla_{\eta_1} \mathcal L = \nabla_m \mathcal L - 2 (\nabla_\Sigma \mathcal L)\, m, \quad
    \nabla_{\eta_2} \mathcal L = \nabla_\Sigma \mathcal L.

For a Gaussian likelihood and the full batch, one step with :math:`\gamma = 1` lands on
the optimal :math:`q(v)`. :math:`\nabla_\Sigma` comes from the gradient in
:math:`S` (:math:`\Sigma = S S^\top`) through the Cholesky factor's vector-Jacobian
product. The other parameters (kernel, :math:`Z`, noise) get the wrapped optimizer's
update.
"""

import jax
import jax.numpy as jnp
import optax

from numpyro_svgp._guide import AutoSVGP
from numpyro_svgp._linalg import after, blocked_cholesky, lower_inverse

__all__ = ["natural_gradient"]


def _natural_step(m, raw, grad_m, grad_raw, step_size, scale_tril):
    """New (m, lower-triangular S) after one natural-gradient ascent step.

    ``grad_m``/``grad_raw`` are gradients of the *loss* (the negative ELBO);
    ``scale_tril`` is the guide's map from its parameter to :math:`S`.
    """
    S = scale_tril(raw)
    Sigma = S @ S.T
    # The guide's map keeps the lower triangle and flips the sign of some columns: on
    # the lower triangle its Jacobian J is diagonal with entries +-1, so J^T = J^-1 = J
    # and the loss gradient in S is J applied to the gradient in the parameter.
    grad_S = jnp.tril(jax.jvp(scale_tril, (raw,), (grad_raw,))[1])
    # the Cholesky factors, inverses and their derivative by blocks (_linalg): above
    # order 128 mostly matrix products, which XLA:CPU runs far faster than LAPACK's
    # solves; Sigma^-1 from the inverse of its factor rather than from an LU
    L, cholesky_vjp = jax.vjp(lambda A: blocked_cholesky(0.5 * (A + A.T)), Sigma)
    grad_Sigma = cholesky_vjp(grad_S)[0]
    grad_Sigma = 0.5 * (grad_Sigma + grad_Sigma.T)
    # ascent on the ELBO = descent on the loss. The inverse waits for the derivative's
    # solves: in a family both are batched LAPACK calls, which must not run at once
    # (see _linalg.after); every later one depends on both already.
    L_inverse = lower_inverse(after(L, grad_Sigma))
    precision = L_inverse.T @ L_inverse
    theta1 = precision @ m - step_size * (grad_m - 2.0 * grad_Sigma @ m)
    theta2 = -0.5 * precision - step_size * grad_Sigma
    new_precision = -2.0 * theta2
    # The new factor straight from the new precision P, with no covariance to form and
    # factorise again: with J the exchange matrix and J P J = R R^T (R lower),
    # P = (J R J)(J R J)^T with J R J upper, so the new Sigma = P^-1 = N N^T with
    # N = (J R J)^-T = J R^-T J, lower and with a positive diagonal: its Cholesky factor.
    R = blocked_cholesky(_reversed(0.5 * (new_precision + new_precision.T)))
    new_S = _reversed(lower_inverse(R).T)
    new_m = new_S @ (new_S.T @ theta1)
    return new_m, new_S


def _reversed(A):
    """:math:`J A J`: rows and columns in reverse order."""
    return A[..., ::-1, ::-1]


def _batched_natural_step(m, raw, grad_m, grad_raw, step_size, scale_tril):
    """:func:`_natural_step` for each GP of a family (leading batch axes on every array)."""
    batch = m.shape[:-1]
    if not batch:
        return _natural_step(m, raw, grad_m, grad_raw, step_size, scale_tril)
    M = m.shape[-1]
    flat = [a.reshape((-1,) + a.shape[len(batch) :]) for a in (m, raw, grad_m, grad_raw)]
    new_m, new_S = jax.vmap(lambda *a: _natural_step(*a, step_size, scale_tril))(*flat)
    return new_m.reshape(batch + (M,)), new_S.reshape(batch + (M, M))


def natural_gradient(
    optimizer: optax.GradientTransformation,
    step_size: float | optax.Schedule = 0.1,
    *,
    guide: AutoSVGP,
) -> optax.GradientTransformation:
    r"""Natural-gradient steps on every :math:`q(v)` of ``guide``, ``optimizer`` on the rest.

    Pass it to SVI like any optax optimizer::

        guide = ns.AutoSVGP(model)
        svi = SVI(model, guide, ns.natural_gradient(optax.adam(1e-2), 0.1, guide=guide),
                  ns.SVGP_ELBO())

    The ``(loc, scale_tril)`` pairs are the guide's own
    (:meth:`~numpyro_svgp.AutoSVGP.whitened_param_names`, read when SVI initialises the
    optimizer); no other parameter is touched. It works with mini-batch and Monte-Carlo
    ELBOs too (then use :math:`\gamma < 1`, e.g. 0.1 as in Salimbeni et al. 2018). A step
    whose new precision is not positive definite gives NaN, which
    :func:`~numpyro_svgp.train` skips.

    :param optimizer: the optax transformation for all other parameters.
    :param guide: the :class:`~numpyro_svgp.AutoSVGP` that SVI fits.
    :param step_size: :math:`\gamma`, a float or an optax schedule of the step count
        (decay it on mini-batches so that the noise settles); 1.0 reaches the optimum
        in one step for a Gaussian likelihood on the full batch.
    """
    if not isinstance(guide, AutoSVGP):
        raise TypeError(
            "natural_gradient(guide=...) needs the AutoSVGP that SVI fits, "
            f"got {type(guide).__name__}."
        )
    schedule = step_size if callable(step_size) else (lambda count: step_size)

    def split(tree, pairs):
        names = {n for pair in pairs for n in pair}
        return {k: v for k, v in tree.items() if k not in names}

    def init(params):
        return jnp.zeros((), jnp.int32), optimizer.init(split(params, guide.whitened_param_names()))

    def update(grads, state, params=None):
        if params is None:
            raise ValueError("natural_gradient needs the current params (SVI passes them).")
        count, inner = state
        pairs = guide.whitened_param_names()
        others, inner = optimizer.update(split(grads, pairs), inner, split(params, pairs))
        updates = dict(others)
        gamma = schedule(count)
        # Each step starts once the whole gradient (and the step before it) is done:
        # its factorisations and solves read only the params, so nothing else would keep
        # them from running beside the ELBO's own, and in a family two batched LAPACK
        # calls at once can deadlock XLA:CPU (see _linalg.after).
        done = grads
        for loc_name, tril_name in pairs:
            new_m, new_S = _batched_natural_step(
                *after((params[loc_name], params[tril_name]), done),
                grads[loc_name],
                grads[tril_name],
                gamma,
                guide.scale_tril,
            )
            done = (new_m, new_S)
            updates[loc_name] = new_m - params[loc_name]
            updates[tril_name] = new_S - params[tril_name]
        return updates, (count + 1, inner)

    return optax.GradientTransformation(init, update)
