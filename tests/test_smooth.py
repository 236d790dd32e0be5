import numpy as np
import pytest
import torch
from conftest import InputRecorder, LinearTwoClass, ThresholdClassifier, true_radius
from torch import nn

from smoothcert import ABSTAIN, Smooth
from smoothcert.stats import MAX_SAMPLES, check_sample_count


def test_linear_classifier_radius_approaches_the_exact_radius_from_below():
    w = torch.tensor([0.6, -0.8, 0.0, 0.0, 0.0])  # ||w|| = 1
    x = torch.tensor([0.5, 0.1, 0.3, -0.2, 0.9])
    b = -0.05
    exact = float((w @ x + b).abs() / w.norm())  # 0.17
    smooth = Smooth(LinearTwoClass(w, b), num_classes=2, sigma=0.25, input_range=(-1.0, 1.0))
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
    recorder = InputRecorder(threshold_classifier)
    smooth = Smooth(recorder, threshold_classifier.num_classes, sigma=0.5)
    smooth.certify(torch.zeros(2), n0=30, n=1_000, alpha=0.01, batch_size=128)
    sizes = [len(batch) for batch in recorder.batches]
    assert sum(sizes) == 1_030
    assert max(sizes) <= 128


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
    smooth = Smooth(threshold_classifier, threshold_classifier.num_classes, 0.5, input_range=None)
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
        (lambda m: Smooth(m, 4, sigma=0.0), None, "^sigma must be a finite number > 0"),
        (lambda m: Smooth(m, 1, sigma=0.5), None, "^num_classes must be an integer >= 2"),
        (lambda m: Smooth(m, 4, sigma=0.5, amp="fp8"), None, "^amp must be None or one of"),
        (lambda m: Smooth(m, 4, 0.5, input_range=(1, 0)), None, "^input_range must be None or"),
        (lambda m: Smooth(m, 4, 0.5, input_range=3), None, "^input_range must be None or"),
        (None, lambda s, x: s.certify(x, 10, 100, 1.5, 10), r"^alpha must be a number in \["),
        (None, lambda s, x: s.certify(x, 10, 100, 1e-101, 10), r"^alpha must be .* got 1e-101"),
        (None, lambda s, x: s.tcertify(x, 10, 100, 5e-100, 10), r"^alpha / grid .* >= 1e-100"),
        (None, lambda s, x: s.certify(x, 0, 100, 0.01, 10), r"^n0 must be an integer in \[1, "),
        (None, lambda s, x: s.certify(x, 10, 0, 0.01, 10), r"^n must be an integer in \[1, "),
        (None, lambda s, x: s.predict(x, 0, 0.01, 10), r"^n must be an integer in \[1, "),
        (None, lambda s, x: s.predict(x, 100, 0.01, 0), "^batch_size must be an integer >= 1"),
        (None, lambda s, x: s.tcertify(x, 10, 100, 0.01, 10, grid=0), "^grid must be an integer"),
        (
            None,
            lambda s, x: s.certify(torch.tensor([float("nan"), 0.0]), 10, 100, 0.01, 10),
            "^x must hold only finite values",
        ),
        (None, lambda s, x: s.certify([0.0, 0.0], 10, 100, 0.01, 10), "^x must be a torch.Tensor"),
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


# --- the base classifier is sampled in eval mode ------------------------------------------------


def batchnorm_dropout_model() -> nn.Sequential:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Flatten(), nn.Linear(16, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Dropout(0.5),
        nn.Linear(16, 3),
    )
    with torch.no_grad():  # running statistics that differ from any batch's own
        model[2].running_mean.uniform_(-1, 1)
        model[2].running_var.uniform_(0.5, 2)
    return model


def test_train_mode_batchnorm_and_dropout_are_sampled_in_eval_mode():
    model = batchnorm_dropout_model()
    model.train()
    model[4].eval()  # a mixed state, which must come back exactly
    modes = [m.training for m in model.modules()]
    statistics = {k: v.clone() for k, v in model.state_dict().items()}
    smooth = Smooth(model, 3, sigma=0.5)
    # 16 values: torch then draws the same noise for any batching (it fills blocks of 16).
    x = torch.linspace(0.2, 0.8, 16)
    results = [
        smooth.certify_all(x, 20, 300, 0.01, batch, generator=torch.Generator().manual_seed(3))
        for batch in (1, 7, 300)
    ]
    for result in results[1:]:  # counts do not depend on how the samples are batched
        assert np.array_equal(result.selection_counts, results[0].selection_counts)
        assert np.array_equal(result.estimation_counts, results[0].estimation_counts)
    model.eval()
    expected = Smooth(model, 3, sigma=0.5).certify_all(
        x, 20, 300, 0.01, 64, generator=torch.Generator().manual_seed(3)
    )
    assert np.array_equal(results[0].estimation_counts, expected.estimation_counts)
    model.train()
    model[4].eval()
    assert [m.training for m in model.modules()] == modes
    for key, value in model.state_dict().items():  # running statistics untouched
        assert torch.equal(value, statistics[key]), key


