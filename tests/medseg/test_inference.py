"""Model specs, the model grid, Monte-Carlo statistics and inference on small synthetic volumes."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from scipy import ndimage

from dicom_io.volume import GeometryReport, ImageVolume, IntensityUnit, Modality, SeriesContext
from medseg.inference import borders_by_intensity, infer, label_map_on_source, largest_components_only
from medseg.model import Model, ModelProvenance, load_model, save_model
from medseg.model_spec import MODELS_DIR, ModelSpecError, Stochastic, load_spec, parse_spec
from medseg.networks import SegmentationNet, set_dropout_sampling
from medseg.preprocess import (
    ModelGrid,
    RuledScores,
    _model_axis_order,
    _model_positions,
    _sample_axes,
    argmax_to_source,
    body_mask,
    labels_to_model,
    map_to_source,
    plan_grid,
    to_model,
)
from medseg.synth import load_site, synthesize_case
from medseg.uncertainty import entropy
from tests.medseg.tiny_model import tiny_spec_data

DEFAULT_SPEC = MODELS_DIR / "default_ct.yaml"


def _spec_data() -> dict:
    return yaml.safe_load(DEFAULT_SPEC.read_text())


def _small_spec(**uncertainty: object) -> dict:
    data = tiny_spec_data()
    data["uncertainty"].update(uncertainty)
    return data


def _model(tmp_path: Path, **uncertainty: object) -> Model:
    return _model_from(tmp_path / "model", _small_spec(**uncertainty))


def _model_from(folder: Path, data: dict) -> Model:
    spec = parse_spec(data, "test")
    torch.manual_seed(0)
    provenance = ModelProvenance(source="test", training_data="none", seed=0, command="", weights_sha256="")
    return save_model(folder, spec, SegmentationNet(spec), provenance)


def _ct(array: np.ndarray, affine: np.ndarray, unit: IntensityUnit = IntensityUnit.HOUNSFIELD) -> ImageVolume:
    return ImageVolume(
        array=array.astype(np.float32),
        affine=affine,
        modality=Modality.CT,
        unit=unit,
        series=SeriesContext("1.2.3", "1.2.3.4", None, 1, "synthetic", "test", "p"),
        frames=(),
        geometry=GeometryReport(array.shape[0], 1.0, 1.0, 1.0, 0.0, ()),
    )


def _volume(matrix: int = 64, slices: int = 24) -> tuple[ImageVolume, np.ndarray]:
    case = synthesize_case(load_site("site_a"), 3, 0, matrix=matrix, slices=slices)
    return _ct(case.image, case.affine), case.labels


def _patient_on_a_table() -> tuple[ImageVolume, dict[str, tuple[int, int]]]:
    """A (24, 128, 128) CT at 1.5 mm pixels and 2 mm slices as a real scanner sees the patient: a body with
    two lungs and a gas bubble in it, an arm beside it, a foam mattress (-900 HU) under it and a 3 mm
    carbon table shell (+300 HU) under that; with the (row, column) of a point in each."""
    rows, cols = np.mgrid[0:128, 0:128]
    plane = np.full((128, 128), -1000.0)
    plane[((rows - 56) / 30) ** 2 + ((cols - 64) / 34) ** 2 <= 1] = 40.0
    for centre in (46, 82):  # the lungs
        plane[((rows - 50) / 12) ** 2 + ((cols - centre) / 10) ** 2 <= 1] = -850.0
    plane[(rows - 70) ** 2 + (cols - 64) ** 2 <= 16] = -1000.0  # gas in the bowel
    plane[(rows - 56) ** 2 + (cols - 114) ** 2 <= 64] = 40.0  # the arm, 12 mm from the body
    plane[88:100, 10:118] = -900.0
    plane[101:103, 10:118] = 300.0
    affine = np.array([[0, 0, 1.5, -96.0], [0, 1.5, 0, -96.0], [2.0, 0, 0, -24.0], [0, 0, 0, 1.0]])
    points = {
        "body": (60, 64),
        "lung": (50, 46),
        "gas": (70, 64),
        "arm": (56, 114),
        "mattress": (94, 64),
        "table": (102, 64),
        "room air": (10, 10),
    }
    return _ct(np.repeat(plane[None], 24, axis=0), affine), points


def test_body_mask_keeps_the_patient_and_leaves_out_table_mattress_and_room_air() -> None:
    volume, points = _patient_on_a_table()
    spec = load_spec(DEFAULT_SPEC)
    grid = plan_grid(volume.array.shape, volume.affine, spec)
    body = body_mask(volume, grid, -500.0, antialias=False)
    assert body.shape == grid.shape and body.dtype == torch.bool
    on_source = map_to_source(body.float(), grid) >= 0.5
    inside = {name: bool(on_source[12, row, col]) for name, (row, col) in points.items()}
    assert inside == {
        "body": True,
        "lung": True,
        "gas": True,
        "arm": True,
        "mattress": False,
        "table": False,
        "room air": False,
    }
    not_hu = _ct(volume.array, volume.affine, IntensityUnit.MR_STORED)
    assert body_mask(not_hu, grid, -500.0, antialias=False).all()  # no HU, no threshold to apply


@pytest.mark.parametrize("site", ["site_a", "site_b", "site_c", "site_d", "site_e"])
def test_body_mask_holds_every_labelled_voxel_of_a_synthetic_patient(site: str) -> None:
    """The mask must never cut the patient: on each site's phantom (lungs, bowel gas, 5 mm slices at
    site c) every voxel of the ground truth lies inside it."""
    case = synthesize_case(load_site(site), 7, 0, matrix=128, slices=40)
    volume = _ct(case.image, case.affine)
    spec = load_spec(DEFAULT_SPEC)
    grid = plan_grid(volume.array.shape, volume.affine, spec)
    assert spec.inference.body_threshold_hu is not None
    body = body_mask(volume, grid, spec.inference.body_threshold_hu, antialias=False)
    inside = map_to_source(body.float(), grid) >= 0.5
    assert inside[case.labels > 0].all()
    assert not inside.all()  # and it is not everything: the room air around the patient is out


def test_nothing_is_labelled_or_found_outside_the_body(tmp_path: Path) -> None:
    """The tiny untrained model labels voxels everywhere; with the spec's body threshold, none outside."""
    volume, _ = _patient_on_a_table()
    data = _small_spec(samples=3)
    data["preprocessing"]["spacing_mm"] = [3.0] * 3
    data["inference"]["body_threshold_hu"] = -500
    masked = infer(volume, _model_from(tmp_path / "masked", data))
    data["inference"]["body_threshold_hu"] = None
    unmasked = infer(volume, _model_from(tmp_path / "unmasked", data))
    assert unmasked.body is None and masked.body is not None
    outside = map_to_source(masked.body.float(), masked.grid) < 0.5
    assert unmasked.label_map[outside].any() and not masked.label_map[outside].any()
    for lesion in masked.lesions:  # every finding is centred where the patient is
        centre = np.linalg.solve(volume.affine, [*lesion.centre_lps, 1.0])[:3].round().astype(int)
        assert not outside[tuple(np.clip(centre, 0, np.array(volume.array.shape) - 1))]


