"""method='certified': its certificate's arithmetic, its refusals, and what it records."""

from __future__ import annotations

import math
import re

import numpy as np
import pytest
import scvi
from scipy.stats import norm

import scvi_unlearn as su
from scvi_unlearn.train import weights_fingerprint
from scvi_unlearn.train._certified import (
    NoiseDominatedError,
    certified_epsilon,
    certified_noise,
    planned_steps,
    retained_library_prior,
)

QUIET = {"accelerator": "cpu", "enable_progress_bar": False}
#: A budget loose enough that the noise is small: these tests check the mechanics, not utility.
LOOSE = 1e12


def _gaussian_mechanism_delta(epsilon: float, sensitivity: float, sigma: float) -> float:
    """Exact delta(epsilon) of one Gaussian mechanism (Balle & Wang 2018, Theorem 8)."""
    a = sensitivity / (2 * sigma)
    b = epsilon * sigma / sensitivity
    return norm.cdf(a - b) - math.exp(epsilon) * norm.cdf(-a - b)


def _model(n_cells=240, **model_kwargs):
    adata = su.data.synthetic_pbmc(n_cells=n_cells, n_genes=40, seed=1)
    su.model.SCVI.setup_anndata(adata, batch_key="donor")
    scvi.settings.seed = 0
    model = su.model.SCVI(adata, n_hidden=16, n_latent=3, **model_kwargs)
    model.train(max_epochs=3, batch_size=64, **QUIET)
    return model


def test_noise_and_epsilon_are_inverse_and_monotone():
    inputs = {"radius": 30.0, "lr": 1e-3, "grad_clip": 1.0, "steps": 500}
    for weight_decay in (0.0, 0.5):
        sigmas = [certified_noise(e, 1e-5, weight_decay=weight_decay, **inputs) for e in (1, 10)]
        assert sigmas[0] > sigmas[1] > 0
        for eps, sigma in zip((1, 10), sigmas):
            back = certified_epsilon(sigma, 1e-5, weight_decay=weight_decay, **inputs)
            assert back == pytest.approx(eps, rel=1e-9)
    # contraction (weight decay) lets the start's distance fade: less noise for the same budget
    assert certified_noise(10, 1e-5, weight_decay=0.5, **inputs) < certified_noise(
        10, 1e-5, **inputs
    )
    assert certified_epsilon(0.0, 1e-5, **inputs) == math.inf


def test_one_step_is_a_gaussian_mechanism_and_the_bound_covers_it():
    # T = 1, no decay: the two runs' weights differ by at most 2 C0 + 2 lr C1 before one draw
    # of noise, a Gaussian mechanism of that sensitivity. The certificate must not claim less
    # privacy loss than that mechanism's exact (epsilon, delta) curve.
    radius, lr, clip = 2.0, 0.1, 1.0
    sensitivity = 2 * radius + 2 * lr * clip
    for eps in (0.5, 2.0, 10.0):
        sigma = certified_noise(eps, 1e-5, radius=radius, lr=lr, grad_clip=clip, steps=1)
        rho = sensitivity**2 / (2 * sigma**2)
        assert rho + 2 * math.sqrt(rho * math.log(1e5)) == pytest.approx(eps, rel=1e-9)
        assert _gaussian_mechanism_delta(eps, sensitivity, sigma) <= 1e-5


def test_more_steps_cost_less_noise_until_the_gradient_shift_dominates():
    inputs = {"radius": 30.0, "lr": 1e-3, "grad_clip": 1.0}
    sigma = [certified_noise(10, 1e-5, steps=t, **inputs) for t in (10, 1000, 30_000)]
    assert sigma[0] > sigma[1] > sigma[2]
    # past T* = C0 / (lr C1) the shift of 2 lr C1 a step grows faster than the noise averages
    assert certified_noise(10, 1e-5, steps=3_000_000, **inputs) > sigma[2]


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"epsilon": 0.0}, "epsilon"),
        ({"delta": 1.0}, "delta"),
        ({"radius": -1.0}, "radius"),
        ({"steps": 0}, "at least one"),
        ({"weight_decay": 2000.0}, "lr \\* weight_decay"),
    ],
)
def test_bad_certificate_inputs_are_refused(kwargs, match):
    inputs = {"epsilon": 1.0, "delta": 1e-5, "radius": 1.0, "lr": 1e-3, "grad_clip": 1.0,
              "steps": 10, **kwargs}  # fmt: skip
    epsilon, delta = inputs.pop("epsilon"), inputs.pop("delta")
    with pytest.raises(ValueError, match=match):
        certified_noise(epsilon, delta, **inputs)


