"""Batch mixup: partners, weights, untouched samples, determinism, devices."""
import pytest
import torch

from distill.data.mixup import mixup_batch

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("device", DEVICES)
def test_partners_and_weights(device):
    torch.manual_seed(0)
    for trial in range(20):
        batch = 16
        images = torch.rand(batch, 3, 8, 8, device=device)
        mask = torch.rand(batch, device=device) < 0.5
        mask[trial % batch] = True
        mask[(trial + 3) % batch] = True  # at least two mixed samples
        mixed, partner, lam = mixup_batch(images, mask)
        assert partner.dtype == torch.long and partner.shape == (batch,) and lam.shape == (batch,)
        m = mask.cpu()
        p, lam_c = partner.cpu(), lam.cpu()
        idx = torch.arange(batch)
        # unmasked: self, weight 1, exact pixels
        assert torch.equal(p[~m], idx[~m]) and (lam_c[~m] == 1).all()
        assert torch.equal(mixed[~mask], images[~mask])
        # masked: another masked sample, each masked sample is somebody's partner once
        assert m[p[m]].all() and (p[m] != idx[m]).all()
        assert sorted(p[m].tolist()) == idx[m].tolist()
        assert ((lam_c[m] >= 0) & (lam_c[m] <= 1)).all()
        expected = lam.view(-1, 1, 1, 1) * images + (1 - lam.view(-1, 1, 1, 1)) * images[partner]
        assert torch.allclose(mixed[mask], expected[mask], atol=1e-6)


def test_weights_are_uniform_over_unit_interval():
    torch.manual_seed(1)
    mask = torch.ones(20000, dtype=torch.bool)
    _, _, lam = mixup_batch(torch.zeros(20000, 1, 1, 1), mask)
    assert abs(lam.mean().item() - 0.5) < 0.02 and abs((lam < 0.1).float().mean().item() - 0.1) < 0.02


def test_edge_cases_and_generator():
    images = torch.rand(6, 3, 4, 4)
    none = torch.zeros(6, dtype=torch.bool)
    mixed, partner, lam = mixup_batch(images, none)
    assert torch.equal(mixed, images) and torch.equal(partner, torch.arange(6)) and (lam == 1).all()
    one = none.clone()
    one[2] = True
    mixed, partner, _ = mixup_batch(images, one)
    assert partner[2] == 2 and torch.allclose(mixed, images)  # mixing with itself changes nothing
    mask = torch.tensor([1, 0, 1, 1, 0, 1], dtype=torch.bool)
    a = mixup_batch(images, mask, torch.Generator().manual_seed(3))
    b = mixup_batch(images, mask, torch.Generator().manual_seed(3))
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    with pytest.raises(ValueError, match="mask"):
        mixup_batch(images, torch.ones(5, dtype=torch.bool))
