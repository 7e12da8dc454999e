"""Conversations as token ids: SFT examples from {"messages": [...]} records, and prompts for `generate --chat`.

A conversation is a list of {"role": ..., "content": ...} messages: an optional "system" message
first, then "user" and "assistant" turns in alternation, beginning with a user turn and ending with
an assistant turn. The template depends on the tokenizer:

- "deepseek", when the tokenizer has DeepSeek-V3's chat tokens (a DeepSeek tokenizer.json, e.g. of
  a run imported with `moeforge convert --hf ... --to run`):
      <｜begin▁of▁sentence｜>{system}<｜User｜>{user}<｜Assistant｜>{assistant}<｜end▁of▁sentence｜><｜User｜>...
  the markers inserted as their own token ids (text never turns into special tokens);
- "plain" otherwise (moeforge's own tokenizer has no chat tokens):
      {system}\\nUser: {user}\\nAssistant:\\n{assistant}<end-of-text>User: ...
  the system message and the first user turn tokenised as one text, every later piece on its own.
  The pieces meet at a newline before a non-space character (or at the end-of-text), where a
  byte-level BPE's pre-tokeniser splits anyway, so a prompt's ids are those of its whole text: what
  transformers' apply_chat_template gives with the template an export writes (CHAT_TEMPLATES;
  tested, a system message ending in newlines included). An assistant turn that begins with two or
  more whitespace characters is the exception: the whole text would join its first whitespace to
  the newline before it, while the ids here keep the prompt's as `generate --chat` gives them, so
  that the answer is what the model learns to continue that prompt with.

Every assistant turn ends with the end-of-text token, so a fine-tuned model stops after its answer.
As an SFT example (posttrain/sft.py) the prompt is everything before the first assistant turn and
the response the rest; only the assistant turns and their end-of-text are scored: the later user
turns inside the response are `unscored` spans (context, not targets).
"""

from __future__ import annotations

from ..data.tokenizer import Tokenizer
from ..errors import MoeforgeError

DEEPSEEK_BOS, DEEPSEEK_USER, DEEPSEEK_ASSISTANT = "<｜begin▁of▁sentence｜>", "<｜User｜>", "<｜Assistant｜>"

# The templates in Jinja, as transformers' tokenizer_config.json holds them ("chat_template"; hf.py writes
# the tokenizer's into an export): a conversation that ends with a user turn ends ready for the answer.
CHAT_TEMPLATES = {
    "plain": ("{% for m in messages %}{% if m['role'] == 'system' %}{% if m['content'] %}{{ m['content'] }}\n{% endif %}"
              "{% elif m['role'] == 'user' %}User: {{ m['content'] }}\nAssistant:\n"
              "{% else %}{{ m['content'] }}{{ eos_token }}{% endif %}{% endfor %}"),
    "deepseek": ("{{ '" + DEEPSEEK_BOS + "' }}{% for m in messages %}{% if m['role'] == 'system' %}{{ m['content'] }}"
                 "{% elif m['role'] == 'user' %}{{ '" + DEEPSEEK_USER + "' }}{{ m['content'] }}{{ '" + DEEPSEEK_ASSISTANT + "' }}"
                 "{% else %}{{ m['content'] }}{{ eos_token }}{% endif %}{% endfor %}"),
}


def check_messages(messages, place: str) -> list[tuple[str, str]]:
    """(role, content) of a conversation, checked (module doc); MoeforgeError naming `place`."""
    if not isinstance(messages, list) or not messages:
        raise MoeforgeError(f"{place}: \"messages\" must be a non-empty list of {{\"role\", \"content\"}} objects")
    turns = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise MoeforgeError(f"{place}: message {i} must be an object with a string \"role\" and \"content\"")
        turns.append((m["role"], m["content"]))
    roles = [r for r, _ in turns]
    body = roles[1:] if roles[0] == "system" else roles
    expected = ["user", "assistant"] * (len(body) // 2 + 1)
    for i, role in enumerate(body):
        if role != expected[i]:
            at = i + (len(roles) - len(body))
            raise MoeforgeError(f"{place}: message {at} has role {role!r}, expected {expected[i]!r} (an optional "
                                f"system message, then user and assistant turns in turn)")
    if not body or body[-1] != "assistant":
        raise MoeforgeError(f"{place}: the conversation must end with an assistant turn (the one to learn)")
    return turns


class ChatTemplate:
    """The tokenizer's chat template (module doc): "deepseek" or "plain"."""

    def __init__(self, tok: Tokenizer):
        self.tok = tok
        ids = [tok.token_id(t) for t in (DEEPSEEK_BOS, DEEPSEEK_USER, DEEPSEEK_ASSISTANT)]
        self.name = "deepseek" if all(i is not None for i in ids) else "plain"
        self.bos, self.user_id, self.assistant_id = ids

    def _user(self, content: str) -> list[int]:
        """A later user turn, up to where the assistant's answer begins."""
        if self.name == "deepseek":
            return [self.user_id] + self.tok.encode(content) + [self.assistant_id]
        return self.tok.encode(f"User: {content}\nAssistant:\n")

    def prompt(self, text: str, system: str = "") -> list[int]:
        """One user turn (after an optional system message), ready for the assistant's answer."""
        if self.name == "deepseek":
            return [self.bos] + self.tok.encode(system) + self._user(text)
        # one text: a system message ending in a newline joins the template's newline after it
        return self.tok.encode((f"{system}\n" if system else "") + f"User: {text}\nAssistant:\n")

    def history_prompt(self, system: str, exchanges: list[tuple[str, "str | list[int]"]], user: str) -> list[int]:
        """A conversation so far (an optional system message, then (user, assistant) exchanges) and a
        new user turn, ready for the assistant's answer: the ids `render` gives the same conversation
        up to that answer (tested). An answer given as ids (what the model generated, without its
        end-of-text) is used as it is, not encoded again."""
        ids: list[int] = []
        for i, (question, answer) in enumerate([*exchanges, (user, None)]):
            ids += self.prompt(question, system) if i == 0 else self._user(question)  # (the first after the system)
            if answer is not None:
                ids += (self.tok.encode(answer) if isinstance(answer, str) else list(answer)) + [self.tok.eos_id]
        return ids

    def render(self, turns: list[tuple[str, str]]) -> tuple[list[int], list[int], tuple[tuple[int, int], ...]]:
        """(prompt, response, unscored spans [a, b) of the response) of a checked conversation."""
        system = turns[0][1] if turns[0][0] == "system" else ""
        body = turns[1:] if turns[0][0] == "system" else turns
        prompt = self.prompt(body[0][1], system)
        response: list[int] = []
        unscored = []
        for i in range(1, len(body), 2):
            if i > 1:  # a later user turn: context inside the response
                user = self._user(body[i - 1][1])
                unscored.append((len(response), len(response) + len(user)))
                response += user
            response += self.tok.encode(body[i][1]) + [self.tok.eos_id]
        return prompt, response, tuple(unscored)
