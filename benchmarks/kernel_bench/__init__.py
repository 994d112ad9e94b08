"""The kernel benchmark's pieces, one module per kernel family; ``benchmarks.bench_kernels`` runs them."""