def test_default_spec_is_valid_and_coded() -> None:
    spec = load_spec(DEFAULT_SPEC)
    assert spec.num_classes == 9 and all(label.category.scheme == "SCT" for label in spec.labels)
    assert [label.value for label in spec.labels] == list(range(1, 9))


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda d: d["network"].update(architecture="resnet"), r"network\.architecture"),
        (lambda d: d["network"]["arguments"].update(out_channels=3), "must not set"),
        (lambda d: d["labels"].pop(0), "label values must be 1..n"),
        (lambda d: d["preprocessing"]["intensity"].pop("CT"), "no transform for modalities"),
        (lambda d: d["inference"].update(roi_size=[90, 96, 96]), "multiple of 16"),
        (lambda d: d["labels"][0]["type"].update(value=""), r"labels\.0\.type\.value"),
        (lambda d: d["preprocessing"]["intensity"]["CT"][0].update(low=2000), "low < high"),
        (lambda d: d["labels"][7].update(single_component=True), "focal .* and single_component"),
        (lambda d: d["inference"].update(body_threshold_hu=200), r"inference\.body_threshold_hu"),
        (lambda d: d["labels"][6].update(border_intensity={}), r"labels\.6\.border_intensity"),
        (lambda d: d["labels"][6].update(border_intensity={"min_hu": 300, "max_hu": 200}), "min_hu < max_hu"),
        (lambda d: d["labels"][6].update(border_intensity={"min_hu": 200, "band": 0.5}), "band"),
        (lambda d: d.update(modalities=["MR"]), "border_intensity is in HU"),
        (
            lambda d: d["labels"][6]["border_intensity"].update(rivals=["Lungs"]),
            r"\['Lungs'\] are not labels",
        ),
    ],
)
def test_bad_spec_names_the_field(change, message: str) -> None:
    data = _spec_data()
    change(data)
    with pytest.raises(ModelSpecError, match=message):
        parse_spec(data, "bad.yaml")


def test_unbuildable_network_is_a_spec_error() -> None:
    data = _small_spec()
    data["network"]["arguments"]["bogus"] = 1
    with pytest.raises(ModelSpecError, match="cannot build unet"):
        SegmentationNet(parse_spec(data, "bad.yaml"))


