"""pipeline.sae: sparsity rules, decoder constraint, dead-feature handling, metrics against
hand-computed references, and recovery of a planted dictionary. All on CPU, one thread,
small enough that the whole file runs in seconds."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from pipeline import sae
from pipeline.sae.train import _init_from_data, _regroup

torch.set_num_threads(1)

D, N_ATOMS, K_ACTIVE, WIDTH = 32, 64, 4, 128
RECOVERY = sae.SAETrainConfig(
    width=WIDTH,
    k=K_ACTIVE,
    lr=2e-3,
    steps=800,
    batch_size=512,
    aux_k=32,
    dead_after_tokens=5 * 512,
    log_every=100,
    seed=0,
)


@pytest.fixture(scope="module")
def planted():
    """Synthetic data from 64 known atoms in 32 dims, 4 active per row: (train, held-out, atoms)."""
    x, atoms = sae.sparse_dictionary_data(24_000, D, N_ATOMS, K_ACTIVE, seed=0)
    return x[:20_000], x[20_000:], atoms


@pytest.fixture(scope="module")
def trained(planted):
    """The BatchTopK SAE of the atom-recovery check, trained once for the whole module."""
    model, history = sae.train_sae(planted[0], RECOVERY)
    return model, history


def fresh_model(kind="batchtopk", k=5, d=16, width=64, seed=0, **kw):
    return sae.SparseAutoencoder(d, width, kind, k, generator=torch.Generator().manual_seed(seed), **kw)


# ---- sparsity rules ------------------------------------------------------------------------


def test_batchtopk_training_keeps_exactly_k_times_batch():
    model = fresh_model("batchtopk", k=5).train()
    x = torch.randn(64, 16, generator=torch.Generator().manual_seed(1))
    pre = model.pre_activations(model.normalize(x))
    z = model.sparsify(pre)
    per_row = (z > 0).sum(dim=1)
    assert int(per_row.sum()) == 5 * 64  # the batch averages exactly k ...
    assert per_row.min() < 5 < per_row.max()  # ... but single rows do not
    kept, dropped = torch.relu(pre)[z > 0], torch.relu(pre)[z == 0]
    assert kept.min() >= dropped.max()  # and the kept ones are the batch's largest
    assert torch.equal(z[z > 0], torch.relu(pre)[z > 0])


def test_topk_keeps_exactly_k_per_row():
    model = fresh_model("topk", k=7)
    x = torch.randn(50, 16, generator=torch.Generator().manual_seed(2))
    z = model.encode(x)
    assert ((z > 0).sum(dim=1) == 7).all()
    assert (z >= 0).all()


def test_batchtopk_inference_uses_learned_threshold(trained, planted):
    model, _ = trained
    assert not model.training and model.threshold > 0
    held_out = torch.as_tensor(planted[1])
    z = model.encode(held_out)
    acts = torch.relu(model.pre_activations(model.normalize(held_out)))
    assert torch.equal(z, acts * (acts > model.threshold))
    # a row's code ignores its batch (to float rounding: a GEMM's blocking, and so its last bits,
    # may depend on the batch size; batch top-k at inference would change which features fire)
    torch.testing.assert_close(model.encode(held_out[:3]), z[:3], rtol=1e-5, atol=1e-6)
    assert sae.l0(z) == pytest.approx(K_ACTIVE, rel=0.15)


def test_relu_l0_falls_as_l1_lambda_grows(planted):
    x = planted[0][:8000]
    l0s = []
    for lam in (0.3, 1.0, 3.0):
        params = sae.SAETrainConfig(
            kind="relu", width=WIDTH, l1_lambda=lam, lr=2e-3, steps=200, batch_size=256
        )
        model, _ = sae.train_sae(x, params)
        l0s.append(sae.l0(model.encode(torch.as_tensor(x[:2000]))))
    assert l0s[0] > l0s[1] > l0s[2] > 0, l0s


# ---- decoder constraint and normalisation --------------------------------------------------


def test_decoder_rows_stay_unit_norm(trained):
    model, _ = trained
    torch.testing.assert_close(model.W_dec.norm(dim=1), torch.ones(WIDTH))
    assert not torch.allclose(model.W_enc.t(), model.W_dec)  # the encoder is not tied to it


def test_decoder_gradient_loses_its_radial_part():
    model = fresh_model()
    x = torch.randn(32, 16, generator=torch.Generator().manual_seed(3))
    x_hat, _ = model(x)
    (x_hat - x).pow(2).sum().backward()

    def radial():
        return (model.W_dec.grad * model.W_dec).sum(dim=1).abs().max() / model.W_dec.grad.norm()

    assert radial() > 1e-2
    model.remove_parallel_decoder_grad()
    assert radial() < 1e-6


def test_normalisation_gives_mean_squared_norm_d_in():
    x = 37.0 * torch.randn(500, 16, generator=torch.Generator().manual_seed(4)) + 5.0
    model = fresh_model()
    model.fit_normalization(x)
    assert float(model.normalize(x).pow(2).sum(dim=1).mean()) == pytest.approx(16, rel=1e-5)
    torch.testing.assert_close(model.denormalize(model.normalize(x)), x)


def test_init_puts_b_dec_at_data_mean_or_median():
    x = torch.randn(400, 8, generator=torch.Generator().manual_seed(5)) + 3.0
    model = fresh_model(d=8)
    _init_from_data(model, x, "mean")
    torch.testing.assert_close(model.b_dec, model.normalize(x).mean(dim=0))
    spiked = torch.cat([x, torch.full((4, 8), 1e4)])  # a few huge outliers drag the mean only
    median = sae.geometric_median(spiked)
    assert (median - x.mean(dim=0)).norm() < 0.5 < (spiked.mean(dim=0) - x.mean(dim=0)).norm()


# ---- dead features -------------------------------------------------------------------------


def test_auxk_loss_is_zero_without_dead_and_positive_with():
    model = fresh_model("topk", k=4).train()
    x_n = model.normalize(torch.randn(64, 16, generator=torch.Generator().manual_seed(6)))
    pre = model.pre_activations(x_n)
    residual = x_n - model.decode_normalized(model.sparsify(pre))
    none_dead = sae.dead_mask(model, 100)
    assert float(sae.auxk_loss(model, pre, residual, none_dead, aux_k=8)) == 0.0
    model.tokens_since_fired[:20] = 1000
    aux = sae.auxk_loss(model, pre, residual, sae.dead_mask(model, 100), aux_k=8)
    assert math.isfinite(aux.item()) and aux.item() > 0
    aux.backward()
    assert model.W_enc.grad[:, :20].abs().sum() > 0 and model.W_enc.grad[:, 20:].abs().sum() == 0


def _dead_after_training(aux_coef: float, x: torch.Tensor) -> float:
    """TopK SAE whose second half of features starts too weak to ever win the top-k."""
    params = sae.SAETrainConfig(
        kind="topk",
        width=WIDTH,
        k=K_ACTIVE,
        lr=1e-3,
        batch_size=256,
        aux_k=16,
        aux_coef=aux_coef,
        dead_after_tokens=512,
    )
    model = sae.SparseAutoencoder(D, WIDTH, "topk", K_ACTIVE, generator=torch.Generator().manual_seed(0))
    _init_from_data(model, x[:1024], "mean")
    with torch.no_grad():
        model.W_enc[:, WIDTH // 2 :] *= 0.01
    optimizer = torch.optim.Adam(model.parameters(), lr=params.lr, betas=params.betas)
    generator = torch.Generator().manual_seed(0)
    for _ in range(300):
        batch = x[torch.randint(0, x.shape[0], (params.batch_size,), generator=generator)]
        sae.train_step(model, optimizer, model.normalize(batch), params)
    return float(sae.dead_mask(model, params.dead_after_tokens).float().mean())


def test_auxk_revives_dead_features(planted):
    x = torch.as_tensor(planted[0][:8000])
    without, with_aux = _dead_after_training(0.0, x), _dead_after_training(1 / 32, x)
    assert without == 0.5  # no gradient ever reaches a feature outside the top-k
    assert with_aux < 0.3


def test_resampling_reinitialises_dead_relu_features():
    model = fresh_model("relu", l1_lambda=1.0)
    optimizer = torch.optim.Adam(model.parameters())
    x_n = model.normalize(torch.randn(128, 16, generator=torch.Generator().manual_seed(7)))
    (model.decode_normalized(model.encode(x_n)) - x_n).pow(2).sum().backward()
    optimizer.step()
    model.normalize_decoder()
    model.tokens_since_fired[:10] = 10**6
    before = model.W_dec.detach().clone()
    assert sae.resample_dead(model, x_n, sae.dead_mask(model, 1000), optimizer) == 10
    assert not torch.allclose(model.W_dec[:10], before[:10]) and torch.equal(model.W_dec[10:], before[10:])
    torch.testing.assert_close(model.W_dec.norm(dim=1), torch.ones(64))
    assert (model.b_enc[:10] == 0).all() and (model.tokens_since_fired == 0).all()
    assert (optimizer.state[model.W_dec]["exp_avg"][:10] == 0).all()
    assert (optimizer.state[model.W_dec]["exp_avg"][10:] != 0).any()


# ---- metrics -------------------------------------------------------------------------------


def test_metrics_match_hand_computation():
    x = np.array([[1.0, 0.0], [0.0, 2.0], [3.0, 4.0]])
    x_hat = np.array([[1.0, 1.0], [0.0, 2.0], [3.0, 0.0]])
    # mean (4/3, 2); sum ||x - mean||^2 = (1/9 + 16/9 + 25/9) + (4 + 0 + 4) = 14/3 + 8 = 38/3
    assert sae.fvu(x, x_hat) == pytest.approx((1 + 0 + 16) / (38 / 3))
    assert sae.cosine_similarity(x, x_hat) == pytest.approx((1 / math.sqrt(2) + 1 + 3 / 5) / 3)
    assert sae.fvu(x, x) == 0.0
    assert sae.fvu(x, np.tile(x.mean(axis=0), (3, 1))) == pytest.approx(1.0)
    assert sae.cosine_similarity(torch.as_tensor(x), torch.as_tensor(x)) == pytest.approx(1.0)
    z = np.array([[0.0, 2.0, 0.0, 0.0], [1.0, 3.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]])
    assert sae.l0(z) == pytest.approx(1.0)  # (1 + 2 + 0) / 3
    assert sae.dead_fraction(z) == pytest.approx(0.5)  # features 2 and 3 never fire
    assert math.isnan(sae.fvu(x[:1], x_hat[:1]))


def test_outlier_mask_by_quantile_and_by_threshold():
    x = np.zeros((100, 3))
    x[:, 0] = np.arange(100)  # row norms 0..99
    assert np.flatnonzero(sae.outlier_mask(x, quantile=0.95)).tolist() == [95, 96, 97, 98, 99]
    assert np.flatnonzero(sae.outlier_mask(x, threshold=97.5)).tolist() == [98, 99]


def test_reconstruction_report_matches_plain_functions(trained, planted):
    model, _ = trained
    x = planted[1]
    report = sae.reconstruction_report(model, x, quantile=0.9, batch_size=1000)
    with torch.no_grad():
        x_hat, z = model(torch.as_tensor(x))
    mask = sae.outlier_mask(x, 0.9)
    for prefix, rows in (("all", slice(None)), ("outlier", mask)):
        assert report[f"{prefix}.fvu"] == pytest.approx(sae.fvu(x[rows], x_hat[rows]), rel=1e-4)
        assert report[f"{prefix}.cosine"] == pytest.approx(
            sae.cosine_similarity(x[rows], x_hat[rows]), rel=1e-5
        )
        assert report[f"{prefix}.l0"] == pytest.approx(sae.l0(z[rows]))
        assert report[f"{prefix}.dead_fraction"] == pytest.approx(sae.dead_fraction(z[rows]))
    assert report["outlier.n"] == mask.sum() == 400
    assert report["all.fvu"] < 0.2 and report["all.cosine"] > 0.9
    empty = sae.reconstruction_report(model, x, threshold=1e9)
    assert empty["outlier.n"] == 0 and math.isnan(empty["outlier.fvu"])


# ---- end to end ----------------------------------------------------------------------------


def test_batchtopk_recovers_planted_atoms(trained, planted):
    model, history = trained
    recovery = sae.atom_recovery(model.W_dec, planted[2])
    print(f"atom recovery (mean max cosine): {recovery:.4f}")
    assert recovery > 0.9
    assert (
        sae.atom_recovery(torch.randn(WIDTH, D, generator=torch.Generator().manual_seed(0)), planted[2]) < 0.7
    )
    assert [h["step"] for h in history] == list(range(100, 801, 100))
    assert history[-1]["fvu"] < history[0]["fvu"] and history[-1]["l0"] == pytest.approx(K_ACTIVE)
    assert set(history[0]) == {"step", "tokens", "loss", "mse", "aux", "l1", "fvu", "l0", "dead_fraction"}


def test_same_seed_same_weights(planted):
    x = planted[0][:4096]
    params = sae.SAETrainConfig(width=64, k=K_ACTIVE, steps=30, batch_size=256, seed=3)
    first, second = sae.train_sae(x, params)[0], sae.train_sae(x, params)[0]
    other = sae.train_sae(x, sae.SAETrainConfig(width=64, k=K_ACTIVE, steps=30, batch_size=256, seed=4))[0]
    for name, tensor in first.state_dict().items():
        assert torch.equal(tensor, second.state_dict()[name]), name
    assert not torch.equal(first.W_dec, other.W_dec)


def test_batch_sources_are_regrouped_and_cycled(planted):
    chunks = [torch.ones(n, 3) for n in (5, 7, 1, 10)]
    assert [b.shape[0] for b in _regroup(chunks, 8)] == [8, 8, 7]
    x = planted[0][:1000]
    pieces = [torch.as_tensor(x[i : i + 300]) for i in range(0, 1000, 300)]
    by_epochs = sae.SAETrainConfig(width=64, k=4, batch_size=256, epochs=2, log_every=1)
    assert len(sae.train_sae(pieces, by_epochs)[1]) == 8  # 4 batches (256, 256, 256, 232) x 2
    by_steps = sae.SAETrainConfig(width=64, k=4, batch_size=256, steps=10, log_every=1)
    assert len(sae.train_sae(lambda: iter(pieces), by_steps)[1]) == 10  # callable: cycled
    assert len(sae.train_sae(iter(pieces), by_steps)[1]) == 4  # one-shot iterator: one pass


def test_cached_training_rows_do_not_depend_on_file_order(tmp_path):
    """Ray Data names activation files by write task, so their order changes between runs; the
    SAE's training rows come in (key, token) order whatever the files are called."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from pipeline.sae.baseline import read_dense

    def write(folder, name, keys, tokens, first_feature):
        folder.mkdir(exist_ok=True)
        rows = [[first_feature + i] for i in range(len(keys))]
        pq.write_table(pa.table({"key": keys, "token": tokens, "indices": pa.array(rows, pa.list_(pa.int32())),
                                 "values": pa.array([[1.0]] * len(keys), pa.list_(pa.float32()))}), folder / name)

    a, b = tmp_path / "a", tmp_path / "b"
    write(a, "0.parquet", ["k2", "k2"], [1, 0], 0)  # run A: key k2 written first...
    write(a, "1.parquet", ["k1"], [0], 2)
    write(b, "0.parquet", ["k1"], [0], 2)  # ...run B: the same rows, the other file order
    write(b, "1.parquet", ["k2", "k2"], [1, 0], 0)
    first, second = read_dense([a], 4), read_dense([b], 4)
    assert torch.equal(first, second)
    assert first.argmax(1).tolist() == [2, 1, 0]  # k1/0, k2/0, k2/1
