"""Fused sparse optimizers against nn.Embedding / nn.EmbeddingBag + torch.optim."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from gauss_plugins.embedding import DynamicEmbeddingTable, DynamicTableConfig, OptimizerConfig, SparseOptimizer

DIM = 8


def _pair(backend, opt_cfg: OptimizerConfig, ids_all: torch.Tensor, dtype="fp32"):
    """A dynamic table holding ``ids_all`` and an nn.Embedding with the same rows."""
    table = DynamicEmbeddingTable(DynamicTableConfig(name="t", dim=DIM, initial_capacity=64, backend=backend,
                                                     optimizer=opt_cfg, init_min=-0.5, init_max=0.5, dtype=dtype))
    table.train()
    with torch.no_grad():
        table.lookup(ids_all)  # inserts every id (training mode)
    values, present = table.get(ids_all)
    assert bool(present.all())
    emb = nn.Embedding(ids_all.numel(), DIM)
    with torch.no_grad():
        emb.weight.copy_(values)
    return table, emb


def _torch_opt(cfg: OptimizerConfig, params):
    if cfg.name == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    if cfg.name == "adagrad":
        return torch.optim.Adagrad(params, lr=cfg.lr, eps=cfg.eps, weight_decay=cfg.weight_decay,
                                   initial_accumulator_value=cfg.initial_accumulator_value)
    if cfg.name == "adam":
        return torch.optim.Adam(params, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps,
                                weight_decay=cfg.weight_decay)
    raise AssertionError(cfg.name)


CONFIGS = [
    OptimizerConfig("sgd", lr=0.1),
    OptimizerConfig("sgd", lr=0.1, weight_decay=0.01),
    OptimizerConfig("adagrad", lr=0.1, eps=1e-10),
    OptimizerConfig("adagrad", lr=0.1, eps=1e-10, initial_accumulator_value=0.1),
    OptimizerConfig("adam", lr=0.01, eps=1e-8),
    OptimizerConfig("adam", lr=0.01, eps=1e-8, beta1=0.8, beta2=0.95, weight_decay=0.001),
]


@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: f"{c.name}-wd{c.weight_decay}-acc{c.initial_accumulator_value}")
def test_lookup_updates_match_nn_embedding(backend, cfg):
    """Every id of the table appears in every batch (so lazy per-row Adam equals dense Adam),
    with repeats, so duplicate gradients must be summed."""
    g = torch.Generator().manual_seed(0)
    ids_all = torch.tensor([5, -3, 2**40, -(2**63), 2**63 - 1, 17, 0, 99])
    table, emb = _pair(backend, cfg, ids_all)
    sparse, dense = SparseOptimizer(table), _torch_opt(cfg, emb.parameters())
    for _ in range(6):
        pos = torch.cat([torch.arange(8), torch.randint(0, 8, (24,), generator=g)])
        pos = pos[torch.randperm(pos.numel(), generator=g)]
        target = torch.randn(pos.numel(), DIM, generator=g)
        loss_t = ((table(ids_all[pos]) - target) ** 2).sum()
        loss_e = ((emb(pos) - target) ** 2).sum()
        loss_t.backward()
        loss_e.backward()
        sparse.step(); dense.step()
        sparse.zero_grad(); dense.zero_grad()
    values, _ = table.get(ids_all)
    torch.testing.assert_close(values, emb.weight.detach(), rtol=0, atol=1e-6)


def _rowwise_reference(weight, state, grad_rows, grads, lr, eps):
    """FBGEMM EXACT_ROWWISE_ADAGRAD, written out."""
    for r, g in zip(grad_rows.tolist(), grads):
        state[r] += (g * g).mean()
        weight[r] -= lr / (state[r].sqrt() + eps) * g


def test_rowwise_adagrad_matches_reference(backend):
    g = torch.Generator().manual_seed(1)
    ids_all = torch.arange(10) * 1000 - 5000
    cfg = OptimizerConfig("rowwise_adagrad", lr=0.1, eps=1e-8)
    table, emb = _pair(backend, cfg, ids_all)
    weight = emb.weight.detach().clone().double()
    state = torch.zeros(10, dtype=torch.float64)
    sparse = SparseOptimizer(table)
    for _ in range(5):
        pos = torch.randint(0, 10, (30,), generator=g)
        coef = torch.randn(30, DIM, generator=g)
        (table(ids_all[pos]) * coef).sum().backward()
        sparse.step()
        summed = torch.zeros(10, DIM, dtype=torch.float64).index_add_(0, pos, coef.double())
        touched = torch.unique(pos)
        _rowwise_reference(weight, state, touched, summed[touched], 0.1, 1e-8)
    torch.testing.assert_close(table.get(ids_all)[0].double(), weight, rtol=0, atol=1e-6)
    torch.testing.assert_close(table.opt_state["sum"][table.find(ids_all)].double(), state, rtol=1e-6, atol=1e-9)


def test_adam_keeps_per_row_step_counts(backend):
    """Rows touched in different steps: each row's Adam runs on its own step count."""
    cfg = OptimizerConfig("adam", lr=0.05, eps=1e-8)
    ids_all = torch.tensor([1, 2])
    table, emb = _pair(backend, cfg, ids_all)
    start = emb.weight.detach().clone()
    sparse = SparseOptimizer(table)
    grads = {1: [], 2: []}
    g = torch.Generator().manual_seed(2)
    for step in range(5):
        chosen = torch.tensor([1]) if step % 2 else torch.tensor([1, 2])
        coef = torch.randn(chosen.numel(), DIM, generator=g)
        (table(chosen) * coef).sum().backward()
        sparse.step()
        for i, k in enumerate(chosen.tolist()):
            grads[k].append(coef[i])
    for row, key in enumerate([1, 2]):
        p = nn.Parameter(start[row].clone())
        ref = torch.optim.Adam([p], lr=0.05, eps=1e-8)
        for gr in grads[key]:
            p.grad = gr.clone()
            ref.step()
        torch.testing.assert_close(table.get(torch.tensor([key]))[0][0], p.detach(), rtol=0, atol=1e-6)
    steps = table.opt_state["step"][table.find(ids_all)]
    assert steps.tolist() == [5, 3]