def test_chunk_statistics_match_a_direct_computation() -> None:
    """Mean, focal variance, mutual information and labels against softmax / var / argmax written out."""
    from medseg.uncertainty import chunk_statistics

    torch.manual_seed(0)
    logits = torch.randn(9, 10, 500) * 3  # (classes, samples, voxels)
    stats = chunk_statistics(logits, [8])
    p = torch.softmax(logits, dim=0)
    mean = p.mean(dim=1)
    expected_mi = entropy(mean, dim=0) - entropy(p, dim=0).mean(dim=0)
    torch.testing.assert_close(stats.mean, mean)
    torch.testing.assert_close(stats.focal_variance[0], p[8].var(dim=0))
    torch.testing.assert_close(stats.mutual_information, expected_mi.clamp_min(0), atol=1e-5, rtol=1e-4)
    labels = logits.argmax(dim=0)
    torch.testing.assert_close(stats.onehot.argmax(dim=0), labels)
    assert torch.all(stats.onehot.sum(dim=0) == 1)


def test_entropy_in_nats() -> None:
    p = torch.tensor([[0.5, 0.5], [1.0, 0.0]])
    torch.testing.assert_close(entropy(p, dim=1), torch.tensor([math.log(2), 0.0]), atol=1e-6, rtol=0)


def test_dropout_sampling_keeps_norms_in_eval_mode(tmp_path: Path) -> None:
    net = _model(tmp_path).network
    set_dropout_sampling(net, enabled=True)
    modes = {type(m).__name__: m.training for m in net.modules()}
    assert modes["Dropout3d"] is True and modes["InstanceNorm3d"] is False and modes["Conv3d"] is False


def test_grid_round_trip_lands_on_the_same_world_positions(tmp_path: Path) -> None:
    spec = parse_spec(_small_spec(), "t")
    affine = np.array([[0, 0, -0.9, 120.0], [0, -0.9, 0, 80.0], [-3.0, 0, 0, 50.0], [0, 0, 0, 1.0]])
    grid = plan_grid((20, 64, 60), affine, spec)
    # resample each world coordinate (linear in the index) onto the model grid: away from the borders,
    # trilinear interpolation is exact, so it must equal what grid.affine says for every model voxel
    shape = (20, 64, 60)
    index = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), axis=-1).astype(np.float64)
    world = index @ affine[:3, :3].T + affine[:3, 3]
    model_index = np.stack(np.meshgrid(*[np.arange(n) for n in grid.shape], indexing="ij"), axis=-1)
    expected = model_index @ grid.affine[:3, :3].T + grid.affine[:3, 3]
    inner = tuple(slice(1, n - 1) for n in grid.shape)
    for axis in range(3):
        source = torch.from_numpy(world[..., axis].astype(np.float32))[None]
        on_grid = _model_axis_order(_sample_axes(source, _model_positions(grid)), grid.ornt)[0].numpy()
        np.testing.assert_allclose(on_grid[inner], expected[..., axis][inner], atol=1e-3)
    labels = np.zeros((20, 64, 60), np.uint8)
    labels[4:16, 8:56, 8:52] = 1
    on_model = labels_to_model(labels, grid)
    assert on_model.shape[1:] == grid.shape
    probs = torch.stack([1.0 - on_model[0].float(), on_model[0].float()])
    back = argmax_to_source(probs, grid)
    assert back.shape == labels.shape
    dice = 2 * np.sum((back == 1) & (labels == 1)) / (np.sum(back == 1) + np.sum(labels == 1))
    assert dice > 0.8  # 6 mm model voxels on a 3 x 0.9 x 0.9 mm grid: only the edges may move
    centroid = [affine[:3, :3] @ np.argwhere(m == 1).mean(0) + affine[:3, 3] for m in (labels, back)]
    # nearest-neighbour labels move each box edge by under half a model voxel (3 mm here); the exact
    # no-shift check is on linear images (test_to_model_and_back_follow_world_coordinates)
    np.testing.assert_allclose(centroid[0], centroid[1], atol=0.5 * max(grid.spacing_mm))
    assert map_to_source(on_model[0].float(), grid).shape == labels.shape