def test_modes_are_restored_when_sampling_fails():
    model = batchnorm_dropout_model()
    model.train()
    smooth = Smooth(model, 3, sigma=0.5)
    with pytest.raises(ValueError, match="rejected an input of shape"):
        smooth.certify(torch.zeros(5), 10, 100, 0.01, 10)
    assert all(m.training for m in model.modules())
    with pytest.raises(ValueError, match="non-finite logits"):
        smooth.base_classifier[1].bias.data[0] = float("nan")
        smooth.certify(torch.zeros(16), 10, 100, 0.01, 10)
    assert all(m.training for m in model.modules())


# --- separate streams for selection and estimation ---------------------------------------------


@pytest.mark.parametrize("separate", [False, True])
def test_no_noisy_input_is_used_twice(threshold_classifier, separate):
    recorder = InputRecorder(threshold_classifier)
    smooth = Smooth(recorder, threshold_classifier.num_classes, sigma=0.5)
    streams = {"generator": torch.Generator().manual_seed(5)}
    if separate:
        streams["estimation_generator"] = torch.Generator().manual_seed(6)
    smooth.certify_all(torch.tensor([0.2, 0.7]), 40, 200, 0.01, 32, **streams)
    rows = torch.cat(recorder.batches)
    assert len(rows) == 240
    assert len(torch.unique(rows, dim=0)) == 240


def test_the_noise_is_centred_gaussian_with_standard_deviation_sigma(threshold_classifier):
    recorder = InputRecorder(threshold_classifier)
    x = torch.linspace(0.1, 0.9, 50)
    Smooth(recorder, 4, sigma=0.3).certify(x, 10, 2_000, 0.01, 500)
    noise = torch.cat(recorder.batches) - x
    assert noise.shape == (2_010, 50)
    assert abs(float(noise.mean())) < 0.005  # standard error 0.3 / sqrt(100500) ~ 0.001
    assert float(noise.std()) == pytest.approx(0.3, rel=0.01)


def test_estimation_counts_come_from_the_estimation_generator_alone(threshold_classifier):
    smooth = Smooth(threshold_classifier, threshold_classifier.num_classes, sigma=0.5)
    x = torch.tensor([0.3, 0.0])

    def run(selection_seed: int, estimation_seed: int):
        return smooth.certify_all(
            x, 30, 400, 0.01, 64, generator=torch.Generator().manual_seed(selection_seed),
            estimation_generator=torch.Generator().manual_seed(estimation_seed),
        )

    a, b, c = run(1, 2), run(9, 2), run(1, 3)
    assert np.array_equal(a.estimation_counts, b.estimation_counts)
    assert not np.array_equal(a.selection_counts, b.selection_counts)
    assert np.array_equal(a.selection_counts, c.selection_counts)
    assert not np.array_equal(a.estimation_counts, c.estimation_counts)


# --- inputs and models that would give meaningless certificates ---------------------------------


class Constant(nn.Module):
    """Returns `output(batch)`; has one parameter so that it has a device."""

    def __init__(self, output):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(1))
        self.output = output

    def forward(self, x):
        return self.output(len(x))


@pytest.mark.parametrize(
    ("x", "message"),
    [
        (torch.full((1, 4, 4), 200, dtype=torch.uint8), r"^x must be a floating-point .*uint8"),
        (torch.ones(3, dtype=torch.int64), r"^x must be a floating-point .*int64"),
        (torch.tensor([0.5, 1.2]), r"^x must lie in \[0, 1\], got values in \[0.5, 1.2\]"),
        (torch.tensor([-0.1, 0.5]), r"^x must lie in \[0, 1\]"),
    ],
)
def test_inputs_outside_the_noise_calibration_are_refused(threshold_classifier, x, message):
    smooth = Smooth(threshold_classifier, threshold_classifier.num_classes, sigma=0.5)
    with pytest.raises(ValueError, match=message):
        smooth.certify(x, 10, 100, 0.01, 10)