@pytest.mark.parametrize("mode", ["sum", "mean"])
@pytest.mark.parametrize("weighted", [False, True])
def test_pooled_lookup_matches_embedding_bag(backend, mode, weighted):
    if weighted and mode == "mean":
        pytest.skip("per_sample_weights need mode='sum', as in nn.EmbeddingBag")
    g = torch.Generator().manual_seed(3)
    ids_all = torch.arange(12) * 7 - 40
    cfg = OptimizerConfig("adagrad", lr=0.1, eps=1e-10)
    table, emb = _pair(backend, cfg, ids_all)
    bag = nn.EmbeddingBag(12, DIM, mode=mode, include_last_offset=True)
    with torch.no_grad():
        bag.weight.copy_(emb.weight)
    sparse, dense = SparseOptimizer(table), _torch_opt(cfg, bag.parameters())
    for _ in range(4):
        lengths = torch.randint(0, 6, (7,), generator=g)
        lengths[0] = 0  # an empty bag
        offsets = torch.cat([torch.zeros(1, dtype=torch.int64), lengths.cumsum(0)])
        pos = torch.randint(0, 12, (int(offsets[-1]),), generator=g)
        psw = torch.rand(pos.numel(), generator=g) if weighted else None
        # The weights are differentiable too (position weights, for instance): same gradient.
        psw_t = psw.clone().requires_grad_() if weighted else None
        psw_e = psw.clone().requires_grad_() if weighted else None
        target = torch.randn(7, DIM, generator=g)
        out_t = table.lookup_pooled(ids_all[pos], offsets, mode=mode, per_sample_weights=psw_t)
        out_e = bag(pos, offsets, per_sample_weights=psw_e)
        torch.testing.assert_close(out_t, out_e, rtol=0, atol=1e-6)
        ((out_t - target) ** 2).sum().backward()
        ((out_e - target) ** 2).sum().backward()
        if weighted:
            torch.testing.assert_close(psw_t.grad, psw_e.grad, rtol=1e-5, atol=1e-6)
        sparse.step(); dense.step(); sparse.zero_grad(); dense.zero_grad()
    torch.testing.assert_close(table.get(ids_all)[0], bag.weight.detach(), rtol=0, atol=1e-6)
    table.eval()
    torch.testing.assert_close(table.lookup_pooled(ids_all[pos], offsets, mode=mode, per_sample_weights=psw),
                               bag(pos, offsets, per_sample_weights=psw), rtol=0, atol=1e-6)


