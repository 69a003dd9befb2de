"""PCH towers: shapes, causality, alignment, the three item towers, the hybrid's unknown-item path, checkpoints."""
from __future__ import annotations

import json

import pytest
import torch

from learn_tasks.pch.model import PCHConfig, build_model, load_checkpoint, save_checkpoint

D_IN = 12


def make(kind: str = "learn", tower: str = "a", **kw) -> torch.nn.Module:
    torch.manual_seed(0)
    cfg = PCHConfig(kind=kind, item_tower=tower, d_in=D_IN, d_model=16, n_layers=2, n_heads=2, dropout=0.0,
                    max_len=8, out_dim=8, n_items=20 if kind != "learn" else 0, **kw)
    return build_model(cfg).eval()


def batch(B: int = 3, L: int = 6, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    content = torch.randn(B, L, D_IN, generator=g)
    idx = torch.randint(1, 21, (B, L), generator=g)
    lengths = torch.tensor([L, 3, 1])[:B]
    mask = torch.arange(L)[None, :] < lengths[:, None]
    return content, mask, idx


@pytest.mark.parametrize("kind", ["learn", "learn_hybrid", "sasrec"])
def test_shapes_and_normalisation(kind):
    m = make(kind)
    content, mask, idx = batch()
    u = m.encode_users(content, mask, idx)
    v = m.encode_items(content[0], idx[0])
    assert u.shape == (3, 8) and v.shape == (6, 8)
    assert torch.allclose(u.norm(dim=-1), torch.ones(3), atol=1e-5)
    assert torch.allclose(v.norm(dim=-1), torch.ones(6), atol=1e-5)


@pytest.mark.parametrize("kind", ["learn", "learn_hybrid", "sasrec"])
def test_no_position_sees_the_future(kind):
    m = make(kind)
    content, _, idx = batch(B=2, L=6)
    x = m.embed_items(content, idx)
    before = m.user_states(x)
    x2 = x.clone()
    x2[:, 4:] += torch.randn_like(x2[:, 4:]) * 5  # change events 4 and 5 only
    after = m.user_states(x2)
    assert torch.allclose(before[:, :4], after[:, :4], atol=1e-6)
    assert not torch.allclose(before[:, 4:], after[:, 4:], atol=1e-3)


def test_user_embedding_is_the_state_after_the_last_event_and_ignores_padding():
    m = make("learn_hybrid")
    content, mask, idx = batch()
    u = m.encode_users(content, mask, idx)
    # the second user has 3 events: the same as feeding exactly those 3
    alone = m.encode_users(content[1:2, :3], mask[1:2, :3], idx[1:2, :3])
    assert torch.allclose(u[1], alone[0], atol=1e-5)
    garbage = content.clone()
    garbage[1, 3:] = 1e3  # padding content must not matter
    assert torch.allclose(m.encode_users(garbage, mask, idx)[1], u[1], atol=1e-5)


def test_right_aligned_input_gives_the_same_embedding():
    m = make("learn")
    content, mask, _ = batch()
    u = m.encode_users(content, mask)
    shift = torch.stack([torch.roll(torch.arange(6), int(6 - mask[i].sum())) for i in range(3)])
    c_r = torch.gather(content, 1, shift[..., None].expand(-1, -1, D_IN))
    m_r = torch.gather(mask, 1, shift)
    assert not torch.equal(m_r, mask)
    assert torch.allclose(m.encode_users(c_r, m_r), u, atol=1e-5)


def test_long_histories_keep_the_most_recent_events():
    m = make("learn")  # max_len 8
    g = torch.Generator().manual_seed(3)
    content = torch.randn(1, 12, D_IN, generator=g)
    mask = torch.ones(1, 12, dtype=torch.bool)
    assert torch.allclose(m.encode_users(content, mask), m.encode_users(content[:, -8:], mask[:, -8:]), atol=1e-5)


def test_item_tower_a_shares_the_user_transformer():
    m = make("learn", "a")
    content, _, _ = batch()
    items = m.encode_items(content[0])
    as_users = m.encode_users(content[0][:, None, :], torch.ones(6, 1, dtype=torch.bool))
    assert torch.allclose(items, as_users, atol=1e-5)
    with torch.no_grad():
        m.transformer.blocks[0].mlp[0].weight.add_(torch.randn_like(m.transformer.blocks[0].mlp[0].weight))
    assert not torch.allclose(m.encode_items(content[0]), items, atol=1e-4)


@pytest.mark.parametrize("tower", ["b", "c"])
def test_item_towers_b_and_c_do_not_use_the_user_transformer(tower):
    m = make("learn", tower)
    content, _, _ = batch()
    items = m.encode_items(content[0])
    assert items.shape == (6, 8)
    with torch.no_grad():
        m.transformer.blocks[0].mlp[0].weight.add_(torch.randn_like(m.transformer.blocks[0].mlp[0].weight))
    assert torch.allclose(m.encode_items(content[0]), items, atol=1e-6)
    if tower == "b":
        assert hasattr(m, "item_transformer")
    else:
        assert not any(n.startswith("item_transformer") for n, _ in m.named_parameters())


@pytest.mark.parametrize("tower", ["a", "b", "c"])
def test_an_item_embedding_depends_only_on_that_item(tower):
    m = make("learn", tower)
    content, _, _ = batch()
    together = m.encode_items(content[0])
    alone = torch.cat([m.encode_items(content[0][i:i + 1]) for i in range(6)])
    assert torch.allclose(together, alone, atol=1e-5)


@pytest.mark.parametrize("tower", ["a", "c"])
def test_unseen_item_does_not_depend_on_any_trained_id_embedding(tower):
    m = make("learn_hybrid", tower)
    content, _, _ = batch()
    unknown = torch.zeros(6, dtype=torch.long)
    before = m.encode_items(content[0], unknown)
    assert torch.allclose(before, m.encode_items(content[0]), atol=1e-6)  # no ids = unknown item
    with torch.no_grad():
        m.item_id.weight[1:] = torch.randn_like(m.item_id.weight[1:]) * 10
    assert torch.allclose(m.encode_items(content[0], unknown), before, atol=1e-6)
    warm = m.encode_items(content[0], torch.arange(1, 7))
    assert not torch.allclose(warm, before, atol=1e-3)


def test_id_dropout_uses_the_unknown_embedding_in_training_only():
    m = make("learn_hybrid", id_dropout=1.0)
    content, _, _ = batch()
    ids = torch.arange(1, 7)
    unknown = m.encode_items(content[0], torch.zeros(6, dtype=torch.long))
    m.train()
    assert torch.allclose(m.encode_items(content[0], ids), unknown, atol=1e-6)  # every id dropped
    m.eval()
    assert not torch.allclose(m.encode_items(content[0], ids), unknown, atol=1e-3)


def test_evidence_weighting_scores_cold_items_from_content_and_popular_items_by_id():
    k = 4.0
    m = make("learn_hybrid", mix_k=k)
    with torch.no_grad():
        m.id_count.copy_(torch.arange(21, dtype=torch.float32) * 3)  # row r: 3r training events, row 0 none
    content, mask, idx = batch()
    ids = torch.tensor([0, 1, 20])
    items = m.encode_items(content[0][:3], ids)
    plain = make("learn_hybrid")  # same seed, same weights, no weighting
    plain.load_state_dict(m.state_dict())
    assert items.shape == (3, 2 * m.config.out_dim) == (3, m.config.vector_dim)
    w = torch.tensor([0.0, 3 / (3 + k), 60 / (60 + k)])[:, None]
    with_id = plain.encode_items(content[0][:3], ids)
    content_only = plain.encode_items(content[0][:3])
    assert torch.allclose(items, torch.cat([w * with_id, (1 - w) * content_only], 1), atol=1e-6)
    users = m.encode_users(content, mask, idx)
    assert torch.allclose(users, torch.cat([plain.encode_users(content, mask, idx), plain.encode_users(content, mask)], 1),
                          atol=1e-6)
    # each reading is the user states' last event (only that one is projected)
    last = mask.sum(1) - 1
    states = plain.user_states(plain.embed_items(content, idx), mask)[torch.arange(len(last)), last]
    assert torch.allclose(users[:, :m.config.out_dim], states, atol=1e-6)
    # both readings come from one pass over twice the rows; without IDs both are the ID-free reading
    no_ids = plain.encode_users(content, mask)
    assert torch.allclose(m.encode_users(content, mask), torch.cat([no_ids, no_ids], 1), atol=1e-6)
    shift = [int(mask.shape[1] - n) for n in mask.sum(1)]  # right-aligned input is re-aligned in the one pass too
    right = [torch.stack([torch.roll(t[b], s, 0) for b, s in enumerate(shift)]) for t in (content, mask, idx)]
    assert torch.allclose(m.encode_users(*right), users, atol=1e-6)
    # the mixed score is one inner product: w <u, v> + (1 - w) <u', v'>
    score = users @ items.T
    expect = (plain.encode_users(content, mask, idx) @ with_id.T) * w.T + \
        (plain.encode_users(content, mask) @ content_only.T) * (1 - w).T
    assert torch.allclose(score, expect, atol=1e-5)
    # a never-seen item (row 0) does not depend on any ID embedding
    before = m.encode_items(content[0][:1], torch.zeros(1, dtype=torch.long))
    with torch.no_grad():
        m.item_id.weight[1:] = torch.randn_like(m.item_id.weight[1:]) * 10
    assert torch.allclose(m.encode_items(content[0][:1], torch.zeros(1, dtype=torch.long)), before, atol=1e-6)
    m.train()  # training never mixes: one out_dim vector per item
    assert m.encode_items(content[0][:3], ids).shape == (3, m.config.out_dim)
    with pytest.raises(ValueError, match="mix_k"):
        make("sasrec", mix_k=1.0)


def test_checkpoints_keep_the_evidence_counts(tmp_path):
    m = make("learn_hybrid", mix_k=2.0)
    with torch.no_grad():
        m.id_count.copy_(torch.arange(21, dtype=torch.float32))
    save_checkpoint(m, m.config, tmp_path)
    back, cfg = load_checkpoint(tmp_path)
    assert cfg.mix_k == 2.0 and torch.equal(back.id_count, m.id_count)


def test_sasrec_ignores_content_and_shares_its_id_table():
    m = make("sasrec")
    content, mask, idx = batch()
    u = m.encode_users(None, mask, idx)
    assert torch.allclose(u, m.encode_users(content * 100, mask, idx), atol=1e-6)
    v = m.encode_items(None, torch.tensor([3]))
    assert torch.allclose(v, m.project(m.item_id.weight[3:4]), atol=1e-6)


def test_checkpoint_round_trip_without_pickle(tmp_path):
    m = make("learn_hybrid", "b")
    with torch.no_grad():
        m.content_mean.fill_(0.25)
    save_checkpoint(m, m.config, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "model.safetensors"]
    assert json.loads((tmp_path / "config.json").read_text())["kind"] == "learn_hybrid"
    loaded, cfg = load_checkpoint(tmp_path)
    assert cfg == m.config and not loaded.training
    assert torch.equal(loaded.content_mean, m.content_mean)
    content, mask, idx = batch()
    assert torch.allclose(loaded.encode_users(content, mask, idx), m.encode_users(content, mask, idx), atol=1e-6)
    assert torch.allclose(loaded.encode_items(content[0], idx[0]), m.encode_items(content[0], idx[0]), atol=1e-6)


def test_missing_checkpoint_file_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_checkpoint(tmp_path)


def test_bad_config_is_rejected():
    with pytest.raises(ValueError, match="item_tower"):
        PCHConfig(item_tower="d")
    with pytest.raises(ValueError, match="ID vocab"):
        PCHConfig(kind="sasrec", n_items=0)


# ------------------------------------------------------------------------------ SASRec as published
def sasrec(**kw):
    torch.manual_seed(0)
    cfg = PCHConfig(kind="sasrec", d_in=0, d_model=8, n_layers=2, n_heads=1, dropout=0.0, max_len=8, out_dim=8,
                    n_items=20, block="sasrec", positions="from_end", similarity="dot", **kw)
    return build_model(cfg).eval()


def test_sasrec_block_scores_with_the_raw_item_table_and_xavier_init():
    m = sasrec()
    assert isinstance(m.head, torch.nn.Identity)
    idx = torch.arange(1, 6)
    assert torch.equal(m.encode_items(None, idx), m.item_id.weight[1:6])  # the input table is the output table
    xavier = (2.0 / (21 + 8)) ** 0.5
    assert m.item_id.weight.std().item() == pytest.approx(xavier, rel=0.3)
    u = m.encode_users(None, torch.ones(2, 3, dtype=torch.bool), torch.randint(1, 21, (2, 3)))
    assert u.shape == (2, 8) and not torch.allclose(u.norm(dim=-1), torch.ones(2))  # inner products, not cosine
    with pytest.raises(ValueError, match="out_dim"):
        PCHConfig(kind="sasrec", d_model=8, out_dim=16, n_heads=1, n_items=5, block="sasrec")


@pytest.mark.parametrize("positions, moves", [("from_end", True), ("from_start", False)])
def test_positions_from_the_end_put_the_newest_event_at_the_last_position(positions, moves):
    """Only position max_len - 1 carries a signal: it reaches a one-event history's state when positions
    count back from the newest event, and never when they count from the oldest (position 0)."""
    m = sasrec() if positions == "from_end" else make("sasrec", positions="from_start")
    with torch.no_grad():
        m.transformer.pos.weight.zero_()
        before = m.encode_users(None, torch.ones(1, 1, dtype=torch.bool), torch.tensor([[3]])).clone()
        m.transformer.pos.weight[-1] = 5.0
        after = m.encode_users(None, torch.ones(1, 1, dtype=torch.bool), torch.tensor([[3]]))
    assert (not torch.allclose(before, after, atol=1e-4)) is moves
    # padding never changes a state: the same 2 events alone or in a wider batch
    m2 = sasrec()
    idx = torch.tensor([[4, 7, 0, 0], [1, 2, 3, 5]])
    mask = torch.tensor([[True, True, False, False], [True] * 4])
    wide = m2.encode_users(None, mask, idx)
    alone = m2.encode_users(None, mask[:1, :2], idx[:1, :2])
    assert torch.allclose(wide[0], alone[0], atol=1e-5)
