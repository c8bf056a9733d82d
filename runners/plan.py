"""``DevicePlan``: what a device wants from the base, declared once by ``_cache_device_properties``.

The base reads only the plan - no hook sets attributes that switch the base's behaviour. The
plan says how steps are padded (static shapes), which steps replay graphs and at which sizes,
whether the model runs as compiled token-wise pieces split at attention (piecewise graphs),
how inputs are uploaded and which no-grad mode the steps run under. ``ModelRunnerBase.default_plan``
fills it from the platform's capability flags and the engine config; a hook changes only what
its device needs (``default_plan(token_buckets=..., ...)``).

The padding arithmetic every plan uses lives here too: ``pad_to``, ``power_of_two_buckets``,
``default_graph_sizes``, and ``step_shapes`` (every padded shape a static plan can meet).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from attention.backend import AttentionBackend
    from engine.config import EngineConfig
    from platforms import Platform


def power_of_two_buckets(limit: int, start: int = 1) -> list[int]:
    """Powers of two from ``start`` up to and including ``limit``."""
    out, b = [], start
    while b < limit:
        out.append(b)
        b *= 2
    return out + [limit]


def default_graph_sizes(max_size: int) -> list[int]:
    """1, 2, 4, 8, then every 8 up to 256, then every 16 (vLLM-like), capped at ``max_size``."""
    sizes = [1, 2, 4] + list(range(8, 257, 8)) + list(range(272, 1025, 16))
    return [s for s in sizes if s < max_size] + [max_size]


def default_tokenwise_sizes(max_size: int) -> list[int]:
    """Token counts for piecewise graphs: 1, 2, 4, 8, every 8 to 64, every 32 to 512 (capped)."""
    sizes = [1, 2, 4] + list(range(8, 65, 8)) + list(range(96, 513, 32))
    return [s for s in sizes if s < max_size] + [min(max_size, 512)]


def pad_to(n: int, buckets: tuple[int, ...] | list[int] | None) -> int:
    """The smallest bucket >= n (n itself without buckets); ValueError past the largest."""
    if not buckets:
        return n
    for b in buckets:
        if b >= n:
            return b
    raise ValueError(f"{n} exceeds the largest padding bucket {buckets[-1]}")


def step_shapes(token_buckets: tuple[int, ...] | list[int],
                req_buckets: tuple[int, ...] | list[int]) -> list[tuple[int, int, bool]]:
    """One (num_tokens, num_reqs, pure_decode) per padded step shape that can occur.

    A step of n tokens over k <= n requests pads to (bucket(n), bucket(k)); pure decodes
    (n == k) attend with ``max_query_len`` 1, mixed steps with the padded token count, so
    they are distinct graphs. Each tuple is a step that pads to its shape.
    """
    shapes, t_lo = [], 0
    for t in token_buckets:
        r_lo = 0
        for r in req_buckets:
            if min(r, t - 1) > r_lo:  # mixed: the most requests below t tokens, within (r_lo, r]
                shapes.append((t, min(r, t - 1), False))
            if min(t, r) > max(t_lo, r_lo):  # pure decode: n == k inside both ranges
                shapes.append((min(t, r), min(t, r), True))
            r_lo = r
        t_lo = t
    return shapes


@dataclass(frozen=True)
class DevicePlan:
    """One device's declared choices; every field has the eager, unpadded default.

    - ``token_buckets`` / ``req_buckets``: pad EVERY step's token / request count up to a bucket
      (static-shape devices: XLA compiles one graph per padded shape). Empty: no padding.
    - ``decode_graph_sizes``: pure-decode steps (one token per request) of at most the largest
      size pad up to one of these batch sizes and replay a full graph of the whole forward.
    - ``use_piecewise_graph``: the model runs as token-wise pieces compiled with torch.compile,
      split at attention (attention runs eagerly between pieces); ``tokenwise_graph_batch_sizes``
      are the token counts at which the pieces are captured as graphs (steps pad up to one; a
      larger step runs the compiled pieces without graphs). Empty sizes with piecewise on: the
      compiled pieces run at every size, without graphs (a platform without graphs).
    - ``persistent_buffers``: step inputs are copied into fixed device buffers (graphs need
      their addresses); False uploads fresh tensors each step (XLA traces in-place updates).
    - ``inference_mode``: steps run under ``torch.inference_mode`` (else ``torch.no_grad``).
    - ``notes``: why a feature the config asked for is off on this device (shown to users).
    """

    token_buckets: tuple[int, ...] = ()
    req_buckets: tuple[int, ...] = ()
    decode_graph_sizes: tuple[int, ...] = ()
    use_piecewise_graph: bool = False
    tokenwise_graph_batch_sizes: tuple[int, ...] = ()
    persistent_buffers: bool = True
    inference_mode: bool = True
    notes: tuple[str, ...] = field(default=(), compare=False)

    def __post_init__(self) -> None:
        for name in ("token_buckets", "req_buckets", "decode_graph_sizes", "tokenwise_graph_batch_sizes"):
            sizes = tuple(getattr(self, name))
            if any(not isinstance(s, int) or s < 1 for s in sizes) or list(sizes) != sorted(set(sizes)):
                raise ValueError(f"DevicePlan.{name} must be strictly increasing positive ints, got {sizes}")
            object.__setattr__(self, name, sizes)
        if bool(self.token_buckets) != bool(self.req_buckets):
            raise ValueError("DevicePlan: token_buckets and req_buckets go together (static shapes pad both)")
        if self.tokenwise_graph_batch_sizes and not self.use_piecewise_graph:
            raise ValueError("DevicePlan.tokenwise_graph_batch_sizes needs use_piecewise_graph=True")
        if (self.decode_graph_sizes or self.tokenwise_graph_batch_sizes) and not self.persistent_buffers:
            raise ValueError("DevicePlan: graphs replay on fixed buffers, so they need persistent_buffers=True")

    @property
    def static_shapes(self) -> bool:
        return bool(self.token_buckets)

    @property
    def has_graphs(self) -> bool:
        return bool(self.decode_graph_sizes or self.tokenwise_graph_batch_sizes)

    def shape(self, n: int, n_reqs: int) -> tuple[int, int, bool]:
        """(padded tokens, padded requests, static?) for a step of ``n`` tokens over ``n_reqs``
        requests. Static: the step's launch decisions must not depend on its lengths (XLA's
        compiled shapes, a full graph's replay)."""
        if self.token_buckets:
            return pad_to(n, self.token_buckets), pad_to(n_reqs, self.req_buckets), True
        if n == n_reqs and self.decode_graph_sizes and n <= self.decode_graph_sizes[-1]:
            p = pad_to(n, self.decode_graph_sizes)
            return p, p, True
        sizes = self.tokenwise_graph_batch_sizes
        if sizes and n <= sizes[-1]:  # piecewise graphs: tokens only; attention runs eagerly
            return pad_to(n, sizes), n_reqs, False
        return n, n_reqs, False

    def describe(self) -> str:
        """One line for users, e.g. "decode graphs at 35 sizes (1..256); piecewise off"."""
        parts = []
        if self.static_shapes:
            parts.append(f"static shapes: {len(self.token_buckets)} token x {len(self.req_buckets)} request buckets")
        g = self.decode_graph_sizes
        parts.append(f"decode graphs at {len(g)} sizes ({g[0]}..{g[-1]})" if g else "no decode graphs")
        if self.use_piecewise_graph:
            t = self.tokenwise_graph_batch_sizes
            parts.append("piecewise: compiled pieces" + (f", graphs at {len(t)} token counts ({t[0]}..{t[-1]})"
                                                        if t else ", no graphs"))
        return "; ".join(parts + list(self.notes))


