"""Run a Hugging Face decoder over KV stored in SGLang's token pool.

One forward handles a ragged batch: every item brings new tokens for one request row
(a prefill of a whole prompt, the suffix after a cached prefix, or one decode token).
Linear layers run over all new tokens of the batch at once; attention runs per item
over the keys gathered from the pool through that request's row of ``ReqToTokenPool``.
Branches of a fork therefore read the very same prefix slots: nothing is copied.

On the CPU, attention is torch's SDPA per item plus a cascade decode for branches that
share a prefix. On CUDA, ``attention_backend="flashinfer"`` runs FlashInfer's paged
kernels over the same pool (``paged_attention``); the bookkeeping (rows, slots, the
tree) stays on the host either way, and the runner hands back logits on the CPU.

The layer code reuses the model's own modules (projections, norms, MLP, rotary
embedding) so the arithmetic is the one ``transformers`` does; only the KV storage and
the attention call differ. Supported layouts: Llama-style decoders (``llama``,
``mistral``, ``qwen2``, and ``qwen3`` with its q/k norms).
"""

from __future__ import annotations

import dataclasses
import sys
from typing import Callable, List, Optional

import torch
import torch.nn.functional as F

from rksc_sgl.kv.records import KVLayout
from rksc_sgl.model.attention import FlashInferAttention, cascade_layout
from rksc_sgl.model.attention_plan import AttentionPlan, plan_attention
from rksc_sgl.model.rope import KeyRotation



@dataclasses.dataclass(frozen=True)
class AttentionStats:
    """Collect decode attention mass per KV slot (RSBCM eviction, decode-KV compression).

    On every ``layer_stride``-th layer (0, k, 2k, ...) each decode query's attention weights
    over its keys, averaged over heads and divided by the number of sampled layers, are
    added to ``mass[slot]``: one decode token adds a total mass of 1. The weights are
    computed beside the attention output, which is unchanged. ``active`` (optional, asked
    once per forward) says whether this forward collects at all (RSBCM's
    ``collect_above_usage``: only near a full pool).
    """

    mass: torch.Tensor
    layer_stride: int = 1
    active: Optional[Callable[[], bool]] = None

    def __post_init__(self):
        object.__setattr__(self, "layer_stride", max(1, int(self.layer_stride)))


@dataclasses.dataclass(frozen=True)
class FeatureCapture:
    """ASKS keys above layer 0: every forward stores each new token's hidden state at
    ``layer`` (the input of block ``layer``; 0 = embeddings) in ``table[slot]``, beside its KV."""

    table: torch.Tensor
    layer: int


@dataclasses.dataclass
class ForwardItem:
    """New tokens of one request, to be appended after ``start`` cached tokens.

    ``slots`` is the request's full row (cached prefix + slots for the new tokens), as
    pool indices. ``logit_positions`` are indices into the new tokens whose next-token
    logits the caller wants (default: only the last one).

    ``token_positions`` (ASKS): the row positions of the new tokens when they are not one
    contiguous run (a semantic alias fills the gaps with donor KV); ``start`` is then the
    first of them and ``slots`` the row up to the last one. Each new token attends to the
    row's keys at positions up to its own.
    """

    token_ids: List[int]
    start: int
    slots: torch.Tensor
    logit_positions: Optional[List[int]] = None
    token_positions: Optional[List[int]] = None
    rope_offset: int = 0  # compressed rows: tokens dropped before these, so RoPE position = row position + this

    def __post_init__(self):
        if self.token_positions is None:
            assert len(self.slots) == self.start + len(self.token_ids)
        else:
            assert len(self.token_positions) == len(self.token_ids) and self.token_positions[0] == self.start
            assert len(self.slots) == self.token_positions[-1] + 1

    def new_positions(self) -> torch.Tensor:
        if self.token_positions is None:
            return torch.arange(self.start, self.start + len(self.token_ids))
        return torch.tensor(self.token_positions, dtype=torch.int64)

    def new_slots(self) -> torch.Tensor:
        if self.token_positions is None:
            return self.slots[self.start :]
        return self.slots[self.new_positions()]


