"""On-manifold robustness (Kwon & Lee 2021): generative models, the latent attack and its
checks, the fixed test sets, the MC-AT objectives, and the paper's Table 2 direction."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import Tensor, nn

from robcomp.attacks import ATTACKS
from robcomp.attacks.manifold import (
    LatentOutcome,
    ManifoldMissing,
    OnManifold,
    latent_pgd,
    using_manifold,
)
from robcomp.compress import COMPRESSORS
from robcomp.data import get
from robcomp.data.base import DataSplits, Split
from robcomp.data.builtin import GAUSSIAN_COVS, GAUSSIAN_MEANS
from robcomp.data.shifts import SHIFTS, ShiftContext
from robcomp.evaluate import ThreatModelViolation, accuracy, attack_batch, evaluate_attack
from robcomp.evaluate.adversarial import check_latent_threat_model
from robcomp.evaluate.manifold import on_manifold_set
from robcomp.models import create
from robcomp.models.generative import (
    GaussianManifold,
    VAESpec,
    bayes_class,
    cached_latent_classifier,
    cached_vae,
    train_vae,
)
from robcomp.train import OBJECTIVES, TrainConfig, fit

SPEC = {"name": "gaussians", "n": 6000}


@pytest.fixture(scope="module")
def gaussians() -> DataSplits:
    return get(SPEC, seed=0)


@pytest.fixture(scope="module")
def manifold() -> GaussianManifold:
    return GaussianManifold(n=SPEC["n"])


@pytest.fixture(scope="module")
def baseline(gaussians: DataSplits) -> nn.Module:
    torch.manual_seed(0)
    model = create("tiny_cnn", 4, gaussians.in_shape, mean=gaussians.mean, std=gaussians.std)
    fit(model, gaussians, TrainConfig(epochs=3, lr=0.05, batch_size=64), seed=0)
    return model.eval()


# --- generative models ----------------------------------------------------------------------------


def test_vae_reconstruction_loss_falls_with_training(digits: DataSplits) -> None:
    x = digits.test.tensors()[0]
    losses = []
    for epochs in (1, 8):
        vae = train_vae(digits, VAESpec(epochs=epochs, latent_dim=8), seed=0)
        with torch.no_grad():
            losses.append(float(vae.loss(x, torch.Generator().manual_seed(0))[0]))
    assert losses[1] < 0.8 * losses[0]
    assert vae.decode(torch.zeros(2, 8)).shape == (2, 1, 8, 8) and vae.kind == "conv"


def test_kl_warmup_ramps_the_weight_up_to_beta() -> None:
    spec = VAESpec(beta=0.5, warmup=4)
    assert [spec.kl_weight(e) for e in range(6)] == [0.125, 0.25, 0.375, 0.5, 0.5, 0.5]
    assert VAESpec(beta=0.5).kl_weight(0) == 0.5
    with pytest.raises(ValueError, match="warmup"):
        VAESpec(warmup=-1)


def test_vae_cache_round_trip_loads_the_same_models(digits: DataSplits, tmp_path: Path) -> None:
    spec = VAESpec(epochs=2, classifier_epochs=2)
    vae = cached_vae(digits, spec, 0, tmp_path)
    clf = cached_latent_classifier(vae, digits, spec, 0, tmp_path)
    files = sorted(p.name for p in tmp_path.rglob("*.safetensors"))
    assert files == ["latent_classifier.safetensors", "vae.safetensors"]
    again = cached_vae(digits, spec, 0, tmp_path)
    clf_again = cached_latent_classifier(again, digits, spec, 0, tmp_path)
    assert again is not vae
    x = digits.test.tensors()[0][:16]
    with torch.no_grad():
        mu, mu_again = vae.encode(x)[0], again.encode(x)[0]
        assert torch.equal(mu, mu_again)
        assert torch.equal(vae.decode(mu), again.decode(mu))
        assert torch.equal(clf(mu), clf_again(mu))
    # another seed is another model
    assert not torch.equal(cached_vae(digits, spec, 1, tmp_path).encode(x)[0], mu)


def test_bayes_rule_is_correct_on_the_class_means() -> None:
    means = torch.tensor(GAUSSIAN_MEANS)
    assert bayes_class(means).tolist() == [0, 1, 2, 3]
    # a point between classes 0 and 1 goes to the nearer mean (same isotropic covariance)
    assert GAUSSIAN_COVS[0] == GAUSSIAN_COVS[1]
    near0 = 0.7 * means[0] + 0.3 * means[1]
    near1 = 0.3 * means[0] + 0.7 * means[1]
    assert bayes_class(torch.stack([near0, near1])).tolist() == [0, 1]


def test_the_simulation_generator_inverts_the_data(
    gaussians: DataSplits, manifold: GaussianManifold
) -> None:
    x, y = gaussians.test.tensors()
    z = manifold.encode(x)
    assert torch.allclose(manifold.decode(z), x, atol=1e-4)
    # the true latents follow the four Gaussians: Bayes is right on ~97 % of them
    assert (bayes_class(z) == y).float().mean() > 0.94


# --- the attack -----------------------------------------------------------------------------------


def test_attack_stays_in_the_latent_ball_and_keeps_only_valid_points(
    gaussians: DataSplits, manifold: GaussianManifold, baseline: nn.Module
) -> None:
    x, y = gaussians.test.tensors()
    attack = OnManifold(eps=0.1, step_size=0.03, steps=10).bind(manifold)
    out = attack.perturb(baseline, x, y)
    assert float((out.z_adv - out.z).abs().max()) <= 0.1 + 1e-6
    with torch.no_grad():
        decoded = manifold.decode(out.z_adv)
        fooled = baseline(decoded).argmax(1) != y
    assert torch.equal(out.fooled, fooled)
    assert torch.equal(out.kept, fooled & (bayes_class(out.z_adv) == y))
    # some points fool the model but leave their class: they are not kept
    assert (out.fooled & ~out.kept).any() and out.kept.any()
    assert torch.equal(out.x_adv[~out.kept], x[~out.kept])
    assert torch.allclose(out.x_adv[out.kept], decoded[out.kept])
    assert (baseline(out.x_adv[out.kept]).argmax(1) != y[out.kept]).all()


def test_points_not_kept_count_as_robust_in_the_evaluator(
    gaussians: DataSplits, manifold: GaussianManifold, baseline: nn.Module
) -> None:
    attack = OnManifold(eps=0.1, step_size=0.03, steps=10)
    with using_manifold(manifold):
        result = evaluate_attack(baseline, attack, gaussians.test)
        x, y = gaussians.test.tensors()
        correct = baseline(x).argmax(1) == y
        kept = attack.bind(manifold).perturb(baseline, x[correct], y[correct]).kept
    assert result.norm == "latent-linf" and result.eps == 0.1
    expected = (int(correct.sum()) - int(kept.sum())) / len(y)
    assert result.robust_accuracy == pytest.approx(expected)
    assert result.robust_accuracy > result.clean_accuracy - 0.2  # most fooling points leave


def test_reanchor_is_one_fgsm_step_and_differs_from_pgd(
    gaussians: DataSplits, manifold: GaussianManifold, baseline: nn.Module
) -> None:
    x, y = gaussians.test.tensors()
    z = manifold.encode(x[:200])
    kwargs = {"eps": 0.3, "step": 0.01, "steps": 7}
    pgd = latent_pgd(baseline, manifold, z, y[:200], **kwargs)
    anchored = latent_pgd(baseline, manifold, z, y[:200], reanchor=True, **kwargs)
    # every coordinate moved by exactly one step: a single signed step from z
    assert torch.allclose((anchored - z).abs(), torch.full_like(z, 0.01), atol=1e-6)
    assert float((pgd - z).abs().max()) == pytest.approx(0.07, abs=1e-5)
    assert not torch.allclose(pgd, anchored)
    # with one step the two are the same FGSM step
    one = {"eps": 0.3, "step": 0.01, "steps": 1}
    assert torch.equal(
        latent_pgd(baseline, manifold, z, y[:200], **one),
        latent_pgd(baseline, manifold, z, y[:200], reanchor=True, **one),
    )


def test_evaluator_rejects_a_latent_ball_violation(
    gaussians: DataSplits, manifold: GaussianManifold, baseline: nn.Module
) -> None:
    x, y = gaussians.test.tensors()
    attack = OnManifold(eps=0.05).bind(manifold)
    z = manifold.encode(x[:8])
    far = z + 0.2  # outside the 0.05 ball
    kept = torch.ones(8, dtype=torch.bool)
    bad = LatentOutcome(manifold.decode(far), z, far, kept, kept)
    with pytest.raises(ThreatModelViolation, match="exceeds eps"):
        check_latent_threat_model(attack, x[:8], bad)
    lying = LatentOutcome(manifold.decode(far), z, z + 0.01, kept, kept)  # misreported latents
    with pytest.raises(ThreatModelViolation, match="decoding"):
        check_latent_threat_model(attack, x[:8], lying)

    class Cheat(OnManifold):
        def perturb(self, model: nn.Module, x: Tensor, y: Tensor) -> LatentOutcome:
            out = super().perturb(model, x, y)
            every = torch.ones_like(out.kept)  # claims every point, from far outside the ball
            return LatentOutcome(out.x_adv, out.z, out.z + 1.0, every, every)

    with pytest.raises(ThreatModelViolation):
        attack_batch(baseline, Cheat(eps=0.05).bind(manifold), x[:64], y[:64])


def test_an_unbound_attack_says_how_to_bind(gaussians: DataSplits, baseline: nn.Module) -> None:
    x, y = gaussians.test.tensors()
    attack = ATTACKS.get("on-manifold")(eps=0.1)
    with pytest.raises(ManifoldMissing, match="using_manifold"):
        attack(baseline, x[:4], y[:4])
    assert attack.label() == "on-manifold7"
    assert OnManifold(eps=0.1, reanchor=True).label() == "on-manifold7-reanchor"


# --- the fixed test sets --------------------------------------------------------------------------


def test_manifold_sets_hold_examples_that_fool_the_baseline(
    gaussians: DataSplits, baseline: nn.Module
) -> None:
    shift = SHIFTS.get("manifold-sets")(step_size=0.03, steps=10, limit=400)
    splits = shift.shifted(gaussians, ShiftContext(data_spec=SPEC, seed=0, baseline=baseline))
    assert [(s.shift, s.severity, s.family) for s in splits] == [
        ("adv-on", 0, "manifold"),
        ("adv-off", 0, "manifold"),
        ("recon", 0, "manifold"),
    ]
    on, off, recon = (s.split for s in splits)
    assert len(on) > 0 and len(off) > 0
    assert accuracy(baseline, on) == 0.0 and accuracy(baseline, off) == 0.0
    # adv-on points keep their true class by the Bayes rule of the true latents
    manifold = GaussianManifold(n=SPEC["n"])
    assert (bayes_class(manifold.encode(on.x)) == on.y).all()
    # recon: every test point through the (here exactly inverted) generator
    x, y = gaussians.test.head(400).tensors()
    assert torch.equal(recon.y, y) and torch.allclose(recon.x, x, atol=1e-4)
    sizes = {("adv-on", 0): 7, ("recon", 0): 400}
    summary = shift.summary(
        {("adv-on", 0): 0.5, ("recon", 0): 0.9}, {("recon", 0): 0.95}, (0.9, 0.95), sizes
    )
    assert summary == pytest.approx({
        "combined_accuracy": 0.7, "adv_on_points": 7.0, "vae_recon_accuracy": 0.95,
        "adv_on_recon_errors": 20.0, "recon_accuracy": 0.9,
    })  # fmt: skip


class _ShiftedDecoder:
    """A toy manifold on (B, 2) inputs: the latent is the input, the decoder moves the first
    coordinate down by 0.3, every latent keeps its class."""

    def encode(self, x: Tensor) -> Tensor:
        return x.detach().clone()

    def decode(self, z: Tensor) -> Tensor:
        return torch.stack([z[:, 0] - 0.3, z[:, 1]], dim=1).clamp(0.0, 1.0)

    def keeps_class(self, z: Tensor, y: Tensor) -> Tensor:
        return torch.ones(len(z), dtype=torch.bool)

    def label(self) -> str:
        return "shifted-decoder"


def test_adv_on_leaves_out_points_the_decoder_alone_misclassifies() -> None:
    """Point 0 (x0 = 0.7) is class 1 (x0 > 0.5) but its reconstruction (0.4) is not: the
    decoder, not the latent step, fools the model, so it must not enter adv-on (the old rule
    kept it: the attack only pushes it further). Point 1 (x0 = 0.9) reconstructs right (0.6)
    and a latent step of 0.3 flips it: a true adv-on example. Point 2 stays right."""
    model = nn.Linear(2, 2)
    with torch.no_grad():  # logit of class 1 minus class 0 = 20 * (x0 - 0.5)
        model.weight.copy_(torch.tensor([[0.0, 0.0], [20.0, 0.0]]))
        model.bias.copy_(torch.tensor([0.0, -10.0]))
    x = torch.tensor([[0.7, 0.5], [0.9, 0.5], [1.0, 0.5]])
    y = torch.tensor([1, 1, 1])
    attack = OnManifold(eps=0.15, step_size=0.05, steps=5).bind(_ShiftedDecoder())
    assert attack.perturb(model, x, y).kept.tolist() == [True, True, False]  # old adv-on
    on = on_manifold_set(model, attack, Split(x, y))
    assert len(on) == 1 and torch.allclose(on.x, torch.tensor([[0.45, 0.5]]))


# --- objectives -----------------------------------------------------------------------------------


def test_mc_at_on_trains_on_the_batch_and_its_selected_adversarials(
    gaussians: DataSplits, manifold: GaussianManifold, baseline: nn.Module
) -> None:
    x, y = gaussians.test.tensors()
    objective = OBJECTIVES.get("mc-at-on")(eta=0.1, on_step=0.03, on_steps=10).bind(manifold)
    out = {k: v.detach() for k, v in objective(baseline, x, y).items()}
    attack = OnManifold(eps=0.1, step_size=0.03, steps=10).bind(manifold)
    selected = attack.perturb(baseline, x, y)
    x_all = torch.cat([x, selected.x_adv[selected.kept]])
    y_all = torch.cat([y, y[selected.kept]])
    expected = nn.functional.cross_entropy(baseline(x_all), y_all)
    assert selected.kept.any()
    assert float(out["loss"]) == pytest.approx(float(expected), rel=1e-5)
    assert float(out["on_selected"]) == pytest.approx(float(selected.kept.float().mean()))
    assert float(out["loss"]) > float(nn.functional.cross_entropy(baseline(x), y))


def test_mc_at_off_is_pgd_at(gaussians: DataSplits, baseline: nn.Module) -> None:
    x, y = gaussians.test.tensors()
    off = OBJECTIVES.get("mc-at-off")()
    pgd = OBJECTIVES.get("pgd-at")(eps=0.07, step=0.01, steps=7)
    torch.manual_seed(3)
    a = off(baseline, x[:128], y[:128])["loss"]
    torch.manual_seed(3)
    b = pgd(baseline, x[:128], y[:128])["loss"]
    assert torch.equal(a, b)
    assert OBJECTIVES.get("mc-trades")().beta == 1.0


def test_mc_at_dual_needs_a_manifold_and_trains_on_both(
    gaussians: DataSplits, manifold: GaussianManifold, baseline: nn.Module
) -> None:
    x, y = gaussians.test.tensors()
    dual = OBJECTIVES.get("mc-at-dual")(eta=0.1, on_step=0.03, on_steps=10)
    with pytest.raises(ManifoldMissing):
        dual(baseline, x[:8], y[:8])
    with using_manifold(manifold):
        out = dual(baseline, x, y)
    assert 0 < float(out["on_selected"]) < 1 and float(out["adv_accuracy"]) < 0.5


# --- the paper's Table 2 direction ----------------------------------------------------------------


@pytest.mark.slow
def test_mc_at_on_keeps_more_adv_on_accuracy_at_high_sparsity(
    gaussians: DataSplits, manifold: GaussianManifold, baseline: nn.Module
) -> None:
    """Kwon & Lee 2021, Table 2 (simulation, 95 % sparsity): MC(regular) 96.93 / 56.50,
    MC-AT(on) 96.98 / 88.00 (clean / adv-on). Here: 90 % of the weights removed (the
    default, global allocation), tiny_cnn, 6,000 points, 3 epochs."""
    settings = {"eps": 0.3, "step_size": 0.03, "steps": 10}
    shift = SHIFTS.get("manifold-sets")(**settings)
    on = shift.shifted(gaussians, ShiftContext(data_spec=SPEC, seed=0, baseline=baseline))[0]
    train = {"epochs": 3, "lr": 0.01, "batch_size": 64}
    latent = {"eta": 0.3, "on_step": 0.03, "on_steps": 10}
    scores = {}
    for name, objective in (("regular", {"name": "ce"}), ("on", {"name": "mc-at-on", **latent})):
        compressor = COMPRESSORS.get("proximal-l0")(sparsity=0.9, objective=objective, train=train)
        with using_manifold(manifold):
            model, _ = compressor(baseline, gaussians)
        scores[name] = (accuracy(model, gaussians.test), accuracy(model, on.split))
    assert len(on.split) >= 30
    (clean_regular, on_regular), (clean_on, on_on) = scores["regular"], scores["on"]
    assert on_on > on_regular + 0.2, scores
    assert abs(clean_on - clean_regular) < 0.03, scores
