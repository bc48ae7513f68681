"""Training-time pruning under torch.distributed: two gloo processes on the CPU, each with its own data,
end with identical masks and identical pruned architectures (fxprune.Pruner and fxprune.SSR)."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn

import fxprune

WORLD = 2


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
                                      nn.Conv2d(32, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU())
        self.head = nn.Linear(32, 4)

    def forward(self, x):
        return self.head(self.features(x).mean((2, 3)))


def _worker(rank: int, init_file: str, out_dir: str, method: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        torch.set_num_threads(1)
        torch.manual_seed(0)  # the same initial weights on every rank, as DDP requires
        model = nn.parallel.DistributedDataParallel(Net())
        optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        example = (torch.randn(1, 3, 8, 8),)
        if method == "pruner":
            pruner = fxprune.Pruner(model, fxprune.FLOPs(0.5), example, steps=3, optimizer=optimizer, round_to=4)
        else:
            pruner = fxprune.SSR(model, example, optimizer=optimizer, strength=0.03, penalty=0.1, every=3)
        data = torch.Generator().manual_seed(100 + rank)  # every rank sees its own batches
        for iteration in range(9):
            x, y = torch.randn(16, 3, 8, 8, generator=data), torch.randint(0, 4, (16,), generator=data)
            nn.functional.cross_entropy(model(x), y).backward()
            optimizer.step()
            optimizer.zero_grad()
            if method == "pruner" and (iteration + 1) % 3 == 0:
                pruner.step()
        small = pruner.compile() if method == "pruner" else pruner.compile(fxprune.Params(0.6), round_to=2)
        masks = pruner.masks if method == "pruner" else pruner.live.masks_of(fxprune.plan_of(small))
        result = {"masks": masks, "architecture": [(n, tuple(p.shape)) for n, p in small.named_parameters()],
                  "weights": {n: p.detach().clone() for n, p in model.module.named_parameters()}}
        with open(f"{out_dir}/rank{rank}.pkl", "wb") as file:
            pickle.dump(result, file)
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("method", ["pruner", "ssr"])
def test_two_gloo_processes_end_with_identical_masks_and_architectures(tmp_path, method):
    if not dist.is_available():
        pytest.skip("this torch build has no torch.distributed")
    mp.spawn(_worker, args=(str(tmp_path / "init"), str(tmp_path), method), nprocs=WORLD, join=True)
    ranks = [pickle.loads((tmp_path / f"rank{r}.pkl").read_bytes()) for r in range(WORLD)]
    masks = [r["masks"] for r in ranks]
    assert masks[0].keys() == masks[1].keys()
    assert all(np.array_equal(masks[0][g], masks[1][g]) for g in masks[0])
    assert any(not m.all() for m in masks[0].values()), "something should have been pruned"
    assert ranks[0]["architecture"] == ranks[1]["architecture"]
    for name, weight in ranks[0]["weights"].items():  # DDP kept the ranks in step, masks included
        torch.testing.assert_close(weight, ranks[1]["weights"][name])


def _heal_worker(rank: int, init_file: str, out_dir: str) -> None:
    transformers = pytest.importorskip("transformers")
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        torch.set_num_threads(1)
        config = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
        torch.manual_seed(0)  # the same model, and so the same plan, on every rank
        model = transformers.LlamaForCausalLM(config).eval()
        ids = torch.randint(0, 64, (1, 16), generator=torch.Generator().manual_seed(0))
        pruned = fxprune.compile(model, fxprune.FLOPs(0.5), {"input_ids": ids}, progress=False)
        data = torch.Generator().manual_seed(100 + rank)  # every rank its own text: a repeated pattern
        pattern = torch.randint(0, 64, (8,), generator=data)
        batches = [pattern.repeat(4)[None].expand(4, -1).clone() for _ in range(12)]
        losses = fxprune.heal(pruned, batches, steps=12, lr=3e-3)
        result = {"cls": type(pruned).__name__, "losses": losses,
                  "weights": {n: p.detach().clone() for n, p in pruned.named_parameters()}}
        with open(f"{out_dir}/heal{rank}.pkl", "wb") as file:
            pickle.dump(result, file)
    finally:
        dist.destroy_process_group()


def test_a_pruned_decoder_heals_as_a_ddp_replica_with_its_own_loss_in_step_across_processes(tmp_path):
    pytest.importorskip("transformers")
    if not dist.is_available():
        pytest.skip("this torch build has no torch.distributed")
    mp.spawn(_heal_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=WORLD, join=True)
    ranks = [pickle.loads((tmp_path / f"heal{r}.pkl").read_bytes()) for r in range(WORLD)]
    assert [r["cls"] for r in ranks] == ["LlamaForCausalLM"] * WORLD
    for rank in ranks:  # each rank's own text, learned through the averaged gradients
        assert rank["losses"][-1] < 0.8 * rank["losses"][0]
    for name, weight in ranks[0]["weights"].items():  # the replicas stayed identical
        torch.testing.assert_close(weight, ranks[1]["weights"][name])


def test_heal_refuses_a_step_count_it_cannot_train_and_too_few_batches():
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                      num_attention_heads=2, num_key_value_heads=1)
    model = transformers.LlamaForCausalLM(config)
    with pytest.raises(fxprune.HealError, match="number of batches"):
        fxprune.heal(model, [], steps=0)
    with pytest.raises(fxprune.HealError, match="ran out of batches after 1"):
        fxprune.heal(model, [torch.randint(0, 64, (1, 8))], steps=2)
