"""Decoding (generate.py): the step whose position is a device tensor, which a CUDA graph captures,
computes what the step with a Python position computes.

- the model's forward at a device position (the whole cache attended, the later places masked)
  against the forward at an int position: the same logits, and the same cache contents;
- the Decoder's "static" mode (that step, run eagerly) samples what "eager" samples, and both what
  generate() returns; the modes' errors;
- prompts of different lengths decoded in one left-padded batch give each prompt's logits alone
  (its positions count from its first token, and no row sees padding), in both step forms;
- several new positions at a device position give the int position's logits;
- speculative decoding with the MTP module's drafts gives greedy decoding's tokens, drafts kept or
  not, in the Python loop and in the device-side step a CUDA graph captures (which also samples what
  the loop samples from the same seed).
The captured graph itself is tested against the static step on a GPU (tests/test_speed_gpu.py).
"""

from __future__ import annotations

import pytest
import torch

from conftest import POSTTRAIN_MODEL as MODEL
from moeforge.config import load_config
from moeforge.errors import MoeforgeError
from moeforge.generate import Decoder, generate, sample_rows
from moeforge.model import build_model


def _model(seed: int = 1):
    cfg = load_config(None, None, MODEL)
    torch.manual_seed(seed)
    return build_model(cfg.model, "cpu").eval()


