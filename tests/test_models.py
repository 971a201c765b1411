import time

import pytest
import timm
import torch
from safetensors.torch import save_file

from ptq.models import ModelLoadError, load_model, read_state_dict


def test_unknown_model_names_the_closest_timm_models():
    with pytest.raises(ModelLoadError, match="closest timm names: resnet18"):
        load_model("resnet_18")


def test_missing_weights_offline_fail_fast_naming_checkpoint():
    start = time.perf_counter()
    with pytest.raises(ModelLoadError, match="--checkpoint"):
        load_model("resnet18")
    assert time.perf_counter() - start < 10


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_checkpoint_file_is_loaded_with_its_head_shape(tmp_path, suffix):
    torch.manual_seed(0)
    src = timm.create_model("test_resnet", num_classes=7).eval()
    path = tmp_path / f"w{suffix}"
    if suffix == ".safetensors":
        save_file(src.state_dict(), str(path))
    else:
        torch.save({"state_dict": src.state_dict()}, path)
    model, data_config = load_model("test_resnet", checkpoint=path)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(model(x), src(x))
    assert data_config["input_size"] == (3, 160, 160)
    assert not model.training


def test_bad_checkpoints_error_clearly(tmp_path):
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_model("test_resnet", checkpoint=tmp_path / "nope.pth")
    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(ModelLoadError, match="could not be read"):
        read_state_dict(bad)
    other = tmp_path / "other.safetensors"
    save_file(timm.create_model("test_efficientnet").state_dict(), str(other))
    with pytest.raises(ModelLoadError, match="does not match the model architecture"):
        load_model("test_resnet", checkpoint=other)


def test_offline_lite0_weights_are_real_imagenet_weights(samples_dir):
    model, data_config = load_model("tf_efficientnet_lite0")
    assert "offline weights" in model.ptq_weights_source
    assert data_config["interpolation"] == "bicubic" and data_config["mean"] == (0.5, 0.5, 0.5)
    from ptq.data import ImageFolder

    ds = ImageFolder(samples_dir, data_config)
    idx = {p.stem: i for i, p in enumerate(ds.images)}
    x = torch.stack([ds[idx["chelsea_full"]][0], ds[idx["coffee_full"]][0]])
    with torch.no_grad():
        top = model(x).argmax(1).tolist()
    assert 281 <= top[0] <= 285  # a domestic cat class
    assert top[1] == 967  # espresso


def test_checkpoint_header_carries_its_data_config(tmp_path):
    import json

    src = timm.create_model("test_resnet", num_classes=10, in_chans=1)
    path = tmp_path / "digits.safetensors"
    cfg = {"input_size": [1, 32, 32], "mean": [0.5], "std": [0.5], "crop_pct": 1.0}
    save_file(src.state_dict(), str(path), metadata={"pretrained_cfg": json.dumps(cfg)})
    model, data_config = load_model("test_resnet", checkpoint=path)
    assert data_config["input_size"] == (1, 32, 32) and data_config["mean"] == (0.5,)
    assert model.num_classes == 10
