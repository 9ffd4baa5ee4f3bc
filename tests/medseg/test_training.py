"""Training on a tiny synthetic dataset: model folder, resume, fine-tuning, the shared train step, CLI."""

from __future__ import annotations

import json
import shlex
from pathlib import Path

import pytest
import torch
import yaml

from medseg.cli import main
from medseg.evaluation import dice_per_class
from medseg.model import ModelProvenance, load_model, save_model
from medseg.model_spec import MODELS_DIR, ModelSpecError, TrainingSpec, parse_spec
from medseg.networks import SegmentationNet
from medseg.synth import generate_dataset, load_site
from medseg.training import (
    RandScannerHUd,
    RandShortScand,
    TrainingCase,
    batches,
    crop_ratios,
    freeze_encoder,
    initial_weights,
    make_loss,
    train,
    train_step,
)
from medseg.training_range import ScanSpacing
from tests.medseg.tiny_model import tiny_spec_data


def _spec_file(tmp_path: Path) -> Path:
    data = tiny_spec_data(spacing_mm=8.0)
    data["training"].update(patch_size=[32, 32, 32], batch_size=1, epochs=1, iterations_per_epoch=2)
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.fixture(scope="module")
def tiny_dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("tiny-ds")
    generate_dataset(root, [load_site("site_a")], 3, seed=2, matrix=64, slices=24)
    return root


def test_train_writes_a_loadable_model_and_resumes(tmp_path: Path, tiny_dataset: Path) -> None:
    spec = parse_spec(yaml.safe_load(_spec_file(tmp_path).read_text()), "tiny")
    out = tmp_path / "model"
    result = train(spec, tiny_dataset, out, seed=3, command="test")
    assert result.epochs == 1 and 0.0 <= result.best_dice <= 1.0
    model = load_model(out)
    assert model.provenance.seed == 3 and model.provenance.epochs == 1 and model.provenance.command == "test"
    resumed = train(spec, tiny_dataset, out, epochs=2, seed=3, resume=True)
    assert [h["epoch"] for h in resumed.history] == [1, 2]
    assert json.loads((out / "training_log.json").read_text())[-1]["epoch"] == 2


def test_resume_without_checkpoint_is_an_error(tmp_path: Path, tiny_dataset: Path) -> None:
    spec = parse_spec(yaml.safe_load(_spec_file(tmp_path).read_text()), "tiny")
    with pytest.raises(FileNotFoundError, match="no checkpoint to resume from"):
        train(spec, tiny_dataset, tmp_path / "fresh", resume=True)


@pytest.mark.parametrize("bad", ["init", "resume"])
def test_a_wrong_start_fails_before_any_case_is_read(tmp_path: Path, tiny_dataset: Path, bad: str) -> None:
    """A wrong --init or --resume is refused first (it was refused only after every case had been read
    onto the grid: six minutes for the shipped model's data): here the cases are not even there."""
    spec = parse_spec(yaml.safe_load(_spec_file(tmp_path).read_text()), "tiny")
    manifest_only = tmp_path / "manifest-only"
    manifest_only.mkdir()
    (manifest_only / "manifest.json").write_bytes((tiny_dataset / "manifest.json").read_bytes())
    if bad == "init":
        with pytest.raises(ModelSpecError, match="no-such-model"):
            train(spec, manifest_only, tmp_path / "out", init=tmp_path / "no-such-model")
    else:
        with pytest.raises(FileNotFoundError, match="no checkpoint to resume from"):
            train(spec, manifest_only, tmp_path / "out", resume=True)


def test_train_step_lowers_the_loss_on_one_batch() -> None:
    spec = parse_spec(yaml.safe_load((MODELS_DIR / "default_ct.yaml").read_text()), "default")
    torch.manual_seed(0)
    net = SegmentationNet(spec)
    images = torch.randn(1, spec.preprocessing.input_channels, 32, 32, 32)
    labels = (images[:, :1] > 0.5).long()
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-2)
    loss_fn = make_loss(spec.training, spec.num_classes)
    losses = [train_step(net, (images, labels), optimizer, loss_fn, torch.device("cpu")) for _ in range(8)]
    assert losses[-1] < losses[0]


def test_freeze_encoder_keeps_half_the_trunk() -> None:
    spec = parse_spec(yaml.safe_load((MODELS_DIR / "default_ct.yaml").read_text()), "default")
    net = SegmentationNet(spec)
    frozen = freeze_encoder(net)
    trunk = list(net.trunk.parameters())
    assert frozen == len(trunk) // 2 and not trunk[0].requires_grad and trunk[-1].requires_grad
    assert net.classifier.weight.requires_grad