@torch.no_grad()
def test_a_device_position_gives_the_same_logits_and_cache():
    model = _model()
    prompt = torch.tensor([[5, 17, 300, 42], [9, 8, 7, 6]])
    plain, static = Decoder(model, 2, 12, "eager"), Decoder(model, 2, 12, "static")
    torch.testing.assert_close(plain.prefill(prompt), static.prefill(prompt), rtol=0, atol=0)
    nxt = torch.tensor([3, 11])
    for step in range(6):
        a, b = plain.step(nxt), static.step(nxt)
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)
        assert float((a - b).abs().max()) < 1e-4
        nxt = a.argmax(dim=-1)
        assert static._pos.item() == plain.position - 1 == 4 + step  # the position the step wrote
    for layer, (x, y) in enumerate(zip(plain.caches, static.caches)):
        torch.testing.assert_close(y.kv[:, :10], x.kv[:, :10], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(y.pe[:, :10], x.pe[:, :10], rtol=1e-5, atol=1e-5)
        if layer == 0:  # the first layer's entries depend on the tokens alone: equal bits
            assert torch.equal(x.kv[:, :10], y.kv[:, :10]) and torch.equal(x.pe[:, :10], y.pe[:, :10])
        assert not y.kv[:, 10:].any()  # nothing written past the decoded positions
    # a value in a later place of the cache stays hidden from the step
    caches = static.caches
    caches[0].kv[:, 11] = 1.0
    c = static.step(nxt)
    caches[0].kv[:, 11] = 0.0
    d = plain.step(nxt)
    torch.testing.assert_close(c, d, rtol=1e-5, atol=1e-5)


@torch.no_grad()
def test_several_positions_at_a_device_position():
    """Three new positions at once at a device position (what speculative decoding's device-side step
    runs: the whole cache attended, each new position's later slots masked, a stale value in a later
    slot hidden) give the int position's logits and cache entries."""
    model = _model()
    prompt = torch.tensor([[5, 17, 300, 42], [9, 8, 7, 6]])
    new = torch.tensor([[3, 11, 40], [1, 2, 3]])
    logits = []
    for pos in (4, torch.tensor(4)):
        caches = model.new_caches(2, 12)
        model(prompt, caches, 0)
        caches[0].kv[:, 9] = 1.0  # a stale value past the new positions
        logits.append(model(new, caches, pos))
        assert torch.equal(caches[0].kv[:, 9], torch.ones_like(caches[0].kv[:, 9]))  # not written
    torch.testing.assert_close(logits[1], logits[0], rtol=1e-5, atol=1e-5)


@torch.no_grad()
def test_static_decoding_samples_what_eager_decoding_samples():
    model = _model()
    rows = [[5, 17, 300, 42]] * 3 + [[9, 8, 7, 6]] * 2
    got = {}
    for mode in ("eager", "static"):
        gen = torch.Generator().manual_seed(0)
        got[mode] = sample_rows(model, rows, 8, 1.0, 1.0, gen, stop_id=None, mode=mode)
    assert torch.equal(got["eager"][0], got["static"][0]) and got["eager"][1].all()
    assert got["eager"][0].unique().numel() > 3  # sampled, not one repeated token
    greedy = generate(model, rows[0], 8, temperature=0.0)
    assert greedy == generate(model, rows[0], 8, temperature=0.0, mode="static")
    stop = greedy[3]
    assert generate(model, rows[0], 8, temperature=0.0, stop_id=stop) == greedy[:greedy.index(stop) + 1]


def test_decoder_errors():
    model = _model()
    with pytest.raises(ValueError, match="mode must be one of"):
        Decoder(model, 1, 8, "fast")
    with pytest.raises(ValueError, match="CUDA"):
        Decoder(model, 1, 8, "graph")
    assert Decoder(model, 1, 8).mode == "eager"  # auto on a CPU


@pytest.mark.parametrize("mode", ["eager", "static"])
@torch.no_grad()
def test_left_padded_prompts_decode_as_they_do_alone(mode):
    model = _model()
    prompts = [[5, 17, 300, 42, 9, 9, 1], [9, 8], [77, 1, 2, 3], [4]]
    L = max(map(len, prompts))
    dec = Decoder(model, len(prompts), L + 6, mode)
    padded = torch.tensor([[0] * (L - len(p)) + p for p in prompts])
    logits = dec.prefill(padded, torch.tensor([L - len(p) for p in prompts]))
    alone = [Decoder(model, 1, len(p) + 6, "eager") for p in prompts]
    want = torch.cat([d.prefill(torch.tensor([p])) for d, p in zip(alone, prompts)])
    for step in range(6):
        assert torch.isfinite(logits).all()
        torch.testing.assert_close(logits, want, rtol=1e-4, atol=1e-4)
        nxt = want.argmax(dim=-1)
        logits = dec.step(nxt)
        want = torch.cat([d.step(n.view(1)) for d, n in zip(alone, nxt)])
    # the padding matters: the same batch without `start` (padding seen as tokens, positions from
    # slot 0) gives other logits for the padded rows
    plain = Decoder(model, len(prompts), L + 6, "eager").prefill(padded)
    first = torch.cat([d.prefill(torch.tensor([p])) for d, p in zip(
        [Decoder(model, 1, len(p) + 6, "eager") for p in prompts], prompts)])
    assert (plain[1:] - first[1:]).abs().max() > 1e-3 and torch.allclose(plain[0], first[0], atol=1e-4)
    # sample_rows pads by itself: greedy rows equal each prompt's own greedy completion
    tokens, mask = sample_rows(model, prompts, 5, 0.0, 1.0, None, stop_id=None, mode=mode)
    for p, row in zip(prompts, tokens):
        assert row.tolist() == generate(model, p, 5, temperature=0.0)



def _oracle_drafts(monkeypatch, gen, mode: str, oracle: list[int], seen: dict) -> None:
    """Replace the MTP module's greedy draft by oracle[slot], recording in seen[slot] the logits the
    MTP module gave for that slot (the draft it would have made)."""
    if mode == "eager":
        def draft(model, h1, slot, *sampling):
            seen[slot] = model.head(h1[:, -1:])[0, -1]
            return oracle[slot], None
        monkeypatch.setattr(gen, "_draft", draft)
    else:
        table = torch.tensor(oracle + [0] * 40)

        def draft(model, h1, slot):
            seen[int(slot)] = model.head(h1)[0, -1]
            return table.index_select(0, slot.view(1))
        monkeypatch.setattr(gen, "_device_draft", draft)


@pytest.mark.parametrize("mode", ["eager", "static"])
def test_speculative_decoding_gives_greedy_decodings_tokens(monkeypatch, mode):
    """generate_speculative (the MTP module drafting the token after next, both checked in one
    forward) returns greedy decoding's tokens, in both forms of its step (the Python loop, and the
    step with its state on the device that a CUDA graph captures): with the random MTP module's own
    drafts (nearly all rejected), with an oracle that drafts greedy decoding's next-but-one token
    (all accepted: two tokens a forward), and with one that is wrong at every third slot (both
    cases, one after the other); the MTP module sees the same inputs in both forms (its logits at
    each slot equal the eager loop's); a stop token ends it as it ends greedy decoding; the
    context's last slot is reached. A model without MTP is refused."""
    from moeforge import generate as gen

    model = _model(2)
    for prompt in ([5, 9, 300, 41], [7], list(range(20, 40))):
        want = generate(model, prompt, 12, temperature=0.0)
        got, stats = gen.generate_speculative(model, prompt, 12, mode=mode)
        assert got == want and stats["drafts"] == stats["forwards"] <= 11, (prompt, stats)
        assert 12 - 1 == stats["forwards"] + stats["accepted"]  # the first token comes from the prefill

        oracle = prompt + want + [0]  # the token at each slot, as greedy decoding has it
        _oracle_drafts(monkeypatch, gen, mode, oracle, {})
        got, stats = gen.generate_speculative(model, prompt, 12, mode=mode)
        monkeypatch.undo()
        assert got == want and stats["accepted"] == stats["drafts"] == stats["forwards"] == 6, stats  # 1 + 2 x 6 >= 12

        longer = generate(model, prompt, 20, temperature=0.0)
        wrong = [t if slot % 3 else (t + 1) % model.cfg.vocab_size for slot, t in enumerate(prompt + longer + [0])]
        seen = {m: {} for m in ("eager", mode)}
        for m in seen:
            _oracle_drafts(monkeypatch, gen, m, wrong, seen[m])
            got, stats = gen.generate_speculative(model, prompt, 20, mode=m)
            monkeypatch.undo()
            assert got == longer
            assert 0 < stats["accepted"] < stats["drafts"], stats
        for slot, logits in seen["eager"].items():
            torch.testing.assert_close(seen[mode][slot], logits, rtol=1e-4, atol=1e-4)
    edge = list(range(100, 160))  # 60 tokens + 4 new: the model's whole context of 64, no slot to spare
    assert gen.generate_speculative(model, edge, 4, mode=mode)[0] == generate(model, edge, 4, temperature=0.0)
    for stop in want[:5]:
        assert gen.generate_speculative(model, prompt, 12, stop_id=stop, mode=mode)[0] == generate(
            model, prompt, 12, temperature=0.0, stop_id=stop)
    no_mtp = build_model(load_config(None, None, [*MODEL, "model.num_nextn_predict_layers=0"]).model, "cpu")
    with pytest.raises(MoeforgeError, match="MTP"):
        gen.generate_speculative(no_mtp, [5], 4, mode=mode)


def test_speculative_sampling_rule_gives_the_models_distribution():
    """accept_draft: a draft drawn from q, kept with probability min(1, p/q) and else replaced from
    max(0, p - q), gives tokens distributed as p (300,000 trials, each frequency within 5 standard
    errors), keeps a share sum(min(p, q)) of the drafts, and keeps every draft when q is p."""
    from moeforge.generate import accept_draft

    g = torch.Generator().manual_seed(0)
    p = torch.tensor([0.40, 0.25, 0.15, 0.10, 0.07, 0.03])
    q = torch.tensor([0.10, 0.05, 0.30, 0.30, 0.25, 0.00])  # token 5 never drafted: only the residual gives it
    n = 300_000
    drafts = torch.multinomial(q.expand(n, -1), 1, replacement=True, generator=g).squeeze(1)
    tokens, kept = accept_draft(p.expand(n, -1), q.expand(n, -1), drafts, g)
    freq = torch.bincount(tokens, minlength=6).double() / n
    assert ((freq - p.double()).abs() <= 5 * (p.double() * (1 - p.double()) / n).sqrt()).all(), freq
    assert kept.double().mean().item() == pytest.approx(torch.minimum(p, q).sum().item(), abs=5e-3)
    same, kept_all = accept_draft(p.expand(1000, -1), p.expand(1000, -1), drafts[:1000], g)
    assert kept_all.all() and torch.equal(same, drafts[:1000])


def test_speculative_sampling_decodes():
    """generate_speculative with temperature > 0: the same seed gives the same tokens, another seed
    others; with a nucleus so small that it holds only the likeliest token (top_p 1e-6), sampling is
    greedy decoding, and so is speculative sampling, token for token (the path's caches and
    positions under the sampling rule). The device-side steps ("static", what a CUDA graph replays)
    draw what the Python loop draws from the same seed: the same tokens and counts, drafts kept and
    rejected, through a stop token."""
    from moeforge import generate as gen

    model = _model(2)
    prompt = [5, 9, 300, 41]
    a = gen.generate_speculative(model, prompt, 12, temperature=1.0, seed=3)[0]
    assert a == gen.generate_speculative(model, prompt, 12, temperature=1.0, seed=3)[0] and len(a) == 12
    assert a != gen.generate_speculative(model, prompt, 12, temperature=1.0, seed=4)[0]
    greedy = generate(model, prompt, 12, temperature=0.0)
    for mode in ("eager", "static"):
        assert gen.generate_speculative(model, prompt, 12, temperature=1.0, top_p=1e-6, seed=5, mode=mode)[0] == greedy
    rejected = 0
    for temperature, top_p, seed in ((1.0, 1.0, 3), (0.6, 0.95, 7), (2.0, 0.9, 11)):
        runs = {m: gen.generate_speculative(model, prompt, 30, temperature=temperature, top_p=top_p, seed=seed, mode=m)
                for m in ("eager", "static")}
        assert runs["static"] == runs["eager"], runs
        stats = runs["eager"][1]
        rejected += stats["drafts"] - stats["accepted"]
        stop = runs["eager"][0][9]
        stopped = [gen.generate_speculative(model, prompt, 30, stop_id=stop, temperature=temperature, top_p=top_p,
                                            seed=seed, mode=m)[0] for m in ("eager", "static")]
        assert stopped[0] == stopped[1] == runs["eager"][0][:runs["eager"][0].index(stop) + 1]
    assert rejected > 0  # both branches of the rule ran


@torch.no_grad()
def test_speculative_rows_decode_as_plain_rows(monkeypatch):
    """sample_rows(speculative=True): the device-side speculative step over several rows of different
    prompt lengths (left-padded, each row at a slot of its own) gives plain decoding's greedy tokens
    and masks, with the MTP module's own drafts and with a table of drafts that keeps and rejects
    (each row wrong at every (r + 2)-th slot, so the rows move apart), through stop tokens that
    end some rows before others; a one-token nucleus samples greedily; a model without MTP and
    lockstep ranks are refused."""
    from moeforge import generate as gen

    model = _model(2)
    prompts = [[5, 17, 300, 42, 9, 9, 1], [9, 8], [77, 1, 2, 3], [4]]
    L = max(map(len, prompts))
    want, mask = sample_rows(model, prompts, 16, 0.0, 1.0, None, stop_id=None, mode="eager")
    got = sample_rows(model, prompts, 16, 0.0, 1.0, None, stop_id=None, speculative=True)
    assert torch.equal(got[0], want) and torch.equal(got[1], mask)

    rows = [[0] * (L - len(p)) + p + want[r].tolist() + [0] * 8 for r, p in enumerate(prompts)]
    table = torch.tensor([[t if slot % (r + 2) else (t + 1) % model.cfg.vocab_size for slot, t in enumerate(row)]
                          for r, row in enumerate(rows)])
    monkeypatch.setattr(gen, "_device_draft", lambda model, h1, slot: table.gather(1, slot[:, None]).squeeze(1))
    steps = gen._SpeculativeRows(model, prompts, 16, False)
    tokens, stats = steps.decode()
    assert tokens == want.tolist()
    assert all(0 < s["accepted"] < s["drafts"] for s in stats), stats
    assert len({s["forwards"] for s in stats}) > 1  # the rows moved apart
    for stop in (want[1, 3].item(), want[0, 10].item()):
        plain = sample_rows(model, prompts, 16, 0.0, 1.0, None, stop_id=stop, mode="eager")
        spec = sample_rows(model, prompts, 16, 0.0, 1.0, None, stop_id=stop, speculative=True)
        assert torch.equal(spec[0], plain[0]) and torch.equal(spec[1], plain[1])
        assert not plain[1].all()  # some row stopped early
    monkeypatch.undo()

    g = torch.Generator().manual_seed(0)
    nucleus = sample_rows(model, prompts, 16, 1.0, 1e-6, g, stop_id=None, speculative=True)
    assert torch.equal(nucleus[0], want)
    runs = [sample_rows(model, prompts, 16, 1.0, 1.0, torch.Generator().manual_seed(s), stop_id=None, speculative=True)[0]
            for s in (1, 1, 2)]
    assert torch.equal(runs[0], runs[1]) and not torch.equal(runs[0], runs[2])

    no_mtp = build_model(load_config(None, None, [*MODEL, "model.num_nextn_predict_layers=0"]).model, "cpu")
    with pytest.raises(MoeforgeError, match="MTP"):
        sample_rows(no_mtp, prompts, 4, 0.0, 1.0, None, stop_id=None, speculative=True)
    with pytest.raises(MoeforgeError, match="one process"):
        sample_rows(model, prompts, 4, 0.0, 1.0, None, stop_id=None, lockstep=object(), speculative=True)


@torch.no_grad()
def test_a_reused_decoder_decodes_as_a_new_one(monkeypatch):
    """sample_rows keeps the decoder of a device-side step ("static" here; "graph" and "compiled" on a
    GPU) for the next call of the same shape: other prompts of other lengths (left-padded or not)
    decode as with a new decoder, also after the weights changed in place (an optimizer step); new
    storage, other rows or another context size give a new decoder."""
    from moeforge import generate as gen

    torch.manual_seed(1)
    model = build_model(load_config(None, None, [*MODEL, "model.max_position_embeddings=96"]).model, "cpu").eval()
    gen.release_decoder()

    def decode(prompts, new=6, mode="static"):
        return sample_rows(model, prompts, new, 0.0, 1.0, None, stop_id=None, mode=mode)[0]

    def kept():
        return gen._kept[0][1] if gen._kept else None

    first = [[5, 17, 300, 42, 9, 9, 1], [9, 8], [77, 1, 2, 3], [4]]
    second = [[3, 3, 3], [8, 1, 2], [300, 301, 302], [6, 5, 4]]  # one length: no padding
    assert torch.equal(decode(first), decode(first, mode="eager"))
    decoder = kept()
    assert decoder is not None and decoder.max_len == 64  # 7 + 6 slots, rounded up
    assert torch.equal(decode(second), decode(second, mode="eager")) and kept() is decoder
    assert torch.equal(decode(first, new=20), decode(first, new=20, mode="eager")) and kept() is decoder
    before = decode(second)
    for p in model.parameters():  # in place, as an optimizer step
        p.add_(torch.randn_like(p) * 0.5 * p.std().clamp(min=0.02))
    after = decode(second)
    assert kept() is decoder and not torch.equal(after, before)
    assert torch.equal(after, decode(second, mode="eager"))
    decode(second[:3])  # other rows
    assert kept() is not decoder
    decoder = kept()
    model.head.weight.data = model.head.weight.data.clone()  # new storage: the old addresses are stale
    decode(second[:3])
    assert kept() is not decoder
    decoder = kept()
    decode(second[:3], new=70)  # 73 slots -> 128, at most the context: 96
    assert kept() is not decoder and kept().max_len == 96
    gen.release_decoder()
    assert kept() is None
    # an eager decoder is never kept
    decode(second, mode="eager")
    assert kept() is None


@torch.no_grad()
def test_compiled_decoding_matches_the_static_step(monkeypatch):
    """The "compiled" mode runs the static step through torch.compile (on a GPU in BF16 also captured
    as a CUDA graph: tests/test_speed_gpu.py). Traced here with the aot_eager backend, which runs the
    same operators, so the greedy tokens equal the static step's. Speculative decoding refuses it."""
    from moeforge import generate as gen

    model = _model()
    gen.release_decoder()
    monkeypatch.setattr(gen, "_compiled_decode_step", torch.compile(gen._decode_step, backend="aot_eager"))
    prompts = [[5, 17, 300, 42, 9, 9, 1], [9, 8], [77, 1, 2, 3], [4]]
    for temperature in (0.0, 1.0):
        got = {}
        for mode in ("static", "compiled"):
            g = torch.Generator().manual_seed(0)
            got[mode] = sample_rows(model, prompts, 8, temperature, 1.0, g, stop_id=None, mode=mode)[0]
            assert gen._kept[0][1].mode == mode
        assert torch.equal(got["compiled"], got["static"])
    with pytest.raises(MoeforgeError, match="compiled step"):
        sample_rows(model, prompts, 4, 0.0, 1.0, None, stop_id=None, mode="compiled", speculative=True)
    gen.release_decoder()


@torch.no_grad()
def test_generate_streams_the_ids_it_returns():
    """generate(stream=f) calls f with each new id as it is decoded: the ids it returns, in order,
    through the stop token; sample_rows(on_token=...) sees each position's tokens and mask."""
    model = _model()
    seen = []
    ids = generate(model, [5, 17, 300], 12, temperature=1.0, seed=3, stream=seen.append)
    assert seen == ids and len(ids) == 12
    stop = ids[4]
    seen = []
    stopped = generate(model, [5, 17, 300], 12, temperature=1.0, seed=3, stop_id=stop, stream=seen.append)
    assert seen == stopped == ids[:ids.index(stop) + 1]
    steps = []
    tokens, mask = sample_rows(model, [[5, 17], [9]], 6, 0.0, 1.0, None, stop_id=None,
                               on_token=lambda t, m: steps.append((t.clone(), m.clone())))
    assert torch.equal(torch.stack([t for t, _ in steps], 1), tokens) and torch.equal(torch.stack([m for _, m in steps], 1), mask)


def test_text_stream_prints_what_decoding_the_whole_prints(capsys):
    """cli._TextStream (generate's and chat's output as it is decoded): with ids that split a
    character's UTF-8 bytes (byte-level BPE), what it prints equals the whole text decoded at once;
    an incomplete last character prints as U+FFFD, as the whole decode gives it; skipped ids (chat's
    end of text) are left out."""
    from moeforge.cli import _TextStream
    from moeforge.data import load_tokenizer

    tok = load_tokenizer(None)
    for text in ("x = ünïcødé → 東京 🙂 done", "plain ascii text\n  indented"):
        ids = tok.encode(text)
        assert any("\ufffd" in tok.decode(ids[:k]) for k in range(1, len(ids))) or text.isascii()
        for cut in (ids, ids[:-1]):  # the whole, and one that may end inside a character
            shown = _TextStream(tok, skip=(tok.eos_id,))
            for i in [*cut[:3], tok.eos_id, *cut[3:]]:
                shown(i)
            shown.close()
            assert capsys.readouterr().out == tok.decode(cut) + "\n"
