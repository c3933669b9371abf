"""Side-by-side speed comparisons of loomx and PyTorch eager (``python -m benchmarks``).

Modules: ``runner`` (command line, one process per thread count), ``worker`` (times the cases
at one thread count), ``workloads`` (the cases), ``loomx_side`` / ``torch_side`` /
``plain`` (the three implementations), ``timing``, ``machine`` and ``report``. See
README.md.
"""
