"""Preset models: they build, train, save, and keep their bounds."""

import keras
import numpy as np
import pytest

from deel_lipdp_ext import DPParameters
from deel_lipdp_ext import layers as L
from deel_lipdp_ext.models import PRESETS, Recipe, recipe
from deel_lipdp_ext.sensitivity import gradient_norm_check

from .helpers import metadata, one_hot, unit_samples

SHAPES = {
    "scattering_mlp": (4, 4, 9),  # the features of 8x8 images, J = 1, L = 8
    "lipschitz_mlp": (8, 8, 1),
    "small_cnn": (8, 8, 1),
    "cifar_cnn": (16, 16, 3),  # 32x32 in use; smaller here for speed
}


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_presets_train_round_trip_and_keep_their_bounds(name, tmp_path):
    shape = SHAPES[name]
    meta = metadata(shape, 10, n=40, batch_size=20, sampling="shuffle")
    model = PRESETS[name](
        shape, 10, dp_parameters=DPParameters(1.0, 1e-5), dataset_metadata=meta
    )
    assert not model.compiled  # uncompiled, as keras.applications
    model.compile(**recipe(name).compile_arguments(meta))
    x, y = unit_samples(40, shape), one_hot(np.arange(40))
    model.fit(x, y, batch_size=20, epochs=1, verbose=0)
    report = gradient_norm_check(model, (x[:8] * 2.0, y[:8]))
    assert report.max_ratio <= 1 + 1e-4
    model.save(tmp_path / f"{name}.keras")
    loaded = keras.models.load_model(tmp_path / f"{name}.keras")
    np.testing.assert_allclose(
        loaded.predict(x[:4], verbose=0), model.predict(x[:4], verbose=0), atol=1e-5
    )


def test_recipes_pick_the_small_data_variant_and_build_what_they_say():
    large, small = recipe("small_cnn"), recipe("small_cnn", dataset_size=1437)
    assert isinstance(large, Recipe) and large.batch_size == 4096
    assert small.batch_size == 512 and small.model_arguments["channels"] == (8,)
    assert recipe("small_cnn", dataset_size=300).batch_size == 300  # capped
    meta = metadata((8, 8, 1), 10, n=1437, batch_size=small.batch_size)
    params = small.dp_parameters(delta=1e-5)
    assert params.noisify_strategy == "per-layer" and params.seed is None
    model = small.build(meta, params)
    convs = [c for c in model.dp_layers if isinstance(c, L.DP_SpectralConv2D)]
    assert [(c.filters, c.nm_coef) for c in convs] == [(8, 4.0)]
    assert isinstance(model.dp_layers[-1], L.DP_ClipGradient)
    assert model.dp_layers[-1].get_config()["clip_value"] == pytest.approx(0.05)
    args = small.compile_arguments(meta)
    assert args["loss"].tau == 64.0
    assert float(args["optimizer"].learning_rate) == pytest.approx(0.02)
    with pytest.raises(ValueError, match="preset"):
        recipe("resnet")
    with pytest.raises(ValueError, match="dataset_size"):
        recipe("small_cnn", dataset_size=0)


def test_the_scattering_recipe_trains_on_features_and_keeps_its_bounds():
    from deel_lipdp_ext.data import load_digits_dataset

    small = recipe("scattering_mlp", dataset_size=1437)
    assert recipe().preset == "scattering_mlp"  # the recommended preset
    assert small.features == {"J": 1, "L": 8, "groups": 3}
    assert recipe("scattering_mlp").features == {"J": 2, "L": 8, "groups": 9}
    assert recipe("small_cnn").feature_map() is None
    train, test, meta = load_digits_dataset(
        batch_size=small.batch_size, seed=0, feature_map=small.feature_map()
    )
    assert meta.input_shape == (4, 4, 9)
    model = small.build(meta, small.dp_parameters(delta=1e-5, seed=0))
    assert [type(layer).__name__ for layer in model.dp_layers] == [
        "DP_BoundedInput",
        "DP_Flatten",
        "DP_QuickSpectralDense",
        "DP_ClipGradient",
    ]
    model.set_noise_multiplier(
        model.privacy_plan.calibrate_noise_multiplier(3.0, 2, "pld")
    )
    model.compile(**small.compile_arguments(meta))
    model.fit(train, epochs=2, verbose=0)
    # the bounds hold on the features, test data and doubled (clipped) inputs
    assert gradient_norm_check(model, test).max_ratio <= 1 + 1e-4
    x, y = next(iter(test))
    assert gradient_norm_check(model, (x * 2.0, y)).max_ratio <= 1 + 1e-4
