"""How computed_seed*/ were made: ASKS in bfloat16 with shifted donor tokens computed.

Run before ``ASKSConfig.shifted`` existed, so the engine's ``kv.rotate_keys`` is cleared by
hand; that is what ``shifted=None`` (the default) now does for a bfloat16 pool.
Usage: python computed_shifted_run.py RECOMPUTE OUT.json [SEED]
"""
import sys, json
from rksc_sgl import bench, Engine
rc = float(sys.argv[1]); out = sys.argv[2]; seed = int(sys.argv[3]) if len(sys.argv) > 3 else 0
settings = bench.BenchSettings(problems=100, seed=seed, dtype="bfloat16", asks_recompute=rc)
modes = bench.parse_modes("radix,asks")
asks_mode = modes[1]
kw = {"num_threads": 1, "device": "cpu", "dtype": "bfloat16", "kv_pool_tokens": settings.kv_pool_tokens,
      "max_running_requests": settings.max_running_requests, "seed": settings.seed, **asks_mode.engine_kwargs(settings)}
eng = Engine(model=settings.model, **kw)
eng.kv.rotate_keys = None
try:
    r = bench.run_bench("paraphrase", modes, settings, engines={"asks": eng}, progress=False)
finally:
    eng.shutdown()
print({m: (r["modes"][m]["agreement_with_radix"], r["modes"][m]["semantic_hit_tokens"], r["modes"][m]["prefill_tokens_total"]) for m in r["modes"]})
json.dump(r, open(out, "w"), default=str)
