import math

import numpy as np
import pytest
import torch

from fewstep import storage
from fewstep.config import EvaluateParams
from fewstep.evaluation import feature_scores, inception_space
from fewstep.nets.inception import FEATURE_DIM, InceptionV3FID, load_inception


def _random_weights(seed=0) -> dict[str, torch.Tensor]:
    """He-initialised convolutions, random batch-norm statistics: activations stay O(1) through the net."""
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for k, v in InceptionV3FID().state_dict().items():
        if k.endswith("conv.weight"):
            fan_in = v[0].numel()
            sd[k] = torch.randn(v.shape, generator=g) * math.sqrt(2.0 / fan_in)
        elif k.endswith("running_var"):
            sd[k] = 0.5 + torch.rand(v.shape, generator=g)
        elif k.endswith(("bn.bias", "running_mean")):
            sd[k] = 0.1 * torch.randn(v.shape, generator=g)
        elif k.endswith("bn.weight"):
            sd[k] = 1.0 + 0.1 * torch.randn(v.shape, generator=g)
    sd["fc.weight"] = torch.zeros(1008, FEATURE_DIM)  # FID files carry the logits; they are ignored
    return sd


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    path = tmp_path_factory.mktemp("inc") / "inception.safetensors"
    storage.save_tensors(path, _random_weights())
    return path


def test_inception_features_and_standard_fid_code_path(weights, monkeypatch):
    import fewstep.nets.inception as inc

    monkeypatch.setattr(inc, "SIZE", 75)  # the smallest input the graph takes: 16x fewer FLOPs than 299
    ep = EvaluateParams(inception_weights=str(weights))
    g = torch.Generator().manual_seed(1)
    train = (torch.rand(10, 3, 16, 16, generator=g) * 1.6 - 0.8)
    feats, stats = inception_space(ep.inception_weights, train, subset=10, seed=0, device=torch.device("cpu"))
    f = feats(train)
    assert f.shape == (10, FEATURE_DIM) and f.dtype == np.float64 and np.isfinite(f).all() and f.std() > 0
    same = feature_scores(f, stats, kid_subsets=2, seed=0)
    assert same["fd"] <= 1e-6 * np.trace(stats["sigma"])
    shifted = feature_scores(feats((train + 0.5).clamp(-1, 1)), stats, kid_subsets=2, seed=0)
    assert shifted["fd"] > 1e3 * max(same["fd"], 1e-9) and shifted["kid"] > same["kid"], (same, shifted)


def test_inception_pth_is_read_weights_only_and_bad_files_fail_clearly(tmp_path, weights):
    sd = _random_weights()
    pth = tmp_path / "pt_inception.pth"
    torch.save(sd, pth)  # the common FID .pth format: a plain state dict
    a, b = load_inception(pth), load_inception(weights)
    x = torch.rand(1, 3, 8, 8) * 2 - 1
    fa = a(x)
    assert fa.shape == (1, FEATURE_DIM)  # at the standard 299 x 299
    torch.testing.assert_close(fa, b(x))

    class Evil:  # an object a weights-only load must refuse to build
        def __reduce__(self):
            return (print, ("unpickled!",))

    torch.save({"Conv2d_1a_3x3.conv.weight": Evil()}, tmp_path / "evil.pth")
    with pytest.raises(ValueError, match="not a readable weight file"):
        load_inception(tmp_path / "evil.pth")
    (tmp_path / "junk.bin").write_bytes(b"not a weight file")
    with pytest.raises(ValueError, match="not a readable weight file"):
        load_inception(tmp_path / "junk.bin")
    with pytest.raises(FileNotFoundError):
        load_inception(tmp_path / "nope.safetensors")
    missing = {k: v for k, v in sd.items() if not k.startswith("Mixed_7c.")}
    storage.save_tensors(tmp_path / "missing.safetensors", missing)
    with pytest.raises(ValueError, match=r"missing: Mixed_7c\."):
        load_inception(tmp_path / "missing.safetensors")
    wrong = dict(sd, **{"Conv2d_1a_3x3.conv.weight": torch.zeros(32, 1, 3, 3), "extra.weight": torch.zeros(1)})
    storage.save_tensors(tmp_path / "wrong.safetensors", wrong)
    with pytest.raises(ValueError, match=r"unexpected: extra.weight.*wrong shape: Conv2d_1a_3x3"):
        load_inception(tmp_path / "wrong.safetensors")
