"""Independent float64 NumPy references for the tests.

Nothing here imports numpyro_svgp: these are the textbook closed forms, written
densely (O(N^3), unwhitened where possible) so that they share no code or
algebraic shortcut with the library.
"""

import numpy as np


def rbf(X1, X2, variance, lengthscale):
    d = (X1[:, None, :] - X2[None, :, :]) / lengthscale
    return variance * np.exp(-0.5 * np.sum(d**2, axis=-1))


def gaussian_logpdf(y, cov):
    """log N(y | 0, cov) via slogdet and solve."""
    sign, logdet = np.linalg.slogdet(cov)
    assert sign > 0
    return -0.5 * (y @ np.linalg.solve(cov, y) + logdet + len(y) * np.log(2 * np.pi))


def exact_lml(K, y, noise_var):
    """Rasmussen & Williams eq. 2.30."""
    return gaussian_logpdf(y, K + noise_var * np.eye(len(y)))


def exact_posterior(K_xx, K_sx, k_ss_diag, y, noise_var):
    """Exact GP posterior mean and marginal variance of f at test points (R&W eq. 2.25-2.26)."""
    C = K_xx + noise_var * np.eye(len(y))
    mean = K_sx @ np.linalg.solve(C, y)
    var = k_ss_diag - np.sum(K_sx * np.linalg.solve(C, K_sx.T).T, axis=1)
    return mean, var


def titsias_bound(K_xx, K_xz, K_zz, y, noise_var):
    """Titsias (2009) eq. 9, dense: log N(y | 0, Q + s2 I) - tr(K - Q) / (2 s2)."""
    Q = K_xz @ np.linalg.solve(K_zz, K_xz.T)
    return gaussian_logpdf(y, Q + noise_var * np.eye(len(y))) - np.trace(K_xx - Q) / (2 * noise_var)


def optimal_q_u(K_xz, K_zz, y, noise_var):
    """Optimal q(u) = N(mu, Sigma) over *unwhitened* inducing values u = f(Z)
    (Titsias 2009, eq. 10): Sigma = K_zz (K_zz + K_zx K_xz / s2)^-1 K_zz,
    mu = Sigma K_zz^-1 K_zx y / s2."""
    P = K_zz + K_xz.T @ K_xz / noise_var
    Sigma = K_zz @ np.linalg.solve(P, K_zz)
    mu = K_zz @ np.linalg.solve(P, K_xz.T @ y) / noise_var
    return mu, Sigma


def whiten(mu, Sigma, K_zz):
    """q(u) -> q(v) for v = L^-1 u, L = chol(K_zz): returns (m, S) with S lower triangular."""
    L = np.linalg.cholesky(K_zz)
    m = np.linalg.solve(L, mu)
    cov = np.linalg.solve(L, np.linalg.solve(L, Sigma).T).T
    return m, np.linalg.cholesky(0.5 * (cov + cov.T))


def hensman_elbo_unwhitened(K_xx_diag, K_xz, K_zz, y, noise_var, mu, Sigma):
    """Hensman et al. (2013) ELBO for q(u) = N(mu, Sigma), u = f(Z), prior N(0, K_zz):
    sum_n E_q[log N(y_n | f_n, s2)] - KL(q(u) || p(u)), with q(f_n) from the
    unwhitened conditional (dense solves, no Cholesky whitening)."""
    ell, kl = hensman_terms_unwhitened(K_xx_diag, K_xz, K_zz, y, noise_var, mu, Sigma)
    return np.sum(ell) - kl