def test_input_range_opt_out(threshold_classifier):
    x = torch.tensor([2.5, -3.0])
    for input_range in ((-4.0, 4.0), None):
        smooth = Smooth(threshold_classifier, 4, sigma=0.5, input_range=input_range)
        assert smooth.certify(x, 100, 1_000, 0.001, 100)[0] == 3
    with pytest.raises(ValueError, match=r"x must lie in \[-1, 1\]"):
        Smooth(threshold_classifier, 4, 0.5, input_range=(-1, 1)).certify(x, 10, 100, 0.01, 10)


@pytest.mark.parametrize(
    ("output", "message"),
    [
        (lambda b: torch.full((b, 3), float("nan")), "non-finite logits"),
        (lambda b: torch.tensor([[0.0, float("inf"), 0.0]]).repeat(b, 1), "non-finite logits"),
        (lambda b: (torch.zeros(b, 3), torch.zeros(b, 5)), "must return a logits tensor.*tuple"),
        (lambda b: {"logits": torch.zeros(b, 3)}, "must return a logits tensor.*dict"),
        (lambda b: torch.zeros(b, 3, dtype=torch.complex64), "real-valued logits.*complex64"),
        (lambda b: torch.zeros(b, 3, dtype=torch.bool), "real-valued logits.*bool"),
    ],
)
def test_outputs_that_cannot_be_counted_are_refused(output, message):
    smooth = Smooth(Constant(output), 3, sigma=0.5)
    with pytest.raises(ValueError, match=message):
        smooth.certify(torch.zeros(2), 10, 100, 0.01, 10)


def test_non_finite_logits_after_the_first_batch_are_refused():
    calls = []

    def output(b):
        calls.append(b)
        logits = torch.zeros(b, 3)
        logits[:, 0] = 1.0 if len(calls) < 5 else float("nan")
        return logits

    smooth = Smooth(Constant(output), 3, sigma=0.5)
    with pytest.raises(ValueError, match="non-finite logits"):
        smooth.predict(torch.zeros(2), 100, 0.01, 10)


def test_a_model_on_the_meta_device_is_refused():
    with torch.device("meta"):
        model = nn.Linear(2, 3)
    with pytest.raises(ValueError, match="^base_classifier is on the meta device"):
        Smooth(model, 3, sigma=0.5).certify(torch.zeros(2), 10, 100, 0.01, 10)


# --- the base classifier is untrusted: one row of num_classes logits per input ------------------


def votes_for_7(rows=lambda b: b, columns=10, wrong_from_call=1):
    """Logits voting for class 7 with rows(b) rows and `columns` columns for a batch of b, from
    the `wrong_from_call`-th call on (one row per input and 10 columns before it)."""
    calls = []

    def output(b):
        calls.append(b)
        wrong = len(calls) >= wrong_from_call
        logits = torch.zeros(rows(b) if wrong else b, columns if wrong else 10)
        logits[:, 7] = 1.0
        return logits

    return output


ENTRY_POINTS = {
    "predict": lambda s, x: s.predict(x, 100, 1e-3, 50),
    "certify": lambda s, x: s.certify(x, 10, 100, 1e-3, 50),
    "tcertify": lambda s, x: s.tcertify(x, 10, 100, 1e-3, 50),
    "certify_all": lambda s, x: s.certify_all(x, 10, 100, 1e-3, 50),
    "certify_radii": lambda s, x: s.certify_radii(x, radii=[0.1], alpha=1e-3, max_n=1_000,
                                                  batch_size=50, n0=10),
    "certify_adaptive": lambda s, x: s.certify_adaptive(x, n0=10, max_n=1_000, alpha=1e-3,
                                                        batch_size=50),
}
HOSTILE = {  # fresh models: the last one counts its calls
    "twice the rows": lambda: votes_for_7(rows=lambda b: 2 * b),
    "a row short": lambda: votes_for_7(rows=lambda b: b - 1),
    "12 classes": lambda: votes_for_7(columns=12),
    "flattened": lambda: lambda b: votes_for_7()(b).flatten(),
    "twice the rows from the second call": lambda: votes_for_7(rows=lambda b: 2 * b,
                                                               wrong_from_call=2),
}


