"""Conversations in SFT data and `generate --chat` (posttrain/chat.py).

- the conversation's checks (roles, order, types) as one-line errors naming the file, line and message;
- the plain template (moeforge's tokenizer) and DeepSeek-V3's (a tokenizer with its chat tokens):
  the ids are the pieces' own, the markers their special ids (text spelling a marker stays text);
- the SFT targets: every assistant turn and its end-of-text scored, the system and user turns not;
- `moeforge sft` on a file mixing conversations and prompt/response pairs trains, and `generate
  --chat` prompts the model with the template's user turn.
"""

from __future__ import annotations

import json

import pytest
import torch
from tokenizers import AddedToken
from tokenizers import Tokenizer as HFTokenizer

from moeforge.data import load_tokenizer
from moeforge.data.tokenizer import DEFAULT_TOKENIZER_PATH, Tokenizer
from moeforge.errors import MoeforgeError
from moeforge.model.mtp import IGNORE_INDEX
from moeforge.posttrain.chat import DEEPSEEK_ASSISTANT, DEEPSEEK_BOS, DEEPSEEK_USER, ChatTemplate, check_messages
from moeforge.posttrain.sft import collate, read_data, tokenize_examples

CONVERSATION = [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "2+2="},
                {"role": "assistant", "content": "4"}, {"role": "user", "content": "and 3+3?"},
                {"role": "assistant", "content": "6, since 3+3=6."}]


def _deepseek_tokenizer(tmp_path) -> Tokenizer:
    """moeforge's tokenizer with DeepSeek-V3's three chat tokens added as special tokens."""
    hf = HFTokenizer.from_file(str(DEFAULT_TOKENIZER_PATH))
    hf.add_special_tokens([AddedToken(t, special=True) for t in (DEEPSEEK_BOS, DEEPSEEK_USER, DEEPSEEK_ASSISTANT)])
    path = tmp_path / "tokenizer.json"
    hf.save(str(path))
    return Tokenizer(path)


@pytest.mark.parametrize("messages, fragment", [
    ([], "non-empty list"),
    ("hi", "non-empty list"),
    ([{"role": "user"}], "message 0 must be an object"),
    ([{"role": "user", "content": 3}], "message 0 must be an object"),
    ([{"role": "assistant", "content": "x"}], "message 0 has role 'assistant', expected 'user'"),
    ([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}], "message 1 has role 'user', expected 'assistant'"),
    ([{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}, {"role": "system", "content": "c"}],
     "message 2 has role 'system'"),
    ([{"role": "system", "content": "s"}, {"role": "user", "content": "a"}], "must end with an assistant turn"),
    ([{"role": "system", "content": "s"}], "must end with an assistant turn"),
])
def test_conversation_checks(messages, fragment):
    with pytest.raises(MoeforgeError, match=fragment):
        check_messages(messages, "data file 'x', line 3")


def test_plain_template():
    tok = load_tokenizer(None)
    t = ChatTemplate(tok)
    assert t.name == "plain"
    prompt, response, unscored = t.render(check_messages(CONVERSATION, "here"))
    enc = tok.encode
    assert prompt == enc("Answer briefly.\n") + enc("User: 2+2=\nAssistant:\n")
    second = enc("User: and 3+3?\nAssistant:\n")
    assert response == enc("4") + [tok.eos_id] + second + enc("6, since 3+3=6.") + [tok.eos_id]
    first = len(enc("4")) + 1
    assert unscored == ((first, first + len(second)),)
    assert t.prompt("2+2=") == enc("User: 2+2=\nAssistant:\n")
    # the pieces give the ids of the whole text at once (they meet where the pre-tokeniser splits)
    text = "Answer briefly.\nUser: 2+2=\nAssistant:\n4"
    assert prompt + response[:len(enc("4"))] == enc(text)