def hensman_terms_unwhitened(K_xx_diag, K_xz, K_zz, y, noise_var, mu, Sigma):
    """The per-point expected log-likelihoods and the KL of
    :func:`hensman_elbo_unwhitened` (``noise_var`` may be per point)."""
    Kinv_kzx = np.linalg.solve(K_zz, K_xz.T)  # (M, N)
    mean = Kinv_kzx.T @ mu
    var = (
        K_xx_diag
        - np.sum(K_xz * Kinv_kzx.T, axis=1)
        + np.sum((Kinv_kzx.T @ Sigma) * Kinv_kzx.T, axis=1)
    )
    ell = -0.5 * np.log(2 * np.pi * noise_var) - ((y - mean) ** 2 + var) / (2 * noise_var)
    M = len(mu)
    _, logdet_K = np.linalg.slogdet(K_zz)
    _, logdet_S = np.linalg.slogdet(Sigma)
    kl = 0.5 * (
        np.trace(np.linalg.solve(K_zz, Sigma))
        + mu @ np.linalg.solve(K_zz, mu)
        - M
        + logdet_K
        - logdet_S
    )
    return ell, kl


def whitened_svgp_marginals(X, Z, variance, lengthscale, m, S, jitter):
    """One RBF SVGP from its whitened q(v) = N(m, S S^T): the dense unwhitened marginals
    of q(f) at X, the KL(q(u) || p(u)), and (K_xz, K_zz, mu, Sigma) of q(u), u = L v."""
    K_zz = rbf(Z, Z, variance, lengthscale) + jitter * np.eye(len(Z))
    L = np.linalg.cholesky(K_zz)
    mu, Sigma = L @ m, L @ S @ S.T @ L.T
    K_xz = rbf(X, Z, variance, lengthscale)
    A = np.linalg.solve(K_zz, K_xz.T).T
    mean = A @ mu
    var = variance - np.sum(A * K_xz, axis=1) + np.sum((A @ Sigma) * A, axis=1)
    _, kl = hensman_terms_unwhitened(
        np.full(len(X), variance), K_xz, K_zz, np.zeros(len(X)), 1.0, mu, Sigma
    )
    return mean, var, kl, (K_xz, K_zz, mu, Sigma)


def natural_step(m, Sigma, dloss_dm, dloss_dSigma, step):
    """One natural-gradient step of size ``step`` on q = N(m, Sigma) that descends a loss
    (Salimbeni et al. 2018): the natural parameters theta1 = Sigma^{-1} m and
    theta2 = -Sigma^{-1} / 2 move by -step times the loss's gradient in the expectation
    parameters eta1 = m, eta2 = Sigma + m m^T, which by the chain rule is
    d/deta2 = d/dSigma and d/deta1 = d/dm - 2 (d/dSigma) m (``dloss_dSigma`` symmetric).
    Returns the new (m, Sigma)."""
    G = 0.5 * (dloss_dSigma + dloss_dSigma.T)
    P = np.linalg.inv(Sigma)
    theta1 = P @ m - step * (dloss_dm - 2 * G @ m)
    theta2 = -0.5 * P - step * G
    Sigma_new = np.linalg.inv(-2 * theta2)
    return Sigma_new @ theta1, 0.5 * (Sigma_new + Sigma_new.T)


def symmetric_gradient(f, Sigma, h=1e-6):
    """The symmetric G with f(Sigma + E) = f(Sigma) + tr(G E) + O(|E|^2) for symmetric E,
    by central differences: G_ii along e_i e_i^T, G_ij = G_ji half the difference along
    e_i e_j^T + e_j e_i^T."""
    n = len(Sigma)
    G = np.zeros((n, n))
    for i in range(n):
        for j in range(i + 1):
            E = np.zeros((n, n))
            E[i, j] = E[j, i] = h
            d = (f(Sigma + E) - f(Sigma - E)) / (2 * h)
            G[i, j] = G[j, i] = d if i == j else d / 2
    return G


def central_difference(f, x, h=1e-6):
    """Central differences of the NumPy scalar function ``f`` at ``x`` (any shape)."""
    x = np.asarray(x, dtype=float)
    g = np.zeros_like(x)
    for i in np.ndindex(x.shape):
        e = np.zeros_like(x)
        e[i] = h
        g[i] = (f(x + e) - f(x - e)) / (2 * h)
    return g
