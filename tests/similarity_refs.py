"""Independent float64 numpy references for the representation-similarity tests.

Each follows the textbook definition on the data matrices themselves (not on streamed moments,
and by a different algorithm where one exists: QR/SVD of the centred data for CCA, Gram
matrices for HSIC, np.corrcoef + scipy for RSA, scipy's orthogonal_procrustes), so agreement
with engine/ is evidence, not a tautology.
"""

from __future__ import annotations

import numpy as np
import scipy.linalg
import scipy.stats


def centre(x, w=None):
    x = np.asarray(x, np.float64)
    w = np.ones(len(x)) if w is None else np.asarray(w, np.float64)
    return x - w @ x / w.sum()


def orth_basis(xc, rtol=1e-10):
    """Orthonormal basis of the column space (SVD, rank cut at rtol * s_max)."""
    u, s, _ = np.linalg.svd(xc, full_matrices=False)
    return u[:, s > rtol * s[0]]


def cca_qr(x, y, w=None):
    """Björck-Golub CCA: singular values of Qx^T Qy for orthonormal bases of centred data.

    Row weights are frequency weights: rows are scaled by sqrt(w) after weighted centring.
    Returns (coefficients, Qx, U) so canonical variates are ``Qx @ U``.
    """
    sw = np.ones(len(x)) if w is None else np.sqrt(np.asarray(w, np.float64))
    xc = centre(x, w) * sw[:, None]
    yc = centre(y, w) * sw[:, None]
    qx, qy = orth_basis(xc), orth_basis(yc)
    u, s, _ = np.linalg.svd(qx.T @ qy, full_matrices=False)
    return np.clip(s, 0, 1), qx, u, xc


def svcca_google(x, y, threshold=0.99):
    """SVCCA the way google/svcca's tutorial does it: SVD of the centred data, keep the top
    singular directions explaining ``threshold`` of the variance (sum of s^2), project, CCA."""

    def reduce(a):
        ac = centre(a)
        _, s, vt = np.linalg.svd(ac, full_matrices=False)
        frac = np.cumsum(s**2) / np.sum(s**2)
        k = int(np.argmax(frac >= threshold)) + 1
        return ac @ vt[:k].T, k

    xr, kx = reduce(x)
    yr, ky = reduce(y)
    coefs = cca_qr(xr, yr)[0]
    return float(coefs.mean()), kx, ky


def pwcca_morcos(x, y):
    """Morcos et al. 2018: alpha_i = sum_j |<h_i, x_j>| with h_i the (unit-norm) canonical
    variates of X and x_j the centred columns of X; PWCCA = sum alpha_i rho_i / sum alpha."""
    coefs, qx, u, xc = cca_qr(x, y)
    h = qx @ u[:, : len(coefs)]
    alpha = np.abs(h.T @ xc).sum(axis=1)
    return float(np.sum(alpha * coefs) / alpha.sum())


def linear_cka(x, y, w=None):
    sw = np.ones(len(x)) if w is None else np.sqrt(np.asarray(w, np.float64))
    xc = centre(x, w) * sw[:, None]
    yc = centre(y, w) * sw[:, None]
    return float(
        np.linalg.norm(yc.T @ xc) ** 2 / (np.linalg.norm(xc.T @ xc) * np.linalg.norm(yc.T @ yc))
    )


def hsic_unbiased_gram(k, l):
    """Song et al. 2012 unbiased HSIC from Gram matrices (diagonals removed)."""
    n = k.shape[0]
    k = k - np.diag(np.diag(k))
    l = l - np.diag(np.diag(l))
    one = np.ones(n)
    return float(
        (
            np.trace(k @ l)
            + (one @ k @ one) * (one @ l @ one) / ((n - 1) * (n - 2))
            - 2.0 / (n - 2) * (one @ k @ l @ one)
        )
        / (n * (n - 3))
    )


def debiased_cka(x, y, centred=True):
    x = centre(x) if centred else np.asarray(x, np.float64)
    y = centre(y) if centred else np.asarray(y, np.float64)
    k, l = x @ x.T, y @ y.T
    return hsic_unbiased_gram(k, l) / np.sqrt(hsic_unbiased_gram(k, k) * hsic_unbiased_gram(l, l))


def minibatch_cka(x, y, batch):
    hs = np.zeros(3)
    for s in range(0, len(x), batch):
        xb = np.asarray(x[s : s + batch], np.float64)
        yb = np.asarray(y[s : s + batch], np.float64)
        if len(xb) < 4:
            continue
        k, l = xb @ xb.T, yb @ yb.T
        hs += [hsic_unbiased_gram(k, l), hsic_unbiased_gram(k, k), hsic_unbiased_gram(l, l)]
    return float(hs[0] / np.sqrt(hs[1] * hs[2]))


def rsa(x, y, method="spearman"):
    iu = np.triu_indices(len(x), 1)
    rx = np.corrcoef(np.asarray(x, np.float64))[iu]
    ry = np.corrcoef(np.asarray(y, np.float64))[iu]
    if method == "spearman":
        return float(scipy.stats.spearmanr(rx, ry).statistic)
    return float(scipy.stats.pearsonr(rx, ry).statistic)


def rsa_weighted_pearson(x, y, w):
    iu = np.triu_indices(len(x), 1)
    rx = np.corrcoef(np.asarray(x, np.float64))[iu]
    ry = np.corrcoef(np.asarray(y, np.float64))[iu]
    pw = (np.asarray(w, np.float64)[:, None] * np.asarray(w, np.float64)[None, :])[iu]
    mx, my = pw @ rx / pw.sum(), pw @ ry / pw.sum()
    return float(
        pw @ ((rx - mx) * (ry - my)) / np.sqrt(pw @ (rx - mx) ** 2 * (pw @ (ry - my) ** 2))
    )


def procrustes_distance(x, y):
    """||X R - Y||_F with scipy's optimal orthogonal R, after centring, unit Frobenius norm and
    zero-padding to a common width."""
    xc, yc = centre(x), centre(y)
    xc, yc = xc / np.linalg.norm(xc), yc / np.linalg.norm(yc)
    d = max(xc.shape[1], yc.shape[1])
    xc = np.pad(xc, ((0, 0), (0, d - xc.shape[1])))
    yc = np.pad(yc, ((0, 0), (0, d - yc.shape[1])))
    r, _ = scipy.linalg.orthogonal_procrustes(xc, yc)
    return float(np.linalg.norm(xc @ r - yc))


def knn(x, k, normalize=False):
    x = np.asarray(x, np.float64)
    if normalize:
        x = x / np.linalg.norm(x, axis=1, keepdims=True)
    s = x @ x.T
    np.fill_diagonal(s, -np.inf)
    return np.argsort(-s, axis=1, kind="stable")[:, :k]


def mutual_knn(x, y, k, w=None, normalize=False):
    a, b = knn(x, k, normalize), knn(y, k, normalize)
    frac = np.array([len(set(a[i]) & set(b[i])) / k for i in range(len(a))])
    w = np.ones(len(frac)) if w is None else np.asarray(w, np.float64)
    return float(w @ frac / w.sum())


def random_pair(seed, n, d1, d2):
    """Independent Gaussian X [n, d1], Y [n, d2] (float32): the no-shared-structure input."""
    rng = np.random.default_rng(seed)
    return (
        rng.normal(size=(n, d1)).astype(np.float32),
        rng.normal(size=(n, d2)).astype(np.float32),
    )
