"""Text generation with the MLA latent cache (only c_kv and the rope key are cached), temperature and top-p.

Decoding is a prefill of the prompts, then one forward per new token (Decoder). On a GPU that step is a
few hundred small kernels, so the host's launches, not the GPU, set its pace; there the Decoder
captures the step as a CUDA graph and replays it, one launch per token. That needs a step that never
waits on the host: the position is a device tensor (LatentCache.write) and the routed experts run
torch's grouped GEMM, which it has on CUDA for BF16 only (in FP32 the experts' per-expert reference
loop reads the row counts on the host). So the graph is used on CUDA when the step computes in BF16
(under BF16 autocast, or with BF16 weights); otherwise the step runs eagerly.

A decoder with the step on the device ("static", "graph", "compiled") is kept for the next call of the
same shape (reused_decoder): decoding the next batch of a GRPO run, the next problems of `score` or the
next turn of `chat` then pays no new capture (or compilation). "compiled" also runs the step through
torch.compile (Inductor fuses its small kernels: about half the time a token of the plain graph on
a GPU, after a compilation of tens of seconds; docs/model.md).
"""

from __future__ import annotations

import functools
import gc
import itertools

import torch

from .errors import MoeforgeError
from .model.attention import LatentCache
from .model.layers import compute_dtype
from .model.transformer import Transformer


def sampling_probs(logits: torch.Tensor, temperature: float, top_p: float) -> torch.Tensor:
    """logits [B, V] -> the distribution sampling draws from [B, V] (temperature > 0): the softmax of
    logits / temperature, cut to the smallest nucleus of mass top_p, and normalised again."""
    probs = (logits.float() / temperature).softmax(dim=-1)
    if top_p < 1.0:
        sorted_p, order = probs.sort(dim=-1, descending=True)
        drop = sorted_p.cumsum(dim=-1) - sorted_p > top_p  # keep tokens until the mass reaches top_p
        sorted_p = sorted_p.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_p)
        probs = probs / probs.sum(dim=-1, keepdim=True)
    return probs


def sample_next(logits: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator | None) -> torch.Tensor:
    """logits: [B, V] -> token ids [B]. temperature 0 is greedy; top_p keeps the smallest nucleus."""
    if temperature <= 0:
        return logits.argmax(dim=-1)
    return torch.multinomial(sampling_probs(logits, temperature, top_p), 1, generator=generator).squeeze(-1)


