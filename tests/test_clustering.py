"""engine/clustering.py against independent float64 numpy references and planted clusters."""

import numpy as np
import pytest

from engine import checks, clustering
from models import planted


def _unit(x):
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _ref_topk(W, k):
    """Dense float64 cosine, self excluded, descending (stable: ties to the lower index)."""
    Wn = _unit(np.asarray(W, np.float64))
    S = Wn @ Wn.T
    np.fill_diagonal(S, -np.inf)
    idx = np.argsort(-S, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(S, idx, 1), idx


def _ref_graph_partition(W, k, threshold):
    """Union-find over the edges i -> top-k neighbours with cosine > threshold."""
    vals, idx = _ref_topk(W, k)
    parent = list(range(len(W)))

    def find(i):
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for i in range(len(W)):
        for v, j in zip(vals[i], idx[i]):
            if v > threshold:
                parent[find(i)] = find(int(j))
    return np.asarray([find(i) for i in range(len(W))])


def _clustered_data(rng, n_groups=5, size=6, n_noise=40, d=48, spread=0.3):
    centres = _unit(rng.normal(size=(n_groups, d)))
    groups = [_unit(c + spread * rng.normal(size=(size, d)) / np.sqrt(d)) for c in centres]
    W = np.concatenate(groups + [_unit(rng.normal(size=(n_noise, d)))])
    truth = np.concatenate(
        [np.full(size, g) for g in range(n_groups)] + [n_groups + np.arange(n_noise)]
    )
    return W.astype(np.float32), truth


def test_topk_neighbours_match_float64(mesh, rng):
    W = rng.normal(size=(203, 24)).astype(np.float32)
    vals, idx = clustering.topk_neighbours(W, 3, mesh=mesh, tile=64)
    ref_v, ref_i = _ref_topk(W, 3)
    np.testing.assert_array_equal(idx, ref_i)
    np.testing.assert_allclose(vals, ref_v, atol=1e-6)
    assert not np.any(idx == np.arange(len(W))[:, None])  # self excluded


def test_topk_neighbours_exact_duplicates(rng):
    # Rows 0, 1, 2 identical: ties go to the lower index and a row never lists itself.
    W = rng.normal(size=(12, 6))
    W[1] = W[0]
    W[2] = W[0]
    for k in (1, 2, 3):
        vals, idx = clustering.topk_neighbours(W, k)
        _, ref_i = _ref_topk(W, k)
        np.testing.assert_array_equal(idx[:3], ref_i[:3])
        assert not np.any(idx == np.arange(12)[:, None])
    assert clustering.topk_neighbours(W, 1)[1][:3, 0].tolist() == [1, 0, 0]


def test_cosine_graph_equals_union_find_reference(mesh, rng):
    W, _ = _clustered_data(rng)
    for k, t in ((2, 0.5), (3, 0.3), (1, 0.6)):
        res = clustering.cosine_graph_clusters(W, k=k, threshold=t, min_size=1, mesh=mesh)
        ref = _ref_graph_partition(W, k, t)
        assert clustering.same_partition(res.labels, ref)
        assert res.labels.min() == 0  # min_size=1 keeps all
        assert sorted(res.component_sizes.tolist()) == sorted(
            np.unique(ref, return_counts=True)[1].tolist()
        )


def test_cosine_graph_finds_planted_groups(rng):
    W, truth = _clustered_data(rng)
    res = clustering.cosine_graph_clusters(W)
    assert len(res.clusters) == 5
    for g in range(5):
        members = np.flatnonzero(truth == g)
        assert np.all(res.labels[members] == res.labels[members[0]])
        assert len(res.cluster_of(members[0])) == 6
    assert np.all(res.labels[30:] == -1)  # noise: singletons


def test_size_limits_and_ordering(rng):
    W, truth = _clustered_data(rng, n_groups=3, size=4, n_noise=10)
    extra = _unit(W[:1] + 0.05 * rng.normal(size=(3, W.shape[1])))  # group 0 grows to 7
    W2 = np.concatenate([W, extra]).astype(np.float32)
    res = clustering.cosine_graph_clusters(W2, min_size=2, max_size=5)
    assert [len(c) for c in res.clusters] == [4, 4]  # the 7 dropped
    assert np.all(res.labels[:4] == -1) and np.all(res.labels[-3:] == -1)
    big = clustering.cosine_graph_clusters(W2, min_size=5)
    assert big.sizes.tolist() == [7]
    assert big.summary()["n_clusters"] == 1
    # Largest first; a cluster's id is its rank.
    full = clustering.cosine_graph_clusters(W2)
    assert full.sizes.tolist() == sorted(full.sizes.tolist(), reverse=True)


def test_precomputed_neighbours_path(rng):
    W, _ = _clustered_data(rng)
    vals, idx = _ref_topk(W, 4)
    a = clustering.cosine_graph_clusters(W, neighbours=(vals, idx))
    b = clustering.cosine_graph_clusters(W)
    np.testing.assert_array_equal(a.labels, b.labels)


def test_planted_family_found_and_unplanted_not():
    pair = planted.make_planted_pair(1, n_tokens=64)
    fam = set(pair.concept_features.tolist())
    for W in (pair.atoms_a, pair.atoms_b):
        res = clustering.cosine_graph_clusters(W)
        hit = clustering.best_cluster_for(res, pair.concept_features)
        assert set(hit["members"].tolist()) == fam
        assert hit["recall"] == 1.0 and hit["precision"] == 1.0
    ctrl = planted.make_planted_pair(1, n_tokens=64, planted=False, shared=False)
    for W in (ctrl.atoms_a, ctrl.atoms_b):
        res = clustering.cosine_graph_clusters(W)
        assert clustering.best_cluster_for(res, ctrl.concept_features)["hits"] <= 1


def test_spectral_recovers_blocks_dense_and_sparse(mesh, rng):
    W, truth = _clustered_data(rng, n_groups=4, size=8, n_noise=0, spread=0.4)
    dense = clustering.spectral_clusters(W, 4, seed=0)
    sparse = clustering.spectral_clusters(W, 4, n_neighbors=6, seed=0, mesh=mesh)
    assert not dense.params["sparse"] and sparse.params["sparse"]
    assert clustering.same_partition(dense.labels, truth)
    assert clustering.same_partition(sparse.labels, truth)
    # The dense path is forced onto the sparse one beyond dense_limit.
    forced = clustering.spectral_clusters(W, 4, dense_limit=10, seed=0, mesh=mesh)
    assert forced.params["sparse"] and clustering.same_partition(forced.labels, truth)


def test_spectral_finds_planted_family():
    pair = planted.make_planted_pair(0, n_tokens=64)
    res = clustering.spectral_clusters(pair.atoms_a, 11, seed=0)
    hit = clustering.best_cluster_for(res, pair.concept_features)
    assert hit["recall"] == 1.0


def test_angular_affinity_values():
    np.testing.assert_allclose(
        clustering.angular_affinity([1.0, 0.0, -1.0, 0.5]), [1.0, 0.5, 0.0, 1 - 1 / 3], atol=1e-12
    )


def test_kmeans_separated_blobs(rng):
    centres = np.array([[0, 0], [10, 0], [0, 10]], float)
    X = np.concatenate([c + rng.normal(size=(20, 2)) for c in centres])
    labels, inertia = clustering.kmeans(X, 3, seed=1)
    truth = np.repeat(np.arange(3), 20)
    assert clustering.same_partition(labels, truth)
    ref = sum(np.sum((X[truth == g] - X[truth == g].mean(0)) ** 2) for g in range(3))
    assert inertia == pytest.approx(ref, rel=1e-10)


def test_same_partition():
    assert clustering.same_partition([0, 0, 1, 2], [5, 5, 3, 9])
    assert not clustering.same_partition([0, 0, 1, 1], [0, 1, 1, 1])
    assert not clustering.same_partition([0, 0, 1], [0, 0, 1, 1])


def test_bad_inputs(rng):
    W = rng.normal(size=(10, 4))
    bad = W.copy()
    bad[3, 1] = np.nan
    with pytest.raises(checks.InputError, match="non-finite"):
        clustering.cosine_graph_clusters(bad)
    zero = W.copy()
    zero[2] = 0
    with pytest.raises(checks.InputError, match="zero row"):
        clustering.cosine_graph_clusters(zero)
    with pytest.raises(checks.InputError, match="at least 2 rows"):
        clustering.cosine_graph_clusters(W[:1])
    with pytest.raises(checks.InputError, match="threshold"):
        clustering.cosine_graph_clusters(W, threshold=1.5)
    with pytest.raises(checks.InputError, match="max_size"):
        clustering.cosine_graph_clusters(W, min_size=4, max_size=2)
    with pytest.raises(checks.InputError, match="n_clusters"):
        clustering.spectral_clusters(W, 10)
    with pytest.raises(checks.InputError, match="must be < the number of rows"):
        clustering.topk_neighbours(W, 10)
    with pytest.raises(checks.InputError, match="neighbours"):
        clustering.cosine_graph_clusters(W, neighbours=(np.zeros((3, 2)), np.zeros((3, 2))))
    res = clustering.cosine_graph_clusters(W)
    with pytest.raises(checks.InputError, match="no features"):
        clustering.best_cluster_for(res, [])
    with pytest.raises(checks.InputError, match="feature indices"):
        clustering.best_cluster_for(res, [0, 99])
    assert (
        clustering.best_cluster_for(clustering.cosine_graph_clusters(np.eye(4)), [0, 1])["cluster"]
        is None
    )
