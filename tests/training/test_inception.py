import pytest
import torch
from safetensors.torch import save_file

from models.inception import FIDInceptionV3
from training.metrics.inception_features import inception_features, load_fid_inception


def test_fid_inception_loads_user_weights_and_gives_2048_features(tmp_path):
    torch.manual_seed(0)
    reference = FIDInceptionV3().eval()
    path = tmp_path / "inception.safetensors"
    # a real weights file also carries the classifier head, which the loader ignores
    save_file({**reference.state_dict(), "fc.weight": torch.zeros(1008, 2048), "fc.bias": torch.zeros(1008)}, str(path))
    model = load_fid_inception(path)
    images = torch.rand(2, 3, 32, 32) * 2 - 1
    features = inception_features(model, images)
    assert features.shape == (2, 2048)
    with torch.no_grad():
        assert torch.allclose(torch.from_numpy(features).float(), reference(images), atol=1e-5)


def test_missing_inception_weights_give_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="cannot be downloaded"):
        load_fid_inception(None)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_fid_inception(tmp_path / "nope.pth")


def test_a_file_of_other_weights_is_refused(tmp_path):
    path = tmp_path / "other.safetensors"
    save_file({"layer.weight": torch.zeros(3)}, str(path))
    with pytest.raises(ValueError, match="not an FID InceptionV3"):
        load_fid_inception(path)
