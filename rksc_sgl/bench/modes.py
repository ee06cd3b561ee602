"""Cache modes (what each ``Engine``/server gets) and the run's settings."""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Dict, List, Optional

from rksc_sgl.config import DTYPES, RKSC_TREE


# ---- modes ---------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Mode:
    """A cache mode: the engine it needs and whether the verify step uses CGEE's gates."""

    name: str
    cache: str
    asks: bool = False
    cgee: bool = False
    rsbcm: bool = False
    help: str = ""
    tau: Optional[float] = None
    """An ASKS threshold of this mode alone (``asks@0.9``); ``None``: the run's ``asks_tau``."""
    eviction: Optional[str] = None
    """Another of SGLang's eviction policies for the stock tree (``lfu``, ``slru``)."""
    key_layer: Optional[int] = None
    """An ASKS key layer of this mode alone (``asks@0.9:L4``); ``None``: the run's ``asks_key_layer``."""
    stop: Optional[str] = None
    """The branch-stop rule (``rksc_sgl.vote``) of the workloads that vote over forks."""
    waves: bool = False
    """With ``stop``: launch the seeded branches in waves (``rksc_sgl.vote_waves``; the
    workload's ``waves_first``/``waves_step``) instead of all at once."""
    kv_method: Optional[str] = None
    """Decode-KV compression of this mode (``radix+rkv@0.25``): the method
    (``CompressionConfig.method``); ``None``: every request keeps its full KV."""
    kv_budget: Optional[float] = None
    """With ``kv_method``: the share of decoded tokens whose KV is kept."""

    @property
    def base_label(self) -> str:
        """The label without compression: the mode a compressed one is compared with."""
        label = self.name if self.tau is None else f"{self.name}@{self.tau:g}"
        return label if self.key_layer is None else f"{label}:L{self.key_layer}"

    @property
    def label(self) -> str:
        if self.kv_method is None:
            return self.base_label
        return f"{self.base_label}+{self.kv_method}@{self.kv_budget:g}"

    def compression_config(self):
        """The mode's ``CompressionConfig`` (``None``: uncompressed); the other settings are
        ``CompressionConfig``'s defaults, on both backends."""
        if self.kv_method is None:
            return None
        from rksc_sgl.rksc.compression_config import CompressionConfig

        return CompressionConfig(method=self.kv_method, budget=self.kv_budget)

    def engine_kwargs(self, settings: "BenchSettings") -> Dict[str, Any]:
        kwargs: Dict[str, Any] = {"cache": self.cache}
        if self.kv_method is not None:
            kwargs["compression"] = {"method": self.kv_method, "budget": self.kv_budget}
        if self.asks:
            kwargs["asks"] = {"enabled": True, "tau": self.tau if self.tau is not None else settings.asks_tau,
                              "recompute_fraction": settings.asks_recompute,
                              "key_layer": self.key_layer if self.key_layer is not None else settings.asks_key_layer}
        if self.rsbcm:
            kwargs["eviction_policy"] = "rsbcm"
        elif self.eviction:
            kwargs["eviction_policy"] = self.eviction
        return kwargs

    def effective_tau(self, settings: "BenchSettings") -> Optional[float]:
        if not self.asks:
            return None
        return self.tau if self.tau is not None else settings.asks_tau


MODES: Dict[str, Mode] = {m.name: m for m in (
    Mode("none", "none", help="no KV reuse between requests"),
    Mode("radix", "radix", help="stock SGLang as a user gets it: exact prefix reuse, LRU eviction"),
    Mode("radix-stock", "radix", help="SGLang's RadixCache class, LRU (the engine's radix; not the runtime's default)"),
    Mode("rksc", RKSC_TREE, asks=True, cgee=True, rsbcm=True, stop="lossless",
         help="every RKSC feature: rksc-tree + ASKS + RSBCM, CGEE gates, lossless branch stop"),
    Mode("asks", RKSC_TREE, asks=True, help="rksc-tree with ASKS semantic KV reuse, LRU eviction"),
    Mode("cgee", "radix", cgee=True, help="stock radix, CGEE gates in the verify step"),
    Mode("rsbcm", RKSC_TREE, rsbcm=True, help="rksc-tree, exact matching, RSBCM eviction"),
    Mode("lfu", "radix", eviction="lfu", help="stock radix with LFU eviction (for pressure)"),
    Mode("slru", "radix", eviction="slru", help="stock radix with SLRU eviction (for pressure)"),
    *(Mode(f"stop-{rule}", "radix", stop=rule, help=f"stock radix, branch stop by the {rule!r} rule (voting workloads)")
      for rule in ("lossless", "beta", "window")),
    *(Mode(f"waves-{rule}", "radix", stop=rule, waves=True,
           help=f"stock radix, seeded branches in waves while the {rule!r} rule leaves the vote open "
                "(vote, serve, load)")
      for rule in ("lossless", "beta", "window")),
    Mode("stop-deepconf", "radix", stop="deepconf",
         help="stock radix, DeepConf online: stops a branch whose confidence falls below a learned threshold "
              "(voting workloads)"),
)}
"""The bench modes by name. Each name means one configuration on both backends
(:func:`mode_table` gives its exact engine keyword arguments and SGLang flags): ``radix`` is
stock SGLang as a user gets it (the engine's ``RadixCache``; the runtime with no cache flag,
SGLang's default ``UnifiedRadixCache``, which matches prefixes the same way), ``rksc`` is every
RKSC feature at once, and the tree alone is the cache mode ``rksc-tree``."""