@pytest.mark.parametrize("dtype", ["fp16", "bf16"])
def test_half_storage_trains_close_to_fp32(backend, dtype):
    cfg = OptimizerConfig("sgd", lr=0.1)
    ids_all = torch.arange(6)
    table, emb = _pair(backend, cfg, ids_all, dtype=dtype)
    assert table.weight.dtype == {"fp16": torch.float16, "bf16": torch.bfloat16}[dtype]
    sparse, dense = SparseOptimizer(table), _torch_opt(cfg, emb.parameters())
    for _ in range(3):
        out = table(ids_all)
        assert out.dtype == torch.float32
        (out.sum() * 0.1).backward(); (emb(ids_all).sum() * 0.1).backward()
        sparse.step(); dense.step(); sparse.zero_grad(); dense.zero_grad()
    tol = 2e-3 if dtype == "fp16" else 1.6e-2
    torch.testing.assert_close(table.get(ids_all)[0], emb.weight.detach(), rtol=0, atol=tol)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_gradients_raise_and_change_nothing(backend, bad):
    cfg = OptimizerConfig("adam", lr=0.1)
    a = DynamicEmbeddingTable(DynamicTableConfig(name="a", dim=4, backend=backend, optimizer=cfg))
    b = DynamicEmbeddingTable(DynamicTableConfig(name="b", dim=4, backend=backend, optimizer=cfg))
    ids = torch.tensor([1, 2, 3])
    sparse = SparseOptimizer([a, b])
    (a(ids).sum() + b(ids).sum()).backward()
    sparse.step()
    sparse.zero_grad()
    before = [(t.export_state()[0]) for t in (a, b)]
    loss = a(ids).sum() + (b(ids) * torch.tensor([1.0, bad, 1.0])[:, None]).sum()
    loss.backward()
    with pytest.raises(FloatingPointError, match=r"\['b'\].*no row was updated"):
        sparse.step()
    for t, saved in zip((a, b), before):
        now = t.export_state()[0]
        for k in ("weight", "opt.exp_avg", "opt.exp_avg_sq", "opt.step"):
            assert torch.equal(now[k], saved[k]), (t.name, k)
        assert not t.has_pending_grads


def test_sparse_optimizer_finds_tables_in_a_module_and_sets_lr(backend):
    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.users = DynamicEmbeddingTable(DynamicTableConfig(name="users", dim=4, backend=backend))
            self.items = DynamicEmbeddingTable(DynamicTableConfig(name="items", dim=4, backend=backend))
            self.mlp = nn.Linear(8, 1)

    m = Model()
    assert [n for n, _ in m.named_parameters()] == ["mlp.weight", "mlp.bias"]  # tables hold no Parameters
    with pytest.raises(ValueError, match="no optimizer"):
        SparseOptimizer(m)
    opt = SparseOptimizer(m, "rowwise_adagrad", lr=0.5)
    assert [t.name for t in opt.tables] == ["users", "items"]
    assert opt.lr == 0.5
    opt.lr = 0.25
    assert m.users.rule.config.lr == 0.25 and m.items.rule.config.name == "rowwise_adagrad"
    dense = torch.optim.SGD(m.mlp.parameters(), lr=0.1)
    ids = torch.tensor([3, 4])
    out = m.mlp(torch.cat([m.users(ids), m.items(ids)], dim=1)).sum()
    out.backward()
    dense.step(); opt.step()
    with pytest.raises(TypeError, match="DynamicEmbeddingTable"):
        SparseOptimizer([nn.Linear(1, 1)])