def test_steps_are_those_the_retain_loader_gives():
    assert planned_steps(256, 128, 3) == 6
    assert planned_steps(257, 128, 3) == 6  # a last minibatch of one cell is dropped
    assert planned_steps(258, 128, 3) == 9


def test_a_useful_epsilon_is_refused_with_the_noise_it_would_need():
    model = _model()
    forget = model.train_indices[:10]
    with pytest.raises(NoiseDominatedError, match="replaced by noise") as err:
        model.unlearn(forget, method="certified", epsilon=10, max_epochs=2, **QUIET)
    message = str(err.value)
    assert "epsilon=10" in message and "allow_noise_dominated=True" in message
    # the epsilon it names is one at which the noise no longer outweighs the weights
    number = r"certify only epsilon ~ ([0-9.]+e[+][0-9]+|[0-9.]*[0-9])"
    named = float(re.search(number, message).group(1))
    assert named > 10


def test_certified_unlearning_records_its_certificate_and_is_reproducible(tmp_path):
    model = _model(use_observed_lib_size=False)
    forget = model.train_indices[:12]
    before = weights_fingerprint(model.module)
    runs = [
        model.unlearn(forget, method="certified", epsilon=LOOSE, max_epochs=2, seed=3, **QUIET)
        for _ in range(2)
    ]
    assert weights_fingerprint(model.module) == before  # the user's model is untouched
    assert weights_fingerprint(runs[0].module) == weights_fingerprint(runs[1].module)
    new = runs[0]
    event = new.provenance["events"][-1]
    cert = event["metrics"]["certificate"]
    n_retain = len(model.train_indices) - 12
    assert cert["epsilon"] == LOOSE and cert["delta"] == pytest.approx(0.1 / n_retain)
    assert cert["steps"] == planned_steps(n_retain, 128, 2)
    assert cert["epsilon_check"] == pytest.approx(LOOSE, rel=1e-6)
    assert cert["noise_to_weights"] < 1
    # the library-size prior now describes the retained cells only
    means, variances = retained_library_prior(new, np.asarray(new.train_indices))
    np.testing.assert_allclose(new.module.library_log_means.cpu().numpy(), means, rtol=1e-5)
    np.testing.assert_allclose(new.module.library_log_vars.cpu().numpy(), variances, rtol=1e-5)
    assert event["metrics"]["buffers_refreshed"]["batch_norm_layers"] > 0
    # saved, loaded, and shown on the unlearning certificate
    new.save(str(tmp_path / "m"), save_anndata=True)
    back = su.model.SCVI.load(str(tmp_path / "m"))
    assert back.provenance["events"][-1]["metrics"]["certificate"] == cert
    page = su.model.write_unlearning_certificate(back, tmp_path / "c.html").read_text()
    assert "Certified unlearning guarantee" in page


def test_frozen_parameters_cannot_be_certified():
    model = _model()
    model.module.z_encoder.requires_grad_(False)
    with pytest.raises(ValueError, match="frozen parameters"):
        model.unlearn(
            model.train_indices[:5], method="certified", epsilon=LOOSE, max_epochs=1, **QUIET
        )


@pytest.mark.parametrize(
    ("kwargs", "match"), [({"epsilon": 0.0}, "epsilon"), ({"epsilon": 1.0, "delta": 1.5}, "delta")]
)
def test_a_budget_out_of_range_is_refused_before_any_training(kwargs, match):
    model = _model(n_cells=120)
    with pytest.raises(ValueError, match=match):
        model.unlearn(model.train_indices[:5], method="certified", max_epochs=1, **kwargs,
                      **QUIET)  # fmt: skip
