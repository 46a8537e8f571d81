"""stgcn_jax: STGCN++ skeleton-based action recognition in JAX/Flax, exact to mmaction2 / pyskl."""

__version__ = '0.1.0'
