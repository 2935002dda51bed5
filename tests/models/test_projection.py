import torch

from models.projection import project, psnr
from models.stylegan import StyleGenerator


def test_projection_recovers_an_image_the_generator_can_draw():
    torch.manual_seed(0)
    G = StyleGenerator(z_dim=8, w_dim=8, resolution=16, img_channels=3, width=8, max_channels=16, mapping_layers=2).eval()
    with torch.no_grad():
        G.w_avg.copy_(G.mapping(torch.randn(256, 8)).mean(0))
        target = G(torch.randn(1, 8))[0]
        start = psnr(G.synthesis(G.w_avg[None, None].expand(1, G.num_ws, -1))[0], target)
    seen = []
    result = project(G.synthesis, target, G.w_avg, G.num_ws, steps=150, lr=0.05, progress=lambda step, loss: seen.append(step) or True)
    assert result.ws.shape == (G.num_ws, 8) and result.image.shape == (3, 16, 16)
    assert result.psnr > start + 5  # much closer than the average image
    assert seen == list(range(1, 151))


def test_projection_stops_when_progress_says_so():
    G = StyleGenerator(z_dim=8, w_dim=8, resolution=16, img_channels=3, width=4, max_channels=8, mapping_layers=2)
    result = project(G.synthesis, torch.zeros(3, 16, 16), G.w_avg, G.num_ws, steps=100, progress=lambda step, loss: step < 3)
    assert result.steps == 3
