"""chunked (256x256, 512x256) vs jax.nn xla, one process, interleaved, best of 5.

Usage: PYTHONPATH=. python benchmarks/attention_interleaved.py OUT.json
"""
import sys, time, json, os
import jax
import tfx_jax as tfx
rows = []
for T in (1024, 2048, 4096):
    x = jax.random.normal(jax.random.key(0), (1, T, 8, 64))
    def make(f, pass_):
        if pass_ == "fwd":
            return jax.jit(f).lower(x, x, x).compile()
        def fb(q, k, v):
            out, vjp = jax.vjp(f, q, k, v)
            return vjp(out)
        return jax.jit(fb).lower(x, x, x).compile()
    impls = {
        "chunked_256x256": lambda q, k, v: tfx.dot_product_attention(q, k, v, implementation="chunked", block_q=256, block_kv=256),
        "chunked_512x256": lambda q, k, v: tfx.dot_product_attention(q, k, v, implementation="chunked", block_q=512, block_kv=256),
        "jax_nn_xla": lambda q, k, v: jax.nn.dot_product_attention(q, k, v, implementation="xla"),
    }
    for pass_ in ("fwd", "fwd+bwd"):
        fns = {n: make(f, pass_) for n, f in impls.items()}
        for f in fns.values():
            jax.block_until_ready(f(x, x, x))
        best = {n: 1e9 for n in fns}
        for _ in range(5):
            for n, f in fns.items():
                t0 = time.perf_counter(); jax.block_until_ready(f(x, x, x))
                best[n] = min(best[n], time.perf_counter() - t0)
        row = {"T": T, "pass": pass_, **{n: round(v * 1e3, 1) for n, v in best.items()},
               "load_avg_1min": os.getloadavg()[0]}
        print(json.dumps(row), flush=True)
        rows.append(row)
json.dump(rows, open(sys.argv[1], "w"), indent=1)