def test_dice_per_class() -> None:
    a = torch.tensor([0, 1, 1, 2])
    b = torch.tensor([0, 1, 2, 2])
    assert dice_per_class(a, b, 4)[:2] == [pytest.approx(2 / 3), pytest.approx(2 / 3)]


def test_cli_fine_tunes_with_frozen_encoder(tmp_path: Path, tiny_dataset: Path) -> None:
    spec = _spec_file(tmp_path)
    base = tmp_path / "base"
    assert main(["-q", "train", str(spec), str(tiny_dataset), "-o", str(base)]) == 0
    tuned = tmp_path / "tuned"
    args = [
        "-q",
        "train",
        str(spec),
        str(tiny_dataset),
        "-o",
        str(tuned),
        "--init",
        str(base),
        "--freeze-encoder",
    ]
    assert main(args) == 0
    assert load_model(tuned).provenance.init_from == str(base)
    assert load_model(tuned).provenance.command == shlex.join(["medseg", *args])
    assert (
        main(["-q", "train", str(spec), str(tiny_dataset), "-o", str(tmp_path / "x"), "--freeze-encoder"])
        == 2
    )


def test_short_scan_keeps_one_slab_and_makes_the_rest_air_and_background() -> None:
    cut = RandShortScand("image", "label", prob=1.0, min_fraction=0.25)
    image = torch.rand(1, 4, 4, 32) + 1.0
    image[0, 0, 0, 0] = -1.0  # the patch's air value
    label = torch.ones(1, 4, 4, 32, dtype=torch.long)
    depths = set()
    for seed in range(20):
        cut.set_random_state(seed)
        out = cut({"image": image, "label": label})
        kept = out["label"][0].sum(dim=(0, 1)) > 0
        z = kept.nonzero().ravel()
        assert z.numel() >= 8 and bool(kept[z.min() : z.max() + 1].all())  # one slab, at least a quarter
        assert bool((out["image"][0][..., ~kept] == -1.0).all())
        assert torch.equal(out["image"][0][..., kept], image[0][..., kept])
        depths.add(z.numel())
    assert len(depths) > 5  # the slab length varies
    assert torch.equal(label, torch.ones_like(label))  # the input is left alone
    cut.prob = 0.0
    assert cut({"image": image, "label": label})["label"] is label


def test_focal_labels_get_their_crop_share_and_loss_weight() -> None:
    spec = parse_spec(yaml.safe_load((MODELS_DIR / "default_ct.yaml").read_text()), "default")
    plain = spec.training.model_copy(update={"focal_crop_share": None, "focal_class_weight": 1.0})
    equal = crop_ratios(plain, 9, [8])
    assert equal[0] == pytest.approx(0.1) and equal[1:] == pytest.approx([0.9 / 8] * 8)
    shared = crop_ratios(plain.model_copy(update={"focal_crop_share": 0.3}), 9, [8])
    assert shared[8] == pytest.approx(0.9 * 0.3) and shared[1] == pytest.approx(0.9 * 0.7 / 7)
    assert sum(shared) == pytest.approx(1.0)
    loss = make_loss(plain.model_copy(update={"focal_class_weight": 3.0}), 9, [8])
    assert loss.cross_entropy.weight.tolist() == [1.0] * 8 + [3.0]
    # a focal class the network misses costs more when it is weighted
    logits = torch.zeros(1, 9, 8, 8, 8)
    logits[:, 0] = 2.0
    labels = torch.zeros(1, 1, 8, 8, 8, dtype=torch.long)
    labels[..., :2, :2, :2] = 8
    assert float(loss(logits, labels)) > float(make_loss(plain, 9, [8])(logits, labels))