@pytest.mark.parametrize("system", ["Answer briefly.\n", "Answer briefly.\n\n", "  ", "Be brief: "])
def test_plain_template_prompt_is_its_whole_text(system):
    """A system message that ends in whitespace meets the template's newline as the whole text
    tokenised at once does (the pre-tokeniser joins a newline run), in every way a prompt is built."""
    tok = load_tokenizer(None)
    t = ChatTemplate(tok)
    whole = tok.encode(f"{system}\nUser: 2+2=\nAssistant:\n")
    assert t.prompt("2+2=", system) == whole
    assert t.history_prompt(system, [], "2+2=") == whole
    prompt, response, _ = t.render([("system", system), ("user", "2+2="), ("assistant", "4")])
    assert prompt == whole and response == tok.encode("4") + [tok.eos_id]
    after = t.history_prompt(system, [("2+2=", "4")], "3+3=")
    assert after == whole + tok.encode("4") + [tok.eos_id] + tok.encode("User: 3+3=\nAssistant:\n")


def test_deepseek_template(tmp_path):
    tok = _deepseek_tokenizer(tmp_path)
    t = ChatTemplate(tok)
    assert t.name == "deepseek"
    bos, user, assistant = (tok.token_id(x) for x in (DEEPSEEK_BOS, DEEPSEEK_USER, DEEPSEEK_ASSISTANT))
    prompt, response, unscored = t.render(check_messages(CONVERSATION, "here"))
    enc = tok.encode
    assert prompt == [bos] + enc("Answer briefly.") + [user] + enc("2+2=") + [assistant]
    assert response == enc("4") + [tok.eos_id] + [user] + enc("and 3+3?") + [assistant] + enc("6, since 3+3=6.") + [tok.eos_id]
    assert unscored == ((len(enc("4")) + 1, len(enc("4")) + 2 + len(enc("and 3+3?")) + 1),)
    assert t.prompt("hi") == [bos, user] + enc("hi") + [assistant]
    assert user not in t.prompt(f"say {DEEPSEEK_USER}")[2:-1]  # a marker spelled in the text stays text


def test_sft_targets_of_a_conversation(tmp_path):
    data = tmp_path / "chat.jsonl"
    data.write_text(json.dumps({"messages": CONVERSATION}) + "\n" + json.dumps({"prompt": "1+1=", "response": "2"}) + "\n")
    tok = load_tokenizer(None)
    rows = read_data(data)
    assert [r[0] for r in rows] == [1, 2] and len(rows[1]) == 3
    chat, pair = tokenize_examples(rows, tok, 512, data, "512")
    inputs, targets = collate([chat], tok.eos_id)
    seq = chat.prompt + chat.response
    scored = [seq[t + 1] for t in range(len(seq) - 1) if targets[0, t] != IGNORE_INDEX]
    assert scored == tok.encode("4") + [tok.eos_id] + tok.encode("6, since 3+3=6.") + [tok.eos_id]
    assert torch.equal(inputs[0], torch.tensor(seq[:-1]))
    assert pair.unscored == () and pair.response == tok.encode("2") + [tok.eos_id]
    with pytest.raises(MoeforgeError, match="line 1: the example is .*plain chat template"):
        tokenize_examples(rows, tok, 10, data, "10")
    data.write_text(json.dumps({"messages": [{"role": "user", "content": "x"}]}) + "\n")
    with pytest.raises(MoeforgeError, match="chat.jsonl', line 1: the conversation must end with an assistant turn"):
        read_data(data)


