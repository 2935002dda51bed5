import pytest
import torch

from models import latent


@pytest.mark.parametrize("num_ws", [6, 8, 10, 12])
def test_named_ranges_partition_the_layers_coarse_to_fine(num_ws):
    ranges = [latent.named_layers(name, num_ws) for name in latent.RANGE_NAMES]
    assert sorted(i for r in ranges for i in r) == list(range(num_ws))
    assert all(ranges) and max(ranges[0]) < min(ranges[1]) <= max(ranges[1]) < min(ranges[2])


def test_explicit_layers_are_checked_against_the_network():
    assert latent.resolve_layers([3, 1, 3], 8) == [1, 3]
    with pytest.raises(ValueError, match="0..7"):
        latent.resolve_layers([8], 8)


def test_slerp_and_lerp_start_and_end_at_their_endpoints():
    a, b = torch.randn(16), torch.randn(16)
    t = latent.frame_times(5)
    for path in (latent.slerp(a, b, t), latent.lerp(a, b, t)):
        assert torch.allclose(path[0], a, atol=1e-5) and torch.allclose(path[-1], b, atol=1e-5)
    norms = latent.slerp(a, a * 1.0 + 1e-3, t).norm(dim=1)
    assert torch.allclose(norms, norms[0].expand_as(norms), rtol=1e-3)


def test_truncation_and_edit_and_mixing():
    w, avg = torch.randn(4, 8), torch.zeros(8)
    assert torch.equal(latent.truncate(w, avg, 1.0), w) and torch.equal(latent.truncate(w, avg, 0.0), avg.expand(4, 8))
    direction = torch.tensor([3.0, 4.0])
    moved = latent.edit(torch.zeros(2), direction, [0.0, 5.0])
    assert torch.allclose(moved, torch.tensor([[0.0, 0.0], [3.0, 4.0]]))
    a, b = torch.zeros(1, 4, 2), torch.ones(1, 4, 2)
    assert latent.mix_styles(a, b, [1, 2])[0, :, 0].tolist() == [0.0, 1.0, 1.0, 0.0]


@pytest.mark.parametrize("z_dim", [7, 16, 100, 512])
def test_a_seeds_latent_is_torch_randn_from_its_own_generator_whatever_is_drawn_beside_it(z_dim):
    """The documented way to reproduce a served image's z outside the service: torch.randn(z_dim)
    from a CPU generator seeded with the seed; batches stack the same rows."""
    seeds = [0, 1, 123, 2**40 + 3, 2**63 - 1]
    stacked = latent.seed_latents(z_dim, seeds)
    for row, seed in zip(stacked, seeds):
        expected = torch.randn(1, z_dim, generator=torch.Generator().manual_seed(seed))[0]
        assert torch.equal(row, expected) and torch.equal(latent.seed_latent(z_dim, seed), expected)
    assert torch.equal(latent.seed_latents(z_dim, seeds[2:3])[0], stacked[2])