@pytest.mark.parametrize("name", ["sgd", "adagrad", "rowwise_adagrad", "adam"])
def test_fused_and_two_phase_updates_are_bit_identical(monkeypatch, name):
    """The one-pass sum+update and the sum-then-update path (used when a sum could
    overflow) compute the very same bits, with repeated ids and two lookups per step."""
    from gauss_kernels.hash_table import cpu_ext
    from gauss_plugins.embedding import table as table_mod

    if not cpu_ext.available():
        pytest.skip(cpu_ext.unavailable_reason())

    def run():
        g = torch.Generator().manual_seed(4)
        t = DynamicEmbeddingTable(DynamicTableConfig(name="t", dim=DIM, backend="cpu_ext",
                                                     optimizer=OptimizerConfig(name, lr=0.05, weight_decay=0.01)))
        opt = SparseOptimizer(t)
        for _ in range(4):
            ids = torch.randint(0, 20, (40,), generator=g)
            offsets = torch.tensor([0, 10, 25, 40])
            loss = (t.lookup_pooled(ids, offsets, mode="mean") * torch.randn(3, DIM, generator=g)).sum()
            loss = loss + (t(ids[:7]) ** 2).sum()
            loss.backward()
            opt.step()
            opt.zero_grad()
        return t.export_state()[0]

    fused = run()
    monkeypatch.setattr(table_mod, "_SAFE_SUM", 0.0)
    two_phase = run()
    for k in fused:
        assert torch.equal(fused[k], two_phase[k]), k


def test_keyword_overrides_keep_the_tables_other_options(backend):
    """SparseOptimizer(table, lr=...) on a table configured with an optimizer overrides that
    option only; the rule, the other hyperparameters and the per-row state stay."""
    cfg = OptimizerConfig("rowwise_adagrad", lr=0.05, eps=1e-6, weight_decay=0.01, initial_accumulator_value=0.1)
    table = DynamicEmbeddingTable(DynamicTableConfig(name="t", dim=DIM, backend=backend, optimizer=cfg))
    ids = torch.tensor([3, 9])
    first = SparseOptimizer(table)
    table(ids).sum().backward()
    first.step()
    state = table.opt_state["sum"].clone()
    opt = SparseOptimizer(table, lr=0.5)
    c = table.rule.config
    assert (c.name, c.lr, c.eps, c.weight_decay, c.initial_accumulator_value) == ("rowwise_adagrad", 0.5, 1e-6, 0.01, 0.1)
    assert table.config.optimizer.lr == 0.5 and cfg.lr == 0.05  # the caller's config object is not changed
    assert torch.equal(table.opt_state["sum"], state)  # same rule: state kept
    # The step uses the new lr: row-wise Adagrad by hand.
    w = table.get(ids)[0]
    rows = table.find(ids)
    table(ids).sum().backward()
    opt.step()
    g = torch.ones(2, DIM) + 0.01 * w
    s_new = state[rows] + (g * g).mean(dim=1)
    expected = w - 0.5 * g / (s_new.sqrt() + 1e-6)[:, None]
    torch.testing.assert_close(table.get(ids)[0], expected, rtol=1e-6, atol=1e-6)