@pytest.mark.parametrize("entry", ENTRY_POINTS)
@pytest.mark.parametrize("hostile", HOSTILE)
def test_logits_of_the_wrong_shape_are_refused_at_every_entry_point(entry, hostile):
    smooth = Smooth(Constant(HOSTILE[hostile]()), 10, sigma=0.25)
    with pytest.raises(ValueError, match=r"^the base classifier returned logits of shape "
                                         r"\([\d, ]+\) for a batch of (\d+) inputs; expected "
                                         r"\(\1, 10\)"):
        ENTRY_POINTS[entry](smooth, torch.zeros(10))


def test_twice_the_rows_cannot_inflate_a_certificate():
    """200 votes from n = 100 samples certified 0.456; the most n = 100 allows is ~0.375."""
    smooth = Smooth(Constant(votes_for_7(rows=lambda b: 2 * b)), 10, 0.25)
    message = (r"^the base classifier returned logits of shape \(20, 10\) for a batch of 10 "
               r"inputs; expected \(10, 10\)")
    with pytest.raises(ValueError, match=message):
        smooth.certify(torch.zeros(10), 10, 100, 1e-3, 100)
    honest = Smooth(Constant(votes_for_7()), 10, 0.25).certify(torch.zeros(10), 10, 100, 1e-3, 100)
    assert honest[0] == 7 and honest[1] < 0.376


@pytest.mark.parametrize("shape", [(0,), (0, 3), (3, 0, 2)])
@pytest.mark.parametrize("input_range", [(0.0, 1.0), None])
def test_an_empty_input_is_refused(threshold_classifier, shape, input_range):
    smooth = Smooth(threshold_classifier, 4, sigma=0.5, input_range=input_range)
    with pytest.raises(ValueError, match=rf"^x must hold at least one value, got shape "
                                         rf"\({', '.join(map(str, shape))},?\)"):
        smooth.certify(torch.zeros(shape), 10, 100, 0.01, 10)


# --- refused before the first forward pass --------------------------------------------------


