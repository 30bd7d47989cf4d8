"""Issue 18.7 in the evaluation itself: ranked rows at evaluate.n_headline beside the table at
n_samples, intervals and duplicates on every row, the FD sensitivity check (tiny random models)."""

from __future__ import annotations

import numpy as np
import torch

from fewstep import models, storage
from fewstep.config import EvaluateParams
from fewstep.evaluation import run_evaluation
from fewstep.nets.evaluator import Evaluator, EvaluatorConfig
from fewstep.nets.unet import UNet, UNetConfig
from fewstep.train.evaluator import CONFIG, STATS, WEIGHTS, features


def _net(seed: int) -> UNet:
    torch.manual_seed(seed)
    net = UNet(UNetConfig(image_size=8, patch_size=2, channels=8, channel_mult=(1,), num_res_blocks=1,
                          attn_resolutions=(), head_dim=8, dropout=0.0))
    for prm in net.parameters():
        torch.nn.init.normal_(prm, std=0.05)
    return net.eval()


def _tree(root):
    meta = {"role": "teacher", "parameterization": "v", "schedule": {"kind": "cosine", "T": 64}, "image_size": 8,
            "dataset": "toy", "sample_steps": 8, "parent": None}
    models.save_model(root / "teacher", _net(0), meta)
    models.save_model(root / "student-2", _net(1), {**meta, "role": "student", "sample_steps": 2})
    torch.manual_seed(0)
    ev = Evaluator(EvaluatorConfig(num_classes=2, widths=(4, 8), blocks_per_stage=1)).eval()
    real = torch.rand(64, 3, 8, 8) * 2 - 1
    f = features(ev, real)
    d = root / "evaluator"
    d.mkdir()
    storage.save_tensors(d / WEIGHTS, ev.state_dict())
    storage.save_tensors(d / STATS, {"mu": torch.from_numpy(f.mean(0)),
                                     "sigma": torch.from_numpy(np.cov(f, rowvar=False)), "subset": torch.from_numpy(f)})
    storage.write_json(d / CONFIG, {"net": ev.cfg.to_dict()})
    return torch.rand(30, 3, 8, 8) * 2 - 1


def _run(root, test, **over):
    ep = EvaluateParams(n_samples=12, batch_size=12, reference_steps=8, ddim_steps=[2, 4, 8], eta_steps=[], etas=[],
                        sigma_hat=False, peers=[], study_steps=[], kid_subsets=2, fd_resamples=20, **over)
    return run_evaluation(root, root / "none", ep, root / "evaluator", torch.device("cpu"), test_images=test)


def test_ranked_rows_get_their_own_n_and_the_table_keeps_one_n(tmp_path, torch_one_thread):
    test = _tree(tmp_path)
    big = _run(tmp_path, test, n_headline=24)
    rows = big.rows
    ranked = {k for k, r in rows.items() if "headline" in r}
    # the reference, DDIM at the student's steps, the student; not DDIM 4 (no student samples in 4)
    assert ranked == {"teacher ddim 8", "teacher ddim 2", "student-2 ddim 2"}
    assert all(r["n"] == 12 for r in rows.values()) and all(rows[k]["headline"]["n"] == 24 for k in ranked)
    for r in [*rows.values(), *(rows[k]["headline"] for k in ranked)]:
        assert r["fd_lo"] <= r["fd_hi"] and r["rmse_lo"] <= r["rmse"] <= r["rmse_hi"] and 0 <= r["dup_rate"] <= 1
    assert rows["teacher ddim 8"]["headline"]["rmse"] == 0  # the reference against itself, at 24 too
    assert big.meta["n_headline"] == 24 and set(big.meta["dup_threshold"]) == {"12", "24"}
    # the table at n_samples does not depend on n_headline: same seeds, same scores
    small = _run(tmp_path, test, n_headline=0)
    assert not any("headline" in r for r in small.rows.values()) and small.meta["n_headline"] == 12
    for k, r in small.rows.items():
        assert {s: v for s, v in rows[k].items() if s not in ("headline", "images_per_s")} == \
            {s: v for s, v in r.items() if s != "images_per_s"}, k
    floor, blur = big.meta["fd_floor"], big.meta["fd_blur"]
    assert floor["n"] == 12 and set(blur) == {"0.5", "1"}
    assert floor["fd"] < blur["0.5"]["fd"] < blur["1"]["fd"]  # FD sees the blur, more of it at sigma 1
    # every row is paired with the reference at its own n (same seeds): the FD difference is the
    # difference of the two FDs, the reference has none, and the ranked rows of one NFE are paired too
    ref = rows["teacher ddim 8"]
    assert "paired" not in ref and "paired" not in ref["headline"]
    for k in ranked - {"teacher ddim 8"}:
        for block, ref_block in ((rows[k], ref), (rows[k]["headline"], ref["headline"])):
            p = block["paired"]
            assert p["ref"] == "teacher ddim 8" and p["fd_diff_lo"] <= p["fd_diff_hi"] and p["kid_diff_se"] > 0
            assert abs(p["fd_diff"] - (block["fd"] - ref_block["fd"])) < 1e-9
        assert rows[k]["headline"]["kid_se"] >= rows[k]["headline"]["kid_se_subsets"]
    assert [(q["a"], q["b"], q["n"]) for q in big.meta["paired_pairs"]] == [
        tuple(sorted(("teacher ddim 2", "student-2 ddim 2"), key=lambda k: rows[k]["headline"]["fd"])) + (24,)]