class ModelRunner:
    """Owns the model weights and computes logits for ragged batches of new tokens."""

    def __init__(self, model, kv_pool, shared_prefix_min_tokens: int = 64, attention_backend: str = "torch",
                 attention_stats: Optional["AttentionStats"] = None, feature_capture: Optional["FeatureCapture"] = None):
        self.model = model
        self.device = next(model.parameters()).device
        self.shared_prefix_min_tokens = shared_prefix_min_tokens
        self.kv_pool = kv_pool
        self.config = model.config
        backbone = model.model
        self.embed_tokens = backbone.embed_tokens
        self.layers = backbone.layers
        self.norm = backbone.norm
        self.rotary_emb = backbone.rotary_emb
        self.lm_head = model.lm_head
        modeling = sys.modules[type(self.layers[0].self_attn).__module__]
        self.apply_rotary = modeling.apply_rotary_pos_emb
        self.rotate_keys = KeyRotation(model)  # (keys, delta) -> keys moved delta positions (ASKS, joins)
        attn = self.layers[0].self_attn
        self.head_dim = attn.head_dim
        self.num_heads = self.config.num_attention_heads
        self.num_kv_heads = self.config.num_key_value_heads
        self.scaling = attn.scaling
        self.has_qk_norm = hasattr(attn, "q_norm")
        self.flashinfer: Optional[FlashInferAttention] = None
        if attention_backend == "flashinfer":
            self.flashinfer = FlashInferAttention(self.num_heads, self.num_kv_heads, self.head_dim, self.scaling,
                                                  kv_pool.dtype, self.device)
        # ASKS slot features (FeatureCapture): each new token's hidden state at one layer.
        self.slot_features = feature_capture.table if feature_capture is not None else None
        self.feature_layer = feature_capture.layer if feature_capture is not None else 0
        # RSBCM / compression attention statistics (AttentionStats): decode attention mass per slot.
        self.slot_attention = attention_stats.mass if attention_stats is not None else None
        self.attention_layer_stride = attention_stats.layer_stride if attention_stats is not None else 1
        self._attention_active = attention_stats.active if attention_stats is not None else None
        self._layer_mass = 1.0 / len(range(0, len(self.layers), self.attention_layer_stride))

    @staticmethod
    def layout_of(model) -> KVLayout:
        config = model.config
        attn = model.model.layers[0].self_attn
        return KVLayout(
            num_layers=config.num_hidden_layers,
            num_kv_heads=config.num_key_value_heads,
            head_dim=attn.head_dim,
            dtype=next(model.parameters()).dtype,
        )

    @torch.inference_mode()
    def forward(self, items: List[ForwardItem]) -> List[torch.Tensor]:
        """Write the new tokens' KV into the pool; return, per item, logits (n_pos, vocab)."""
        hidden = self._run(items, len(self.layers))
        hidden = self.norm(hidden)[0]
        return self._logits(hidden, items)

    @torch.inference_mode()
    def hidden_at(self, items: List[ForwardItem], layer: int) -> torch.Tensor:
        """Hidden states (T, hidden) of the new tokens at ``layer``: only the first ``layer``
        blocks run (their KV is written to the items' slots like any forward)."""
        return self._run(items, layer)[0]

    def start(self, items: List[ForwardItem]) -> "LayerPass":
        """A forward over ``items`` that runs one block at a time (:class:`LayerPass`): what
        :meth:`forward` and :meth:`hidden_at` run to their end, and what the verifier's
        layer-by-layer exit stops early."""
        return LayerPass(self, items)

    def _run(self, items: List[ForwardItem], stop: int) -> torch.Tensor:
        layer_pass = self.start(items)
        while layer_pass.layers_run < stop:
            layer_pass.run_block()
        return layer_pass.hidden

    @property
    def can_rotate_keys(self) -> bool:
        """Whether ``rotate_keys`` works for this model's rotary embedding."""
        return self.rotate_keys.supported

    def prepare(self, items: List[ForwardItem]) -> "AttentionPlan":
        """The attention plan of one forward over ``items`` (and FlashInfer's page tables)."""
        plan = plan_attention(items, self.shared_prefix_min_tokens, device=self.device)
        if self.flashinfer is not None:
            self.flashinfer.plan(cascade_layout(items, plan))
        return plan

    def collects(self) -> bool:
        """Whether a forward starting now adds attention statistics."""
        return self.slot_attention is not None and (self._attention_active is None or self._attention_active())

    def _layer(self, layer_id, layer, hidden, cos, sin, plan, new_slots, collect: bool = True):
        residual = hidden
        x = layer.input_layernorm(hidden)
        hidden = residual + self._attention(layer_id, layer.self_attn, x, cos, sin, plan, new_slots, collect)
        residual = hidden
        return residual + layer.mlp(layer.post_attention_layernorm(hidden))

    def _attention(self, layer_id, attn, x, cos, sin, plan, new_slots, collect_pass: bool = True):
        total = x.shape[1]
        q = attn.q_proj(x).view(1, total, -1, self.head_dim)
        k = attn.k_proj(x).view(1, total, -1, self.head_dim)
        v = attn.v_proj(x).view(1, total, -1, self.head_dim)
        if self.has_qk_norm:
            q, k = attn.q_norm(q), attn.k_norm(k)
        q, k = self.apply_rotary(q.transpose(1, 2), k.transpose(1, 2), cos, sin)
        # Pool layout is (slot, kv_head, head_dim).
        k_buf = self.kv_pool.get_key_buffer(layer_id)
        v_buf = self.kv_pool.get_value_buffer(layer_id)
        k_buf[new_slots] = k[0].transpose(0, 1).to(k_buf.dtype)
        v_buf[new_slots] = v[0].to(v_buf.dtype)
        collect = collect_pass and self.slot_attention is not None and layer_id % self.attention_layer_stride == 0
        if self.flashinfer is not None and not collect:  # sampled RSBCM layers need the weights: torch
            out = self._flashinfer_attention(q, k_buf, v_buf)
        else:
            out = self._torch_attention(q, k_buf, v_buf, plan, collect)
        return attn.o_proj(out.transpose(1, 2).reshape(1, total, -1).to(x.dtype))

    def _flashinfer_attention(self, q, k_buf, v_buf):
        out = self.flashinfer.run(q[0].transpose(0, 1), k_buf, v_buf).transpose(0, 1)[None].to(q.dtype)
        for offset, item, index in self.flashinfer.layout.torch_items:  # ASKS: scattered positions
            self._attend_item(q, k_buf, v_buf, out, offset, item, index)
        return out

    def _torch_attention(self, q, k_buf, v_buf, plan, collect):
        out = torch.empty_like(q)  # (1, heads, T, head_dim)
        for offset, item, index in plan.singles:
            keys = self._attend_item(q, k_buf, v_buf, out, offset, item, index)
            if collect and len(item.token_ids) == 1 and item.token_positions is None:
                self._collect_decode(q[0, :, offset], keys[0], item.slots)
        for group in plan.groups:
            out[0, :, group.offsets] = self._shared_prefix_decode(q[0, :, group.offsets], k_buf, v_buf, group,
                                                                  collect=collect)
        return out

    def _attend_item(self, q, k_buf, v_buf, out, offset, item, index):
        """SDPA of one item's queries over its row's keys, written into ``out``; the keys."""
        n = len(item.token_ids)
        keys = k_buf[index].transpose(0, 1)[None].to(q.dtype)
        values = v_buf[index].transpose(0, 1)[None].to(q.dtype)
        out[:, :, offset : offset + n] = self._sdpa(q[:, :, offset : offset + n], keys, values, item.start,
                                                    item.token_positions)
        return keys

    def _collect_decode(self, q, keys, slots):
        """RSBCM: add one decode query's attention weights to its keys' slots.

        ``q`` is (heads, head_dim), ``keys`` (kv_heads, L, head_dim), ``slots`` the L slots.
        An explicit softmax(q k^T), computed only on sampled layers, beside SDPA.
        """
        q = q.reshape(self.num_kv_heads, -1, self.head_dim)  # query head h reads kv head h // group
        scores = torch.einsum("kgd,kld->kgl", q, keys).float() * self.scaling
        weights = torch.softmax(scores, dim=-1).mean(dim=(0, 1))
        self.slot_attention.index_add_(0, slots.to(self.slot_attention.device, torch.int64),
                                       weights * self._layer_mass)

    def _shared_prefix_decode(self, q, k_buf, v_buf, group, collect: bool = False):
        """Decode attention for m branches that share a prefix, reading the prefix once.

        The scores over the shared prefix come from one matmul for all m queries; each
        branch's own suffix is scored separately; one softmax spans both (cascade
        attention, as FlashInfer does on GPUs). ``q`` is (heads, m, head_dim).
        """
        kv_heads, dim = self.num_kv_heads, self.head_dim
        m = q.shape[1]
        q = q.reshape(kv_heads, -1, m, dim)  # query head h reads kv head h // group size
        k_pre = k_buf[group.prefix_index].to(q.dtype)  # (P, kv_heads, dim)
        v_pre = v_buf[group.prefix_index].to(q.dtype)
        k_suf = k_buf[group.suffix_slots].to(q.dtype)  # (m, S, kv_heads, dim)
        v_suf = v_buf[group.suffix_slots].to(q.dtype)
        s_pre = torch.einsum("kgmd,pkd->kgmp", q, k_pre) * self.scaling
        s_suf = torch.einsum("kgmd,mskd->kgms", q, k_suf) * self.scaling
        s_suf = s_suf.masked_fill(~group.suffix_mask, float("-inf"))
        peak = torch.maximum(s_pre.amax(-1, keepdim=True), s_suf.amax(-1, keepdim=True))
        e_pre, e_suf = torch.exp(s_pre - peak), torch.exp(s_suf - peak)
        weighted = torch.einsum("kgmp,pkd->kgmd", e_pre, v_pre) + torch.einsum("kgms,mskd->kgmd", e_suf, v_suf)
        denom = e_pre.sum(-1, keepdim=True) + e_suf.sum(-1, keepdim=True)
        out = weighted / denom
        if collect:  # RSBCM: the softmax weights are e / denom, already at hand
            w_pre = (e_pre / denom).float().mean(dim=(0, 1)).sum(0) * self._layer_mass  # (P,)
            w_suf = (e_suf / denom).float().mean(dim=(0, 1)) * self._layer_mass  # (m, S), padding 0
            if isinstance(group.prefix_index, slice):
                self.slot_attention[group.prefix_index] += w_pre
            else:
                self.slot_attention.index_add_(0, group.prefix_index.to(torch.int64), w_pre)
            self.slot_attention.index_add_(0, group.suffix_slots.reshape(-1), w_suf.reshape(-1))
        return out.reshape(-1, m, dim)

    def _sdpa(self, q, keys, values, start, token_positions=None):
        """Causal attention of ``n`` new queries over ``start + n`` keys (or, with
        ``token_positions``, of queries at those row positions over the row's keys)."""
        n = q.shape[2]
        if token_positions is not None:
            total = keys.shape[2]
            mask = torch.arange(total, device=q.device)[None, :] <= torch.tensor(token_positions, device=q.device)[:, None]
            return F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, scale=self.scaling, enable_gqa=True)
        if n == 1:
            return F.scaled_dot_product_attention(q, keys, values, scale=self.scaling, enable_gqa=True)
        if start == 0:
            return F.scaled_dot_product_attention(q, keys, values, is_causal=True, scale=self.scaling, enable_gqa=True)
        total = keys.shape[2]
        mask = torch.arange(total, device=q.device)[None, :] <= (start + torch.arange(n, device=q.device))[:, None]
        return F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, scale=self.scaling, enable_gqa=True)

    def _logits(self, hidden, items):
        picks, counts, offset = [], [], 0
        for it in items:
            n = len(it.token_ids)
            pos = it.logit_positions if it.logit_positions is not None else [n - 1]
            picks.extend(offset + p for p in pos)
            counts.append(len(pos))
            offset += n
        if not picks:
            return [hidden.new_zeros((0, self.lm_head.out_features)) for _ in items]
        logits = self.lm_head(hidden[torch.tensor(picks, device=hidden.device)]).float().cpu()
        return list(torch.split(logits, counts))


