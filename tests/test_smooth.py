import numpy as np
import pytest
import torch
from conftest import LinearTwoClass, ThresholdClassifier, true_radius
from torch import nn

from smoothcert import ABSTAIN, Smooth


class CallRecorder(nn.Module):
    """Wraps a model and records the batch sizes it is called with."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        self.batch_sizes: list[int] = []

    def forward(self, x):
        self.batch_sizes.append(len(x))
        return self.model(x)


def test_linear_classifier_radius_approaches_the_exact_radius_from_below():
    w = torch.tensor([0.6, -0.8, 0.0, 0.0, 0.0])  # ||w|| = 1
    x = torch.tensor([0.5, 0.1, 0.3, -0.2, 0.9])
    b = -0.05
    exact = float((w @ x + b).abs() / w.norm())  # 0.17
    smooth = Smooth(LinearTwoClass(w, b), num_classes=2, sigma=0.25)
    label, radius = smooth.certify(
        x,
        n0=100,
        n=100_000,
        alpha=0.001,
        batch_size=10_000,
        generator=torch.Generator().manual_seed(0),
    )
    assert label == 1
    assert exact - 0.01 < radius <= exact


def test_certify_all_gives_three_certificates_from_the_same_samples(threshold_classifier):
    smooth = Smooth(threshold_classifier, threshold_classifier.num_classes, sigma=0.5)
    x = torch.tensor([0.1, 0.0])
    result = smooth.certify_all(
        x, n0=50, n=2_000, alpha=0.01, batch_size=300, generator=torch.Generator().manual_seed(1)
    )
    assert result.selection_counts.sum() == 50
    assert result.estimation_counts.sum() == 2_000
    assert result.tcertify.radius >= result.certify.radius
    assert {result.certify.label, result.tcertify.label, result.strict.label} == {1}


def test_selection_samples_are_not_reused_and_batches_are_bounded(threshold_classifier):
    recorder = CallRecorder(threshold_classifier)
    smooth = Smooth(recorder, threshold_classifier.num_classes, sigma=0.5)
    smooth.certify(torch.zeros(2), n0=30, n=1_000, alpha=0.01, batch_size=128)
    assert sum(recorder.batch_sizes) == 1_030
    assert max(recorder.batch_sizes) <= 128


def test_seeded_runs_are_reproducible(threshold_classifier):
    smooth = Smooth(threshold_classifier, threshold_classifier.num_classes, sigma=0.5)
    x = torch.tensor([0.3, 0.0])
    runs = [
        smooth.certify_all(x, 20, 500, 0.01, 64, generator=torch.Generator().manual_seed(s))
        for s in (7, 7, 8)
    ]
    assert np.array_equal(runs[0].estimation_counts, runs[1].estimation_counts)
    assert runs[0].certify == runs[1].certify
    assert not np.array_equal(runs[0].estimation_counts, runs[2].estimation_counts)


def test_cohen_signatures(threshold_classifier):
    smooth = Smooth(threshold_classifier, threshold_classifier.num_classes, sigma=0.5)
    x = torch.tensor([2.5, 0.0])  # deep inside class 3
    assert smooth.predict(x, n=200, alpha=0.001, batch_size=100) == 3
    label, radius = smooth.certify(x, 100, 1_000, 0.001, 100)
    assert (label, type(radius)) == (3, float) and radius > 0
    assert smooth.tcertify(x, 100, 1_000, 0.001, 100)[0] == 3
    assert smooth.tcertify(x, 100, 1_000, 0.001, 100, grid=5, strict=True)[0] == 3


def test_abstains_at_a_decision_boundary(threshold_classifier):
    smooth = Smooth(threshold_classifier, threshold_classifier.num_classes, sigma=0.5)
    x = torch.tensor([0.5, 0.0])  # on the threshold between classes 1 and 2
    assert smooth.predict(x, n=200, alpha=0.001, batch_size=100) == ABSTAIN
    assert smooth.certify(x, 100, 1_000, 0.001, 100) == (ABSTAIN, 0.0)


def test_any_input_shape_and_bf16_autocast():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.Linear(4 * 6 * 6, 5))
    x = torch.rand(3, 8, 8)
    for amp, memory_format in ((None, torch.contiguous_format), ("bf16", torch.channels_last)):
        smooth = Smooth(model.to(memory_format=memory_format), 5, sigma=0.25, amp=amp)
        result = smooth.certify_all(x, 10, 300, 0.01, 64)
        assert result.estimation_counts.sum() == 300
        assert result.estimation_counts.dtype == np.int64


def test_monte_carlo_coverage_through_the_smoothed_classifier():
    """Over many runs, each certificate fails (wrong label or radius too large) at most alpha."""
    model = ThresholdClassifier([-0.3, 0.35, 0.9, 1.6])
    sigma, alpha, runs = 0.5, 0.1, 300
    x0 = 0.05
    top, exact = true_radius(model.class_probabilities(x0, sigma), sigma)
    smooth = Smooth(model, model.num_classes, sigma)
    generator = torch.Generator().manual_seed(123)
    failures = {"certify": 0, "tcertify": 0, "strict": 0}
    for _ in range(runs):
        result = smooth.certify_all(torch.tensor([x0]), 10, 200, alpha, 210, generator=generator)
        for name in failures:
            cert = getattr(result, name)
            failures[name] += cert.label != ABSTAIN and (cert.label != top or cert.radius > exact)
    limit = alpha + 3 * np.sqrt(alpha * (1 - alpha) / runs)
    assert all(count / runs <= limit for count in failures.values()), failures


@pytest.mark.parametrize(
    ("build", "call", "message"),
    [
        (lambda m: Smooth(m, 4, sigma=0.0), None, "sigma"),
        (lambda m: Smooth(m, 1, sigma=0.5), None, "num_classes"),
        (lambda m: Smooth(m, 4, sigma=0.5, amp="fp8"), None, "amp"),
        (None, lambda s, x: s.certify(x, 10, 100, 1.5, 10), "alpha"),
        (None, lambda s, x: s.certify(x, 0, 100, 0.01, 10), "n0"),
        (None, lambda s, x: s.certify(x, 10, 0, 0.01, 10), "n"),
        (None, lambda s, x: s.predict(x, 100, 0.01, 0), "batch_size"),
        (None, lambda s, x: s.tcertify(x, 10, 100, 0.01, 10, grid=0), "grid"),
        (
            None,
            lambda s, x: s.certify(torch.tensor([float("nan"), 0.0]), 10, 100, 0.01, 10),
            "finite",
        ),
    ],
)
def test_bad_input_is_rejected_with_the_argument_named(threshold_classifier, build, call, message):
    with pytest.raises(ValueError, match=message):
        smooth = (build or (lambda m: Smooth(m, 4, sigma=0.5)))(threshold_classifier)
        call(smooth, torch.zeros(2))


def test_shape_the_model_rejects_is_reported_with_the_given_shape():
    smooth = Smooth(nn.Linear(4, 3), 3, sigma=0.5)
    with pytest.raises(ValueError, match=r"shape \(5,\)"):
        smooth.certify(torch.zeros(5), 10, 100, 0.01, 10)


def test_wrong_number_of_logits_is_reported():
    smooth = Smooth(nn.Linear(4, 3), 10, sigma=0.5)
    with pytest.raises(ValueError, match="num_classes"):
        smooth.predict(torch.zeros(4), 100, 0.01, 10)
