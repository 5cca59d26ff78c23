"""Benchmark suite of efcn_sparse (a package so its conftest and modules never clash with tests/)."""
