"""How the suite compiles: cheap code for its many small programs, XLA's defaults where a test needs users' code
(no jax import here: tests/conftest.py sets XLA_FLAGS from this before jax is imported)."""

# Cheap code generation: the suite spends most of its time compiling small programs. LLVM's optimisation off
# (xla_backend_optimization_level=0), XLA:CPU's legacy elemental emitter instead of its MLIR fusion emitters, and one
# LLVM module per program instead of parallel splits: together they cut the backend's compile time by about 40%
# (tests/decoding/test_engine.py: 27.7 -> 16.2 s); pytest on a fresh clone went from 11.2 to 7.4-8.3 minutes. The
# maths is the same; the legacy emitter fuses less (reductions stay their own kernels: 154 loop fusions instead of
# 191 in a tiny target's forward), and the machine code is slower and sums in a different order. So the float32
# oracle tests compile as users do (USER_CODEGEN, XLA's defaults), and no test reads a compiled program's HLO or
# memory in this process (the full-size dry runs compile in their own, as users run them).
XLA_FLAGS = (
    "--xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0"
    " --xla_cpu_use_fusion_emitters=false --xla_cpu_parallel_codegen_split_count=1"
)
USER_CODEGEN = {
    "xla_backend_optimization_level": 3,
    "xla_cpu_use_fusion_emitters": True,
    "xla_cpu_parallel_codegen_split_count": 32,
}