def test_bad_optimizer_options_change_no_table(backend):
    a = DynamicEmbeddingTable(DynamicTableConfig(name="a", dim=DIM, backend=backend, optimizer=OptimizerConfig("adam", lr=0.1)))
    b = DynamicEmbeddingTable(DynamicTableConfig(name="b", dim=DIM, backend=backend, optimizer="sgd"))
    bare = DynamicEmbeddingTable(DynamicTableConfig(name="bare", dim=DIM, backend=backend))
    a(torch.tensor([1])).sum().backward()
    SparseOptimizer(a).step()
    state = {k: v.clone() for k, v in a.opt_state.items()}

    def unchanged():
        assert a.rule.config == OptimizerConfig("adam", lr=0.1) and b.rule.config == OptimizerConfig("sgd")
        assert all(torch.equal(a.opt_state[k], v) for k, v in state.items())
        assert bare.rule is None

    cases = [
        (ValueError, "lr .* must be >= 0", lambda: SparseOptimizer([a, b], lr=-1.0)),
        (ValueError, "eps must be > 0", lambda: SparseOptimizer([a, b], eps=0.0)),
        (ValueError, "beta1 .* must be in \\[0, 1\\)", lambda: SparseOptimizer([a, b], beta1=1.0)),
        (ValueError, "lr must be a finite number", lambda: SparseOptimizer([a, b], lr=float("nan"))),
        (ValueError, "lr must be a finite number", lambda: SparseOptimizer([a, b], lr="0.1")),
        (ValueError, "unknown optimizer options \\['momentum'\\]", lambda: SparseOptimizer([a, b], momentum=0.9)),
        (ValueError, "'bare' has no optimizer for the options \\['lr'\\]", lambda: SparseOptimizer([a, b, bare], lr=0.2)),
        (ValueError, "'bare' has no optimizer", lambda: SparseOptimizer([a, bare])),
        (TypeError, "a DynamicEmbeddingTable, a list of them or a module", lambda: SparseOptimizer(42)),
        (TypeError, "OptimizerConfig, a rule name or a dict", lambda: SparseOptimizer([a, b], 3)),
    ]
    for exc, match, call in cases:
        with pytest.raises(exc, match=match):
            call()
        unchanged()
    opt = SparseOptimizer([a, b])
    with pytest.raises(ValueError, match="finite number"):
        opt.lr = float("inf")
    unchanged()
    with pytest.raises(ValueError, match="unknown optimizer options"):
        opt.load_state_dict({"a": {"name": "adam", "lr": 0.3}, "b": {"name": "sgd", "nope": 1}})
    unchanged()
    opt.load_state_dict({"a": {"name": "adam", "lr": 0.3}})
    assert a.rule.config.lr == 0.3 and all(torch.equal(a.opt_state[k], v) for k, v in state.items())


def test_table_and_optimizer_modules_do_not_import_each_other_back():
    """optim.py builds on table.py; table.py and the shared rules never import optim.py (no
    circle, not even a deferred import inside a function)."""
    import ast
    import importlib

    def imported(module_name):
        path = importlib.import_module(module_name).__file__
        names = set()
        for node in ast.walk(ast.parse(open(path).read())):
            if isinstance(node, ast.ImportFrom) and node.module:
                names.add(node.module)
            elif isinstance(node, ast.Import):
                names.update(alias.name for alias in node.names)
        return names

    assert "gauss_plugins.embedding.optim" not in imported("gauss_plugins.embedding.table")
    rules = imported("gauss_plugins.embedding.sparse_rules")
    assert not {"gauss_plugins.embedding.optim", "gauss_plugins.embedding.table"} & rules
    assert "gauss_plugins.embedding.table" in imported("gauss_plugins.embedding.optim")
    # The registry's optimizer factories live below the table too.
    from gauss_plugins import get_registry

    factories = [c.factory for c in get_registry().components("sparse_optimizer") if c.name in ("sgd", "adagrad", "rowwise_adagrad", "adam")]
    assert len(factories) == 4 and all(f.startswith("gauss_plugins.embedding.sparse_rules:") for f in factories), factories
