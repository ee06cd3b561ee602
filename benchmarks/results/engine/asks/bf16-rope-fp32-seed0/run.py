"""bfloat16 engines whose RoPE runs in float32 (cos/sin and the rotation), rotated copies on:
does phase precision explain why rotated copies flip answers in bfloat16?
Usage: python run.py OUT.json SEED. Result on seed 0: 98/100 (95/100 with bfloat16 RoPE,
99/100 with shifted tokens computed): partly."""
import sys, json, torch
from rksc_sgl import bench, Engine
seed = int(sys.argv[2]); out = sys.argv[1]
settings = bench.BenchSettings(problems=100, seed=seed, dtype="bfloat16")
modes = bench.parse_modes("radix,asks")
def make(mode, shifted):
    kw = {"num_threads": 1, "device": "cpu", "dtype": "bfloat16", "kv_pool_tokens": settings.kv_pool_tokens,
          "max_running_requests": settings.max_running_requests, "seed": settings.seed, **mode.engine_kwargs(settings)}
    if shifted is not None:
        kw["asks"] = {**kw["asks"], "shifted": shifted}
    eng = Engine(model=settings.model, **kw)
    r = eng.runner
    emb, apply = r.rotary_emb, r.apply_rotary
    r.rotary_emb = lambda x, pos: emb(x.float(), pos)
    def apply32(q, k, cos, sin):
        q2, k2 = apply(q.float(), k.float(), cos, sin)
        return q2.to(q.dtype), k2.to(k.dtype)
    r.apply_rotary = apply32
    return eng
engines = {"radix": make(modes[0], None), "asks": make(modes[1], True)}
assert engines["asks"].kv.rotate_keys is not None
try:
    res = bench.run_bench("paraphrase", modes, settings, engines=engines, progress=False)
finally:
    for e in engines.values(): e.shutdown()
print({m: (res["modes"][m]["agreement_with_radix"], res["modes"][m]["semantic_hit_tokens"], res["modes"][m]["prefill_tokens_total"]) for m in res["modes"]})
json.dump(res, open(out, "w"), default=str)