@pytest.mark.parametrize(
    "affine",
    [
        [[0, 0, -0.9, 120.0], [0, -0.9, 0, 80.0], [-3.0, 0, 0, 50.0], [0, 0, 0, 1.0]],  # axial, head first
        [[0.8, 0, 0, 10.0], [0, 0, 2.0, 20.0], [0, -0.7, 0, 30.0], [0, 0, 0, 1.0]],  # coronal-like
        [[0, 0.7, 0, 0], [-0.7, 0, 0, 40.0], [0, 0, 2.5, 0], [0, 0, 0, 1.0]],  # columns along -x
    ],
)
def test_to_model_and_back_follow_world_coordinates(affine: list[list[float]]) -> None:
    """Resampled before or after reorienting, every model voxel holds the value at its world position.

    The image is one world coordinate (linear, so trilinear interpolation is exact away from the
    borders): the model image must equal it at ``grid.affine`` positions, and a model-grid map of it
    must come back onto the source grid as the source's own coordinate; all three axes in turn."""
    volume, _ = _volume(matrix=48, slices=20)
    matrix = np.array(affine)
    index = np.stack(np.meshgrid(*[np.arange(n) for n in volume.array.shape], indexing="ij"), axis=-1)
    world = (index @ matrix[:3, :3].T + matrix[:3, 3]).astype(np.float32)
    spec = parse_spec(_small_spec(), "t")
    for axis in range(3):
        source = ImageVolume(**{**volume.__dict__, "array": world[..., axis].copy(), "affine": matrix})
        model_input = to_model(source, spec)
        grid = model_input.grid
        model_index = np.stack(np.meshgrid(*[np.arange(n) for n in grid.shape], indexing="ij"), axis=-1)
        expected = (model_index @ grid.affine[:3, :3].T + grid.affine[:3, 3])[..., axis]
        inner = tuple(slice(1, n - 1) for n in grid.shape)
        hu = model_input.image[0].numpy() * 700.0 - 300.0  # undo the CT window [-1000, 400]
        np.testing.assert_allclose(hu[inner], expected[inner], atol=1e-2)
        back = map_to_source(torch.from_numpy(expected.astype(np.float32)), grid)
        shape = volume.array.shape
        edge = [max(2, int(np.ceil(n / m))) for n, m in zip(shape, _source_shape(grid), strict=True)]
        source_inner = tuple(slice(e, n - e) for e, n in zip(edge, shape, strict=True))
        np.testing.assert_allclose(back[source_inner], world[..., axis][source_inner], atol=1e-2)


@pytest.mark.parametrize("smoothing", [False, True])
@pytest.mark.parametrize(
    "affine",
    [
        [[0, 0, -0.9, 120.0], [0, -0.9, 0, 80.0], [-3.0, 0, 0, 50.0], [0, 0, 0, 1.0]],  # axial, head first
        [[0.8, 0, 0, 10.0], [0, 0, 2.0, 20.0], [0, -0.7, 0, 30.0], [0, 0, 0, 1.0]],  # coronal-like
    ],
)
def test_model_grid_and_voxels_are_monai_spacing_ones(affine: list[list[float]], smoothing: bool) -> None:
    """The MONAI recipe (Orientation LPS, ScaleIntensityRange per window, with ``smooth_before_shrinking``
    GaussianSmooth with edge padding, Spacing) gives the same grid (shape and affine) and the same voxel
    values, borders and clipped values included, as ``to_model``."""
    from monai.data import MetaTensor
    from monai.transforms import BorderPad, GaussianSmooth, Orientation, ScaleIntensityRange, Spacing

    rng = np.random.default_rng(0)
    matrix = np.array(affine)
    volume, _ = _volume(matrix=48, slices=20)
    smooth = rng.uniform(-1200, 600, (5, 7, 6)).astype(np.float32)  # beyond the window: clipped first
    image = torch.nn.functional.interpolate(
        torch.from_numpy(smooth)[None, None], size=volume.array.shape, mode="trilinear"
    )[0, 0].numpy()
    image += rng.normal(0, 40, image.shape).astype(np.float32)  # voxel noise: what the smoothing is for
    source = ImageVolume(**{**volume.__dict__, "array": image, "affine": matrix})
    data = _small_spec()
    data["preprocessing"]["smooth_before_shrinking"] = smoothing
    spec = parse_spec(data, "t")
    ours = to_model(source, spec)
    ras_affine = np.diag([-1.0, -1.0, 1.0, 1.0]) @ matrix  # MONAI's affines are RAS, ours LPS
    monai_image = Orientation(axcodes="LPS")(MetaTensor(torch.tensor(image)[None], affine=ras_affine))
    windows = spec.preprocessing.intensity[Modality.CT]
    scaled = torch.cat(
        [
            ScaleIntensityRange(a_min=w.low, a_max=w.high, b_min=-1.0, b_max=1.0, clip=True)(monai_image)
            for w in windows
        ]
    )
    step = np.asarray(spec.preprocessing.spacing_mm) / np.asarray(monai_image.pixdim)
    sigma = [(s - 1) / 2 if smoothing else 0.0 for s in step]  # sigma 0: MONAI's kernel is [1], no change
    border = [int(4 * s + 0.5) for s in sigma]  # the kernel's reach, padded with edge values
    padded = BorderPad(spatial_border=border, mode="replicate")(scaled)
    smoothed = torch.as_tensor(GaussianSmooth(sigma=sigma)(padded))
    inner = (slice(None), *(slice(b, b + n) for b, n in zip(border, scaled.shape[1:], strict=True)))
    unpadded = MetaTensor(smoothed[inner], affine=scaled.affine)
    theirs = Spacing(pixdim=spec.preprocessing.spacing_mm, mode="bilinear")(unpadded)
    assert theirs.shape == ours.image.shape
    np.testing.assert_allclose(np.diag([-1.0, -1.0, 1.0, 1.0]) @ ours.grid.affine, theirs.affine, atol=1e-4)
    np.testing.assert_allclose(ours.image.numpy(), np.asarray(theirs), atol=1e-4)