def test_sft_data_writes_conversations(cli, tmp_path):
    """sft-data --chat: the task's worked examples as one-exchange conversations, the same pairs."""
    plain, chat = tmp_path / "plain.jsonl", tmp_path / "chat.jsonl"
    assert cli("sft-data", "--n", "5", "--out", plain).rc == 0 and cli("sft-data", "--n", "5", "--out", chat, "--chat").rc == 0
    pairs = [(r[1], r[2]) for r in read_data(plain)]
    turns = [r[1] for r in read_data(chat)]
    assert turns == [[("user", p), ("assistant", a)] for p, a in pairs]
    multi = tmp_path / "multi.jsonl"  # --turns 3: 2 conversations of 3 of the same problems (6 drawn)
    r = cli("sft-data", "--n", "2", "--out", multi, "--chat", "--turns", "3")
    assert r.rc == 0 and "2 arithmetic conversations of 3 exchanges" in r.out
    six = tmp_path / "six.jsonl"
    assert cli("sft-data", "--n", "6", "--out", six).rc == 0
    pairs = [(r[1], r[2]) for r in read_data(six)]
    assert [r[1] for r in read_data(multi)] == [[t for p, a in pairs[i:i + 3] for t in (("user", p), ("assistant", a))]
                                               for i in (0, 3)]
    for flags, fragment in ((["--turns", "2"], "only with --chat"), (["--chat", "--turns", "0"], "--turns 0")):
        r = cli("sft-data", "--n", "2", "--out", tmp_path / "bad.jsonl", *flags)
        assert r.rc == 2 and fragment in r.err and not (tmp_path / "bad.jsonl").exists()


