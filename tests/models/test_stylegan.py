import numpy as np
import onnxruntime as ort
import pytest
import torch

from models.stylegan import MappingNetwork, MinibatchStdDev, ModulatedConv2d, ResidualDiscriminator, StyleGenerator


def small_generator(**kwargs) -> StyleGenerator:
    torch.manual_seed(0)
    return StyleGenerator(z_dim=16, w_dim=16, resolution=16, img_channels=3, width=8, max_channels=32, mapping_layers=2, **kwargs).eval()


def test_generator_maps_latents_through_w_to_images():
    G = small_generator()
    assert G.num_ws == 6
    images = G(torch.randn(3, 16))
    assert images.shape == (3, 3, 16, 16)


def test_demodulated_conv_outputs_unit_variance_whatever_the_style_scale():
    torch.manual_seed(0)
    conv = ModulatedConv2d(64, 64, 3, w_dim=8)
    x = torch.randn(4, 64, 16, 16)
    small, large = conv(x, torch.zeros(4, 8)), conv(x * 1.0, torch.full((4, 8), 3.0))
    assert small.std().item() == pytest.approx(1.0, abs=0.15)
    assert large.std().item() == pytest.approx(1.0, abs=0.15)


def test_activation_modulation_equals_per_sample_weight_modulation():
    """x·s then the static conv then ·d is the grouped-conv StyleGAN2 formula, rearranged."""
    torch.manual_seed(0)
    conv = ModulatedConv2d(5, 7, 3, w_dim=4)
    x, w = torch.randn(2, 5, 8, 8), torch.randn(2, 4)
    style = conv.affine(w)
    expected = []
    for i in range(2):
        weight = conv.weight * conv.scale * style[i][None, :, None, None]
        weight = weight * torch.rsqrt(weight.pow(2).sum(dim=(1, 2, 3), keepdim=True) + 1e-8)
        expected.append(torch.nn.functional.conv2d(x[i : i + 1], weight, padding=1))
    assert torch.allclose(conv(x, w), torch.cat(expected), atol=1e-5)


def test_conditional_mapping_needs_labels():
    mapping = MappingNetwork(8, 8, 2, num_classes=3)
    assert mapping(torch.randn(2, 8), torch.tensor([0, 2])).shape == (2, 8)
    with pytest.raises(ValueError, match="class labels"):
        mapping(torch.randn(2, 8))


def test_minibatch_stddev_is_zero_for_identical_samples():
    out = MinibatchStdDev(4)(torch.ones(8, 3, 4, 4))
    assert out.shape == (8, 4, 4, 4) and out[:, 3].abs().max() < 1e-3


def test_residual_discriminator_scores_images_with_and_without_projection():
    assert ResidualDiscriminator(16, 3, 8, 32)(torch.randn(4, 3, 16, 16)).shape == (4,)
    projected = ResidualDiscriminator(16, 3, 8, 32, num_classes=3)
    assert projected(torch.randn(4, 3, 16, 16), torch.tensor([0, 1, 2, 0])).shape == (4,)


def test_orig_synthesis_paints_with_one_torgb_driven_by_the_last_style():
    G = small_generator(synthesis_arch="orig")
    assert G.num_ws == 6 and len(G.synthesis.rgbs) == 1 and G.synthesis.rgb4 is None
    ws = torch.randn(2, G.num_ws, 16)
    with torch.no_grad():
        base = G.synthesis(ws)
        last_changed = ws.clone()
        last_changed[:, -1] = torch.randn(2, 16)
        # the last style reaches the image through the single ToRGB
        assert not torch.allclose(G.synthesis(last_changed), base)
    with pytest.raises(ValueError, match="skip or orig"):
        small_generator(synthesis_arch="resnet")


@pytest.mark.parametrize("arch", ["skip", "orig"])
def test_synthesis_exports_to_onnx_with_a_dynamic_batch(tmp_path, arch):
    G = small_generator(synthesis_arch=arch)
    ws = torch.randn(2, G.num_ws, 16)
    batch = torch.export.Dim("batch", min=1, max=1024)
    torch.onnx.export(G.synthesis, (ws,), str(tmp_path / "synthesis.onnx"), input_names=["ws"], output_names=["image"],
                      opset_version=18, dynamo=True, external_data=False, dynamic_shapes=({0: batch},), verbose=False)
    session = ort.InferenceSession(str(tmp_path / "synthesis.onnx"), providers=["CPUExecutionProvider"])
    for n in (1, 5):
        ws = torch.randn(n, G.num_ws, 16)
        with torch.no_grad():
            expected = G.synthesis(ws).numpy()
        got = session.run(None, {"ws": ws.numpy()})[0]
        assert np.abs(got - expected).max() < 1e-4
