"""The decode step's C kernels: sources per instruction set under arch/, built for this CPU by gemv."""