def test_sft_on_conversations_and_generate_chat(cli, expect_error, base_checkpoint, tmp_path):
    from moeforge.generate import generate
    from moeforge.train.checkpoint import load_trained_model

    data = tmp_path / "chat.jsonl"
    lines = [json.dumps({"messages": [{"role": "user", "content": f"{a}+{a}="},
                                      {"role": "assistant", "content": str(2 * a)}]}) for a in range(6)]
    data.write_text("\n".join(lines + [json.dumps({"prompt": "9+9=", "response": "18"})]) + "\n")
    r = cli("sft", "--checkpoint", base_checkpoint, "--data", data, "--out", tmp_path / "o", "--steps", "2",
            "--batch-size", "2", "--no-progress")
    assert r.rc == 0, r.err
    records = [json.loads(x) for x in (tmp_path / "o" / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in records if "loss" in x] == [1, 2] and "val_loss" in records[-1]

    r = cli("generate", "--checkpoint", tmp_path / "o", "--prompt", "3+3=", "--chat", "--max-new-tokens", "5",
            "--temperature", "0")
    assert r.rc == 0, r.err
    model, cfg = load_trained_model(tmp_path / "o", "cpu")
    tok = load_tokenizer(cfg.train.tokenizer or None)
    want = generate(model, ChatTemplate(tok).prompt("3+3="), 5, temperature=0.0, stop_id=tok.eos_id)
    assert r.out == tok.decode(want) + "\n"

    data.write_text(lines[0] + "\n" + json.dumps({"messages": [{"role": "user", "content": "x"},
                                                                {"role": "user", "content": "y"}]}) + "\n")
    expect_error(cli("sft", "--checkpoint", base_checkpoint, "--data", data, "--out", tmp_path / "p"), "sft",
                 "chat.jsonl", "line 2", "message 1 has role 'user'")
    assert not (tmp_path / "p").exists()


def test_history_prompt_is_the_rendered_conversation(tmp_path):
    """The prompt of a conversation's next answer (what `moeforge chat` feeds the model) is the
    rendered conversation up to that answer, in both templates."""
    for tok in (load_tokenizer(None), _deepseek_tokenizer(tmp_path)):
        t = ChatTemplate(tok)
        prompt, response, _ = t.render(check_messages(CONVERSATION, "here"))
        whole = prompt + response
        last = tok.encode(CONVERSATION[-1]["content"]) + [tok.eos_id]
        assert t.history_prompt("Answer briefly.", [("2+2=", "4")], "and 3+3?") == whole[:len(whole) - len(last)]
        assert t.history_prompt("Answer briefly.", [("2+2=", tok.encode("4"))], "and 3+3?") == whole[:len(whole) - len(last)]


def test_chat_command(cli, base_checkpoint, monkeypatch, expect_error):
    """`moeforge chat`: each stdin line a user turn, answered with the conversation so far as context
    (the answers equal generate's on the history prompts, the earlier answers as the ids the model
    generated); /reset forgets it; an empty line ends; a
    message that cannot fit the context is skipped with a note, the oldest exchanges make room."""
    import io

    from moeforge.generate import generate
    from moeforge.train.checkpoint import load_trained_model

    model, cfg = load_trained_model(base_checkpoint, "cpu")
    tok = load_tokenizer(cfg.train.tokenizer or None)
    t = ChatTemplate(tok)

    def answer(history, user):  # the answer's ids, without the end-of-text (the history keeps them)
        ids = generate(model, t.history_prompt("", history, user), 6, temperature=0.0, stop_id=tok.eos_id)
        return [i for i in ids if i != tok.eos_id]

    a1 = answer([], "3+3=")
    a2 = answer([("3+3=", a1)], "4+4=")
    fresh = answer([], "4+4=")
    monkeypatch.setattr("sys.stdin", io.StringIO("3+3=\n4+4=\n/reset\n4+4=\n\nnot read\n"))
    r = cli("chat", "--checkpoint", base_checkpoint, "--max-new-tokens", "6", "--temperature", "0")
    assert r.rc == 0, r.err
    assert r.out == f"{tok.decode(a1)}\n{tok.decode(a2)}\n(a new conversation)\n{tok.decode(fresh)}\n"

    long = " ".join(["word"] * 80)  # more than the context of 64 with any answer
    monkeypatch.setattr("sys.stdin", io.StringIO(f"3+3=\n{long}\n4+4=\n"))
    r = cli("chat", "--checkpoint", base_checkpoint, "--max-new-tokens", "30", "--temperature", "0")
    assert r.rc == 0, r.err
    assert "exceed the model's context of 64 tokens" in r.err and "oldest exchange left the context" in r.err
    assert len(r.out.splitlines()) >= 2  # the first and last messages were answered
    expect_error(cli("chat", "--checkpoint", base_checkpoint, "--max-new-tokens", "0"), "chat", "--max-new-tokens")


@pytest.mark.parametrize("kind", ["plain", "deepseek"])
def test_exported_chat_template_gives_the_same_ids(kind, tmp_path):
    """The tokenizer_config.json an export writes (hf.py) holds the chat template in Jinja, and
    transformers' apply_chat_template on it gives the ids moeforge renders: a whole conversation
    (what SFT trains on) and one that ends with a user turn (what generate --chat and chat ask)."""
    from transformers import AutoTokenizer

    from moeforge.hf import _write_tokenizer

    path = DEFAULT_TOKENIZER_PATH if kind == "plain" else _deepseek_tokenizer(tmp_path).path
    tok = Tokenizer(path)
    out = tmp_path / "export"
    out.mkdir()
    _write_tokenizer(out, path, 64)
    theirs = AutoTokenizer.from_pretrained(out)

    def ids(messages):
        got = theirs.apply_chat_template(messages, tokenize=True)
        return list(got["input_ids"] if hasattr(got, "keys") else got)

    t = ChatTemplate(tok)
    assert t.name == kind
    prompt, response, _ = t.render(check_messages(CONVERSATION, "here"))
    assert ids(CONVERSATION) == prompt + response
    assert ids(CONVERSATION[:-1]) == t.history_prompt("Answer briefly.", [("2+2=", "4")], "and 3+3?")
    assert ids(CONVERSATION[1:2]) == t.prompt("2+2=")
    spaced = [{"role": "system", "content": "Answer briefly.\n\n"}, *CONVERSATION[1:]]
    prompt, response, _ = t.render(check_messages(spaced, "here"))
    assert ids(spaced) == prompt + response
    assert ids(spaced[:2]) == t.prompt("2+2=", "Answer briefly.\n\n")