def parse_compression(spec: str, text: str):
    """``"rkv@0.25"`` (what follows ``+`` in mode ``spec``) -> ``(method, budget)``, checked by
    ``CompressionConfig`` (its methods, budget in (0, 1]); no budget: its default."""
    from rksc_sgl.rksc.compression_config import CompressionConfig

    method, at, budget_text = text.partition("@")
    method = method.strip()
    budget = CompressionConfig.budget
    if at:
        try:
            budget = float(budget_text)
        except ValueError:
            raise ValueError(f"mode {spec!r}: budget {budget_text!r} is not a number") from None
    try:
        config = CompressionConfig(method=method, budget=budget)
    except ValueError as exc:
        raise ValueError(f"mode {spec!r}: {exc} (compression is written MODE+METHOD@BUDGET, "
                         "e.g. radix+rkv@0.25)") from None
    return config.method, config.budget


def parse_modes(text: str) -> List[Mode]:
    """``"none,radix,rksc,asks@0.9,asks@0.9:L4,radix+rkv@0.25"`` -> modes; ``ValueError`` naming
    what is wrong. ``+METHOD@BUDGET`` adds decode-KV compression to a mode."""
    names = [t.strip() for t in str(text).split(",") if t.strip()]
    if not names:
        raise ValueError(f"no modes given; choose from {', '.join(MODES)}")
    modes: List[Mode] = []
    for spec in names:
        base_spec, plus, kv_text = spec.partition("+")
        kv = parse_compression(spec, kv_text) if plus else None
        head, _, layer_text = base_spec.partition(":")
        name, _, tau_text = head.partition("@")
        if name not in MODES:
            raise ValueError(f"unknown mode {name!r}; choose from {', '.join(MODES)} (ASKS modes take "
                             "a threshold as NAME@TAU and a key layer as :L<layer>, e.g. asks@0.9:L4)")
        mode = MODES[name]
        if layer_text:
            if not mode.asks:
                raise ValueError(f"mode {name!r} does not use ASKS, so {spec!r} has no key layer to set")
            if not (layer_text.startswith("L") and layer_text[1:].isdigit()):
                raise ValueError(f"mode {spec!r}: the key layer is written :L<layer>, e.g. :L4")
            mode = dataclasses.replace(mode, key_layer=int(layer_text[1:]))
        if tau_text:
            if not mode.asks:
                raise ValueError(f"mode {name!r} does not use ASKS, so {spec!r} has no tau to set")
            try:
                tau = float(tau_text)
            except ValueError:
                raise ValueError(f"mode {spec!r}: tau {tau_text!r} is not a number") from None
            if not math.isfinite(tau) or tau < -1.0:
                raise ValueError(f"mode {spec!r}: tau must be a finite number >= -1")
            mode = dataclasses.replace(mode, tau=tau)
        if kv is not None:
            mode = dataclasses.replace(mode, kv_method=kv[0], kv_budget=kv[1])
        if any(m.label == mode.label for m in modes):
            raise ValueError(f"mode {mode.label!r} is given twice")
        modes.append(mode)
    return modes