class LayerPass:
    """One forward of a ragged batch, a decoder block at a time.

    Each block writes the new tokens' KV into the pool, as :meth:`ModelRunner.forward` does
    (which is this pass run to the end). ``keep`` drops items between blocks: the verifier's
    layer exit stops items whose verdict is settled and runs the rest further. ``hidden``
    is (1, new tokens of the kept items, hidden size); ``last_rows`` indexes each kept
    item's last token in it.
    """

    def __init__(self, runner: ModelRunner, items: List[ForwardItem]):
        self.runner = runner
        dev = runner.device
        ids = torch.tensor([t for it in items for t in it.token_ids], dtype=torch.long, device=dev)
        positions = torch.cat([it.new_positions() + it.rope_offset for it in items]).to(dev)
        self.hidden = runner.embed_tokens(ids)[None]  # (1, T, H): the model's own batch layout
        self.cos, self.sin = runner.rotary_emb(self.hidden, positions[None])
        self.layers_run = 0
        self.collect = runner.collects()  # decided once for the whole pass
        self._use(items)

    def _use(self, items: List[ForwardItem]) -> None:
        self.items = items
        self.new_slots = torch.cat([it.new_slots() for it in items]).to(self.runner.device)
        self.plan = self.runner.prepare(items)
        self._lengths = torch.tensor([len(it.token_ids) for it in items])
        self._ends = torch.cumsum(self._lengths, 0)
        self.last_rows = self._ends - 1  # ragged, no padding

    def run_block(self) -> torch.Tensor:
        """Run the next block; the hidden states after it."""
        runner, layer_id = self.runner, self.layers_run
        features = runner.slot_features
        if features is not None and layer_id == runner.feature_layer:
            features[self.new_slots] = self.hidden[0].float()
        self.hidden = runner._layer(layer_id, runner.layers[layer_id], self.hidden, self.cos, self.sin, self.plan,
                                    self.new_slots, self.collect)
        self.layers_run += 1
        if features is not None and runner.feature_layer == self.layers_run == len(runner.layers):
            features[self.new_slots] = self.hidden[0].float()
        return self.hidden

    def keep(self, indices: List[int]) -> None:
        """Go on with the items at ``indices`` (positions in :attr:`items`) only."""
        starts = self._ends - self._lengths
        rows = torch.cat([torch.arange(int(starts[j]), int(self._ends[j])) for j in indices])
        self.hidden = self.hidden[:, rows]
        self.cos, self.sin = self.cos[:, rows], self.sin[:, rows]
        self._use([self.items[j] for j in indices])