class CallCounter(nn.Module):
    """Wraps a model and counts its calls."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return self.model(x)


TOO_MANY = MAX_SAMPLES + 1


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda s, x: s.predict(x, TOO_MANY, 0.01, 100), "n"),
        (lambda s, x: s.certify(x, TOO_MANY, 100, 0.01, 100), "n0"),
        (lambda s, x: s.certify(x, 10, TOO_MANY, 0.01, 100), "n"),
        (lambda s, x: s.tcertify(x, 10, TOO_MANY, 0.01, 100), "n"),
        (lambda s, x: s.certify_all(x, 10, TOO_MANY, 0.01, 100), "n"),
        (lambda s, x: s.certify_radii(x, radii=[0.1], alpha=0.01, max_n=TOO_MANY,
                                      batch_size=100), "max_n"),
        (lambda s, x: s.certify_radii(x, radii=[0.1], alpha=0.01, max_n=1_000, batch_size=100,
                                      n0=TOO_MANY), "n0"),
        (lambda s, x: s.certify_adaptive(x, n0=10, max_n=TOO_MANY, alpha=0.01,
                                         batch_size=100), "max_n"),
        (lambda s, x: s.certify_adaptive(x, n0=TOO_MANY, max_n=1_000, alpha=0.01,
                                         batch_size=100), "n0"),
    ],
    ids=["predict", "certify-n0", "certify-n", "tcertify", "certify_all", "radii-max_n",
         "radii-n0", "adaptive-max_n", "adaptive-n0"],
)
def test_more_samples_than_the_statistics_are_validated_for_are_refused_up_front(
        threshold_classifier, call, message):
    model = CallCounter(threshold_classifier)
    with pytest.raises(ValueError, match=rf"^{message} must be an integer in \[1, 10000000\], "
                                         rf"got {TOO_MANY}$"):
        call(Smooth(model, 4, sigma=0.5), torch.zeros(2))
    assert model.calls == 0


def test_the_sample_limit_is_the_validated_ten_million():
    assert MAX_SAMPLES == 10_000_000 == check_sample_count(MAX_SAMPLES, "n")


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda s, x: s.certify_radii(x, radii=[0.1], alpha=3e-100, max_n=10_000, batch_size=100,
                                      confidence_sequence="bonferroni", final_share=0.0),
         r"^alpha must be >= 8e-100 for certify with the bonferroni confidence sequence and "
         r"final share 0, got 3e-100: it bounds at level alpha / 8 at each of its 8 looks up to "
         r"max_n 10000"),
        (lambda s, x: s.certify_radii(x, radii=[0.1], alpha=1e-99, max_n=10_000, batch_size=100,
                                      method="tcertify",
                                      confidence_sequence="bonferroni", final_share=0.0),
         r"^alpha must be >= 1.6e-99 for tcertify with the bonferroni"),
        (lambda s, x: s.certify_radii(x, radii=[0.1], alpha=1e-99, max_n=10_000, batch_size=100,
                                      confidence_sequence="bonferroni"),  # the sequence's half
         r"^alpha must be >= 1.6e-99 for certify with the bonferroni confidence sequence and "
         r"final share 0.5"),
        (lambda s, x: s.certify_adaptive(x, n0=10, max_n=1_000, alpha=5e-100, batch_size=100),
         r"^alpha / grid .* must be >= 1e-100, got 5e-100 / 10"),
    ],
    ids=["bonferroni-certify", "bonferroni-tcertify", "bonferroni-final-share",
         "adaptive-grid"],
)
def test_an_alpha_too_small_for_its_looks_is_refused_before_any_sample(
        threshold_classifier, call, message):
    model = CallCounter(threshold_classifier)
    with pytest.raises(ValueError, match=message):
        call(Smooth(model, 4, sigma=0.5), torch.zeros(2))
    assert model.calls == 0


def test_the_mixture_and_enough_alpha_still_certify_at_tiny_alpha(threshold_classifier):
    smooth = Smooth(threshold_classifier, 4, sigma=0.5, input_range=None)
    x = torch.tensor([2.5, 0.0])  # deep inside class 3
    for options in ({}, {"method": "tcertify"},
                    {"confidence_sequence": "bonferroni", "final_share": 0.0}):
        alpha = 8e-100 if options else 3e-100
        cert = smooth.certify_radii(x, radii=[0.1], alpha=alpha, max_n=10_000, batch_size=100,
                                    **options)
        assert cert.label == 3 and cert.certified == (True,)


# --- Cohen's arguments by position, every other one by keyword ----------------------------------


@pytest.mark.parametrize(
    "call",
    [
        # certify_radii takes alpha before max_n, certify_adaptive max_n before alpha
        lambda s, x: s.certify_radii(x, [0.1], 1_000, 0.01, 100),
        lambda s, x: s.certify_radii(x, [0.1], 0.01, 1_000, 100),
        lambda s, x: s.certify_adaptive(x, 10, 0.01, 1_000, 100),
        lambda s, x: s.certify_adaptive(x, 10, 1_000, 0.01, 100),
        lambda s, x: s.certify_all(x, 10, 100, 0.01, 100, 5),
        lambda s, x: s.tcertify(x, 10, 100, 0.01, 100, 5, True),
        lambda s, x: s.certify(x, 10, 100, 0.01, 100, torch.Generator()),
        lambda s, x: s.predict(x, 100, 0.01, 100, torch.Generator()),
        lambda s, x: Smooth(s.base_classifier, 4, 0.5, "bf16"),
    ],
    ids=["radii-swapped", "radii", "adaptive-swapped", "adaptive", "certify_all-grid",
         "tcertify-grid-strict", "certify-generator", "predict-generator", "Smooth-amp"],
)
def test_arguments_beyond_cohens_must_be_given_by_keyword(threshold_classifier, call):
    model = CallCounter(threshold_classifier)
    with pytest.raises(TypeError, match="positional argument"):
        call(Smooth(model, 4, sigma=0.5), torch.zeros(2))
    assert model.calls == 0


def test_cohens_positional_calls_and_the_keyword_only_variants_agree(threshold_classifier):
    smooth = Smooth(threshold_classifier, 4, 0.5)
    x = torch.tensor([0.2, 0.0])

    def seeded() -> dict:
        return {"generator": torch.Generator().manual_seed(4)}

    every = smooth.certify_all(x, 20, 400, 0.01, 64, grid=5, **seeded())
    assert smooth.certify(x, 20, 400, 0.01, 64, **seeded()) == (every.certify.label,
                                                               every.certify.radius)
    assert smooth.tcertify(x, 20, 400, 0.01, 64, grid=5, strict=True, **seeded()) == (
        every.strict.label, every.strict.radius)
    adaptive = smooth.certify_adaptive(x, n0=20, max_n=400, alpha=0.01, batch_size=64,
                                       tolerance=0.0, grid=5, **seeded())
    assert adaptive.estimation_counts.sum() == 400  # tolerance 0: n = max_n, the same samples
    for field in ("certify", "tcertify", "strict", "selection_counts", "estimation_counts"):
        assert np.array_equal(getattr(adaptive, field), getattr(every, field)), field