def accept_draft(p: torch.Tensor, q: torch.Tensor, draft: torch.Tensor,
                 generator: torch.Generator | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Speculative sampling's rule (Leviathan et al. 2023; Chen et al. 2023): a draft drawn from q [B, V]
    is kept with probability min(1, p[draft] / q[draft]), else replaced by a token drawn from
    max(0, p - q) normalised; the token is then distributed as p [B, V] whatever q is (tested).
    Returns (tokens [B], kept [B])."""
    pd, qd = p.gather(1, draft[:, None]).squeeze(1), q.gather(1, draft[:, None]).squeeze(1)
    u = torch.rand(draft.shape, generator=generator, device=p.device)
    kept = u * qd < pd  # u < p/q without dividing by a q of 0
    residual = (p - q).clamp_min(0)
    residual = torch.where(residual.sum(-1, keepdim=True) > 0, residual, p)  # (p == q: every draft is kept)
    other = torch.multinomial(residual, 1, generator=generator).squeeze(1)
    return torch.where(kept, draft, other), kept


class _Captured:
    """A step whose inputs and outputs live in fixed device buffers, run as a CUDA graph: the first
    call runs it eagerly on a side stream (kernels compile, workspaces are made; CUDA graphs require
    the side stream), the second captures it (a capture records without running) and replays it,
    every later call replays it. Returns the step's output, a buffer of the graph's own from the
    second call on: read it before the next call.

    Python's garbage collector is kept off during the capture: a collection inside a capture can free
    an earlier decoder's graph or memory (decoders hold their captured steps in reference cycles), a
    CUDA call that invalidates the capture; this failed a test that decoded after other decoding tests
    in one process. (A gc.collect() before each capture instead cost about a tenth of a second per
    decoding call.)

    cast_cache=False runs the warm-up and the capture with autocast's cache of cast weights off, so
    the graph casts the weights itself at every replay and stays right when they change in place
    between calls (an optimizer step). With the cache on, the graph reads the copies cast in the
    warm-up, which autocast frees when its context ends: right only within one call."""

    def __init__(self, fn, cast_cache: bool = True):
        self.fn = fn if cast_cache else functools.partial(_without_cast_cache, fn)
        self.graph = None
        self.out = None
        self.warm = False

    def __call__(self):
        if self.graph is not None:
            self.graph.replay()
            return self.out
        if not self.warm:
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                out = self.fn()
            torch.cuda.current_stream().wait_stream(side)
            self.warm = True
            return out
        enabled = gc.isenabled()
        gc.disable()
        try:
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph):
                self.out = self.fn()
        finally:
            if enabled:
                gc.enable()
        self.graph.replay()
        return self.out


def _without_cast_cache(fn):
    """fn() under the autocast that is on, with autocast's cache of cast weights off (_Captured)."""
    if not torch.is_autocast_enabled("cuda"):
        return fn()
    with torch.autocast("cuda", dtype=torch.get_autocast_dtype("cuda"), cache_enabled=False):
        return fn()


def _graph_ready(model: Transformer) -> bool:
    """Whether the decoding step can be captured: on CUDA, computing in BF16 (module doc)."""
    weight = model.embed.weight
    probe = torch.empty(0, device=weight.device, dtype=weight.dtype)
    return weight.device.type == "cuda" and compute_dtype(probe) == torch.bfloat16


def _resolve_mode(model: Transformer, mode: str, modes: tuple[str, ...]) -> str:
    """"auto" -> "graph" on CUDA when the step computes in BF16 (the experts' grouped GEMM then never
    waits on the host; module doc), else "eager"; other modes checked."""
    if mode not in modes:
        raise ValueError(f"mode must be one of {modes}, got {mode!r}")
    if mode == "auto":
        mode = "graph" if _graph_ready(model) else "eager"
    if mode == "graph" and model.embed.weight.device.type != "cuda":
        raise ValueError("a CUDA graph needs a CUDA device")
    return mode


SPECULATIVE_MODES = ("auto", "eager", "static", "graph")  # (no compiled step: sample_rows, generate_speculative)


def _decode_step(model: Transformer, tokens: torch.Tensor, caches: list[LatentCache], pos: torch.Tensor) -> torch.Tensor:
    return model(tokens, caches, pos)[:, -1]


_compiled_decode_step = None  # torch.compile(_decode_step), made on first use (Decoder "compiled")


def _compiled_step():
    global _compiled_decode_step
    if _compiled_decode_step is None:
        _compiled_decode_step = torch.compile(_decode_step)
    return _compiled_decode_step


class Decoder:
    """R rows of one prompt length decoded in lockstep from the latent cache: prefill() the prompts,
    then step() one token per row (module doc). mode: "eager" (the position a Python int; the
    attention reads only the positions written), "static" (the position a device tensor; the
    attention reads the whole cache, masked: the graph's step, run eagerly), "graph" (the static step
    captured as a CUDA graph at its second call, after a first call that warms it up, and replayed
    from then on), "compiled" (the static step through torch.compile, and on CUDA in BF16 captured
    as "graph" captures it), or "auto": "graph" on CUDA when the step computes in BF16, else "eager".

    A decoder of the last three modes may decode again: prefill() starts over, with other prompts of
    any length up to max_len (reused_decoder). Its graph casts the weights at every replay, so it
    reads their values of the moment (an optimizer step between calls changes them in place).

    step()'s logits are a buffer of the decoder's own under "graph": read them before the next step."""

    MODES = ("auto", "eager", "static", "graph", "compiled")

    def __init__(self, model: Transformer, rows: int, max_len: int, mode: str = "auto"):
        device = model.embed.weight.device
        self.model, self.mode = model, _resolve_mode(model, mode, self.MODES)
        self.rows, self.max_len = rows, max_len
        self.caches = model.new_caches(rows, max_len)
        self.position = 0  # the next position to decode
        self._pos = torch.zeros((), dtype=torch.long, device=device)  # the same, on the device (static, graph)
        self._tokens = torch.zeros(rows, 1, dtype=torch.long, device=device)
        self._start = torch.zeros(rows, dtype=torch.long, device=device)  # each row's first slot (not eager)
        fn = functools.partial(_compiled_step() if self.mode == "compiled" else _decode_step,
                               model, self._tokens, self.caches, self._pos)
        captured = self.mode == "graph" or (self.mode == "compiled" and _graph_ready(model))
        self._fn = _Captured(fn, cast_cache=False) if captured else fn

    @property
    def _graph(self) -> "_Captured | None":
        """The captured step ("graph"; "compiled" on CUDA in BF16), else None."""
        return self._fn if isinstance(self._fn, _Captured) else None

    def prefill(self, tokens: torch.Tensor, start: torch.Tensor | None = None) -> torch.Tensor:
        """tokens [R, L] (slots 0..L-1) -> the logits after the last one [R, V]. start [R]: prompts
        shorter than L, left-padded; row r's prompt fills slots start[r]..L-1 (LatentCache.start).
        Starts the decoding over: the caches' slots from L on are hidden until written."""
        if tokens.shape[0] != self.rows or not 0 < tokens.shape[1] <= self.max_len:
            raise ValueError(f"a prefill of {tuple(tokens.shape)} does not fit {self.rows} rows of {self.max_len} slots")
        if self.mode != "eager":  # one start buffer for the step's whole life (the graph reads it)
            self._start.copy_(start) if start is not None else self._start.zero_()
            start = self._start
        for cache in self.caches:
            cache.start = start
        logits = self.model(tokens, self.caches, 0)[:, -1]
        self.position = tokens.shape[1]
        return logits

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens [R] at the next position -> the logits after them [R, V]."""
        if self.mode == "eager":
            logits = self.model(tokens.view(-1, 1), self.caches, self.position)[:, -1]
            self.position += 1
            return logits
        self._tokens.copy_(tokens.view(-1, 1))
        self._pos.fill_(self.position)
        logits = self._fn()
        self.position += 1
        return logits


_kept: list[tuple[tuple, Decoder]] = []  # the one decoder reused_decoder keeps between calls, with its key


def _has_fp8(model: Transformer) -> bool:
    from .fp8.linear import FP8Experts, FP8FeedForward, FP8Linear

    return any(isinstance(m, (FP8Linear, FP8Experts, FP8FeedForward)) for m in model.modules())


def reused_decoder(model: Transformer, rows: int, max_len: int, mode: str = "auto") -> Decoder:
    """A Decoder for `rows` rows of up to max_len slots. For the modes whose step lives on the device
    ("static", "graph", "compiled"; "auto" where it means "graph") the decoder of the previous call is
    returned again when it fits: the same model, rows and autocast settings, the same storage of every
    parameter and buffer (the graph reads them by address), and max_len rounded up to a multiple of
    64 slots (at most the model's context). Then no step is warmed up or captured again: about 60 ms a
    call for the `small` preset on a GPU (docs/model.md). One decoder is kept (release_decoder() drops
    it); a model with FP8 layers gets a new one each call (their cached FP8 weights are read on the
    host, which a replay skips)."""
    mode = _resolve_mode(model, mode, Decoder.MODES)
    if mode == "eager" or _has_fp8(model):
        return Decoder(model, rows, max_len, mode)
    max_len = min(-(-max_len // 64) * 64, max(max_len, model.cfg.max_position_embeddings))
    device = model.embed.weight.device.type
    key = (id(model), rows, max_len, mode, torch.is_autocast_enabled(device), torch.get_autocast_dtype(device),
           tuple(t.data_ptr() for t in itertools.chain(model.parameters(), model.buffers())))
    if _kept and _kept[0][0] == key:
        return _kept[0][1]
    release_decoder()  # (its memory back before the new one's)
    decoder = Decoder(model, rows, max_len, mode)
    _kept.append((key, decoder))
    return decoder


def release_decoder() -> None:
    """Drop the decoder reused_decoder keeps (its caches and captured graph)."""
    _kept.clear()


def check_length(model: Transformer, prompt_len: int, max_new: int) -> None:
    limit = model.cfg.max_position_embeddings
    if prompt_len + max_new > limit:
        raise MoeforgeError(f"a prompt of {prompt_len} tokens plus --max-new-tokens {max_new} exceeds the model's "
                            f"context of {limit} tokens")


@torch.no_grad()
def sample_rows(model: Transformer, rows: list[list[int]], max_new: int, temperature: float, top_p: float,
                generator: torch.Generator | None, stop_id: int | None,
                mode: str = "auto", lockstep=None, speculative: bool = False,
                on_token=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Completions of prompts, one per row, decoded together: (tokens, mask) [R, N]. Prompts of
    different lengths are left-padded to the longest (each row's positions count from its first
    token, and no row sees another's padding: LatentCache.start). A row that emits stop_id keeps it
    and is masked after it; the masked places hold stop_id (0 without one). Decoding ends when every
    row has stopped: checked after every token on a CPU, every 8 tokens on a GPU (each check waits
    for the GPU; the extra tokens are masked).

    lockstep: a process group whose ranks decode together, for a model whose forwards are collective
    (experts sliced over the ranks, FSDP shards): every rank runs as many forwards as the longest
    decoding among them (a rank whose rows have all stopped keeps stepping, its tokens masked), and
    the steps run eagerly (no CUDA graph around the collectives).

    mode: Decoder's; the decoder of a mode with the step on the device is kept for the next call
    (reused_decoder).

    on_token: None, or called after each position t is decoded with its tokens and mask [R] (device
    tensors; the forward for t + 1 already queued), e.g. to print a completion as it is decoded.
    Not with speculative decoding.

    speculative: the first MTP module drafts each row's token after next (_SpeculativeRows; one
    process): greedy, the same tokens; sampled, tokens of the same distribution. "eager" then runs
    the device-side step without a graph; "compiled" is refused."""
    if not rows or not all(rows):
        raise MoeforgeError("a prompt is empty")
    length = max(map(len, rows))
    check_length(model, length, max_new)
    was_training = model.training
    model.eval()
    device = model.embed.weight.device
    R = len(rows)
    if speculative and max_new > 0:
        if not model.mtp:
            raise MoeforgeError("speculative decoding drafts with the MTP module, and this model has none "
                                "(model.num_nextn_predict_layers = 0)")
        if lockstep is not None:
            raise MoeforgeError("speculative decoding runs in one process, not over the ranks of a sliced or "
                                "sharded model")
        if on_token is not None:
            raise ValueError("on_token: not with speculative decoding")
        if mode == "compiled":
            raise MoeforgeError("speculative decoding has no compiled step: leave out --compile-decoding or "
                                "--speculative")
        graph = _resolve_mode(model, mode, SPECULATIVE_MODES) == "graph"
        new, _ = _SpeculativeRows(model, rows, max_new, graph, temperature, top_p, generator, stop_id).decode()
        tokens = torch.full((R, max_new), stop_id if stop_id is not None else 0, dtype=torch.long, device=device)
        mask = torch.zeros(R, max_new, dtype=torch.bool, device=device)
        for r, row in enumerate(new):
            tokens[r, :len(row)] = torch.tensor(row, device=device)
            mask[r, :len(row)] = True
        model.train(was_training)
        return tokens, mask
    decoder = reused_decoder(model, R, length + max_new, "eager" if lockstep is not None else mode)
    padded = torch.tensor([[0] * (length - len(r)) + list(r) for r in rows], device=device)
    start = (None if all(len(r) == length for r in rows)
             else torch.tensor([length - len(r) for r in rows], device=device))
    logits = decoder.prefill(padded, start)
    tokens = torch.full((R, max_new), stop_id if stop_id is not None else 0, dtype=torch.long, device=device)
    mask = torch.zeros(R, max_new, dtype=torch.bool, device=device)
    alive = torch.ones(R, dtype=torch.bool, device=device)
    every = 8 if device.type == "cuda" else 1
    for t in range(max_new):
        nxt = sample_next(logits, temperature, top_p, generator)
        tokens[:, t] = torch.where(alive, nxt, tokens[:, t])
        mask[:, t] = alive
        done = False
        if stop_id is not None:
            alive = alive & (nxt != stop_id)
            done = (t + 1) % every == 0 and not _any_alive(alive, lockstep)
        if t + 1 < max_new and not done:
            logits = decoder.step(tokens[:, t])
        if on_token is not None:  # (after the next step is queued: the GPU computes it meanwhile)
            on_token(tokens[:, t], mask[:, t])
        if done:
            break
    model.train(was_training)
    return tokens, mask


def _draft(model: Transformer, h1: torch.Tensor, slot: int, temperature: float, top_p: float,
           generator: torch.Generator | None) -> tuple[int, torch.Tensor | None]:
    """The MTP module's guess for the token at `slot` from its last hidden state h1 [1, S, D]: greedy
    (temperature 0; None for its distribution), or drawn from its sampling distribution q [V]."""
    logits = model.head(h1[:, -1:])[:, -1]  # [1, V]
    if temperature <= 0:
        return int(logits.argmax(-1)), None
    q = sampling_probs(logits, temperature, top_p)
    return int(torch.multinomial(q, 1, generator=generator)), q[0]


def _device_draft(model: Transformer, h1: torch.Tensor, slot: torch.Tensor) -> torch.Tensor:
    """The greedy drafts of the device-side steps: the MTP module's choice [R] for the token at each
    row's `slot` [R] (device tensors) from its hidden states h1 [R, 1, D]."""
    return model.head(h1)[:, -1].argmax(-1)


class _SpeculativeRows:
    """Speculative decoding of R rows with each step's state on the device, so that the step can be
    captured as a CUDA graph and replayed without the host: each row's newest token, draft, slot and
    number of tokens decoded are device tensors, and every step has the same shapes. A step runs the
    main model on [newest token, draft] of every row at the row's own slot (LatentCache.write:
    "verify"), keeps one or two tokens per row as generate_speculative does, writes both into the
    row's output buffer (the second is written over by the next step when the draft was not kept),
    runs the MTP module on both positions (the second's cache slot likewise written over when unused)
    and takes the hidden state of each row's last kept token ("advance"), and drafts from it. Prompts
    of different lengths are left-padded (LatentCache.start), in the MTP module's cache too.

    A row is done once it has max_new tokens or has emitted stop_id; from then on it stays where it
    is (its steps write only past its end) while the other rows go on. The host looks every CHECK
    steps whether all rows are done; the buffers and caches have room for a row's steps past its end.

    Greedy, the whole step is one graph. Sampling, verify and advance are two graphs and the random
    draws run between them, eagerly, in the order generate_speculative's loop makes them (one row
    draws what the loop draws from the same seed; tested), so no random number generator is
    captured. The replays equal the same steps run eagerly, token for token (tests/test_speed_gpu.py)."""

    CHECK = 8

    def __init__(self, model: Transformer, rows: list[list[int]], max_new: int, graph: bool,
                 temperature: float = 0.0, top_p: float = 1.0, generator: torch.Generator | None = None,
                 stop_id: int | None = None):
        device, dtype = model.embed.weight.device, model.embed.weight.dtype
        self.model, self.mtp, self.max_new = model, model.mtp[0], max_new
        self.sampling, self.temperature, self.top_p, self.gen = temperature > 0, temperature, top_p, generator
        R, L = len(rows), max(map(len, rows))
        room = L + max_new + 3
        self.caches = model.new_caches(R, room)
        self.mtp_cache = LatentCache.empty(model.cfg, R, room, device, dtype)
        tokens = torch.tensor([[0] * (L - len(r)) + list(r) for r in rows], device=device)
        start = None if all(len(r) == L for r in rows) else torch.tensor([L - len(r) for r in rows], device=device)
        for cache in (*self.caches, self.mtp_cache):
            cache.start = start
        h, _, cos, sin = model.hidden(tokens, self.caches, 0)
        first = sample_next(model.head(h[:, -1:])[:, -1], temperature, top_p, generator)  # [R]
        h1, _ = self.mtp(h, model.embed(torch.cat([tokens[:, 1:], first[:, None]], 1)), cos, sin,
                         cache=self.mtp_cache, start_pos=0)
        self.out = torch.zeros(R, max_new + 3, dtype=torch.long, device=device)
        self.out[:, 0] = first
        self.token = first[:, None].clone()  # each row's newest token, not yet run through the model
        self.pos = torch.full((R,), L, dtype=torch.long, device=device)  # its slot
        self.count = torch.ones(R, dtype=torch.long, device=device)  # tokens decoded
        self.forwards = torch.zeros(R, dtype=torch.long, device=device)  # steps while the row was not done
        self.accepted = torch.zeros(R, dtype=torch.long, device=device)  # drafts kept
        self.stop = torch.tensor(-1 if stop_id is None else stop_id, device=device)
        self.done = (first == self.stop) | (max_new <= 1)
        self.two = torch.arange(2, device=device)
        self.new = torch.zeros(R, 2, dtype=torch.long, device=device)  # (sampling) the advance's inputs
        self.kept = torch.zeros(R, dtype=torch.bool, device=device)
        if self.sampling:
            self.draft, self.q = self._sampled_draft(model.head(h1[:, -1:])[:, -1])
            advance = self._advance_to_draft_logits
            self.verify = _Captured(self._verify) if graph else self._verify
            self.advance = _Captured(advance) if graph else advance
            self.run = self._sampled_step
        else:
            self.draft = _device_draft(model, h1[:, -1:], self.pos + 1)
            self.run = _Captured(self._greedy_step) if graph else self._greedy_step

    def _verify(self) -> torch.Tensor:
        h, _, cos, sin = self.model.hidden(torch.cat([self.token, self.draft[:, None]], 1), self.caches, self.pos)
        self._h, self._cos, self._sin = h, cos, sin  # (under a graph: its buffers, read by the advance's graph)
        return self.model.head(h)  # [R, 2, V]: after the newest token, after the draft

    def _advance(self, new: torch.Tensor, kept: torch.Tensor) -> torch.Tensor:
        """Record the step's tokens new [R, 2] (the second counts where kept), run the MTP module on
        both positions and move on; returns the MTP hidden state of each row's last kept token [R, 1, D]."""
        live = ~self.done
        k = kept.long() + 1
        stops = (new == self.stop) & (self.two < k[:, None])
        k = torch.where(stops[:, 0], 1, k)  # a stop ends the row where it stands
        k = torch.where(live, k, 0)
        self.out.scatter_(1, self.count[:, None] + self.two, new)
        h1, _ = self.mtp(self._h, self.model.embed(new), self._cos, self._sin, cache=self.mtp_cache,
                         start_pos=self.pos)
        last = (k - 1).clamp(min=0)
        self.token.copy_(new.gather(1, last[:, None]))
        self.forwards.add_(live.long())
        self.accepted.add_((live & kept).long())
        self.pos.add_(k)
        self.count.add_(k)
        self.done.logical_or_(stops.any(1) | (self.count >= self.max_new))
        return h1.gather(1, last[:, None, None].expand(-1, 1, h1.shape[-1]))

    def _greedy_step(self) -> None:
        choice = self._verify().argmax(-1)  # [R, 2]
        kept = choice[:, 0] == self.draft
        h1 = self._advance(torch.stack([torch.where(kept, self.draft, choice[:, 0]), choice[:, 1]], 1), kept)
        self.draft.copy_(_device_draft(self.model, h1, self.pos + 1))

    def _advance_to_draft_logits(self) -> torch.Tensor:
        return self.model.head(self._advance(self.new, self.kept))[:, -1]  # [R, V]

    def _sampled_draft(self, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        q = sampling_probs(logits, self.temperature, self.top_p)
        return torch.multinomial(q, 1, generator=self.gen).view(-1), q

    def _sampled_step(self) -> None:
        logits = self.verify()
        token, kept = accept_draft(sampling_probs(logits[:, 0], self.temperature, self.top_p), self.q, self.draft,
                                   self.gen)
        second = sample_next(logits[:, 1], self.temperature, self.top_p, self.gen)
        self.new.copy_(torch.stack([token, second], 1))
        self.kept.copy_(kept)
        draft, q = self._sampled_draft(self.advance())
        self.draft.copy_(draft)
        self.q.copy_(q)

    def decode(self) -> tuple[list[list[int]], list[dict]]:
        """Each row's new tokens (through its stop token) and its counts."""
        while not bool(self.done.all()):
            for _ in range(self.CHECK):
                self.run()
        counts, forwards, accepted = self.count.tolist(), self.forwards.tolist(), self.accepted.tolist()
        out = [row[:min(n, self.max_new)] for row, n in zip(self.out.tolist(), counts)]
        return out, [{"forwards": f, "drafts": f, "accepted": a} for f, a in zip(forwards, accepted)]


@torch.no_grad()
def generate_speculative(model: Transformer, prompt: list[int], max_new_tokens: int, stop_id: int | None = None,
                         temperature: float = 0.0, top_p: float = 1.0, seed: int = 0,
                         mode: str = "auto") -> tuple[list[int], dict]:
    """Decoding with the first MTP module drafting the token after next (DeepSeek-V3 §5.4.3): each step
    runs the main model on the newest token and the draft together; when the model's own choice
    after the newest token is the draft, both are kept (with the model's choice after the draft,
    two tokens for one forward), else only the model's choice. Greedy (temperature 0): the tokens
    are greedy decoding's (tested; up to argmax ties that two forwards of other shapes may round
    apart). Sampling (temperature > 0, top_p): the draft is drawn from the MTP module's sampling
    distribution and kept or replaced by accept_draft's rule, so every token is distributed as plain
    sampling's (not the same tokens: the random draws differ; seed: the generator's seed).

    Returns (new tokens, through stop_id when emitted; {"forwards": main-model decoding forwards,
    "drafts": drafts checked, "accepted": drafts kept}). The MTP module decodes from a latent cache of
    its own: its position i pairs the main model's hidden state at i with the embedding of token
    i + 1, as in training, and predicts token i + 2.

    mode: "eager" (the steps above, the host reading each step's tokens), "static" (_SpeculativeRows:
    the step with its state on the device, run eagerly), "graph" (that step captured as CUDA graphs
    and replayed), or "auto": "graph" where Decoder's auto picks it, else "eager". All give the same
    tokens (sampling: from the same seed), up to rounding."""
    mode = _resolve_mode(model, mode, SPECULATIVE_MODES)
    if not model.mtp:
        raise MoeforgeError("speculative decoding drafts with the MTP module, and this model has none "
                            "(model.num_nextn_predict_layers = 0)")
    if not prompt:
        raise MoeforgeError("the prompt is empty")
    check_length(model, len(prompt), max_new_tokens)  # (a draft is checked only while a token is missing:
    # it takes a slot below len(prompt) + max_new_tokens)
    was_training = model.training
    model.eval()
    device, dtype, mtp = model.embed.weight.device, model.embed.weight.dtype, model.mtp[0]
    gen = torch.Generator(device=device).manual_seed(seed) if temperature > 0 else None
    if mode != "eager" and max_new_tokens > 0:
        rows = _SpeculativeRows(model, [prompt], max_new_tokens, mode == "graph", temperature, top_p, gen, stop_id)
        out, stats = rows.decode()
        model.train(was_training)
        return out[0], stats[0]
    n, slots = len(prompt), len(prompt) + max_new_tokens
    caches = model.new_caches(1, slots)
    mtp_cache = LatentCache.empty(model.cfg, 1, slots, device, dtype)

    def ids(values: list[int]) -> torch.Tensor:
        return torch.tensor([values], device=device)

    def pick(logits: torch.Tensor) -> int:  # [1, V] -> the model's token
        return int(sample_next(logits, temperature, top_p, gen)[0])

    stats = {"forwards": 0, "drafts": 0, "accepted": 0}
    out: list[int] = []
    if max_new_tokens > 0:
        h, _, cos, sin = model.hidden(ids(prompt), caches, 0)
        out.append(pick(model.head(h[:, -1:])[:, -1]))
        h1, _ = mtp(h, model.embed(ids(prompt[1:] + out)), cos, sin, cache=mtp_cache, start_pos=0)
        pos = n  # the slot of out[-1], the newest token, not yet run through the model
        while len(out) < max_new_tokens and out[-1] != stop_id:
            draft, q = _draft(model, h1, pos + 1, temperature, top_p, gen)
            h, _, cos, sin = model.hidden(ids([out[-1], draft]), caches, pos)
            logits = model.head(h)[0]  # [2, V]: after out[-1], after the draft
            stats["forwards"] += 1
            stats["drafts"] += 1
            if q is None:  # greedy
                choice = logits.argmax(-1).tolist()
                new = [draft, choice[1]] if choice[0] == draft else [choice[0]]
            else:
                token, kept = accept_draft(sampling_probs(logits[:1], temperature, top_p), q[None],
                                           torch.tensor([draft], device=device), gen)
                second = pick(logits[1:])  # (drawn either way: the device-side steps draw in this order)
                new = [draft, second] if bool(kept) else [int(token)]
            stats["accepted"] += len(new) - 1
            k = len(new)  # MTP positions pos..pos+k-1: the model's hidden state there, the token after it
            h1, _ = mtp(h[:, :k], model.embed(ids(new)), cos[:k], sin[:k], cache=mtp_cache, start_pos=pos)
            pos += k
            out += new
            if stop_id is not None and stop_id in new:
                out = out[:out.index(stop_id) + 1]
                break
        out = out[:max_new_tokens]
    model.train(was_training)
    return out, stats


def _any_alive(alive: torch.Tensor, group) -> bool:
    """Whether a row is still decoding, here (group None) or on any rank of `group`."""
    if group is None:
        return bool(alive.any())
    import torch.distributed as dist

    count = alive.sum().reshape(1)
    dist.all_reduce(count, group=group)  # (SUM: gloo has no MAX for every dtype)
    return bool(count.item())


@torch.no_grad()
def generate(model: Transformer, prompt: list[int], max_new_tokens: int, temperature: float = 0.8,
             top_p: float = 0.95, seed: int = 0, stop_id: int | None = None, mode: str = "auto",
             stream=None) -> list[int]:
    """Prefill the prompt once, then decode one token at a time from the cache (Decoder). Returns the
    new tokens, through stop_id when it is emitted. stream: None, or called with each new token id as
    it is decoded (the same ids, in order)."""
    if not prompt:
        raise MoeforgeError("the prompt is empty")
    gen = torch.Generator(device=model.embed.weight.device).manual_seed(seed)

    def each(tokens: torch.Tensor, alive: torch.Tensor) -> None:
        token, kept = torch.stack([tokens[0], alive[0].long()]).tolist()  # (one wait for the device)
        if kept:
            stream(token)

    tokens, mask = sample_rows(model, [prompt], max_new_tokens, temperature, top_p, gen, stop_id, mode,
                               on_token=each if stream is not None else None)
    return tokens[0][mask[0]].tolist()