def mode_table(settings: Optional["BenchSettings"] = None) -> List[Dict[str, Any]]:
    """Every bench mode's exact configuration on both backends, for ``rksc-sgl bench --list``
    and the docs: ``mode``, ``summary``, ``engine`` (the ``Engine(...)`` keyword arguments),
    ``sglang_flags`` (what ``--backend runtime`` gives SGLang's ``launch_server``, besides the
    model, port and pool flags every mode gets), ``env`` (the environment it adds),
    ``launch_server`` (the same server from ``rksc-sgl launch-server``) and ``client`` (what the
    program does differently: CGEE's gates in ``verify``, a branch-stop rule in ``vote``).
    ``settings``: the run's ASKS defaults (``BenchSettings()``'s if not given)."""
    import inspect
    import json

    from rksc_sgl.rksc.asks_config import ASKSConfig
    from rksc_sgl.rksc.rsbcm import RSBCMStrategy
    from rksc_sgl.runtime.asks_settings import ENV_VAR, env_value
    from rksc_sgl.runtime.attention_stats import hook_spec
    from rksc_sgl.runtime.bench_servers import RUNTIME_FLAGS
    from rksc_sgl.runtime.launch_plan import ASKS_CHUNKED_PREFILL_SIZE

    settings = settings or BenchSettings()
    stride = inspect.signature(RSBCMStrategy).parameters["attention_layer_stride"].default
    rows = []
    for mode in MODES.values():
        given, launcher_defaults = RUNTIME_FLAGS[mode.name]
        flags, env = list(given), {}
        tree = flags[flags.index("--radix-cache-backend") + 1] if "--radix-cache-backend" in flags else None
        if launcher_defaults and mode.rsbcm:  # the launcher adds RSBCM's attention hook
            flags += ["--forward-hooks", json.dumps([hook_spec(stride)], separators=(",", ":"))]
        if tree == "rksc":  # launch-server's defaults: the rksc tree, RSBCM eviction and its hook
            launch = [f for f in given[2:] if mode.rsbcm is False or f not in ("--radix-eviction-policy", "rsbcm")]
        elif tree is None and "--disable-radix-cache" not in given:
            launch = ["--rksc-tree", "off", *given]  # SGLang's own default cache
        else:
            launch = list(given)
        if mode.asks:
            tau = mode.effective_tau(settings)
            env[ENV_VAR] = env_value(ASKSConfig(enabled=True, tau=tau, recompute_fraction=settings.asks_recompute))
            flags += ["--chunked-prefill-size", str(ASKS_CHUNKED_PREFILL_SIZE)]
            launch += ["--asks-tau", f"{tau:g}", "--asks-recompute", f"{settings.asks_recompute:g}"]
        client = []
        if mode.cgee:
            client.append("CGEE gates in verify (the runtime: gate 1, skip; no layer exit)")
        if mode.stop:
            how = "seeded branches launched in waves (vote_waves)" if getattr(mode, "waves", False) else "vote"
            client.append(f"branch stop by the {mode.stop!r} rule in {how} (voting workloads)")
        rows.append({"mode": mode.name, "summary": mode.help, "engine": mode.engine_kwargs(settings),
                     "sglang_flags": flags, "env": env, "launch_server": launch, "client": client})
    return rows


def format_mode_table(settings: Optional["BenchSettings"] = None) -> str:
    """:func:`mode_table` as text, a block per mode."""
    import shlex

    lines = []
    for row in mode_table(settings):
        engine = ", ".join(f"{k}={v!r}" for k, v in row["engine"].items())
        env = " ".join(f"{k}={shlex.quote(v)}" for k, v in row["env"].items())
        sglang = shlex.join(row["sglang_flags"]) or "(no cache flag: SGLang's default cache)"
        lines += [f"{row['mode']}: {row['summary']}",
                  f"    engine:        Engine({engine})",
                  f"    runtime:       {(env + ' ') if env else ''}python -m sglang.launch_server {sglang}",
                  f"    launch-server: rksc-sgl launch-server {' '.join(row['launch_server'])}".rstrip()]
        if row["client"]:
            lines.append(f"    program:       {'; '.join(row['client'])}")
    return "\n".join(lines)


# ---- settings --------------------------------------------------------------------------------
BACKENDS = ("engine", "runtime")
SERVER_SCHEDULES = ("together", "one-at-a-time")
"""How ``--backend runtime`` runs its servers: all at once, the modes taking turns problem by
problem (the default, as the engines do), or one after another, each serving every problem
before the next starts (for GPUs that cannot hold every mode's server at once)."""
ROUTER_POLICIES = ("cache_aware", "round_robin", "random", "power_of_two")
"""SGLang router policies ``--scale-out workers:N`` can put in front of a mode's workers (the
router's ``manual`` needs a routing-key header that SGLang's ``RuntimeEndpoint`` cannot send)."""


def parse_scale_out(text: str):
    """``"single"`` -> ``("single", 1)``; ``"workers:N"`` / ``"dp:N"`` -> ``(kind, N)``; ``ValueError``
    naming what is wrong. ``workers:N``: N servers of the mode behind SGLang's router; ``dp:N``:
    one server with ``--dp-size N``."""
    text = str(text).strip()
    if text == "single":
        return "single", 1
    kind, sep, count = text.partition(":")
    if kind not in ("workers", "dp") or not sep:
        raise ValueError(f"scale-out must be single, workers:N or dp:N, got {text!r}")
    if not count.isdigit() or int(count) < 1:
        raise ValueError(f"scale-out {text!r}: N must be a positive integer")
    return kind, int(count)


