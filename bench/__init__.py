"""jobspine benchmarks: reproducible scripts that print tables and write JSON."""