def plan_from_config(cfg: "EngineConfig", platform: "Platform", attn_backend: type["AttentionBackend"],
                     max_num_reqs: int, max_num_tokens: int, multimodal: bool = False) -> DevicePlan:
    """The default plan (``ModelRunnerBase.default_plan``): full decode graphs where the platform
    and the attention backend support graphs, piecewise graphs where the config asks for them
    (captured where graphs run, else the compiled pieces alone); ``enforce_eager`` turns all off."""
    notes = []
    graphs = platform.supports_graphs and attn_backend.supports_graphs and not cfg.enforce_eager
    limit = min(max_num_reqs, max_num_tokens)
    decode = sorted({s for s in cfg.cuda_graph_sizes or default_graph_sizes(limit) if s <= limit}) if graphs else []
    piecewise = cfg.use_piecewise_graph and not cfg.enforce_eager and not multimodal
    if cfg.use_piecewise_graph and multimodal:
        notes.append("use_piecewise_graph is not supported for multimodal models yet (eager instead)")
    tokenwise: list[int] = []
    if piecewise and graphs:
        wanted = cfg.tokenwise_graph_batch_sizes or default_tokenwise_sizes(max_num_tokens)
        tokenwise = sorted({s for s in wanted if s <= max_num_tokens})
    elif piecewise:
        notes.append(f"piecewise pieces run compiled without graphs ({platform.name} or the "
                     f"{attn_backend.name} backend has none)")
    if cfg.use_piecewise_graph and cfg.enforce_eager:
        notes.append("use_piecewise_graph is off under enforce_eager")
    return DevicePlan(decode_graph_sizes=tuple(decode), use_piecewise_graph=piecewise,
                      tokenwise_graph_batch_sizes=tuple(tokenwise), notes=tuple(notes))