def test_site_weights_draw_a_site_more_often_and_say_a_site_without_cases(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Each case's image holds its site's number, so a patch says which site it was drawn from."""
    plain = TrainingSpec(
        patch_size=(8, 8, 8), batch_size=1, noise_std=0.0, intensity_drift=0.0, foreground_ratio=0.0
    )

    def case(site: str, value: float) -> TrainingCase:
        labels = torch.zeros(1, 8, 8, 8)
        labels[0, 2:6, 2:6, 2:6] = 1
        return TrainingCase(site, site, torch.full((1, 8, 8, 8), value), labels, {}, ScanSpacing(1.0, 1.0))

    cases = [case("site_a", 0.0), case("site_b", 1.0), case("site_c", 2.0)]

    def drawn(training: TrainingSpec) -> list[float]:
        stream = batches(cases, training, 2, seed=3)
        return [float(next(stream)[0].mean()) for _ in range(600)]

    uniform = drawn(plain)
    assert 0.25 < uniform.count(2.0) / 600 < 0.42
    weighted = drawn(plain.model_copy(update={"site_weights": {"site_c": 4.0}}))
    assert 0.58 < weighted.count(2.0) / 600 < 0.75  # 4 of 6 shares
    assert weighted.count(0.0) > 50 and weighted.count(1.0) > 50  # the others are still drawn
    # the shipped config weights site_c; fine-tuned on a hospital's own sites it draws them alike
    other = plain.model_copy(update={"site_weights": {"site_x": 2.0}})
    assert drawn(other) == uniform
    assert "training.site_weights: no training case from site site_x; ignored" in caplog.text


def test_init_from_a_model_with_fewer_input_channels_starts_from_its_predictions(tmp_path: Path) -> None:
    """A one-window model starts a two-window one: zero weights for the new channel, same logits."""
    data = tiny_spec_data()
    data["network"]["arguments"]["num_res_units"] = 1  # a residual convolution reads the input too
    wide = {"kind": "window", "low": -1000, "high": 400}
    data["preprocessing"]["intensity"] = {"CT": wide}
    one = parse_spec(data, "one")
    torch.manual_seed(0)
    provenance = ModelProvenance(source="test", training_data="none", seed=0, command="", weights_sha256="")
    init = save_model(tmp_path / "one", one, SegmentationNet(one), provenance)
    soft = {"kind": "window", "low": -160, "high": 240}
    two = parse_spec(
        {**data, "preprocessing": {**data["preprocessing"], "intensity": {"CT": [wide, soft]}}}, "two"
    )
    network = SegmentationNet(two)
    network.load_state_dict(initial_weights(network, two, init))
    network.eval()
    x = torch.randn(1, 2, 32, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(network(x), init.network.eval()(x[:, :1]))
    swapped = parse_spec(
        {**data, "preprocessing": {**data["preprocessing"], "intensity": {"CT": [soft, wide]}}}, "s"
    )
    with pytest.raises(ValueError, match="keeps its channels first"):
        initial_weights(SegmentationNet(swapped), swapped, init)


def test_scanner_hu_changes_reach_every_ct_window_alike() -> None:
    """Offset, gain and one noise field in HU, seen through both windows; clipped voxels stay clipped."""
    windows = ((-1000.0, 400.0), (-160.0, 240.0))
    hu = torch.linspace(-1100.0, 500.0, 4096).reshape(1, 16, 16, 16)
    image = torch.cat([(2 * (hu - lo) / (hi - lo) - 1).clamp(-1, 1) for lo, hi in windows])

    def window_hu(x: torch.Tensor, c: int) -> torch.Tensor:
        lo, hi = windows[c]
        return lo + (x + 1) * (hi - lo) / 2

    shift = RandScannerHUd("image", windows, prob=1.0, noise_hu=0.0, offset_hu=30.0, gain=0.0)
    shift.set_random_state(seed=3)
    out = shift({"image": image})["image"]
    inside = (image.abs() < 1) & (out.abs() < 1)
    offsets = [window_hu(out[c], c) - window_hu(image[c], c) for c in range(2)]
    first = offsets[0][inside[0]][0]
    assert 0 < abs(float(first)) <= 30
    for c in range(2):
        assert torch.allclose(offsets[c][inside[c]], first, atol=1e-2)
    assert torch.equal(out[image.abs() >= 1], image[image.abs() >= 1])  # clipped: HU unknown, kept

    noisy = RandScannerHUd("image", windows, prob=1.0, noise_hu=40.0, offset_hu=0.0, gain=0.0)
    noisy.set_random_state(seed=4)
    out = noisy({"image": image})["image"]
    both = (image.abs() < 1).all(dim=0) & (out.abs() < 1).all(dim=0)
    noise = [(window_hu(out[c], c) - window_hu(image[c], c))[both] for c in range(2)]
    assert torch.allclose(noise[0], noise[1], atol=1e-2)  # the same noise field in HU through both
    assert 5 < float(noise[0].std()) < 40
