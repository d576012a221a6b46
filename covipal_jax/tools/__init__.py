"""Tools around the library: benchmarks, ahead-of-time TPU compilation, visualization."""
