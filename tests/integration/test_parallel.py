"""torch.distributed on the CPU (gloo, 2 processes on 127.0.0.1) against one process.

One spawn of 2 ranks (module fixture) does all the distributed work: a fresh training run, a
resume of a 1-process checkpoint, sharded sampling and sharded trajectory collection. The tests
compare what it wrote with what one process makes in the same tmp dir.
"""

from __future__ import annotations

import os
import shutil
import socket
from pathlib import Path
from typing import Iterator

import pytest
import torch
import torch.multiprocessing as mp

from fewstep import parallel, storage
from fewstep.math.ddim import generate
from fewstep.math.param import NetDenoiser
from fewstep.math.schedules import make_schedule, timesteps
from fewstep.nets.unet import UNet, UNetConfig
from fewstep.train import checkpoint
from fewstep.train.loop import LoopConfig, backward, train
from fewstep.train.teacher import diffusion_loss
from fewstep.trajectories import write_shards
from tests.helpers import tiny_images

BATCH, STEPS, CK = 7, 6, 3  # an odd global batch: ranks hold 4 and 3 rows
SAMPLE_CASES = {"ddim": (range(5), {}), "eta1": (range(5), {"eta": 1.0}), "one_seed": ([11], {})}
CPU = torch.device("cpu")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _net() -> UNet:
    torch.manual_seed(0)
    return UNet(UNetConfig(image_size=8, patch_size=1, channels=16, channel_mult=(1, 2), num_res_blocks=1,
                           attn_resolutions=(4,), head_dim=8, dropout=0.0))


def _loss_fn():
    data = torch.from_numpy(tiny_images(32, 8)[0].transpose(0, 3, 1, 2).copy())
    return diffusion_loss(data, make_schedule("cosine", 64), "v", "snr+1", BATCH, hflip=True)


def _grads() -> dict[str, torch.Tensor]:
    """Gradients of one step of the loop (through DDP in a world > 1), as rank 0 holds them."""
    net = _net()
    model = parallel.wrap_ddp(net, CPU)
    backward(model, _loss_fn(), torch.Generator().manual_seed(5), parallel.batch_part())
    return {k: p.grad for k, p in net.named_parameters()}


def _train(ckpt: Path) -> tuple[torch.nn.Module, torch.nn.Module]:
    """(trained net, EMA net) after STEPS steps (resuming from ``ckpt`` when it holds a checkpoint)."""
    net, loss_fn = _net(), _loss_fn()
    cfg = LoopConfig(steps=STEPS, lr=2e-3, warmup=2, ema_decay=0.9, checkpoint_every=CK, keep_checkpoints=10,
                     log_every=1, seed=3)
    res = train(net, loss_fn, cfg, ckpt, "run", CPU, progress=False, log=lambda _m: None)
    return net, res.net


def _denoiser() -> NetDenoiser:
    return NetDenoiser(_net().eval(), make_schedule("cosine", 64), "v", autocast=False)


def _sample(name: str, seeds, den: NetDenoiser) -> torch.Tensor | None:
    kw = SAMPLE_CASES[name][1]
    return parallel.map_sharded(lambda s: generate(den, s, (3, 8, 8), timesteps(64, 4), batch_size=2, **kw), seeds)


def _rewind(ckpt: Path, step: int) -> None:
    """Leave ``ckpt`` as a run killed right after its step-``step`` checkpoint would."""
    for d in ckpt.glob("step-*"):
        if int(d.name.split("-")[1]) > step:
            shutil.rmtree(d)
    storage.write_json(ckpt / "latest.json", {"dir": f"step-{step:08d}", "step": step})


