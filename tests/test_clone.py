"""deepcopy_model: a copy whose closures hold the copy's modules (minGPT / makemore blocks)."""
from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

import trainguard as tg
from trainguard.clone import deepcopy_model


class Block(nn.Module):
    """karpathy/makemore's (and minGPT's) transformer block MLP, as written there."""

    def __init__(self, w: int = 16) -> None:
        super().__init__()
        self.ln = nn.LayerNorm(w)
        self.mlp = nn.ModuleDict(dict(c_fc=nn.Linear(w, 4 * w), c_proj=nn.Linear(4 * w, w),
                                      act=nn.GELU()))
        m = self.mlp
        self.mlpf = lambda x: m.c_proj(m.act(m.c_fc(x)))  # MLP forward

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.mlpf(self.ln(x))


class Tiny(nn.Module):
    def __init__(self, vocab: int = 11, w: int = 16) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, w)
        self.blocks = nn.ModuleList([Block(w), Block(w)])
        self.head = nn.Linear(w, vocab)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        h = self.emb(idx)
        for b in self.blocks:
            h = b(h)
        return self.head(h)


def test_plain_deepcopy_shares_the_closure_and_deepcopy_model_does_not():
    torch.manual_seed(0)
    model = Tiny()
    x = torch.randint(0, 11, (4, 6))
    ref = model(x).detach()
    shared = copy.deepcopy(model)
    with torch.no_grad():
        for p in shared.blocks[0].mlp.parameters():
            p.zero_()
    assert torch.equal(shared(x), ref)  # the copy's lambda still runs the original's MLP
    clone = deepcopy_model(model)
    with torch.no_grad():
        for p in clone.blocks[0].mlp.parameters():
            p.zero_()
    assert not torch.equal(clone(x), ref)  # the clone runs its own MLP
    assert torch.equal(model(x), ref)
    clone(x).sum().backward()
    assert all(p.grad is None for p in model.parameters())  # nothing reached the original
    assert all(p.grad is not None for p in clone.blocks[1].mlp.parameters())
    # the float64 copy the doctor's precision audit runs (it failed: Double and Float)
    assert deepcopy_model(model).double()(x).dtype == torch.float64


def test_hooks_and_nested_closures_are_rebound_and_outside_objects_kept():
    torch.manual_seed(0)
    outside = nn.Linear(2, 2)
    model = nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 3))
    first = model[0]
    seen: list[nn.Module] = []

    def inner(mod: nn.Module) -> nn.Module:
        return mod

    model.pick = lambda: inner(first)  # nested: a closure over a function over nothing
    model.other = lambda: outside      # an object outside the model stays shared
    model.plain = len                  # a builtin: kept as it is

    def hook(_m: nn.Module, _i: tuple, _o: torch.Tensor) -> None:
        seen.append(first)

    model.register_forward_hook(hook)
    clone = deepcopy_model(model)
    assert clone.pick() is clone[0] and model.pick() is model[0]
    assert clone.other() is outside and clone.plain is len
    clone(torch.ones(1, 3))
    assert seen[-1] is clone[0]
    model(torch.ones(1, 3))
    assert seen[-1] is model[0]


def test_the_doctor_diagnoses_a_mingpt_block_and_leaves_the_model_as_it_was():
    torch.manual_seed(0)
    model = Tiny()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    gen = torch.Generator().manual_seed(1)
    data = [(torch.randint(0, 11, (8, 6), generator=gen), torch.randint(0, 11, (8, 6), generator=gen))
            for _ in range(4)]
    opt = torch.optim.AdamW(model.parameters(), lr=5e-4)

    def loss_fn(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(out.view(-1, out.size(-1)), y.view(-1))

    report = tg.doctor(model, loss_fn, data, opt, steps=3, lr_range=False, noise=False,
                       progress=False)
    assert report is not None
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    assert all(p.grad is None for p in model.parameters())
    assert not opt.state  # the user's optimizer was not stepped
