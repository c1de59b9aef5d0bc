import jax, jax.numpy as jnp, re, collections
from model.grouped_matmul import gmm
from model.linear import QuantizedWeight
e, k, n, rows = 256, 7168, 2048, 64
x = jax.ShapeDtypeStruct((rows, k), jnp.bfloat16)
sizes = jax.ShapeDtypeStruct((e,), jnp.int32)
w = QuantizedWeight(jax.ShapeDtypeStruct((e, k, n), jnp.float8_e4m3fn), jax.ShapeDtypeStruct((e, k // 128, n // 128), jnp.float32))
c = jax.jit(lambda x, s, w: gmm(x, w, s, impl="scan", recipe="fp8")).lower(x, sizes, w).compile()
m = c.memory_analysis(); print("temp", m.temp_size_in_bytes / 1e9)
txt = c.as_text()
big = collections.Counter()
for line in txt.split("\n"):
    for dt, shp in re.findall(r"(f32|bf16|f8e4m3fn|s32)\[([\d,]+)\]", line.split("=")[1] if "=" in line else ""):
        size = 1
        for d in shp.split(","): size *= int(d)
        nbytes = size * {"f32": 4, "bf16": 2, "f8e4m3fn": 1, "s32": 4}[dt]
        if nbytes > 1e8:
            big[(dt, shp, line.strip()[:160])] += 1
        break
for (dt, shp, l), cnt in big.most_common(30): print(dt, shp, cnt, "|", l)