def test_to_model_smooths_noise_before_shrinking() -> None:
    """Uniform tissue with voxel noise: point sampling at 6 mm would keep the noise; the smoothed
    sampling keeps its mean and cuts its spread by far more than half."""
    rng = np.random.default_rng(1)
    volume, _ = _volume(matrix=48, slices=20)
    image = (40.0 + rng.normal(0, 30, volume.array.shape)).astype(np.float32)
    fine = np.diag([2.0, 0.8, 0.8, 1.0])  # 2 mm slices of 0.8 mm voxels: every axis shrinks to 6 mm
    source = ImageVolume(**{**volume.__dict__, "array": image, "affine": fine})
    spreads = {}
    for smooth in (False, True):
        data = _small_spec()
        data["preprocessing"]["smooth_before_shrinking"] = smooth
        soft_tissue = to_model(source, parse_spec(data, "t")).image[1].numpy()  # -160..240 HU: no clipping
        hu = soft_tissue * 200.0 + 40.0
        assert abs(float(hu.mean()) - 40.0) < 2.0
        spreads[smooth] = float(hu.std())
    assert spreads[False] > 0.6 * 30.0 and spreads[True] < 0.3 * 30.0


def _source_shape(grid: ModelGrid) -> tuple[int, ...]:
    return tuple(grid.shape[int(grid.ornt[axis, 0])] for axis in range(3))


def test_mc_inference_is_seeded_and_typed(tmp_path: Path) -> None:
    model = _model(tmp_path, samples=4, dropout=0.5)
    volume, _ = _volume()
    first = infer(volume, model, seed=5)
    again = infer(volume, model, seed=5)
    other = infer(volume, model, seed=6)
    assert first.label_map.shape == volume.array.shape and first.label_map.dtype == np.uint8
    np.testing.assert_array_equal(first.mutual_information, again.mutual_information)
    assert not np.array_equal(first.mutual_information, other.mutual_information)
    assert first.mutual_information.max() > 0 and np.all(first.entropy >= first.mutual_information - 1e-5)
    assert [m.label for m in first.structures] == list(range(1, 9))
    assert all(0 <= m.sample_agreement <= 1 for m in first.structures)


def test_head_sampling_equals_explicit_dropout_masks(tmp_path: Path) -> None:
    """Stacked masked weights give exactly what dropout on the features followed by the head gives."""
    from medseg.uncertainty import MonteCarloSampler

    model = _model(tmp_path, samples=3, dropout=0.5)
    net = model.network.eval()
    sampler = MonteCarloSampler(
        net,
        samples=3,
        stochastic=Stochastic.HEAD,
        num_classes=9,
        weights=torch.ones(32, 32, 32),
        generator=torch.Generator().manual_seed(1),
    )
    x = torch.randn(1, model.spec.preprocessing.input_channels, 32, 32, 32)
    with torch.no_grad():
        features = net.features(x)
        fast = sampler._head_logits(features[0].reshape(features.shape[1], -1), slice(None))
        assert sampler.head_weights is not None
        for s in range(3):
            keep = (sampler.head_weights[s].abs().sum(0) > 0).float() / 0.5
            slow = net.classifier(features * keep.reshape(1, -1, 1, 1, 1))
            torch.testing.assert_close(fast[:, s], slow.reshape(9, -1), atol=1e-4, rtol=1e-4)


