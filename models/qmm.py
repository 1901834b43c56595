"""Whether ONNX Runtime must take its exact uint8 x uint8 path for int8 products on this
CPU, decided as the service decides (`precise_qmm_needed` in src/encoder/runtime.rs): on
x86 CPUs without VNNI the fast uint8 x int8 path sums pairs in int16 that saturate; with
VNNI it is exact, and the precise path takes twice as long. Stdlib only."""

import platform


def precise_qmm_needed(cpuinfo="/proc/cpuinfo"):
    if platform.machine() not in ("x86_64", "AMD64"):
        return False
    try:
        with open(cpuinfo) as f:
            flags = next((line.split(":", 1)[1].split() for line in f
                          if line.startswith("flags")), [])
    except OSError:
        return True  # unknown: exact is the safe choice
    return not ({"avx512_vnni", "avx_vnni"} & set(flags))


def set_precise_qmm(so):
    """Sets `session.x64quantprecision` on onnxruntime SessionOptions `so` as the service does."""
    so.add_session_config_entry("session.x64quantprecision",
                                "1" if precise_qmm_needed() else "0")
