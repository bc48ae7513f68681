"""Training-time methods on a model only torch.export captures: masks and rows go by parameter name."""

from __future__ import annotations

import torch
import transformers

import fxprune


def _bert():
    config = transformers.BertConfig(vocab_size=100, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                     intermediate_size=128, num_labels=3)
    ids = torch.randint(0, 100, (4, 8), generator=torch.Generator().manual_seed(0))
    torch.manual_seed(0)
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    return transformers.BertForSequenceClassification(config), inputs


def test_pruner_prunes_heads_of_a_transformer_while_it_trains():
    model, inputs = _bert()
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-2)
    pruner = fxprune.Pruner(model, fxprune.FLOPs(0.6), inputs, steps=2, optimizer=optimizer)
    labels = torch.tensor([0, 1, 2, 0])
    for _ in range(2):
        for _ in range(2):
            optimizer.zero_grad()
            model(**inputs, labels=labels).loss.backward()
            optimizer.step()
        pruner.step()
    pruned = pruner.compile()
    model.eval()
    with torch.no_grad():
        out = pruned(**inputs)
    assert out.logits.shape == (4, 3)
    assert fxprune.count_flops(pruned, fxprune.graph_inputs(pruner.live.gm, inputs)) <= \
        0.6 * fxprune.count_flops(pruner.live.gm, fxprune.graph_inputs(pruner.live.gm, inputs)) * 1.001
    assert pruner.live.axes and all(axis.name in dict(model.named_parameters()) for axis in pruner.live.axes)
    removed = [axis for axis in pruner.live.axes if not pruner.masks[axis.space.group_id].all()]
    assert removed  # and the live model's weights of removed channels are zero
    for axis in removed:
        keep = pruner.masks[axis.space.group_id][axis.space.channel_index]
        dropped = torch.as_tensor(~keep).nonzero().flatten()
        assert float(model.get_parameter(axis.name).index_select(axis.dim, dropped).abs().max()) == 0.0


def test_ssr_regularizes_a_transformer_and_compiles_it_to_a_budget():
    model, inputs = _bert()
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-2)
    ssr = fxprune.SSR(model, inputs, optimizer=optimizer, strength=1e-2, every=1)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    for _ in range(3):
        optimizer.zero_grad()
        model(**inputs, labels=torch.tensor([0, 1, 2, 0])).loss.backward()
        optimizer.step()
    regularized = {axis.name for axis in ssr.live.axes}
    assert regularized and all(not torch.equal(before[n], model.get_parameter(n)) for n in regularized)
    small = ssr.compile(fxprune.FLOPs(0.7))
    model.eval()
    with torch.no_grad():
        assert small(**inputs).logits.shape == (4, 3)