def test_sampler_window_statistics_equal_the_samples_written_out(tmp_path: Path) -> None:
    """Chunked statistics of one window (8 chunks) against all samples' softmax computed at once."""
    from medseg.uncertainty import MonteCarloSampler

    model = _model(tmp_path, samples=5, dropout=0.5)
    net = model.network.eval()
    weights = torch.full((32, 32, 32), 0.5)
    sampler = MonteCarloSampler(
        net,
        samples=5,
        stochastic=Stochastic.HEAD,
        num_classes=9,
        weights=weights,
        generator=torch.Generator().manual_seed(3),
        focal_labels=[8],
    )
    x = torch.randn(1, model.spec.preprocessing.input_channels, 32, 32, 32)
    location = [slice(None), slice(None), slice(0, 32), slice(0, 32), slice(0, 32)]
    with torch.no_grad():
        out = sampler(x, [location])[0]
        assert sampler.head_weights is not None
        features = net.features(x)[0]
        logits = torch.einsum("scf,fxyz->scxyz", sampler.head_weights, features)
        logits = logits + net.classifier.bias[None, :, None, None, None]
    p = torch.softmax(logits, dim=1)  # (samples, classes, X, Y, Z)
    labels = logits.argmax(dim=1)
    channels = sampler.channels
    torch.testing.assert_close(channels.mean(out), p.mean(0), atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(channels.focal_variance(out, 0), p[:, 8].var(0), atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(channels.votes(out, 0), (labels == 8).float().mean(0))
    expected_volumes = torch.stack([(labels == c).flatten(1).sum(1) for c in range(9)], dim=1) * 0.5
    torch.testing.assert_close(sampler.volumes, expected_volumes.double())
    both = (labels[0] == 1) & (labels[1] == 1)
    assert float(sampler.overlaps[1, 0, 1]) == pytest.approx(0.5 * float(both.sum()))


def test_one_sample_is_deterministic_with_no_epistemic_part(tmp_path: Path) -> None:
    model = _model(tmp_path, samples=4)
    volume, _ = _volume()
    single = infer(volume, model, samples=1)
    assert float(single.mutual_information.max()) < 1e-5
    assert all(m.sample_agreement == 1.0 and m.volume_spread_ml == 0.0 for m in single.structures)


def test_wrong_modality_is_refused(tmp_path: Path) -> None:
    model = _model(tmp_path)
    volume, _ = _volume()
    mr = ImageVolume(**{**volume.__dict__, "modality": Modality.MR, "unit": IntensityUnit.MR_STORED})
    with pytest.raises(ModelSpecError, match="modality MR is not handled by model default_ct"):
        to_model(mr, model.spec)


def test_model_folder_detects_changed_weights(tmp_path: Path) -> None:
    model = _model(tmp_path)
    loaded = load_model(model.folder)
    assert loaded.device_uid == model.device_uid
    (model.folder / "weights.pt").write_bytes((model.folder / "weights.pt").read_bytes() + b"x")
    with pytest.raises(ModelSpecError, match="SHA-256"):
        load_model(model.folder)
    with pytest.raises(ModelSpecError, match="no shipped model of that name"):
        load_model("no_such_model")


def test_lesion_findings_from_votes_and_moments() -> None:
    from medseg.lesions import lesion_findings
    from medseg.model_spec import ReviewSpec

    spec = parse_spec(_small_spec(), "t")
    grid = plan_grid((30, 30, 30), np.diag([2.0, 2.0, 2.0, 1.0]), spec.model_copy(update={}))
    shape = grid.shape
    p, var, votes = torch.zeros(shape), torch.zeros(shape), torch.zeros(shape)
    votes[2:4, 2:4, 2:4] = 1.0  # found by every sample
    votes[1, 2:4, 2:4] = 0.3  # some samples reach one voxel further
    p[2:4, 2:4, 2:4] = 0.9
    var[2:4, 2:4, 2:4] = 0.01
    votes[7, 7, 7] = 0.1  # one sample in ten: dropped as noise
    votes[8, 1, 8] = 0.4  # a doubtful one
    p[8, 1, 8] = 0.45
    var[8, 1, 8] = 0.09
    findings = lesion_findings(p, var, votes, grid, ReviewSpec())
    assert len(findings) == 2
    sure, doubtful = findings
    assert sure.index == 1 and sure.detection_rate == 1.0 and sure.score == pytest.approx(0.9)
    assert not sure.needs_review and sure.box_spread_mm > 0
    assert sure.box_min_lps[0] < sure.centre_lps[0] < sure.box_max_lps[0]
    assert doubtful.needs_review and doubtful.detection_rate == pytest.approx(0.4)
    assert doubtful.score_spread == pytest.approx(0.3)


def test_lesion_finding_in_the_grid_overhang_is_centred_on_the_scan() -> None:
    """The model grid can reach past the last source slice; a finding there stays on the source grid.

    21 voxels of 2 mm on a 6 mm grid: 8 model voxels, the last one at source index 21 (one past the end),
    where the SR's key slice would not exist."""
    from medseg.lesions import lesion_findings
    from medseg.model_spec import ReviewSpec

    spec = parse_spec(_small_spec(), "t")
    grid = plan_grid((21, 21, 21), np.diag([2.0, 2.0, 2.0, 1.0]), spec)
    assert grid.shape[0] == 8 and grid.last_source_index[0] == pytest.approx(20 / 3)
    p, var, votes = torch.zeros(grid.shape), torch.zeros(grid.shape), torch.zeros(grid.shape)
    votes[7, 3:5, 3:5] = 1.0
    p[7, 3:5, 3:5] = 0.9
    (finding,) = lesion_findings(p, var, votes, grid, ReviewSpec())
    assert finding.centre_lps[0] == pytest.approx(40.0)  # the last source slice (index 20), not 42 mm
    assert finding.centre_lps[1] == pytest.approx(3.5 * 6.0)  # in-plane centre untouched
    assert finding.box_max_lps[0] > 40.0  # the box still shows where the region was


def test_label_map_alignment_flips_and_refuses(tmp_path: Path) -> None:
    from medseg.preprocess import align_to_volume

    volume, labels = _volume(matrix=32, slices=8)
    flip = np.diag([-1.0, 1.0, 1.0, 1.0])
    flip[0, 3] = 7
    flipped_affine = volume.affine @ flip
    np.testing.assert_array_equal(
        align_to_volume(labels[::-1], flipped_affine, volume, what="case x"), labels
    )
    with pytest.raises(ValueError, match=r"case x: label map grid .* does not lie on series"):
        align_to_volume(labels[:, :16], volume.affine, volume, what="case x")


def test_short_scans_are_padded_with_air_not_zero() -> None:
    """A 0 in window units is -300 HU: a slab of it around a short scan made the model call air lung."""
    from medseg.preprocess import pad_to_roi

    image = torch.full((1, 1, 40, 40, 10), 0.5)
    image[..., 0, 0, 0] = -1.0
    padded, crop = pad_to_roi(image, (32, 32, 32))
    assert padded.shape[2:] == (40, 40, 32)
    assert float(padded[0, 0, 0, 0, 0]) == -1.0 and float(padded[0, 0, 20, 20, 31]) == -1.0
    torch.testing.assert_close(padded[(0, slice(None), *crop)], image[0])


def test_stray_island_of_a_single_component_organ_goes_to_the_next_class() -> None:
    probabilities = torch.zeros(4, 12, 12, 12)
    probabilities[0] = 0.6
    probabilities[1, 1:7, 1:7, 1:7] = 0.9  # the organ: 216 voxels
    probabilities[1, 9:11, 9:11, 9:11] = 0.9  # an island of 8 voxels, apart from it
    probabilities[2, 9:11, 9:11, 9:11] = 0.7  # the runner-up there (not background)
    probabilities[3, 0:2, 9:11, 0:2] = 0.9  # two islands of a label that may have many parts
    probabilities[3, 9:11, 0:2, 9:11] = 0.9
    kept = largest_components_only(probabilities, (1, 2))
    winner = kept.argmax(dim=0)
    assert (winner == 1).sum() == 216
    assert (winner[9:11, 9:11, 9:11] == 2).all()
    assert (winner == 3).sum() == 16
    assert torch.equal(probabilities[1, 9, 9, 9], torch.tensor(0.9))  # the caller's tensor is untouched
    assert largest_components_only(probabilities, ()) is probabilities


def _dice(prediction: np.ndarray, truth: np.ndarray) -> float:
    return float(2 * np.sum(prediction & truth) / (np.sum(prediction) + np.sum(truth)))


def test_bone_border_decided_by_hu_draws_a_rib_the_model_grid_cannot() -> None:
    """A 5 mm rib (600 HU) and a vertebral body (600 HU cortex around 150 HU marrow) in soft tissue,
    scored as a well-trained network would score them on default_ct's 3 mm grid (the share of each model
    voxel that is bone): the argmax alone draws the rib blocky; with the spec's bone rule the source
    voxels' HU draws it. A bright vessel (300 HU) away from bone and the marrow deep inside the vertebra
    keep the network's decision; a volume not in HU, or one coarser than the model grid, gets the plain
    argmax."""
    spec = load_spec(DEFAULT_SPEC)
    bone = next(label.value for label in spec.labels if label.name == "Bone")
    assert spec.border_rules[bone].min_hu == 200
    affine = np.array([[0, 0, -0.7, 60.0], [0, -0.7, 0, 40.0], [-1.0, 0, 0, 30.0], [0, 0, 0, 1.0]])
    slices, rows, cols = np.mgrid[0:40, 0:80, 0:80].astype(np.float64)
    rib = (slices - 20.3) ** 2 + ((rows - 20.4) * 0.7) ** 2 <= 2.5**2  # along the columns
    axial = ((rows - 58) * 0.7) ** 2 + ((cols - 40) * 0.7) ** 2  # a vertebra along the slices
    vertebra, marrow = axial <= 12.0**2, axial <= 9.0**2
    vessel = ((rows - 40) * 0.7) ** 2 + ((cols - 70) * 0.7) ** 2 <= 3.0**2  # along the slices, 10 mm clear
    truth = rib | vertebra
    hu = np.where(truth, 600.0, 40.0)
    hu[marrow] = 150.0
    hu[vessel] = 300.0
    volume = _ct(hu, affine)
    grid = plan_grid(hu.shape, affine, spec)
    share = ndimage.uniform_filter(truth.astype(np.float32), size=(3, 4, 4))  # 3 mm boxes
    on_grid = _model_axis_order(
        _sample_axes(torch.from_numpy(share)[None], _model_positions(grid)), grid.ornt
    )[0]
    scores = torch.zeros(spec.num_classes, *grid.shape)
    scores[0] = 1.0 - on_grid
    scores[bone] = on_grid
    plain = argmax_to_source(scores, grid) == bone
    ruled = label_map_on_source(scores, grid, volume, spec) == bone
    assert _dice(ruled & ~vertebra, rib) > 0.95 > _dice(plain & ~vertebra, rib) + 0.1
    assert _dice(ruled, truth) > _dice(plain, truth)
    assert not (ruled & vessel).any()
    deep = axial <= 7.0**2  # marrow more than a model voxel and a half inside: the network decides alone
    assert ruled[deep].all() and plain[deep].all()
    # marrow nearer the surface than that, under 200 HU, is left out (what the rule cannot know)
    assert not ruled[marrow & ~deep].all()
    not_hu = _ct(hu, affine, IntensityUnit.MR_STORED)
    np.testing.assert_array_equal(
        label_map_on_source(scores, grid, not_hu, spec), argmax_to_source(scores, grid)
    )
    thick = affine.copy()
    thick[2, 0] = -5.0  # the same voxels as 5 mm slices, coarser than the 3 mm grid along one axis
    coarse = plan_grid(hu.shape, thick, spec)
    assert grid.source_at_least_as_fine and not coarse.source_at_least_as_fine
    coarse_scores = torch.zeros(spec.num_classes, *coarse.shape)
    coarse_scores[0], coarse_scores[bone] = 0.5, 0.4  # with the rule, every voxel >= 200 HU would be bone
    plain_coarse = argmax_to_source(coarse_scores, coarse)
    assert not (plain_coarse == bone).any()
    np.testing.assert_array_equal(
        label_map_on_source(coarse_scores, coarse, _ct(hu, thick), spec), plain_coarse
    )


def test_border_rule_lets_hu_choose_between_a_label_and_its_rival_only_where_both_are_plausible() -> None:
    data = _spec_data()
    data["labels"][0]["border_intensity"] = {"max_hu": 100, "band": 0.1}  # a liver rule, to test max_hu
    spec = parse_spec(data, "test")
    bone, lung, spleen, liver = 7, 6, 2, 1
    scores = torch.zeros(spec.num_classes, 8, 1, 1)
    cases = [  # (bone, rival class, rival score, HU) -> expected label
        (0.6, 0, 0.4, 100.0, 0),  # bone by a nose, too faint for bone: background
        (0.3, 0, 0.7, 500.0, bone),  # background by the network, bright: bone
        (0.99, 0, 0.01, 100.0, bone),  # inside bone (marrow): the network alone
        (0.01, 0, 0.99, 400.0, 0),  # a bright vessel far from bone: the network alone
        (0.4, lung, 0.6, 300.0, bone),  # the rival is lung, not background
        (0.45, lung, 0.55, -800.0, lung),
        (0.3, spleen, 0.7, 500.0, spleen),  # not one of bone's rivals: HU proves nothing against it
    ]
    for i, (bone_score, rival, rival_score, _, _) in enumerate(cases):
        scores[bone, i] = bone_score
        scores[rival, i] += rival_score
    scores[liver, 7] = 0.6  # liver with background beside it: too bright for its rule
    scores[0, 7] = 0.4
    hu = np.array([c[3] for c in cases] + [150.0], dtype=np.float32).reshape(8, 1, 1)
    label = borders_by_intensity(RuledScores.of(scores, list(spec.border_rules)), hu, spec)
    assert label.ravel().tolist() == [c[4] for c in cases] + [0]
