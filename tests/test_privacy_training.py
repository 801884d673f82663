"""DP-SGD training through real Opacus: mechanisms, clipping, noise, modes, validation."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from secure_fed.data.datasets import Dataset, load_bundled
from secure_fed.data.partition import select, slave_partition
from secure_fed.errors import PrivacyError
from secure_fed.models.package import parameter_count, parameters_vector
from secure_fed.models.registry import build_model
from secure_fed.privacy.accounting import Mechanism
from secure_fed.privacy.training import (
    DPSettings,
    evaluate,
    train_delta,
    train_distill,
    train_gradient,
)


@pytest.fixture(scope="module")
def part() -> Dataset:
    return slave_partition("digits", index=0, count=3, seed=0)


@pytest.fixture(scope="module")
def small() -> Dataset:
    return select(load_bundled("digits"), np.arange(60))


def _mlp(seed: int = 0, hidden: list[int] | None = None) -> torch.nn.Module:
    torch.manual_seed(seed)
    return build_model("mlp", in_features=64, num_classes=10, hidden=hidden or [64])


def test_train_delta_returns_the_mechanism_it_ran(part: Dataset) -> None:
    model = _mlp()
    before = parameters_vector(model)
    settings = DPSettings(noise_multiplier=1.3, max_grad_norm=1.0, batch_size=64, epochs=2, lr=0.5)
    result = train_delta(model, part, settings, seed=1, delta=1e-5)
    assert result.mechanism == Mechanism(1.3, 64 / 480, 2 * int(480 / 64))
    assert result.samples == 480
    assert result.delta_vector.dtype == np.float32
    assert result.delta_vector.shape == (parameter_count(model),)
    assert np.isfinite(result.loss) and result.loss > 0
    assert np.linalg.norm(result.delta_vector) > 0
    assert np.array_equal(parameters_vector(model), before)  # the caller's model is untouched
    assert not hasattr(model, "_module")


def test_seed_makes_runs_reproducible(small: Dataset) -> None:
    settings = DPSettings(noise_multiplier=1.0, max_grad_norm=1.0, batch_size=10, epochs=1, lr=0.5)
    a = train_delta(_mlp(), small, settings, seed=5)
    b = train_delta(_mlp(), small, settings, seed=5)
    c = train_delta(_mlp(), small, settings, seed=6)
    assert np.array_equal(a.delta_vector, b.delta_vector)
    assert not np.allclose(a.delta_vector, c.delta_vector)


def test_update_is_the_mean_of_clipped_per_sample_gradients(small: Dataset) -> None:
    # q = 1 (B = N): one step on all records; Δ = −lr · Σ clip_C(g_i) / B exactly.
    clip = 0.05
    settings = DPSettings(noise_multiplier=0.0, max_grad_norm=clip, batch_size=60, epochs=1, lr=1.0)
    model = _mlp()
    result = train_delta(model, small, settings, seed=0)
    assert result.mechanism.steps == 1 and result.mechanism.sample_rate == 1.0
    clipped = []
    for i in range(len(small)):
        model.zero_grad()
        x = torch.from_numpy(small.features[i : i + 1])
        y = torch.from_numpy(small.labels[i : i + 1])
        F.cross_entropy(model(x), y).backward()
        g = torch.cat([p.grad.reshape(-1) for p in model.parameters()])
        clipped.append(g * min(1.0, clip / (float(g.norm()) + 1e-6)))
    expected = -torch.stack(clipped).sum(0).numpy() / 60
    assert np.allclose(result.delta_vector, expected, atol=1e-6)
    assert float(np.linalg.norm(result.delta_vector)) <= clip + 1e-6


def test_noise_has_the_promised_scale(small: Dataset) -> None:
    # Δ = −lr (Σ clip(g_i) + N(0, σ²C²)) / B: coordinates carry noise of std lr·σ·C/B.
    settings = DPSettings(noise_multiplier=10.0, max_grad_norm=1.0, batch_size=60, epochs=1, lr=1.0)
    result = train_delta(_mlp(), small, settings, seed=0)
    expected_std = 1.0 * 10.0 * 1.0 / 60
    assert float(np.std(result.delta_vector)) == pytest.approx(expected_std, rel=0.1)


def test_fedsgd_gradient_equals_true_mean_gradient_without_noise(small: Dataset) -> None:
    model = _mlp()
    settings = DPSettings(noise_multiplier=0.0, max_grad_norm=1e6, batch_size=60, epochs=1, lr=0.1)
    result = train_gradient(model, small, settings, seed=0)
    assert result.mechanism == Mechanism(0.0, 1.0, 1)
    model.zero_grad()
    loss = F.cross_entropy(model(torch.from_numpy(small.features)), torch.from_numpy(small.labels))
    loss.backward()
    expected = torch.cat([p.grad.reshape(-1) for p in model.parameters()]).numpy()
    assert np.allclose(result.gradient, expected, atol=1e-6)
    assert result.loss == pytest.approx(float(loss.detach()), rel=1e-5)


@pytest.mark.parametrize("mode", ["linear", "ew"])
def test_a_public_record_count_is_the_divisor_never_the_exact_one(small: Dataset,
                                                                 mode: str) -> None:
    # A full batch (q = 1): the noisy sum is divided by the expected batch min(B, count). With
    # the slave's public count (here 70 for 60 records) that is 70, never the 60 only the
    # slave knows; the sample rate and the released mechanism follow the same count.
    settings = DPSettings(noise_multiplier=0.0, max_grad_norm=1e6, batch_size=70, epochs=1,
                          lr=0.1)
    exact = train_gradient(_mlp(), small, settings, seed=0, grad_sample_mode=mode)
    public = train_gradient(_mlp(), small, settings, seed=0, grad_sample_mode=mode, records=70)
    assert exact.mechanism == public.mechanism == Mechanism(0.0, 1.0, 1)
    assert public.samples == 70 and exact.samples == 60
    assert np.allclose(public.gradient * 70, exact.gradient * 60, atol=1e-5)
    assert np.abs(exact.gradient).max() > 1e-3  # the comparison is not of zeros


def test_fedsgd_mechanism_is_one_step(part: Dataset) -> None:
    settings = DPSettings(noise_multiplier=1.1, max_grad_norm=1.0, batch_size=32, epochs=3, lr=0.1)
    result = train_gradient(_mlp(), part, settings, seed=0)
    assert result.mechanism == Mechanism(1.1, 32 / 480, 1)
    assert result.gradient.shape == (4810,) and np.isfinite(result.gradient).all()


def test_distillation_trains_only_the_student(part: Dataset) -> None:
    teacher = _mlp(seed=1)
    teacher_before = parameters_vector(teacher)
    student = _mlp(seed=2, hidden=[16])
    student_before = parameters_vector(student)
    settings = DPSettings(noise_multiplier=0.5, max_grad_norm=1.0, batch_size=64, epochs=3, lr=0.5)
    result = train_distill(teacher, student, part, settings, temperature=2.0, alpha=1.0, seed=0)
    assert result.mechanism == Mechanism(0.5, 64 / 480, 3 * 7)
    assert result.params_vector.shape == student_before.shape
    assert not np.allclose(result.params_vector, student_before)
    assert np.array_equal(parameters_vector(teacher), teacher_before)
    assert np.array_equal(parameters_vector(student), student_before)
    with pytest.raises(PrivacyError, match="alpha must be between 0 and 1"):
        train_distill(teacher, student, part, settings, alpha=1.5, seed=0)
    with pytest.raises(PrivacyError, match="temperature must be > 0"):
        train_distill(teacher, student, part, settings, temperature=0.0, seed=0)


def test_distillation_moves_student_towards_teacher(small: Dataset) -> None:
    teacher = _mlp(seed=1)
    student = _mlp(seed=2)
    settings = DPSettings(
        noise_multiplier=0.0, max_grad_norm=100.0, batch_size=60, epochs=30, lr=0.5
    )
    result = train_distill(teacher, student, small, settings, alpha=1.0, temperature=1.0, seed=0)
    x = torch.from_numpy(small.features)
    with torch.no_grad():
        target = F.softmax(teacher(x), dim=1)
        trained = _mlp(seed=2)
        from secure_fed.models.package import set_parameters_vector

        set_parameters_vector(trained, result.params_vector)
        before = F.kl_div(F.log_softmax(student(x), dim=1), target, reduction="batchmean")
        after = F.kl_div(F.log_softmax(trained(x), dim=1), target, reduction="batchmean")
    assert float(after) < 0.5 * float(before)


def test_cnn8_trains_under_dp(part: Dataset) -> None:
    torch.manual_seed(0)
    model = build_model("cnn8", num_classes=10)
    settings = DPSettings(noise_multiplier=1.0, max_grad_norm=1.0, batch_size=64, epochs=1, lr=0.5)
    result = train_delta(model, part, settings, seed=0)
    assert result.delta_vector.shape == (parameter_count(model),)
    assert np.isfinite(result.delta_vector).all()


@pytest.mark.parametrize("mode", ["ew", "hooks", "functorch"])
def test_grad_sample_modes_agree(small: Dataset, mode: str) -> None:
    # Same seed, same Poisson batches and the same noise draws: the linear-clipping step
    # (the default for an MLP) and every Opacus mode release the same update.
    settings = DPSettings(noise_multiplier=1.0, max_grad_norm=1.0, batch_size=20, epochs=1, lr=0.5)
    default = train_delta(_mlp(), small, settings, seed=3)  # "auto" → "linear"
    other = train_delta(_mlp(), small, settings, seed=3, grad_sample_mode=mode)
    assert np.allclose(default.delta_vector, other.delta_vector, atol=1e-5)


def _frozen_weight(model: torch.nn.Module) -> torch.nn.Module:
    """Freeze the first layer and the weight (not the bias) of the second."""
    for p in model[0].parameters():
        p.requires_grad_(False)
    model[2].weight.requires_grad_(False)
    return model


@pytest.mark.parametrize(
    "model",
    [
        lambda: _mlp(hidden=[32, 16]),
        lambda: torch.nn.Sequential(
            torch.nn.Linear(64, 16, bias=False), torch.nn.Tanh(), torch.nn.Linear(16, 10)
        ),
        lambda: _frozen_weight(_mlp(hidden=[16, 16])),
    ],
)
@pytest.mark.parametrize("clip", [0.05, 1e6])
def test_linear_clipping_equals_opacus_without_noise(small: Dataset, model, clip: float) -> None:
    # σ = 0, several Poisson steps with momentum: per-sample clipping (active at C = 0.05,
    # inactive at 1e6) and averaging over B give Opacus's update to float32 precision.
    settings = DPSettings(0.0, clip, batch_size=20, epochs=2, lr=0.5, momentum=0.5)
    torch.manual_seed(4)
    start = model()
    ours = train_delta(start, small, settings, seed=9, grad_sample_mode="linear")
    opacus = train_delta(start, small, settings, seed=9, grad_sample_mode="hooks")
    assert ours.mechanism == opacus.mechanism
    assert np.abs(ours.delta_vector).max() > 1e-4
    assert np.allclose(ours.delta_vector, opacus.delta_vector, atol=1e-6, rtol=0)
    assert ours.loss == pytest.approx(opacus.loss, rel=1e-5)


def test_linear_clipping_fedsgd_gradient_and_distillation_match_opacus(small: Dataset) -> None:
    settings = DPSettings(noise_multiplier=2.0, max_grad_norm=0.1, batch_size=30, epochs=1, lr=0.5)
    ours = train_gradient(_mlp(), small, settings, seed=2, grad_sample_mode="linear")
    opacus = train_gradient(_mlp(), small, settings, seed=2, grad_sample_mode="ew")
    assert np.allclose(ours.gradient, opacus.gradient, atol=1e-6)
    teacher, student = _mlp(seed=1), _mlp(seed=2, hidden=[16])
    a = train_distill(teacher, student, small, settings, seed=2, grad_sample_mode="linear")
    b = train_distill(teacher, student, small, settings, seed=2, grad_sample_mode="hooks")
    assert np.allclose(a.params_vector, b.params_vector, atol=1e-5)


def test_poisson_batches_are_coins_of_the_sampling_stream(small: Dataset) -> None:
    from secure_fed.privacy.noise import RandomStream, seed_from_int
    from secure_fed.privacy.private_run import SAMPLING_STREAM, PrivateRun

    settings = DPSettings(1.0, 1.0, batch_size=20, epochs=2, lr=0.1)
    x, y = torch.from_numpy(small.features), torch.from_numpy(small.labels)
    run = PrivateRun(_mlp(), x, y, settings, 1 / 3, 21, "auto")
    ours = [yb for _, yb in run.batches(2)]
    run.close()
    # Each batch: one ChaCha20 word per record, kept when below ⌊q·2⁶⁴⌋.
    stream = RandomStream(seed_from_int(21), SAMPLING_STREAM)
    threshold = np.uint64(int((1 / 3) * 2**64))
    expected = [y[torch.from_numpy(np.flatnonzero(stream.words(60) < threshold))] for _ in range(6)]
    assert len(ours) == len(expected) == 6
    assert all(torch.equal(a, b) for a, b in zip(ours, expected, strict=True))
    # Every record joins each batch independently with probability q.
    run = PrivateRun(_mlp(), x, y, DPSettings(1.0, 1.0, batch_size=6, epochs=100, lr=0.1),
                     0.1, 22, "auto")
    counts = np.array([len(yb) for _, yb in run.batches(100)])
    run.close()
    assert len(counts) == 1000
    # Binomial(60, 0.1): mean 6, variance 5.4; the mean of 1000 batches within 4 standard errors.
    assert abs(counts.mean() - 6.0) < 4 * np.sqrt(5.4 / 1000)
    assert counts.var() == pytest.approx(5.4, rel=0.15)


def test_models_outside_the_linear_step_go_through_opacus(part: Dataset, small: Dataset) -> None:
    # A Linear applied to 3-D input (8 rows of 8 pixels) needs Opacus; "auto" falls back to it.
    def rows() -> torch.nn.Module:
        torch.manual_seed(0)
        return torch.nn.Sequential(
            torch.nn.Unflatten(1, (8, 8)),
            torch.nn.Linear(8, 4),
            torch.nn.Flatten(),
            torch.nn.Linear(32, 10),
        )

    settings = DPSettings(noise_multiplier=0.5, max_grad_norm=1.0, batch_size=20, epochs=1, lr=0.5)
    auto = train_delta(rows(), small, settings, seed=1)
    ew = train_delta(rows(), small, settings, seed=1, grad_sample_mode="ew")
    assert np.array_equal(auto.delta_vector, ew.delta_vector)
    with pytest.raises(PrivacyError, match="needs a model whose trainable layers are all"):
        train_delta(rows(), small, settings, seed=1, grad_sample_mode="linear")
    with pytest.raises(PrivacyError, match="needs a model whose trainable layers are all"):
        train_delta(build_model("cnn8", num_classes=10), part, settings, grad_sample_mode="linear")


@pytest.mark.parametrize("mode", ["linear", "ew", "hooks"])
def test_empty_poisson_batches_still_get_noise(mode: str) -> None:
    tiny = select(load_bundled("digits"), np.arange(3))
    # seed 11 draws at least one empty batch among the 12 steps at q = 1/3
    settings = DPSettings(noise_multiplier=1.0, max_grad_norm=1.0, batch_size=1, epochs=4, lr=0.1)
    from secure_fed.privacy.private_run import PrivateRun

    x, y = torch.from_numpy(tiny.features), torch.from_numpy(tiny.labels)
    run = PrivateRun(_mlp(), x, y, settings, 1 / 3, 11, mode)
    assert any(len(yb) == 0 for _, yb in run.batches(4))
    run.close()
    result = train_delta(_mlp(), tiny, settings, seed=11, grad_sample_mode=mode)
    assert result.mechanism == Mechanism(1.0, 1 / 3, 12)
    assert np.isfinite(result.delta_vector).all()
    # noise-only steps: a model trained with σ = 0 on the same batches moves less
    quiet = DPSettings(noise_multiplier=0.0, max_grad_norm=1.0, batch_size=1, epochs=4, lr=0.1)
    baseline = train_delta(_mlp(), tiny, quiet, seed=11, grad_sample_mode=mode)
    assert np.linalg.norm(result.delta_vector) > 2 * np.linalg.norm(baseline.delta_vector)


@pytest.mark.parametrize(
    ("settings", "kwargs", "message"),
    [
        (DPSettings(-1.0, 1.0, 10, 1, 0.1), {}, "noise_multiplier must be ≥ 0, got -1.0"),
        (DPSettings(1.0, 0.0, 10, 1, 0.1), {}, "max_grad_norm must be > 0"),
        (DPSettings(1.0, 1.0, 0, 1, 0.1), {}, "batch_size must be an integer between 1 and"),
        (DPSettings(1.0, 1.0, 10, 0, 0.1), {}, "epochs must be an integer between 1"),
        (DPSettings(1.0, 1.0, 10, 1, 0.0), {}, "lr must be > 0"),
        (DPSettings(1.0, 1.0, 10, 1, 0.1, momentum=1.0), {}, "momentum must be < 1"),
        (
            DPSettings(1.0, 1.0, 10, 1, 0.1),
            {"delta": 0.02},
            r"delta=0.02 is not below 1/N = 0.0167 for N=60",
        ),
        (
            DPSettings(1.0, 1.0, 10, 1, 0.1),
            {"grad_sample_mode": "ghost"},  # Opacus's two-backward mode is not offered
            "grad_sample_mode must be one of",
        ),
        (DPSettings(1.0, 1.0, 10, 1, 0.1), {"seed": -1}, "seed must be an integer ≥ 0 or None"),
    ],
)
def test_invalid_settings_are_refused(
    small: Dataset, settings: DPSettings, kwargs: dict, message: str
) -> None:
    with pytest.raises(PrivacyError, match=message):
        train_delta(_mlp(), small, settings, **kwargs)


def test_evaluate(small: Dataset) -> None:
    model = _mlp()
    accuracy, loss = evaluate(model, small)
    with torch.no_grad():
        out = model(torch.from_numpy(small.features))
    labels = torch.from_numpy(small.labels)
    assert accuracy == pytest.approx(float((out.argmax(1) == labels).float().mean()))
    assert loss == pytest.approx(float(F.cross_entropy(out, labels)), rel=1e-5)
    model.train()
    evaluate(model, small)
    assert model.training  # mode restored


def test_batch_larger_than_the_data_means_full_batches(small: Dataset) -> None:
    settings = DPSettings(noise_multiplier=0.0, max_grad_norm=1e6, batch_size=500, epochs=1, lr=1.0)
    assert settings.sample_rate(60) == 1.0 and settings.expected_batch(60) == 60
    full = train_delta(_mlp(), small, settings, seed=0)
    exact = train_delta(_mlp(), small, DPSettings(0.0, 1e6, 60, 1, 1.0), seed=0)
    assert full.mechanism == Mechanism(0.0, 1.0, 1)
    assert np.allclose(full.delta_vector, exact.delta_vector)


@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("mode", ["auto", "ew"])
def test_batchnorm_models_are_refused_with_a_privacy_error(
    small: Dataset, affine: bool, mode: str
) -> None:
    model = torch.nn.Sequential(
        torch.nn.Linear(64, 8), torch.nn.BatchNorm1d(8, affine=affine), torch.nn.Linear(8, 10)
    )
    settings = DPSettings(1.0, 1.0, 10, 1, 0.1)
    with pytest.raises(PrivacyError, match="cannot be trained with DP-SGD.*GroupNorm"):
        train_delta(model, small, settings, seed=0, grad_sample_mode=mode)


def test_without_dp_the_update_is_plain_sgd_without_clipping(small: Dataset) -> None:
    # B = N: one plain SGD step on all records, no clipping: Δ = −lr · mean gradient exactly,
    # far larger than the clipped DP step would allow.
    settings = DPSettings(noise_multiplier=0.0, max_grad_norm=0.05, batch_size=60, epochs=1,
                          lr=1.0, dp=False)
    model = _mlp()
    result = train_delta(model, small, settings, seed=0)
    assert result.mechanism == Mechanism(0.0, 1.0, 1)
    model.zero_grad()
    F.cross_entropy(model(torch.from_numpy(small.features)),
                    torch.from_numpy(small.labels)).backward()
    expected = -torch.cat([p.grad.reshape(-1) for p in model.parameters()]).numpy()
    assert np.allclose(result.delta_vector, expected, atol=1e-6)
    assert float(np.linalg.norm(result.delta_vector)) > 0.05
    gradient = train_gradient(model, small, settings, seed=0)
    assert np.allclose(gradient.gradient, -expected, atol=1e-6)


def test_without_dp_every_record_is_used_once_per_epoch(part: Dataset) -> None:
    settings = DPSettings(noise_multiplier=0.0, max_grad_norm=1.0, batch_size=64, epochs=3,
                          lr=0.3, dp=False)
    model = _mlp()
    result = train_delta(model, part, settings, seed=2)
    assert result.mechanism == Mechanism(0.0, 64 / 480, 3 * int(480 / 64))
    trained = _mlp()
    with torch.no_grad():
        torch.nn.utils.vector_to_parameters(
            torch.nn.utils.parameters_to_vector(trained.parameters())
            + torch.from_numpy(result.delta_vector), trained.parameters())
    assert evaluate(trained, part)[0] > evaluate(model, part)[0] + 0.3
    with pytest.raises(PrivacyError, match="noise_multiplier must be 0"):
        train_delta(model, part, DPSettings(noise_multiplier=1.0, max_grad_norm=1.0,
                                            batch_size=64, epochs=1, lr=0.3, dp=False))
