import torch

from coalora.adapters.mapper import FIELDS, ConfigMapper

SIZES = {"bits": 4, "bits0": 4, "dtype1": 3, "block0": 3, "block1": 3, "position": 6, "module": 6}


def random_index(n: int, g: torch.Generator) -> torch.Tensor:
    cols = [torch.randint(0, SIZES[f], (n, 1), generator=g) for f in FIELDS]
    return torch.cat(cols, dim=1)  # (n, 7)


def test_batched_equals_per_layer():
    torch.manual_seed(0)
    mapper = ConfigMapper(SIZES, rank=4, init_std=0.1)
    idx = random_index(36, torch.Generator().manual_seed(1))
    batched = mapper(idx)  # (36, 4, 4)
    single = torch.stack([mapper(idx[i : i + 1])[0] for i in range(idx.shape[0])])
    torch.testing.assert_close(batched, single)
    assert batched.shape == (36, 4, 4)


def test_starts_near_identity():
    torch.manual_seed(0)
    mapper = ConfigMapper(SIZES, rank=8)
    m = mapper(random_index(10, torch.Generator().manual_seed(2)))
    assert (m - torch.eye(8)).abs().max() < 0.05


def test_zero_last_layer_gives_identity_and_gradients_reach_all_parts():
    mapper = ConfigMapper(SIZES, rank=4)
    torch.nn.init.zeros_(mapper.fc2.weight)
    idx = random_index(5, torch.Generator().manual_seed(3))
    assert torch.equal(mapper(idx), torch.eye(4).expand(5, 4, 4))
    torch.nn.init.normal_(mapper.fc2.weight, std=0.1)
    mapper(idx).pow(2).sum().backward()
    assert mapper.gamma.grad is not None and mapper.embeddings[0].weight.grad.abs().sum() > 0