def _worker(rank: int, world: int, port: int, tmp: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    tmp = Path(tmp)
    with parallel.session("cpu"):
        assert parallel.world_size() == world and parallel.rank() == rank
        storage.save_tensors(tmp / f"grads{rank}.safetensors", _grads())
        net, ema = _train(tmp / "two")  # (a) fresh 2-rank run
        storage.save_tensors(tmp / f"rank{rank}.safetensors",
                             {**{f"net.{k}": v for k, v in net.state_dict().items()},
                              **{f"ema.{k}": v for k, v in ema.state_dict().items()}})
        _train(tmp / "one_to_two")  # (c) a 1-process checkpoint resumed on 2 ranks
        den = _denoiser()  # (b) sharded sampling and trajectories
        for name, (seeds, _) in SAMPLE_CASES.items():
            imgs = _sample(name, seeds, den)
            assert (imgs is None) == (rank != 0)
            if rank == 0:
                storage.save_tensors(tmp / f"sample-{name}-2.safetensors", {"x": imgs})
        write_shards(tmp / "traj-2", den, range(5), (3, 8, 8), timesteps(64, 4), shard_size=2, batch_size=1,
                     device=CPU, meta={}, progress=False)


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Iterator[Path]:
    tmp = tmp_path_factory.mktemp("dist")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny nets: threads only contend with the two ranks
    try:
        _train(tmp / "one")  # the uninterrupted 1-process reference
        shutil.copytree(tmp / "one", tmp / "one_to_two")
        _rewind(tmp / "one_to_two", CK)
        mp.spawn(_worker, args=(2, _free_port(), str(tmp)), nprocs=2, join=True)
        shutil.copytree(tmp / "two", tmp / "two_to_one")
        _rewind(tmp / "two_to_one", CK)
        _train(tmp / "two_to_one")  # a 2-rank checkpoint resumed by 1 process
        yield tmp
    finally:
        torch.set_num_threads(threads)


def _final_state(ckpt: Path) -> dict[str, torch.Tensor]:
    d, meta = checkpoint.latest(ckpt)
    assert meta["step"] == STEPS
    return storage.load_tensors(d / "state.safetensors")


def _assert_states_close(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5, msg=k)


def test_two_ranks_with_global_batch_b_match_one_process_with_batch_b(runs):
    one, two = _final_state(runs / "one"), _final_state(runs / "two")  # model, EMA and AdamW state
    _assert_states_close(one, two)
    moved = max(float((one[k] - _net().state_dict()[k[6:]]).abs().max()) for k in one if k.startswith("model."))
    assert moved > 1e-3  # the steps did train (the comparison is not between two untouched inits)
    r0, r1 = (storage.load_tensors(runs / f"rank{r}.safetensors") for r in (0, 1))
    for k in r0:  # parameters and EMA stay bit-identical across ranks
        assert torch.equal(r0[k], r1[k]), k
    # the loss history rank 0 logged is the global-batch loss, as one process logs it
    h1, h2 = (storage.read_json(checkpoint.latest(runs / d)[0] / "meta.json")["history"] for d in ("one", "two"))
    assert [s for s, _ in h1] == [s for s, _ in h2]
    assert [l for _, l in h2] == pytest.approx([l for _, l in h1], rel=1e-4)


def test_ddp_gradients_of_a_step_equal_the_global_batch_gradients(runs):
    one = _grads()  # Adam is nearly scale-invariant: compare the gradients themselves
    for r in (0, 1):
        two = storage.load_tensors(runs / f"grads{r}.safetensors")
        assert one.keys() == two.keys()
        for k in one:
            torch.testing.assert_close(two[k], one[k], rtol=1e-4, atol=1e-7, msg=k)
    assert max(float(g.abs().max()) for g in one.values()) > 1e-3


def test_resume_across_world_sizes_matches_the_uninterrupted_run(runs):
    one = _final_state(runs / "one")
    _assert_states_close(one, _final_state(runs / "one_to_two"))  # 1 process -> 2 ranks
    _assert_states_close(one, _final_state(runs / "two_to_one"))  # 2 ranks -> 1 process


def test_sharded_sampling_and_trajectories_match_one_process(runs):
    den = _denoiser()
    for name, (seeds, _) in SAMPLE_CASES.items():
        two = storage.load_tensors(runs / f"sample-{name}-2.safetensors")["x"]
        one = _sample(name, seeds, den)
        assert two.shape == one.shape == (len(seeds), 3, 8, 8)
        torch.testing.assert_close(two, one, rtol=1e-5, atol=1e-5, msg=name)
    write_shards(runs / "traj-1", den, range(5), (3, 8, 8), timesteps(64, 4), shard_size=2, batch_size=5,
                 device=CPU, meta={}, progress=False)
    assert storage.read_json(runs / "traj-1" / "meta.json") == storage.read_json(runs / "traj-2" / "meta.json")
    files = sorted(p.name for p in (runs / "traj-1").glob("shard-*"))
    assert files == sorted(p.name for p in (runs / "traj-2").glob("shard-*")) and len(files) == 3
    for f in files:
        a, b = storage.load_tensors(runs / "traj-1" / f), storage.load_tensors(runs / "traj-2" / f)
        assert torch.equal(a["seeds"], b["seeds"])
        for k in ("x", "e"):
            torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-5, msg=f"{f} {k}")


@pytest.mark.parametrize("n,world", [(7, 2), (1, 2), (5, 3), (0, 2), (4, 4)])
def test_shards_cover_in_order_and_rank_0_holds_the_most(n, world):
    blocks = [parallel.shard(list(range(n)), r, world) for r in range(world)]
    assert sum(blocks, []) == list(range(n))
    assert parallel.shard_counts(n, world) == [len(b) for b in blocks]
    assert max(len(b) for b in blocks) - min(len(b) for b in blocks) <= 1 and len(blocks[0]) == max(map(len, blocks))
    with pytest.raises(ValueError):
        parallel.shard([1, 2], world, world)


def test_a_world_of_one_needs_no_process_group(monkeypatch):
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(k, raising=False)
    assert parallel.init("cpu") == CPU and not parallel.is_initialized()
    assert (parallel.rank(), parallel.world_size(), parallel.is_main()) == (0, 1, True)
    parallel.barrier()
    x = torch.arange(3.0)
    assert parallel.map_sharded(lambda s: torch.tensor(s, dtype=torch.float32), [0, 1, 2]).tolist() == x.tolist()
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    with pytest.raises(parallel.DistError, match="MASTER_ADDR"):
        parallel.init("cpu")
    monkeypatch.setenv("RANK", "5")
    with pytest.raises(parallel.DistError, match="inconsistent"):
        parallel.init("cpu")