@dataclasses.dataclass
class BenchSettings:
    """Everything a run depends on besides the workload and modes (all recorded in the JSON)."""

    problems: int = 4
    seed: int = 0
    repeats: int = 1
    warmup: int = 1
    model: str = "smollm2-135m"
    threads: int = 1
    device: str = "cpu"
    """Where the engines run (``cpu``, ``cuda``, ``auto``); CPU timings are the protocol's."""
    dtype: str = "auto"
    """The engines' dtype (``auto``: the engine's default, float32 on the CPU and bfloat16 on
    CUDA); ``bfloat16`` on the CPU reproduces a GPU run's rounding where the CPU can."""
    kv_pool_tokens: int = 16384
    max_running_requests: int = 64
    asks_tau: float = 0.95  # the ASKS defaults (ASKSConfig's, chosen from this benchmark;
    asks_recompute: float = 0.5  # a test keeps them equal; literal here, since rksc_cache
    asks_key_layer: int = 0  # imports SGLang)
    audit_fraction: float = 1.0
    bootstrap: int = 2000
    params: Dict[str, Any] = dataclasses.field(default_factory=dict)
    """Overrides of the workload's parameters (``branches``, ``max_tokens``, ...)."""
    backend: str = "engine"
    """``engine``: every mode on an embedded engine in this process; ``runtime``: every mode as
    a real SGLang server (``rksc_sgl.runtime.bench_servers``); either way the modes take turns."""
    server_args: str = ""
    """Further SGLang flags for every mode's server (``--backend runtime``), e.g.
    ``--schedule-policy lpm``."""
    servers: str = "together"
    """``--backend runtime``: one of :data:`SERVER_SCHEDULES`."""
    scale_out: str = "single"
    """``--backend runtime``: each mode as one server (``single``), as N servers behind SGLang's
    router (``workers:N``) or as one server with ``--dp-size N`` (``dp:N``); see
    :func:`parse_scale_out`."""
    router_policy: str = "cache_aware"
    """``scale_out="workers:N"``: the router's policy, one of :data:`ROUTER_POLICIES`."""
    router_args: str = ""
    """``scale_out="workers:N"``: further flags for the router, as one string (e.g.
    ``--cache-threshold 0.8``); checked by the router's own parser before anything starts."""

    def __post_init__(self) -> None:
        for name in ("problems", "repeats", "threads", "kv_pool_tokens", "max_running_requests", "bootstrap"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name.replace('_', '-')} must be a positive integer, got {value!r}")
        if self.backend not in BACKENDS:
            raise ValueError(f"backend must be one of {', '.join(BACKENDS)}, got {self.backend!r}")
        if self.server_args and self.backend != "runtime":
            raise ValueError("server-args are SGLang server flags: they need --backend runtime")
        if self.servers not in SERVER_SCHEDULES:
            raise ValueError(f"servers must be one of {', '.join(SERVER_SCHEDULES)}, got {self.servers!r}")
        if self.servers != "together" and self.backend != "runtime":
            raise ValueError("servers one-at-a-time needs --backend runtime (the engines always take turns)")
        kind, _ = parse_scale_out(self.scale_out)
        if kind != "single" and self.backend != "runtime":
            raise ValueError(f"scale-out {self.scale_out} needs --backend runtime (the engines run in this "
                             "process: there is no server to scale out)")
        if self.router_policy not in ROUTER_POLICIES:
            raise ValueError(f"router-policy must be one of {', '.join(ROUTER_POLICIES)}, got {self.router_policy!r}")
        if self.router_policy != "cache_aware" and kind != "workers":
            raise ValueError("router-policy needs --scale-out workers:N (only then is there a router)")
        if self.router_args and kind != "workers":
            raise ValueError("router-args needs --scale-out workers:N (only then is there a router)")
        if self.dtype != "auto" and self.dtype not in DTYPES:
            raise ValueError(f"dtype must be auto or one of {', '.join(DTYPES)}, got {self.dtype!r}")
        if not isinstance(self.warmup, int) or isinstance(self.warmup, bool) or self.warmup < 0:
            raise ValueError(f"warmup must be an integer >= 0, got {self.warmup!r}")
        if not isinstance(self.seed, int) or isinstance(self.seed, bool):
            raise ValueError(f"seed must be an integer, got {self.seed!r}")
        if not (isinstance(self.asks_tau, (int, float)) and math.isfinite(self.asks_tau) and self.asks_tau >= -1):
            raise ValueError(f"asks-tau must be a finite number >= -1, got {self.asks_tau!r}")
        if not isinstance(self.asks_key_layer, int) or isinstance(self.asks_key_layer, bool) or self.asks_key_layer < 0:
            raise ValueError(f"asks-key-layer must be an integer >= 0, got {self.asks_key_layer!r}")
        if not 0.0 <= self.asks_recompute <= 1.0:
            raise ValueError(f"asks-recompute must be in [0, 1], got {self.asks_recompute!r}")
        if not 0.0 <= self.audit_fraction <= 1.0:
            raise ValueError(f"audit-fraction must be in [0, 1], got {self.audit_fraction!r}")
